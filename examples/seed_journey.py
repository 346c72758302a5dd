"""The whole journey of a managed-container user, from Python, on this machine:

    write serving.properties -> package mymodel.tar.gz -> upload to S3 -> deploy -> predict -> stream -> delete

twice: for the default model (SmolLM2-135M-Instruct, the "tarball holding only serving.properties"
pattern) and for a small random-weight GPT-J checkpoint served at tensor-parallel degree 2.

S3 is a loopback S3-compatible server that this script starts (moto, from the test extras) unless
AWS_ENDPOINT_URL already names one. Run: python examples/seed_journey.py
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from lmserve.sdk import Model, S3Uploader, package
from lmserve.store.default_model import pull_default_model

QUESTION = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 12}}


def start_local_s3() -> str:
    """A loopback S3 server with dummy credentials, for this process and the servers it starts."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log of the S3 server in the output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
                       "AWS_DEFAULT_REGION": "us-east-1"})  # fmt: skip
    import boto3

    boto3.client("s3").create_bucket(Bucket="lmserve-models")
    return endpoint


def default_model_dir(work: Path) -> Path:
    """serving.properties only: the weights are named by option.model_id, as many LMI deployments do."""
    model = work / "smollm2"
    model.mkdir()
    (model / "serving.properties").write_text(
        "engine=Python\n"
        f"option.model_id={pull_default_model(progress=False)}\n"
        "option.dtype=bf16\n"
        "option.max_rolling_batch_size=8\n"
    )
    return model


def random_gptj_dir(work: Path) -> Path:
    """A small GPT-J with random weights (and the default model's tokenizer), to shard over 2 ranks."""
    import torch
    from transformers import AutoTokenizer, GPTJConfig, GPTJForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(pull_default_model(progress=False))
    torch.manual_seed(0)
    config = GPTJConfig(vocab_size=len(tokenizer), n_positions=512, n_embd=128, n_layer=2, n_head=4, rotary_dim=16,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model = work / "gptj-random"
    GPTJForCausalLM(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    (model / "serving.properties").write_text("engine=Python\noption.tensor_parallel_degree=2\noption.dtype=fp32\n")
    return model


def journey(name: str, model_dir: Path, work: Path, tensor_parallel_degree: int | None = None) -> None:
    print(f"\n== {name} ==")
    archive = package(model_dir, work / f"{name}.tar.gz", progress=False)
    uri = S3Uploader.upload(archive, f"s3://lmserve-models/{name}/", progress=False)
    print(f"uploaded {archive.name} ({archive.stat().st_size:,} bytes) to {uri}")
    predictor = Model(model_data=uri, name=name).deploy(instance_type="local", tensor_parallel_degree=tensor_parallel_degree)
    try:
        print(f"deployed at {predictor.url}")
        print("predict:", predictor.predict(QUESTION))
        print("stream: ", end="")
        for text in predictor.predict_stream(QUESTION):
            print(text, end="|", flush=True)
        print()
    finally:
        predictor.delete_endpoint()
        print(f"deleted endpoint {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-gptj", action="store_true", help="only the default model")
    args = parser.parse_args()
    if "AWS_ENDPOINT_URL" not in os.environ:
        print(f"started a loopback S3 server at {start_local_s3()}")
    with tempfile.TemporaryDirectory(prefix="seed-journey-") as scratch:
        work = Path(scratch)
        journey("smollm2", default_model_dir(work), work)
        if not args.skip_gptj:
            journey("gptj-tp2", random_gptj_dir(work), work, tensor_parallel_degree=2)


if __name__ == "__main__":
    main()
