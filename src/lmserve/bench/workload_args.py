"""The workload flags ``bench`` and ``recommend`` share; argparse only, so building the CLI's parser
stays cheap."""

from __future__ import annotations

import argparse

from lmserve.bench import BenchUsageError


def add_workload_arguments(parser: argparse.ArgumentParser, *, num_requests: int) -> None:
    """What to send: shared by ``bench`` and ``recommend``."""
    g = parser.add_argument_group("workload")
    g.add_argument("--api", default="openai", choices=["openai", "openai-chat", "tgi", "lmi"],
                   help="dialect: openai (/v1/completions), openai-chat (/v1/chat/completions), "
                        "tgi (/generate_stream), lmi (/invocations, JSON lines); default %(default)s")  # fmt: skip
    g.add_argument("--num-requests", type=int, default=num_requests, help="requests to send (default %(default)s)")
    g.add_argument("--input-len", default="128", help="prompt tokens: N or MIN:MAX (default %(default)s)")
    g.add_argument("--output-len", default="128", help="tokens to generate: N or MIN:MAX (default %(default)s)")
    g.add_argument("--dataset", default="random",
                   help="random, shared-prefix (prompts sharing --num-prefixes prefixes of --prefix-len "
                        "tokens: exercises prefix caching) or a JSONL file of {\"prompt\", \"output_len\"?}")  # fmt: skip
    g.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: prefix tokens (default %(default)s)")
    g.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct prefixes (default %(default)s)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or a directory holding one) to make prompt lengths exact; "
                        "without it a token is approximated by a common English word")  # fmt: skip
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let the model stop at end of sequence (default: generate exactly the output length)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature the requests ask for (default 0: greedy decoding; OpenAI's own "
                        "default, when a client sends none, is 1.0)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of the dataset and arrival times")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a response or a chunk")


def check_workload(ns: argparse.Namespace) -> None:
    """Refuse, by flag, workload values argparse lets through."""
    if ns.temperature < 0:
        raise BenchUsageError(f"--temperature must be >= 0 (0: greedy decoding), got {ns.temperature:g}")
