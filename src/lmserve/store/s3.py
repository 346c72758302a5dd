"""Models on S3 or any S3-compatible store, synced into the cache with boto3.

``s3://bucket/prefix`` is mirrored into ``<cache>/s3/<bucket>/<prefix>``. A small sidecar file there
records the size and ETag of every object fetched, so a later sync downloads only objects that are new
or changed (and removes files whose objects were deleted). Each file is downloaded to a temporary name
and renamed, so an interrupted sync never leaves a truncated file under a real name.

The endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO, Ceph, R2, a local
test server ...); credentials and region come from the usual boto3 chain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
from tqdm.auto import tqdm

from lmserve.cache import cache_subdir
from lmserve.errors import ModelNotFoundError
from lmserve.fsutil import staged_file, write_text_atomic

log = logging.getLogger(__name__)

SIDECAR = ".lmserve-s3.json"


@dataclass(frozen=True)
class S3Object:
    """One object to mirror: its key, size and ETag as the listing reported them."""

    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class SyncResult:
    """What a sync did: the local directory and the relative paths fetched or found up to date."""

    path: Path
    downloaded: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)


def is_s3_uri(uri: str) -> bool:
    """Whether ``uri`` names an S3 location."""
    return uri.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty (the whole bucket)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or bucket in {".", ".."} or ".." in PurePosixPath(key).parts:
        raise ModelNotFoundError(
            f"{uri!r} is not a usable S3 location: expected s3://<bucket>/<prefix> with a bucket name and "
            "no '..' in the prefix."
        )
    return bucket, key


def s3_client() -> Any:
    """A boto3 S3 client for the configured endpoint (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).

    Recent boto3 reads these variables itself; passing them explicitly keeps older versions working too.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        endpoint = None
    return boto3.client("s3", endpoint_url=endpoint)


def sync_s3_prefix(uri: str, *, progress: bool = True) -> SyncResult:
    """Mirror every object under ``s3://bucket/prefix`` into ``<cache>/s3/<bucket>/<prefix>``.

    Raises:
        ModelNotFoundError: no credentials, no such bucket, nothing under the prefix, access denied or
            the endpoint cannot be reached; the message names the URI.
    """
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.strip("/")
    dest = cache_subdir("s3") / bucket / prefix
    client = s3_client()
    with _s3_errors(uri):
        objects = _list_objects(client, bucket, prefix)
        if not objects:
            raise ModelNotFoundError(
                f"no objects under {uri} (bucket {bucket!r}, prefix {prefix!r}); check the prefix, e.g. "
                f"'aws s3 ls {uri.rstrip('/')}/'."
            )
        return _sync(client, bucket, objects, dest, progress=progress, prune=True)


def download_s3_object(uri: str, *, progress: bool = True) -> Path:
    """Fetch the single object ``s3://bucket/key`` into the cache (unless unchanged) and return its path."""
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise ModelNotFoundError(f"{uri!r} names no object: expected s3://<bucket>/<key>.")
    parent, name = PurePosixPath(key).parent, PurePosixPath(key).name
    dest = cache_subdir("s3") / bucket / ("" if str(parent) == "." else str(parent))
    client = s3_client()
    with _s3_errors(uri):
        head = client.head_object(Bucket=bucket, Key=key)
        obj = S3Object(key, int(head["ContentLength"]), str(head.get("ETag", "")))
        _sync(client, bucket, {name: obj}, dest, progress=progress, prune=False)
    return dest / name


def _list_objects(client: Any, bucket: str, prefix: str) -> dict[str, S3Object]:
    """Objects under ``prefix/``, keyed by their path relative to it (directory markers skipped)."""
    list_prefix = f"{prefix}/" if prefix else ""
    objects: dict[str, S3Object] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=list_prefix):
        for item in page.get("Contents", []):
            rel = item["Key"][len(list_prefix) :]
            if not rel or rel.endswith("/"):
                continue
            if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
                raise ModelNotFoundError(
                    f"refusing S3 object s3://{bucket}/{item['Key']}: its key would be written outside the "
                    "local mirror ('..' or absolute path). Rename the object."
                )
            objects[rel] = S3Object(item["Key"], int(item["Size"]), str(item.get("ETag", "")))
    return objects


def _sync(
    client: Any, bucket: str, objects: dict[str, S3Object], dest: Path, *, progress: bool, prune: bool
) -> SyncResult:
    dest.mkdir(parents=True, exist_ok=True)
    recorded = _read_sidecar(dest)
    result = SyncResult(dest)
    stale = {rel: obj for rel, obj in objects.items() if not _up_to_date(dest, rel, obj, recorded)}
    result.up_to_date.extend(sorted(set(objects) - set(stale)))
    total = sum(obj.size for obj in stale.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"s3://{bucket}", disable=not progress) as bar:
        for rel, obj in sorted(stale.items()):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            # A temporary name per process, since two processes may sync the same prefix at once.
            with staged_file(target) as part:
                client.download_file(bucket, obj.key, str(part), Callback=bar.update)
            recorded[rel] = {"size": obj.size, "etag": obj.etag}
            _write_sidecar(dest, recorded)  # after each file, so an interrupted sync keeps its progress
            result.downloaded.append(rel)
    if prune:
        for rel in sorted(set(recorded) - set(objects)):
            (dest / rel).unlink(missing_ok=True)
            del recorded[rel]
        _write_sidecar(dest, recorded)
    log.info(
        "synced s3://%s into %s: %d downloaded, %d up to date",
        bucket,
        dest,
        len(result.downloaded),
        len(result.up_to_date),
    )
    return result


def _up_to_date(dest: Path, rel: str, obj: S3Object, recorded: dict[str, dict[str, Any]]) -> bool:
    seen = recorded.get(rel)
    target = dest / rel
    return (
        seen is not None
        and seen.get("size") == obj.size
        and seen.get("etag") == obj.etag
        and target.is_file()
        and target.stat().st_size == obj.size
    )


def _read_sidecar(dest: Path) -> dict[str, dict[str, Any]]:
    try:
        return dict(json.loads((dest / SIDECAR).read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def _write_sidecar(dest: Path, recorded: dict[str, dict[str, Any]]) -> None:
    write_text_atomic(dest / SIDECAR, json.dumps(recorded, indent=1, sort_keys=True))


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn boto3's failures into ModelNotFoundError messages that name the URI and the fix."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise ModelNotFoundError(
            f"cannot read {uri}: no usable AWS credentials ({exc}). Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an IAM role."
        ) from exc
    except ClientError as exc:
        raise ModelNotFoundError(f"cannot read {uri} from {endpoint}: {_client_error_hint(exc)}") from exc
    except BotoCoreError as exc:
        raise ModelNotFoundError(
            f"cannot read {uri} from {endpoint}: {exc}. Check the network and AWS_ENDPOINT_URL."
        ) from exc


def _client_error_hint(exc: ClientError) -> str:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket":
        return "the bucket does not exist; check the bucket name (and AWS_ENDPOINT_URL for non-AWS stores)."
    if code in {"NoSuchKey", "404", "NotFound"}:
        return "no such object; check the key."
    if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return f"access denied ({code}); check the credentials and that they may read this bucket."
    return f"{code or 'error'}: {exc}"
