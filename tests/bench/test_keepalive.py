"""The load generator against servers that close kept-alive connections: a request that went out on
a connection the server had already given up is sent again on a new one, once; a request that finds
no answer on a new connection is a failure, as before."""

from __future__ import annotations

import asyncio
import json

from lmserve.bench.dialects import Prompt, dialect
from lmserve.bench.records import TRANSPORT_ERROR
from lmserve.bench.runner import LoadSpec, RunResult, run_load

ANSWER = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in (
    {"choices": [{"text": "Hi"}]},
    {"choices": [{"text": " there"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
)) + b"data: [DONE]\n\n"


async def read_request(reader: asyncio.StreamReader) -> bool:
    """Read one request (headers, then a body of Content-Length bytes); False at end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return False
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
    await reader.readexactly(length)
    return True


def serve(answers_per_connection: int):
    """A server that says keep-alive, answers this many requests on a connection, then reads the next
    one and closes without a word (what llama.cpp's server does after a streamed answer, when the
    next request is already on its way)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        while await read_request(reader):
            if answered == answers_per_connection:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n"
                         b"Content-Length: " + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)
            await writer.drain()
            answered += 1
        writer.close()
    return handle


def run(answers_per_connection: int, requests: int, concurrency: int = 1) -> tuple[RunResult, int]:
    """Run the load generator against that server; returns its result and how many connections it opened."""
    async def main() -> tuple[RunResult, int]:
        connections = 0
        handle = serve(answers_per_connection)

        async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            await handle(reader, writer)

        server = await asyncio.start_server(counted, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        spec = LoadSpec(url=f"http://127.0.0.1:{port}", dialect=dialect("openai"), concurrency=concurrency,
                        timeout_s=10.0)
        async with server:
            result = await run_load(spec, [Prompt("Hello", 2)] * requests)
        return result, connections
    return asyncio.run(main())


def test_a_request_on_a_connection_the_server_closed_is_sent_again() -> None:
    result, connections = run(answers_per_connection=1, requests=5)
    assert [r.ok for r in result.records] == [True] * 5
    assert [r.output_tokens for r in result.records] == [2] * 5
    # The first request had a new connection; each later one found the old one closed and went again.
    assert [r.resent for r in result.records] == [False, True, True, True, True]
    assert connections == 5
    assert all(r.ttft is not None and r.ttft >= 0 for r in result.records)


def test_connections_that_stay_open_are_reused_without_a_second_send() -> None:
    result, connections = run(answers_per_connection=100, requests=6, concurrency=2)
    assert all(r.ok and not r.resent for r in result.records)
    assert connections == 2


def test_no_answer_on_a_new_connection_is_a_failure_and_is_not_sent_again() -> None:
    result, connections = run(answers_per_connection=0, requests=3)
    assert [r.error for r in result.records] == [TRANSPORT_ERROR] * 3
    assert not any(r.resent for r in result.records)
    assert "RemoteProtocolError" in (result.records[0].error_detail or "")
    assert connections == 3
