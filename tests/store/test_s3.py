"""S3 sync against a local S3-compatible server (moto), reached only through AWS_ENDPOINT_URL."""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from lmserve.errors import ModelNotFoundError
from lmserve.store import resolve_model
from lmserve.store.s3 import SIDECAR, sync_s3_prefix
from tests.conftest import share_cache_parts


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Dummy credentials and the test endpoint, with nothing read from the user's AWS config; a
    cache of the test's own, sharing the compiled kernels (a server started here compiled them again,
    ~50 s) and fetched models."""
    from lmserve.cache import cache_root

    share_cache_parts(cache_root(), tmp_path / "cache")
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a fresh session sees this environment
    return s3_endpoint


@pytest.fixture
def bucket(aws_env: str) -> str:
    name = f"models-{uuid.uuid4().hex[:12]}"
    admin().create_bucket(Bucket=name)
    return name


@pytest.fixture
def gets(aws_env: str) -> list[str]:
    """Keys of every GetObject request lmserve's client sends, counted by botocore itself."""
    keys: list[str] = []
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register(  # type: ignore[union-attr]
        "before-parameter-build.s3.GetObject", lambda params, **_: keys.append(params["Key"])
    )
    return keys


def admin() -> Any:
    """The test's own client for the local server (explicit endpoint, independent of lmserve's)."""
    return boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def put(bucket: str, key: str, data: bytes) -> None:
    admin().put_object(Bucket=bucket, Key=key, Body=data)


MODEL_FILES = {
    "llama/config.json": b'{"model_type": "llama"}',
    "llama/model.safetensors": b"\0" * 4096,
    "llama/tokenizer/tokenizer.json": b"{}",
    "llama-other/config.json": b"not under the prefix llama/",
}


def test_sync_downloads_every_object_under_the_prefix(bucket: str, gets: list[str], tmp_path: Path) -> None:
    for key, data in MODEL_FILES.items():
        put(bucket, key, data)

    result = sync_s3_prefix(f"s3://{bucket}/llama", progress=False)

    assert result.path == tmp_path / "cache" / "s3" / bucket / "llama"
    assert sorted(result.downloaded) == ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    assert (result.path / "model.safetensors").read_bytes() == b"\0" * 4096
    assert (result.path / "tokenizer" / "tokenizer.json").read_bytes() == b"{}"
    assert sorted(gets) == sorted(k for k in MODEL_FILES if k.startswith("llama/"))


def test_second_sync_downloads_nothing(bucket: str, gets: list[str]) -> None:
    for key, data in MODEL_FILES.items():
        put(bucket, key, data)
    sync_s3_prefix(f"s3://{bucket}/llama/", progress=False)
    gets.clear()

    again = sync_s3_prefix(f"s3://{bucket}/llama/", progress=False)

    assert gets == []
    assert again.downloaded == []
    assert len(again.up_to_date) == 3


def test_changed_object_is_downloaded_again(bucket: str, gets: list[str]) -> None:
    for key, data in MODEL_FILES.items():
        put(bucket, key, data)
    sync_s3_prefix(f"s3://{bucket}/llama", progress=False)
    put(bucket, "llama/config.json", b'{"model_type": "mistral"}')
    gets.clear()

    result = sync_s3_prefix(f"s3://{bucket}/llama", progress=False)

    assert gets == ["llama/config.json"]
    assert (result.path / "config.json").read_bytes() == b'{"model_type": "mistral"}'


def test_deleted_object_is_removed_and_damaged_file_refetched(bucket: str) -> None:
    for key, data in MODEL_FILES.items():
        put(bucket, key, data)
    first = sync_s3_prefix(f"s3://{bucket}/llama", progress=False)
    admin().delete_object(Bucket=bucket, Key="llama/tokenizer/tokenizer.json")
    (first.path / "model.safetensors").write_bytes(b"truncated")

    second = sync_s3_prefix(f"s3://{bucket}/llama", progress=False)

    assert second.downloaded == ["model.safetensors"]
    assert (second.path / "model.safetensors").read_bytes() == b"\0" * 4096
    assert not (second.path / "tokenizer" / "tokenizer.json").exists()
    assert (second.path / SIDECAR).is_file()


def test_endpoint_from_aws_endpoint_url_s3(
    aws_env: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(bucket, "m/config.json", b"{}")
    # The S3-specific variable wins over the general one, which here points nowhere.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", aws_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")

    assert resolve_model(f"s3://{bucket}/m", progress=False).kind == "s3"


def test_missing_bucket_error_names_the_uri(aws_env: str) -> None:
    with pytest.raises(ModelNotFoundError, match=r"s3://no-such-bucket-here/llama.*bucket does not exist"):
        resolve_model("s3://no-such-bucket-here/llama", progress=False)


def test_empty_prefix_error_names_the_uri(bucket: str) -> None:
    put(bucket, "llama/config.json", b"{}")

    with pytest.raises(ModelNotFoundError, match=rf"no objects under s3://{bucket}/mistral"):
        resolve_model(f"s3://{bucket}/mistral", progress=False)


def test_missing_credentials_error_names_the_uri(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    with pytest.raises(ModelNotFoundError, match=rf"s3://{bucket}/llama: no usable AWS credentials"):
        resolve_model(f"s3://{bucket}/llama", progress=False)


def test_seed_tarball_naming_an_s3url_resolves_to_the_synced_weights(bucket: str, tmp_path: Path) -> None:
    """The seed's flow: `tar czvf mymodel.tar.gz mymodel/` of a lone serving.properties naming S3."""
    for key, data in MODEL_FILES.items():
        put(bucket, key, data)
    properties = f"engine=Python\noption.s3url=s3://{bucket}/llama\noption.tensor_parallel_degree=1\n"
    archive = tmp_path / "mymodel.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("mymodel/serving.properties")
        info.size = len(properties)
        tf.addfile(_dir("mymodel"))
        tf.addfile(info, io.BytesIO(properties.encode()))

    model = resolve_model(str(archive), progress=False)

    assert model.kind == "s3"
    assert model.source == f"s3://{bucket}/llama"
    assert (model.path / "config.json").read_bytes() == b'{"model_type": "llama"}'
    assert model.properties is not None
    assert model.properties.read_text() == properties
    assert model.properties.parent.name == "mymodel"


def test_serving_properties_naming_its_own_prefix_is_not_a_cycle(bucket: str) -> None:
    put(bucket, "self/config.json", b"{}")
    put(bucket, "self/serving.properties", f"option.s3url=s3://{bucket}/self/\n".encode())

    model = resolve_model(f"s3://{bucket}/self", progress=False)

    assert model.kind == "s3"
    assert model.properties == model.path / "serving.properties"


def test_s3_tarball_is_downloaded_and_extracted(bucket: str, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        info = tarfile.TarInfo("packed/config.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    put(bucket, "archives/packed.tar.gz", buffer.getvalue())

    model = resolve_model(f"s3://{bucket}/archives/packed.tar.gz", progress=False)

    assert model.kind == "archive"
    assert model.path.name == "packed"
    assert (model.path / "config.json").read_bytes() == b"{}"


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info
