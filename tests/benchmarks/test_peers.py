"""The pure helpers of the peer benchmarks: workload choice, the TinyLlama-shaped checkpoint, the
llama-server command line. No timing: the benchmarks themselves are run by hand."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import offline_throughput  # noqa: E402
import vs_llama_cpp  # noqa: E402
from peers.cpuinfo import describe_cpu  # noqa: E402
from peers.model_shapes import TINYLLAMA_1_1B, LlamaShape, llama_config, random_checkpoint, weight_shapes  # noqa: E402


def test_tinyllama_shape_has_the_published_parameter_count() -> None:
    # TinyLlama-1.1B's model card: 1,100,048,384 parameters.
    assert TINYLLAMA_1_1B.num_parameters() == 1_100_048_384
    assert sum(math.prod(d) for d in weight_shapes(TINYLLAMA_1_1B).values()) == 1_100_048_384


def test_weight_names_and_shapes_are_what_transformers_builds() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LlamaShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=96, vocab_size=128)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**llama_config(shape)))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert weight_shapes(shape) == expected


def test_random_checkpoint_loads_in_transformers_and_lmserve(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from lmserve.engine.tokenizer import Tokenizer

    shape = LlamaShape(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=48, vocab_size=300)
    out = random_checkpoint(shape, tmp_path / "random")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    assert Tokenizer(out).vocab_size == 300
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert random_checkpoint(shape, out) == out  # written once, then reused
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_model_shape_picks_the_issue_workload_unless_overridden() -> None:
    tiny = offline_throughput.parse_args(["--model-shape", "tinyllama-1.1b"])
    assert (tiny.num_requests, tiny.min_prompt, tiny.max_prompt, tiny.new_tokens, tiny.hf_batch) == (16, 128, 384, 64, 16)
    default = offline_throughput.parse_args(["--new-tokens", "8"])
    assert (default.num_requests, default.min_prompt, default.max_prompt, default.new_tokens) == (64, 64, 512, 8)
    assert default.hf_batch == 32


def test_unknown_system_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        offline_throughput.parse_args(["--systems", "lmserve,openvino"])
    assert "openvino" in capsys.readouterr().err and "ov-genai" in offline_throughput.SYSTEMS


def test_rounds_alternate_the_order_and_give_each_round_fresh_prompts_of_the_same_lengths(
        capsys: pytest.CaptureFixture[str]) -> None:
    prompts = offline_throughput.make_workload(32000, 6, 10, 40, seed=0)
    first = offline_throughput.round_prompts(prompts, 32000, 0, 0)
    second = offline_throughput.round_prompts(prompts, 32000, 0, 1)
    third = offline_throughput.round_prompts(prompts, 32000, 0, 2)
    assert first == prompts
    assert [len(p) for p in second] == [len(p) for p in third] == [len(p) for p in prompts]
    # no round shares a prompt's first tokens with another: nothing for a prefix cache to find
    heads = [tuple(p[:4]) for p in first + second + third]
    assert len(set(heads)) == len(heads)
    assert all(100 <= t < 32000 for p in second for t in p)
    assert offline_throughput.round_prompts(prompts, 32000, 0, 1) == second  # reproducible
    systems = ["lmserve", "hf-static", "ov-genai"]
    assert offline_throughput.round_order(systems, 0) == systems
    assert offline_throughput.round_order(systems, 1) == systems[::-1]
    assert offline_throughput.parse_args(["--rounds", "3"]).rounds == 3
    with pytest.raises(SystemExit):
        offline_throughput.parse_args(["--rounds", "0"])
    assert "--rounds" in capsys.readouterr().err


def test_llama_server_gets_a_slot_per_stream_and_room_for_each_request() -> None:
    args = vs_llama_cpp.parse_args(["--streams", "16,1"])
    assert args.streams == [16, 1] and args.quantize == ["none"]
    ctx = vs_llama_cpp.context_size(16, 200, 128)
    assert ctx // 16 >= 200 + 128
    command = vs_llama_cpp.llama_server_command(Path("llama-server"), Path("m.gguf"), 8081, slots=16, ctx=ctx,
                                                threads=2)
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["--parallel"] == "16" and flags["--ctx-size"] == str(ctx) and flags["--threads"] == "2"


def test_bad_streams_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        vs_llama_cpp.parse_args(["--streams", "16,x"])
    assert "--streams" in capsys.readouterr().err


def test_each_level_reports_its_median_round_and_needs_one(capsys: pytest.CaptureFixture[str]) -> None:
    rounds = [_summary(300, 1.0), _summary(100, 1.0), _summary(200, 1.0)]
    assert vs_llama_cpp.median_round(rounds) is rounds[2]  # type: ignore[arg-type]
    assert vs_llama_cpp.median_round(rounds[:2]) is rounds[1]  # type: ignore[arg-type]  # even: the lower
    assert vs_llama_cpp.parse_args([]).rounds == 3
    with pytest.raises(SystemExit):
        vs_llama_cpp.parse_args(["--rounds", "0"])
    assert "--rounds" in capsys.readouterr().err


def test_cpu_description_names_model_and_the_flags_that_matter() -> None:
    text = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 sha_ni\n"
    line = describe_cpu(text)
    assert line.startswith("AMD EPYC 9R14,")
    assert line.endswith("flags: avx2 fma avx512f avx512_bf16")


def test_greedy_agreement_counts_each_output_up_to_its_first_difference() -> None:
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert offline_throughput.agreement(reference, [[1, 2, 3, 4], [5, 6, 7, 8]]) == 1.0
    # first identical, second parts after one token: (4/4 + 1/4) / 2
    assert offline_throughput.agreement(reference, [[1, 2, 3, 4], [5, 9, 7, 8]]) == 0.625
    assert offline_throughput.agreement(reference, [[9, 2, 3, 4], [9, 6, 7, 8]]) == 0.0


def _summary(tokens: int, seconds: float) -> object:
    from lmserve.bench.metrics import summarize
    from lmserve.bench.records import RequestRecord

    return summarize([RequestRecord(0, send=0.0, end=seconds, chunks=[0.1, seconds], output_tokens=tokens)])


def test_table_gives_ratios_at_the_same_level_and_the_share_kept_under_load(capsys: pytest.CaptureFixture[str]) -> None:
    Row = vs_llama_cpp.Row
    vs_llama_cpp.print_table([Row("llama.cpp", 16, _summary(100, 1.0)), Row("lmserve", 16, _summary(300, 1.0)),
                              Row("llama.cpp", 16, _summary(10, 1.0), busy=1),
                              Row("lmserve", 16, _summary(120, 1.0), busy=1)])  # type: ignore[arg-type]
    lines = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| l")}
    assert "| 3.00x | - | - |" in lines[("lmserve", "16", "0")]
    assert "| 12.00x | 40% | - |" in lines[("lmserve", "16", "1")]
    assert "| 1.00x | 10% | - |" in lines[("llama.cpp", "16", "1")]


def test_table_shows_every_rounds_median_first_token(capsys: pytest.CaptureFixture[str]) -> None:
    Row = vs_llama_cpp.Row
    vs_llama_cpp.print_table([Row("lmserve", 16, _summary(300, 1.0), round_ttfts=(547.2, 705.6, 100.0)),
                              Row("llama.cpp", 16, _summary(100, 1.0))])  # type: ignore[arg-type]
    lines = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| l")}
    assert "| 100 | 547/706/100 |" in lines["lmserve"]  # the median round's, then every round's
    assert "| 100 | - |" in lines["llama.cpp"]


def test_only_bf16_lmserve_unloaded_is_measured_against_the_ttft_floor(capsys: pytest.CaptureFixture[str]) -> None:
    Row = vs_llama_cpp.Row  # _summary's first token comes after 100 ms
    vs_llama_cpp.print_table([Row("llama.cpp", 16, _summary(100, 1.0)), Row("lmserve", 16, _summary(300, 1.0)),
                              Row("lmserve int4", 16, _summary(300, 1.0)),
                              Row("lmserve", 16, _summary(120, 1.0), busy=1)], floors={16: 80.0})  # type: ignore[arg-type]
    lines = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| l")}
    assert lines[("lmserve", "16", "0")].endswith("| 1.25x |")
    for other in (("llama.cpp", "16", "0"), ("lmserve int4", "16", "0"), ("lmserve", "16", "1")):
        assert lines[other].endswith("| - |")


def test_first_tokens_of_a_burst_wait_for_the_prompts_before_them() -> None:
    from peers.roofline import first_token_floors

    from lmserve.bench.metrics import percentile

    # 16 streams, 16 prompts of 2 GFLOP at 1 TFLOP/s: the k-th first token needs k prompts, 2k ms.
    burst = first_token_floors(2e9, 16, 16, 1e12)
    assert burst == pytest.approx([0.002 * k for k in range(1, 17)])
    assert percentile(burst, 50) == pytest.approx(0.017)  # between the 8th and the 9th
    # One stream: every request arrives alone. Four streams of eight: a burst of four, then one at a time.
    assert first_token_floors(2e9, 8, 1, 1e12) == pytest.approx([0.002] * 8)
    assert first_token_floors(2e9, 8, 4, 1e12) == pytest.approx([0.002, 0.004, 0.006, 0.008] + [0.002] * 4)
    assert vs_llama_cpp.level_requests(vs_llama_cpp.parse_args(["--streams", "4"]), 4) == 8
    assert vs_llama_cpp.level_requests(vs_llama_cpp.parse_args(["--num-requests", "3"]), 16) == 3


def test_single_stream_prompt_fits_a_vocabulary_smaller_than_the_default_models() -> None:
    # It was drawn from the default model's 49152 ids whatever the model: out of range for 32000.
    for _ in range(3):
        prompt = offline_throughput.single_stream_prompt(32000)
        assert len(prompt) == 16 and max(prompt) < 32000
    assert offline_throughput.single_stream_prompt(32000) == offline_throughput.single_stream_prompt(32000)


def test_the_floor_counts_each_weight_once_per_pass_and_the_last_request_decodes_alone(tmp_path: Path) -> None:
    from peers.roofline import Floor, Work, workload

    shape = LlamaShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=100)
    (tmp_path / "config.json").write_text(json.dumps(llama_config(shape)))
    # Per layer: q and o 64x64, k and v 64x32 (2 KV heads of 16), gate, up and down 64x128.
    linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    head = 100 * 64
    attention = 2 * 2 * 4 * 16 * 2  # per (query, key) pair: 2 layers, QK^T and PV, 2 FLOPs per head dimension
    # Prompts of 3 and 5 tokens, 2 new each: the prompts' passes give the first token of each. In the
    # last layer every prompt token computes its key and value, and only each prompt's last token the
    # rest of the layer and its attention...
    layer, kv = linear // 2, 2 * 64 * 32
    prompts = (2 * (layer + kv) * 8 + 2 * (layer - kv) * 2 + 2 * head * 2
               + attention // 2 * (3 * 4 // 2 + 5 * 6 // 2) + attention // 2 * (3 + 5))
    # ...then one decode pass per request, over 4 and 6 positions.
    decode = 2 * (linear + head) * 2 + attention * (4 + 6)
    work = workload(tmp_path, [3, 5], 2)
    assert work == Work(flops=prompts + decode, prompt_flops=prompts, weight_bytes=2 * (linear + head), serial_passes=1)
    # Compute-bound: all the arithmetic at the kernel's rate is the longer bound.
    fast_memory = Floor(work, rate=work.flops / 2, kernel="k", bandwidth=1e12)
    assert fast_memory.seconds == fast_memory.compute_seconds == 2
    # Memory-bound: the prompts' arithmetic, then the last request's pass reading every weight.
    slow_memory = Floor(work, rate=work.flops / 2, kernel="k", bandwidth=work.weight_bytes / 3)
    assert slow_memory.seconds == slow_memory.serial_seconds == pytest.approx(2 * prompts / work.flops + 3)
