"""``S3Uploader`` / ``S3Downloader``, as the SageMaker Python SDK names them: boto3 underneath, the
endpoint from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) like the server's own S3 loading,
with a progress bar per file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from tqdm import tqdm

from lmserve.store.s3 import parse_s3_uri, s3_client


class S3Uploader:
    @staticmethod
    def upload(local_path: str | os.PathLike[str], desired_s3_uri: str, progress: bool = True) -> str:
        """Upload a file, or every file under a directory, below ``desired_s3_uri``; returns the
        URI of the uploaded file (or of the prefix, for a directory). A URI ending in ``/`` is a
        prefix the file's name is added to."""
        source = Path(local_path)
        if not source.exists():
            raise FileNotFoundError(f"nothing to upload at {source}")
        bucket, key = parse_s3_uri(desired_s3_uri)
        client = s3_client()
        if source.is_file():
            key = f"{key}{source.name}" if not key or key.endswith("/") else key
            _put(client, source, bucket, key, progress)
            return f"s3://{bucket}/{key}"
        prefix = key.rstrip("/")
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            rel = path.relative_to(source).as_posix()
            _put(client, path, bucket, f"{prefix}/{rel}" if prefix else rel, progress)
        return f"s3://{bucket}/{prefix}"


class S3Downloader:
    @staticmethod
    def download(s3_uri: str, local_path: str | os.PathLike[str], progress: bool = True) -> list[Path]:
        """Download the object at ``s3_uri``, or every object under it as a prefix, into ``local_path``."""
        bucket, key = parse_s3_uri(s3_uri)
        client = s3_client()
        dest = Path(local_path)
        if key and not key.endswith("/") and _exists(client, bucket, key):
            targets = {key: dest / Path(key).name}  # one object: it keeps its name
        else:
            prefix = f"{key.rstrip('/')}/" if key.strip("/") else ""
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            targets = {obj["Key"]: dest / obj["Key"][len(prefix):] for page in pages
                       for obj in page.get("Contents", []) if not obj["Key"].endswith("/")}  # fmt: skip
        for item, target in targets.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            size = client.head_object(Bucket=bucket, Key=item)["ContentLength"]
            with tqdm(total=size, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                client.download_file(bucket, item, str(target), Callback=bar.update)
        return list(targets.values())


def _exists(client: Any, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def _put(client: Any, path: Path, bucket: str, key: str, progress: bool) -> None:
    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=path.name, disable=not progress) as bar:
        client.upload_file(str(path), bucket, key, Callback=bar.update)
