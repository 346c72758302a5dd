"""Every metric against values computed by hand on synthetic timings, through the dialect parsers."""

from __future__ import annotations

import json
import math

import pytest

from lmserve.bench import BenchUsageError
from lmserve.bench.dialects import LMI, TGI, OpenAIChat, OpenAICompletions
from lmserve.bench.metrics import failure_lines, parse_slo, percentile, summarize
from lmserve.bench.records import EMPTY_STREAM, STREAM_ERROR, RequestRecord, absorb, finish


def sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data).encode()


def tgi_event(text: str, final: bool = False, generated: int | None = None) -> bytes:
    return sse({"token": {"id": 5, "text": text, "special": False}, "generated_text": "x" if final else None,
                "details": {"generated_tokens": generated, "input_length": 7} if final else None})


def feed(dialect, record: RequestRecord, lines: list[tuple[float, bytes]], end: float) -> RequestRecord:
    for at, line in lines:
        chunk = dialect.parse(line)
        if chunk is not None:
            absorb(record, chunk, at)
    finish(record, end)
    return record


def three_tokens() -> RequestRecord:
    """TGI, one token per event at 0.1, 0.15, 0.3: TTFT 100 ms, TPOT 100 ms, ITL 50 and 150 ms."""
    lines = [(0.1, tgi_event("a")), (0.1, b""), (0.15, tgi_event("b")), (0.3, tgi_event("c", True, 3))]
    return feed(TGI(), RequestRecord(0, send=0.0), lines, 0.3)


def one_token() -> RequestRecord:
    """LMI, a single token: TTFT 200 ms, no TPOT, no ITL, e2e 250 ms."""
    line = json.dumps({"token": {"id": 1, "text": "a"}, "generated_text": "a",
                       "details": {"generated_tokens": 1}}).encode()  # fmt: skip
    return feed(LMI(), RequestRecord(1, send=0.05), [(0.25, line)], 0.3)


def multi_token_chunks() -> RequestRecord:
    """OpenAI chunks carrying 2 then 3 tokens (usage says 5), an empty finish chunk, usage, [DONE]."""
    lines = [(0.2, sse({"choices": [{"text": "ab"}], "usage": None})),
             (0.4, sse({"choices": [{"text": "cde"}], "usage": None})),
             (0.45, sse({"choices": [{"text": "", "finish_reason": "length"}], "usage": None})),
             (0.45, sse({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5,
                                                   "prompt_tokens_details": {"cached_tokens": 8}}})),
             (0.45, b"data: [DONE]")]  # fmt: skip
    return feed(OpenAICompletions(), RequestRecord(2, send=0.1), lines, 0.5)


def http_error() -> RequestRecord:
    return RequestRecord(3, send=0.2, end=0.21, error="429")


def empty_stream() -> RequestRecord:
    return feed(OpenAICompletions(), RequestRecord(4, send=0.3), [(0.5, b"data: [DONE]")], 0.6)


def test_records_from_each_dialect() -> None:
    a, b, c = three_tokens(), one_token(), multi_token_chunks()
    assert (a.output_tokens, a.chunks, a.ok) == (3, [0.1, 0.15, 0.3], True)
    assert (b.output_tokens, b.tpot, b.itls) == (1, None, [])
    assert c.chunks == [0.2, 0.4]  # the empty finish chunk is not a token
    assert (c.output_tokens, c.prompt_tokens, c.cached_tokens) == (5, 11, 8)
    assert a.cached_tokens is None  # TGI does not say
    assert c.ttft == pytest.approx(0.1) and c.tpot == pytest.approx(0.3 / 4)  # e2e 0.4, TTFT 0.1, 5 tokens
    assert empty_stream().error == EMPTY_STREAM


def test_summary_by_hand() -> None:
    s = summarize([three_tokens(), one_token(), multi_token_chunks(), http_error(), empty_stream()])
    assert (s.num_requests, s.completed, s.failed) == (5, 3, 2)
    assert s.errors == {"429": 1, "empty": 1}
    assert s.duration_s == pytest.approx(0.6)  # first send 0.0 to last end 0.6
    assert s.request_throughput == pytest.approx(3 / 0.6)
    assert s.total_output_tokens == 9 and s.output_token_throughput == pytest.approx(9 / 0.6)
    assert s.total_prompt_tokens == 7 + 11  # TGI details and OpenAI usage; LMI gave none
    assert s.cached_prompt_tokens == 8  # only OpenAI's usage says
    assert summarize([three_tokens()]).cached_prompt_tokens is None  # no server said: unknown, not 0
    assert s.total_token_throughput == pytest.approx((9 + 18) / 0.6)
    # TTFT 100, 200, 100 ms
    assert (s.ttft_ms.count, s.ttft_ms.mean, s.ttft_ms.p50) == (3, pytest.approx(400 / 3), pytest.approx(100))
    assert (s.ttft_ms.p90, s.ttft_ms.p95, s.ttft_ms.p99) == (pytest.approx(180), pytest.approx(190), pytest.approx(198))
    # TPOT 100 and 75 ms (the one-token request has none)
    assert (s.tpot_ms.count, s.tpot_ms.mean, s.tpot_ms.p90) == (2, pytest.approx(87.5), pytest.approx(97.5))
    # ITL: 50 and 150 ms (TGI), 200 ms (OpenAI): one gap per pair of chunks, whatever they carried
    assert (s.itl_ms.count, s.itl_ms.p50, s.itl_ms.mean) == (3, pytest.approx(150), pytest.approx(400 / 3))
    # e2e 300, 250, 400 ms
    assert (s.e2e_ms.p50, s.e2e_ms.p99) == (pytest.approx(300), pytest.approx(398))


def test_goodput_needs_every_objective() -> None:
    records = [three_tokens(), one_token(), multi_token_chunks(), http_error()]
    # three_tokens misses TPOT (100 > 90), one_token misses TTFT (200 > 150), the 429 never counts.
    s = summarize(records, parse_slo("ttft_ms=150,tpot_ms=90"))
    assert (s.good, s.goodput) == (1, pytest.approx(1 / 0.5))
    # A one-token request has no decode to be slow in: it meets any TPOT objective.
    assert summarize(records, {"tpot_ms": 50}).good == 1
    assert summarize(records, {"e2e_ms": 300}).good == 2


def test_no_request_and_all_failed() -> None:
    s = summarize([http_error()])
    assert (s.completed, s.request_throughput, s.output_token_throughput) == (0, 0.0, 0.0)
    assert math.isnan(s.ttft_ms.p50) and s.ttft_ms.count == 0
    assert summarize([]).num_requests == 0


def test_error_event_after_the_stream_began() -> None:
    lines = [(0.1, sse({"choices": [{"delta": {"content": "hi"}}]})),
             (0.2, sse({"error": "engine process exited", "code": 503}))]  # fmt: skip
    record = feed(OpenAIChat(), RequestRecord(0, send=0.0), lines, 0.2)
    assert record.error == STREAM_ERROR and "engine process exited" in (record.error_detail or "")
    assert summarize([record]).errors == {STREAM_ERROR: 1}


def test_failures_are_told_by_kind_with_the_first_detail() -> None:
    """A failed count alone does not say whose fault it was: each kind of failure gets a line with
    its count and the first request's detail, in the order of the kinds' names."""
    lines = [(0.1, sse({"choices": [{"delta": {"content": "hi"}}]})),
             (0.2, sse({"error": "engine process exited", "code": 503}))]  # fmt: skip
    broken = feed(OpenAIChat(), RequestRecord(1, send=0.0), lines, 0.2)
    records = [three_tokens(), http_error(), broken, http_error()]
    assert failure_lines(records) == ["2 request(s) failed with 429",  # an HTTP status without a body
                                      f"1 request(s) failed with {STREAM_ERROR}: engine process exited"]
    assert failure_lines([three_tokens()]) == []


def test_tgi_placeholder_end_event_is_not_a_token() -> None:
    # A last step without a token ends TGI's stream with an empty special event; the count says so.
    lines = [(0.1, tgi_event("a")), (0.2, tgi_event("b")), (0.3, tgi_event("", True, 2))]
    record = feed(TGI(), RequestRecord(0, send=0.0), lines, 0.3)
    assert (record.chunks, record.output_tokens) == ([0.1, 0.2], 2)
    # ...but an end-of-sequence token with empty text that the server counted is one.
    lines[-1] = (0.3, tgi_event("", True, 3))
    assert feed(TGI(), RequestRecord(0, send=0.0), lines, 0.3).chunks == [0.1, 0.2, 0.3]


def test_percentile_interpolates_like_numpy() -> None:
    values = [5.0, 1.0, 4.0, 2.0]
    assert [percentile(values, q) for q in (0, 50, 90, 100)] == pytest.approx([1.0, 3.0, 4.7, 5.0])
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("text", ["ttft=5", "ttft_ms=fast", "tpot_ms=-1", "ttft_ms"])
def test_bad_slo_names_the_part(text: str) -> None:
    with pytest.raises(BenchUsageError, match="--slo"):
        parse_slo(text)


def test_every_dialect_asks_for_greedy_decoding_or_the_given_temperature() -> None:
    from lmserve.bench.dialects import Prompt

    prompt = Prompt("hello", 4)
    for api in (OpenAICompletions(), OpenAIChat()):
        assert api.body(prompt, None, True)["temperature"] == 0.0
        assert api.body(prompt, None, True, 0.7)["temperature"] == 0.7
    for api in (TGI(), LMI()):  # greedy unless do_sample is set
        assert "do_sample" not in api.body(prompt, None, True)["parameters"]
        assert api.body(prompt, None, True, 0.7)["parameters"] | {"do_sample": True, "temperature": 0.7} == \
            api.body(prompt, None, True, 0.7)["parameters"]


def test_a_negative_temperature_is_refused_by_name() -> None:
    from lmserve.bench.bench import load_spec
    from lmserve.cli import build_parser

    ns = build_parser().parse_args(["bench", "http://127.0.0.1:1", "--temperature", "-1"])
    with pytest.raises(BenchUsageError, match="--temperature"):
        load_spec(ns)
