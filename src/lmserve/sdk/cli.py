"""The SDK's subcommands: ``lmserve package``, ``upload``, ``endpoints``, ``predict``, ``delete``.

Each is an ``add_*`` function (its arguments) and a ``run_*`` function (returns the exit code);
``lmserve.cli`` lists them. A user's mistake raises ``LMServeError`` (one line and a hint on the
terminal); anything else is a bug and shows its traceback with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmserve.errors import InvalidRequestError


def add_package(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="model directory (serving.properties, model.py, weights...)")
    parser.add_argument("-o", "--output", default="mymodel.tar.gz", help="archive to write (default: %(default)s)")


def run_package(ns: argparse.Namespace) -> int:
    from lmserve.sdk.packaging import package

    path = package(ns.directory, ns.output)
    print(f"packed {ns.directory} into {path} ({path.stat().st_size:,} bytes)")
    return 0


def add_upload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="file or directory to upload")
    parser.add_argument("s3_uri", help="s3://bucket/prefix/ (a trailing / keeps the file's name)")


def run_upload(ns: argparse.Namespace) -> int:
    from lmserve.sdk.s3 import S3Uploader

    if not Path(ns.file).exists():
        raise InvalidRequestError("file", f"{ns.file} does not exist")
    print(S3Uploader.upload(ns.file, ns.s3_uri))
    return 0


def add_endpoints(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_endpoints(ns: argparse.Namespace) -> int:
    from lmserve.sdk.endpoints import list_endpoints

    records = list_endpoints()
    if ns.json:
        print(json.dumps([{"name": r.name, "url": r.url, "pid": r.pid, "model_data": r.model_data}
                          for r in records]))  # fmt: skip
        return 0
    if not records:
        print("no running endpoints (start one with lmserve.sdk.Model(...).deploy())")
        return 0
    print(f"{'NAME':<24} {'URL':<26} {'PID':>7}  {'UP':>8}  MODEL")
    for r in records:
        print(f"{r.name:<24} {r.url:<26} {r.pid:>7}  {time.time() - r.created:>7.0f}s  {r.model_data or '(default)'}")
    return 0


def add_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("endpoint", help="an endpoint name (lmserve endpoints) or a URL such as http://127.0.0.1:8080")
    parser.add_argument("body", help='the JSON body, e.g. \'{"inputs": "Hello", "parameters": {"max_new_tokens": 20}}\'')
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--model-name", default=None, help="the model, when the server serves several")


def run_predict(ns: argparse.Namespace) -> int:
    from lmserve.sdk.predictor import Predictor

    try:
        body = json.loads(ns.body)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError("body", f"is not JSON ({exc}); quote it, e.g. '{{\"inputs\": \"Hi\"}}'") from None
    predictor = Predictor(ns.endpoint, model_name=ns.model_name)
    if ns.stream:
        for text in predictor.predict_stream(body):
            print(text, end="", flush=True)
        print()
    else:
        print(json.dumps(predictor.predict(body)))
    return 0


def add_delete(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the endpoint to stop (lmserve endpoints lists them)")


def run_delete(ns: argparse.Namespace) -> int:
    from lmserve.sdk.predictor import Predictor

    Predictor(ns.name).delete_endpoint()
    print(f"deleted endpoint {ns.name}", file=sys.stderr)
    return 0
