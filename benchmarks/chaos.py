"""Chaos under load: kill, freeze and resume a 2-replica server's engines at random, then count outcomes.

Starts ``lmserve serve`` on 127.0.0.1 with two replicas, runs ``--clients`` streaming clients in a
closed loop (LMI JSON lines, TGI SSE, OpenAI completions and chat SSE, picked at random), and every
few seconds picks a ready engine process and kills it (SIGKILL) or freezes it (SIGSTOP), resuming a
frozen one (SIGCONT) after a random time: some before ``--heartbeat-timeout`` (the engine must carry
on as if nothing happened), some after it (the server must have failed its requests with 503,
killed it and started another). After ``--duration`` seconds the chaos and the load stop, the server
is given time to become idle, and the script prints:

- requests sent, succeeded (the dialect's normal ending), failed cleanly (a JSON error body, or the
  dialect's error event and terminator), failed uncleanly (a cut stream, a non-JSON error) and hung
  (no ending within ``--predict-timeout`` + 30 s);
- KV blocks still in use once every replica is idle (leaked), from the management API;
- processes of the server's session still alive after it shut down (leaked).

Exit status 0 only when nothing hung, every failure was clean and nothing leaked.

    python benchmarks/chaos.py                   # 2 minutes, tiny random-weight llama
    python benchmarks/chaos.py --duration 30     # shorter
    python benchmarks/chaos.py --model default   # the default model, if it is in the cache
    python benchmarks/chaos.py --model DIR       # any local model directory
    python benchmarks/chaos.py --model fake      # the test suite's fake engine: a quick smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox", "Paris is the capital of", "Tokens, tokens everywhere:", "Berlin is"]


# ---- the server ----------------------------------------------------------------------------------


def model_arguments(model: str, scratch: Path) -> list[str]:
    """``lmserve serve`` arguments that serve ``model`` (tiny, fake, default or a directory)."""
    sys.path.insert(0, str(REPO_ROOT))
    if model == "tiny":
        from tests.tiny_models import build_tokenizer, make_tiny_model

        tokenizer, directory = scratch / "tokenizer", scratch / "tiny-llama"
        build_tokenizer(tokenizer)
        make_tiny_model(directory, "llama", tokenizer)
        return [str(directory), "--dtype", "fp32"]
    if model == "fake":
        from tests.server.fake_engine import FakeEngine
        from tests.server.tiny_tokenizer import build_tiny_tokenizer

        factory = f"{FakeEngine.__module__}:FakeEngine"
        directory = build_tiny_tokenizer(scratch / "fake")
        return [str(directory), "--engine-factory", factory, "--engine-options", json.dumps({"token_delay_s": 0.01}),
                "--block-size", "4"]  # fmt: skip
    if model == "default":
        from lmserve.store.default_model import default_model_dir, is_default_model_present

        if not is_default_model_present():
            raise SystemExit("the default model is not in the cache; run `lmserve pull` first, or use --model tiny")
        return [str(default_model_dir())]
    if not Path(model).is_dir():
        raise SystemExit(f"--model: {model!r} is not tiny, fake, default or a local model directory")
    return [model]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, scratch: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port, log = free_port(), scratch / "serve.log"
    command = [sys.executable, "-m", "lmserve.cli", "serve", *model_arguments(args.model, scratch),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--cpu-devices", "2",
               "--n-positions", "256", "--heartbeat-timeout", str(args.heartbeat_timeout),
               "--predict-timeout", str(args.predict_timeout)]  # fmt: skip
    env = dict(os.environ, SERVING_GRACEFUL_SHUTDOWN_S="5", OPTION_PARALLEL_LOADING="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.load_timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    return proc, url, log
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    except BaseException:  # Ctrl+C while loading: leave no server behind
        stop_server(proc)
        raise
    stop_server(proc)
    raise SystemExit(f"the server did not become ready; its log:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM the server's process group (as a supervisor does) and wait; SIGKILL after a minute."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -signal.SIGKILL
    return proc.returncode


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of a session: what the server started and left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == session and "\nState:\tZ" not in (entry / "status").read_text():
                found.append(int(entry.name))
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return found


# ---- the load ------------------------------------------------------------------------------------


def request_for(dialect: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    prompt, tokens = rng.choice(PROMPTS), rng.randint(8, 48)
    if dialect == "lmi":
        return "/invocations", {"inputs": prompt, "stream": True, "parameters": {"max_new_tokens": tokens}}
    if dialect == "tgi":
        return "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": tokens}}
    if dialect == "openai":
        return "/v1/completions", {"prompt": prompt, "max_tokens": tokens, "stream": True}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                                    "stream": True}  # fmt: skip


def _data(line: str) -> Any:
    return json.loads(line[len("data:"):]) if line.startswith("data:") else None


def stream_outcome(dialect: str, lines: list[str]) -> str:
    """``ok``, ``error <code> <error_type>`` (a clean error event) or ``unclean``."""
    try:
        if dialect == "lmi":
            last = json.loads(lines[-1])
            if "error" in last:
                return f"error {last['code']} {last.get('error_type')}"
            return "ok" if last.get("generated_text") is not None else "unclean"
        if dialect == "tgi":
            if len(lines) >= 2 and lines[-2] == "event: error":
                error = _data(lines[-1])
                return f"error {error['code']} {error.get('error_type')}"
            return "ok" if (_data(lines[-1]) or {}).get("generated_text") is not None else "unclean"
        if lines[-1] != "data: [DONE]":
            return "unclean"
        if len(lines) >= 3 and lines[-3] == "event: error":
            error = _data(lines[-2])
            return f"error {error['code']} {error.get('error_type')}"
        finished = any(c.get("finish_reason") for line in lines[:-1] for c in (_data(line) or {}).get("choices", []))
        return "ok" if finished else "unclean"
    except (IndexError, KeyError, TypeError, ValueError):
        return "unclean"


async def one_request(http: httpx.AsyncClient, dialect: str, rng: random.Random) -> str:
    path, body = request_for(dialect, rng)
    try:
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                try:
                    error = json.loads(await response.aread())
                    return f"error {error['code']} {error.get('error_type')}"
                except (ValueError, KeyError, TypeError):
                    return "unclean"
            lines = [line async for line in response.aiter_lines() if line]
    except httpx.TransportError:
        return "unclean"
    return stream_outcome(dialect, lines)


async def client_loop(url: str, until: float, hang_s: float, outcomes: collections.Counter[str], seed: int) -> None:
    rng, loop = random.Random(seed), asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:
        while loop.time() < until:
            dialect = rng.choice(["lmi", "tgi", "openai", "chat"])
            try:
                async with asyncio.timeout(hang_s):
                    outcome = await one_request(http, dialect, rng)
            except TimeoutError:
                outcome = "hung"
            outcomes[outcome] += 1
            if outcome.startswith("error"):
                await asyncio.sleep(0.2)  # as a client that backs off does


# ---- the chaos -----------------------------------------------------------------------------------


async def replicas(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    models = (await http.get("/models")).json()["models"]
    described = [(await http.get(f"/models/{m['model_name']}")).json() for m in models]
    return [replica for model in described for replica in model.get("replicas", [])]


async def chaos_loop(url: str, until: float, args: argparse.Namespace, actions: collections.Counter[str],
                     frozen: dict[int, float], rng: random.Random) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while loop.time() < until:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * args.chaos_interval)
            ready = [r["pid"] for r in await replicas(http) if r["state"] == "ready" and r["pid"] not in frozen]
            if not ready:
                continue
            pid = rng.choice(ready)
            if rng.random() < 0.5:
                os.kill(pid, signal.SIGKILL)
                actions["killed (SIGKILL)"] += 1
            else:
                os.kill(pid, signal.SIGSTOP)
                frozen[pid] = loop.time() + rng.uniform(0.3, 2.0) * args.heartbeat_timeout
                actions["frozen (SIGSTOP)"] += 1


async def resume_loop(url: str, actions: collections.Counter[str], frozen: dict[int, float], stop: asyncio.Event) -> None:
    """SIGCONT each frozen engine when its time comes (all of them once ``stop`` is set)."""
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while frozen or not stop.is_set():
            await asyncio.sleep(0.1)
            for pid, when in list(frozen.items()):
                if when > loop.time() and not stop.is_set():
                    continue
                del frozen[pid]
                listed = {r["pid"]: r["state"] for r in await replicas(http)}
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                kept = listed.get(pid) == "ready"  # still serving: the freeze was shorter than the deadline
                actions["resumed (SIGCONT) in time" if kept else "frozen past the deadline, replaced"] += 1


async def wait_idle(url: str, timeout: float) -> list[dict[str, Any]]:
    """The replicas once every one is ready with nothing running or waiting (or as they are at ``timeout``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while True:
            listed = await replicas(http)
            idle = all(r["state"] == "ready" and r.get("running") == 0 and r.get("waiting") == 0 for r in listed)
            if idle or loop.time() > end:
                return listed
            await asyncio.sleep(0.5)


async def run(url: str, args: argparse.Namespace) -> tuple[collections.Counter[str], collections.Counter[str], list[dict[str, Any]]]:
    loop, rng = asyncio.get_running_loop(), random.Random(args.seed)
    until, hang_s = loop.time() + args.duration, args.predict_timeout + 30
    outcomes: collections.Counter[str] = collections.Counter()
    actions: collections.Counter[str] = collections.Counter()
    frozen: dict[int, float] = {}
    stop = asyncio.Event()
    resumer = asyncio.create_task(resume_loop(url, actions, frozen, stop))
    clients = [client_loop(url, until, hang_s, outcomes, args.seed + 1 + i) for i in range(args.clients)]
    await asyncio.gather(chaos_loop(url, until, args, actions, frozen, rng), *clients)
    stop.set()
    await resumer
    return outcomes, actions, await wait_idle(url, args.load_timeout)


def report(outcomes: collections.Counter[str], actions: collections.Counter[str], idle: list[dict[str, Any]],
           leaked_processes: list[int], exit_code: int, wall: float) -> bool:  # fmt: skip
    clean = sum(n for outcome, n in outcomes.items() if outcome.startswith("error"))
    leaked_blocks = sum(r.get("kv_blocks_used", 0) for r in idle)
    not_idle = [r["id"] for r in idle if r["state"] != "ready" or r.get("running") or r.get("waiting")]
    rows = [("requests sent", sum(outcomes.values())), ("succeeded", outcomes["ok"]), ("failed with a clean error", clean),
            *((f"  {outcome}", n) for outcome, n in sorted(outcomes.items()) if outcome.startswith("error")),
            ("failed uncleanly (must be 0)", outcomes["unclean"]), ("hung (must be 0)", outcomes["hung"]),
            *sorted(actions.items()), ("replica restarts", sum(r["restarts"] for r in idle)),
            ("replicas not idle at the end (must be none)", ", ".join(map(str, not_idle)) or "none"),
            ("leaked KV blocks (must be 0)", leaked_blocks),
            ("leaked processes after shutdown (must be 0)", len(leaked_processes)),
            ("server exit status", exit_code), ("wall time (s)", f"{wall:.0f}")]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return not (outcomes["unclean"] or outcomes["hung"] or leaked_blocks or leaked_processes or not_idle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of chaos (default 120)")
    parser.add_argument("--model", default="tiny", help="tiny (default), fake, default, or a model directory")
    parser.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    parser.add_argument("--chaos-interval", type=float, default=4.0, help="mean seconds between chaos actions")
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0, help="the server's option.heartbeat_timeout")
    parser.add_argument("--predict-timeout", type=float, default=30.0, help="the server's option.predict_timeout")
    parser.add_argument("--load-timeout", type=float, default=900.0, help="seconds to wait for the server to be ready")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lmserve-chaos-") as scratch:
        proc, url, log = start_server(args, Path(scratch))
        try:
            outcomes, actions, idle = asyncio.run(run(url, args))
        finally:
            exit_code = stop_server(proc)
        time.sleep(1.0)  # let the init process reap what the server left
        leaked = session_processes(proc.pid)
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        if not report(outcomes, actions, idle, leaked, exit_code, time.monotonic() - started):
            print(f"\nserver log (last lines):\n{log.read_text()[-3000:]}")
            raise SystemExit(1)


if __name__ == "__main__":
    main()
