"""Registering the classic LMI artifact through the management API: a .tar.gz holding only a
serving.properties whose option.model_id is an s3:// prefix (on a local S3-compatible server)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.server.conftest import start_server
from tests.store.test_s3 import aws_env, bucket, put, s3_endpoint  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def test_a_tarball_naming_an_s3_prefix_is_fetched_and_served(tiny_model_dir: Path, bucket: str,  # noqa: F811
                                                             tmp_path: Path) -> None:
    for file in tiny_model_dir.iterdir():
        put(bucket, f"models/tiny/{file.name}", file.read_bytes())
    properties = f"engine=Python\noption.model_id=s3://{bucket}/models/tiny/\noption.n_positions=64\n".encode()
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("serving.properties")
        info.size = len(properties)
        tar.addfile(info, io.BytesIO(properties))
    server = start_server(tiny_model_dir, server={"enable_model_api": True, "allowed_urls": (".*",)})
    try:
        with server.client() as http:
            r = http.post("/models", params={"url": str(archive), "model_name": "from-s3", "max_worker": 1})
            assert r.status_code == 200, r.text
            assert r.json()["model"]["max_model_len"] == 64  # the archive's serving.properties applied
            answer = http.post("/predictions/from-s3", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
            assert answer.status_code == 200 and answer.json()["generated_text"]
    finally:
        server.stop()
