"""The seed's journey from Python: package -> upload to a loopback S3 server -> deploy -> predict ->
stream -> delete, with the SDK and the CLI; then the ways it can go wrong."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmserve.cli import main
from lmserve.sdk import DeployError, Model, Predictor, S3Downloader, S3Uploader, list_endpoints, package
from lmserve.sdk.endpoints import free_port, port_in_use, process_alive
from tests.ready import wait_until_ready
from tests.store.test_s3 import admin, aws_env, s3_endpoint  # noqa: F401 - fixtures used by name

BODY = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.tiny_models import make_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(path, "llama", tokenizer_dir)
    (path / "serving.properties").write_text("engine=Python\noption.dtype=fp32\noption.max_rolling_batch_size=4\n")
    return path


@pytest.fixture
def bucket(aws_env: str) -> str:  # noqa: F811
    admin().create_bucket(Bucket="journey")
    return "journey"


def descendants(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found if process_alive(int(p))]


@pytest.mark.slow
def test_package_upload_deploy_predict_stream_delete(llama_dir: Path, bucket: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    archive = tmp_path / "mymodel.tar.gz"
    assert main(["package", str(llama_dir), "-o", str(archive)]) == 0
    with tarfile.open(archive) as tar:
        assert {"serving.properties", "config.json", "tokenizer.json"} <= set(tar.getnames())  # at the root
    assert main(["upload", str(archive), f"s3://{bucket}/models/"]) == 0
    uri = capsys.readouterr().out.strip().splitlines()[-1]
    assert uri == f"s3://{bucket}/models/mymodel.tar.gz"
    assert S3Downloader.download(uri, tmp_path / "back", progress=False)[0].read_bytes() == archive.read_bytes()

    predictor = Model(model_data=uri, role="arn:aws:iam::000000000000:role/ignored").deploy(endpoint_name="journey")
    record = predictor.record
    assert record is not None and port_in_use(record.port)
    try:
        assert [r.name for r in list_endpoints()] == ["journey"]
        answer = predictor.predict(BODY)
        assert isinstance(answer["generated_text"], str) and answer["generated_text"]
        assert "".join(predictor.predict_stream(BODY)) == answer["generated_text"]
        assert Predictor("journey").predict(BODY) == answer  # attached by name from another object
        assert main(["predict", "journey", json.dumps(BODY)]) == 0
        assert json.loads(capsys.readouterr().out) == answer
        assert main(["endpoints", "--json"]) == 0
        assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["journey"]
        processes = descendants(record.pid)
        assert len(processes) >= 2  # the server and its engine
    finally:
        predictor.delete_endpoint()
    assert not any(process_alive(pid) for pid in processes)
    assert not port_in_use(record.port)
    assert list_endpoints() == []


@pytest.mark.slow
def test_a_broken_model_raises_the_servers_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A generated key may start with "-": the server must still take it as the key, not as a flag.
    monkeypatch.setattr("lmserve.sdk.model.secrets.token_urlsafe", lambda n: "-starts-with-a-dash")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nope"}))
    started = time.monotonic()
    with pytest.raises(DeployError) as failure:
        Model(model_data=str(broken)).deploy(endpoint_name="broken", container_startup_health_check_timeout=120)
    assert "NoSuchForCausalLM" in str(failure.value) or "tokenizer" in str(failure.value), str(failure.value)
    assert time.monotonic() - started < 120
    assert list_endpoints() == []


@pytest.mark.slow
def test_predictor_attaches_to_a_server_it_did_not_start(llama_dir: Path) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmserve.cli", "serve", str(llama_dir), "--port", str(port),
                               "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, server, 180)
        predictor = Predictor(url)
        assert predictor.predict(BODY)["generated_text"]
        assert "".join(predictor.predict_stream(BODY)) == predictor.predict(BODY)["generated_text"]
        with pytest.raises(Exception, match="not started by the SDK"):
            predictor.delete_endpoint()
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.slow
@pytest.mark.default_model
def test_the_default_model_deploys_and_answers(default_model_dir: Path) -> None:
    predictor = Model().deploy()
    try:
        answer = predictor.predict({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}})
        assert "Paris" in answer["generated_text"]
    finally:
        predictor.delete_endpoint()


def test_package_refuses_a_bad_key_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "serving.properties").write_text("engine=Python\noption.max_rolling_batch_prefill_tokes=512\n")
    assert main(["package", str(model), "-o", str(tmp_path / "m.tar.gz")]) == 2
    err = capsys.readouterr().err
    assert "option.max_rolling_batch_prefill_tokes" in err and "Traceback" not in err
    assert not (tmp_path / "m.tar.gz").exists()


def test_package_refuses_a_model_py_that_does_not_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.py").write_text("import no_such_module_anywhere\n\ndef handle(inputs):\n    return None\n")
    assert main(["package", str(model), "-o", str(tmp_path / "m.tar.gz")]) == 2
    assert "no_such_module_anywhere" in capsys.readouterr().err
    (model / "model.py").write_text("def handle(inputs):\n    return None\n")
    assert package(model, tmp_path / "m.tar.gz", progress=False).is_file()


def test_upload_of_a_directory_keeps_its_layout(aws_env: str, tmp_path: Path) -> None:  # noqa: F811
    admin().create_bucket(Bucket="dirs")
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "sub" / "b.txt").write_text("b")
    assert S3Uploader.upload(source, "s3://dirs/prefix", progress=False) == "s3://dirs/prefix"
    written = S3Downloader.download("s3://dirs/prefix", tmp_path / "out", progress=False)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == ["a.txt", "sub/b.txt"]


def test_cli_errors_are_one_line_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["delete", "no-such-endpoint"]) == 2
    err = capsys.readouterr().err
    assert "no running endpoint called 'no-such-endpoint'" in err and "hint:" in err and "Traceback" not in err
    assert main(["predict", "http://127.0.0.1:9", "{not json"]) == 2
    assert "body" in capsys.readouterr().err


def test_model_refuses_arguments_it_does_not_know() -> None:
    with pytest.raises(TypeError, match="instance_typo"):
        Model(instance_typo="x")
    with pytest.raises(ValueError, match="instance_type"):
        Model().deploy(instance_type="ml.g5.xlarge")


@pytest.fixture(autouse=True)
def _no_endpoints_left() -> Iterator[None]:
    yield
    for record in list_endpoints():  # a failed test must not leave a server running
        Predictor(record.name).delete_endpoint(grace_s=2)


def test_the_record_of_a_dead_endpoint_is_cleaned_when_listed() -> None:
    from lmserve.sdk.endpoints import EndpointRecord, records_dir, save

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    save(EndpointRecord("gone", "http://127.0.0.1:9", dead.pid, 9, None, time.time()))
    assert (records_dir() / "gone.json").exists()
    assert [r.name for r in list_endpoints()] == []
    assert not (records_dir() / "gone.json").exists()
    assert main(["delete", "gone"]) == 2  # nothing left to stop
