"""The load generator: sends a dataset's prompts as streams and records raw timings.

Closed loop: ``concurrency`` workers, each sending its next request when the last one ends. Open loop:
requests leave at arrival times drawn up front (Poisson, gamma with ``burstiness`` < 1 burstier and
> 1 smoother, or constant), optionally ramping the rate up from zero over ``ramp_up_s``, optionally
capped at ``max_concurrency`` in flight. Waiting is ``asyncio.sleep`` and socket reads: the loop never
spins, so the generator can share a small machine with the server it measures. Its own CPU time is
measured over the run and reported.
"""

from __future__ import annotations

import asyncio
import math
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from lmserve.bench import BenchUsageError
from lmserve.bench.dialects import Dialect, Prompt
from lmserve.bench.records import TRANSPORT_ERROR, RequestRecord, absorb, finish

ARRIVALS = ("poisson", "constant")
IDENTITY = {"Accept-Encoding": "identity"}  # raw body bytes are the stream itself


@dataclass(frozen=True)
class LoadSpec:
    """How to send: where, in which dialect, and the loop (``request_rate`` None = closed loop)."""

    url: str
    dialect: Dialect
    model: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    concurrency: int = 1
    request_rate: float | None = None
    arrival: str = "poisson"
    burstiness: float = 1.0
    ramp_up_s: float = 0.0
    max_concurrency: int | None = None
    timeout_s: float = 600.0
    seed: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        if self.request_rate is None and self.concurrency < 1:
            raise BenchUsageError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise BenchUsageError(f"--request-rate must be > 0 requests/s, got {self.request_rate}")
        if self.arrival not in ARRIVALS:
            raise BenchUsageError(f"--arrival: {self.arrival!r} is not one of {', '.join(ARRIVALS)}")
        if self.burstiness <= 0:
            raise BenchUsageError(f"--burstiness must be > 0, got {self.burstiness}")

    @property
    def mode(self) -> str:
        return "closed" if self.request_rate is None else "open"


@dataclass
class RunResult:
    """The records of a run, its wall time and the load generator's own CPU time."""

    records: list[RequestRecord]
    wall_s: float
    cpu_s: float

    @property
    def cpu_percent(self) -> float:
        """CPU used by this process over the run, in percent of one core."""
        return 100 * self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def arrival_times(n: int, rate: float, arrival: str = "poisson", burstiness: float = 1.0,
                  ramp_up_s: float = 0.0, seed: int = 0) -> list[float]:
    """Send times (s from start) of ``n`` open-loop requests at ``rate`` per second on average.

    Intervals are gamma-distributed with shape ``burstiness`` and mean ``1/rate`` (shape 1 is
    Poisson), or all ``1/rate`` for ``constant``. A ramp-up grows the rate linearly from 0 to ``rate``
    over ``ramp_up_s`` by warping time: at steady rate R, "operational" time s maps to real time t with
    R*s = integral of the rate up to t, i.e. t = sqrt(2*T*s) while s < T/2 and s + T/2 after.
    """
    rng = random.Random(seed)
    s, times = 0.0, []
    for _ in range(n):
        times.append(s)
        s += 1 / rate if arrival == "constant" else rng.gammavariate(burstiness, 1 / (rate * burstiness))
    if ramp_up_s <= 0:
        return times
    half = ramp_up_s / 2
    return [math.sqrt(2 * ramp_up_s * t) if t < half else t + half for t in times]


async def _send(client: httpx.AsyncClient, spec: LoadSpec, prompt: Prompt, record: RequestRecord, t0: float,
                reused: bool) -> bool:
    """Send ``prompt`` and fill ``record``. Returns False, leaving ``record`` untouched, when a kept-alive
    connection (``reused``) turned out closed before any answer came: nothing was answered, so the
    caller may send it again."""
    body = spec.dialect.body(prompt, spec.model, spec.ignore_eos, spec.temperature)
    answered = False
    try:
        async with client.stream("POST", spec.dialect.path, json=body) as response:
            answered = True
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                record.error, record.error_detail = str(response.status_code), detail
            else:
                await _read_stream(response, spec.dialect, record, t0)
    except httpx.HTTPError as exc:
        if reused and not answered and isinstance(exc, httpx.RemoteProtocolError | httpx.NetworkError):
            return False
        record.error, record.error_detail = TRANSPORT_ERROR, f"{type(exc).__name__}: {exc}"[:300]
    finish(record, time.perf_counter() - t0)
    return True


class ClientPool:
    """One single-connection ``httpx.AsyncClient`` per request in flight, reused afterwards.

    One shared client would do, but its connection pool scans every connection (with a ``poll``
    system call each) whenever a request starts or ends: at 64 streams that scan cost the load
    generator most of a core. A client per stream makes that O(1); all share one TLS context.
    """

    def __init__(self, spec: LoadSpec) -> None:
        self.spec, self._all = spec, list[httpx.AsyncClient]()
        self._free = list[tuple[httpx.AsyncClient, bool]]()  # and whether its connection was left open
        self._tls = ssl.create_default_context() if spec.url.startswith("https:") else None

    def get(self) -> tuple[httpx.AsyncClient, bool]:
        """A client, and whether its last request left a kept-alive connection (which the server may
        have closed since)."""
        if self._free:
            return self._free.pop()
        timeout = httpx.Timeout(self.spec.timeout_s, connect=min(self.spec.timeout_s, 30.0))
        client = httpx.AsyncClient(base_url=self.spec.url, timeout=timeout, headers=self.spec.headers | IDENTITY,
                                   limits=httpx.Limits(max_connections=1), verify=self._tls or False)  # fmt: skip
        self._all.append(client)
        return client, False

    def put(self, client: httpx.AsyncClient, kept: bool) -> None:
        self._free.append((client, kept))

    async def send(self, prompt: Prompt, index: int, t0: float) -> RequestRecord:
        """One request; sent once more, on a new connection, when the kept-alive one it went out on
        was closed by the server before any answer (llama.cpp's server closes its connection after
        a streamed answer, though it says keep-alive: 5 of 12 requests sent back to back on one
        connection found it closed). Its times still count from the first send."""
        client, kept = self.get()
        record = RequestRecord(index, send=time.perf_counter() - t0, prompt_tokens=prompt.prompt_tokens)
        try:
            if not await _send(client, self.spec, prompt, record, t0, kept):
                record.resent = True  # httpx dropped the dead connection; the client opens a new one
                await _send(client, self.spec, prompt, record, t0, reused=False)
            return record
        finally:
            # A transport error drops the connection: the next request on this client opens a new one.
            self.put(client, record.error != TRANSPORT_ERROR)

    async def close(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._all))


async def _read_stream(response: httpx.Response, dialect: Dialect, record: RequestRecord, t0: float) -> None:
    """Read the body as raw bytes and split lines here: httpx's text and line decoders cost more per
    chunk than the parse. Every line of one read is stamped with the time of that read."""
    pending = b""
    async for data in response.aiter_raw():
        at = time.perf_counter() - t0
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            chunk = dialect.parse(line)
            if chunk is not None:
                absorb(record, chunk, at)
                if record.error is not None:
                    return
    if pending.strip() and (chunk := dialect.parse(pending)) is not None:
        absorb(record, chunk, time.perf_counter() - t0)


async def run_load(spec: LoadSpec, prompts: Sequence[Prompt],
                   on_done: Callable[[RequestRecord], None] | None = None) -> RunResult:
    """Send every prompt as ``spec`` says; returns the records in send order."""
    spec.check()
    records: list[RequestRecord] = []

    def done(record: RequestRecord) -> None:
        records.append(record)
        if on_done is not None:
            on_done(record)

    pool = ClientPool(spec)
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        if spec.request_rate is None:
            await _closed_loop(pool, spec, prompts, t0, done)
        else:
            await _open_loop(pool, spec, prompts, t0, done)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await pool.close()
    records.sort(key=lambda r: r.index)
    return RunResult(records, wall, cpu)


async def _closed_loop(pool: ClientPool, spec: LoadSpec, prompts: Sequence[Prompt], t0: float,
                       done: Callable[[RequestRecord], None]) -> None:
    next_index = iter(range(len(prompts)))

    async def worker() -> None:
        for i in next_index:  # shared iterator: each index is taken by exactly one worker
            done(await pool.send(prompts[i], i, t0))

    await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, len(prompts)))))


async def _open_loop(pool: ClientPool, spec: LoadSpec, prompts: Sequence[Prompt], t0: float,
                     done: Callable[[RequestRecord], None]) -> None:
    assert spec.request_rate is not None
    gate = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    times = arrival_times(len(prompts), spec.request_rate, spec.arrival, spec.burstiness, spec.ramp_up_s, spec.seed)

    async def one(i: int) -> None:
        if gate is None:
            done(await pool.send(prompts[i], i, t0))
            return
        async with gate:
            done(await pool.send(prompts[i], i, t0))

    tasks = []
    for i, at in enumerate(times):
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
