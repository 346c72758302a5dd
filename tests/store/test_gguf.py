"""GGUF import: the converted directory loads in transformers and computes what the GGUF holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmserve.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from lmserve.store import gguf as gguf_import
from lmserve.store.gguf import IMPORT_RECORD, import_gguf, import_record

from .gguf_fixtures import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    LLAMA3_ROPE,
    MIXED_TYPES,
    TinyGguf,
    write_header_only_gguf,
    write_tiny_gguf,
)

VARIANTS = {
    "llama-f32": {"arch": "llama"},
    "llama-quantized": {"arch": "llama", "types": MIXED_TYPES},
    "qwen2-quantized-tied": {"arch": "qwen2", "types": MIXED_TYPES, "tied": True},
    "llama3-rope": {"arch": "llama", "rope_scaling": LLAMA3_ROPE},
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TinyGguf, Path]]:
    """Each variant written to GGUF and imported once for the whole module."""
    root = tmp_path_factory.mktemp("gguf")
    result = {}
    for name, kwargs in VARIANTS.items():
        tiny = write_tiny_gguf(root / f"{name}.gguf", **kwargs)
        result[name] = (tiny, import_gguf(tiny.path, root / name, progress=False))
    return result


@pytest.fixture
def fresh(tmp_path: Path) -> TinyGguf:
    return write_tiny_gguf(tmp_path / "model.gguf", types=MIXED_TYPES)


def _input_ids(vocab_size: int) -> torch.Tensor:
    # long enough that rotary positions (and so any rope error) matter
    return torch.arange(48).mul(37).remainder(vocab_size).unsqueeze(0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_the_gguf_model(imported: dict, variant: str) -> None:
    tiny, out = imported[variant]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _input_ids(tiny.model.config.vocab_size)
    with torch.no_grad():
        got, want = model(ids).logits, tiny.model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_quantized_tensors_become_float32_and_float_tensors_keep_their_dtype(imported: dict) -> None:
    tiny, out = imported["llama-quantized"]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        dtypes = {name: f.get_tensor(name).dtype for name in f.keys()}  # noqa: SIM118
        q_proj = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # Q8_0
    assert dtypes["model.layers.1.self_attn.k_proj.weight"] == torch.float32  # Q4_1
    assert dtypes["model.layers.1.self_attn.v_proj.weight"] == torch.bfloat16
    assert dtypes["lm_head.weight"] == torch.float16
    assert dtypes["model.norm.weight"] == torch.float32
    # Q4_1 and un-permuted: the rows are back in Hugging Face order
    torch.testing.assert_close(q_proj, tiny.model.model.layers[0].self_attn.q_proj.weight.detach(),
                               rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["llama-f32", "qwen2-quantized-tied"])
def test_config_describes_the_model(imported: dict, variant: str) -> None:
    tiny, out = imported[variant]
    config = json.loads((out / "config.json").read_text())
    ref = tiny.float_model.config
    assert config["architectures"] == [type(tiny.float_model).__name__]
    assert config["model_type"] == ref.model_type
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps"):
        assert config[key] == getattr(ref, key), key
    assert config["head_dim"] == ref.hidden_size // ref.num_attention_heads  # Qwen2Config has no head_dim
    assert config["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert config["tie_word_embeddings"] is ref.tie_word_embeddings
    assert config["eos_token_id"] == tiny.tokenizer.token_to_id(EOS_TOKEN)
    assert config["bos_token_id"] == tiny.tokenizer.token_to_id("<|im_start|>")
    assert "rope_scaling" not in config


def test_llama3_rope_scaling_is_recovered(imported: dict) -> None:
    _, out = imported["llama3-rope"]
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == LLAMA3_ROPE


def test_tokenizer_round_trips_text(imported: dict) -> None:
    tiny, out = imported["llama-f32"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "What is the capital of France? Paris, café 🚀"
    ids = tokenizer.encode(text)
    assert ids == tiny.tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_end|>") == [tiny.tokenizer.token_to_id("<|im_end|>")]


def test_chat_template_and_special_tokens_are_saved(imported: dict) -> None:
    _, out = imported["qwen2-quantized-tied"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == EOS_TOKEN
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_generation_stops_at_eos_and_end_of_turn(imported: dict) -> None:
    tiny, out = imported["llama-f32"]
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [tiny.tokenizer.token_to_id(EOS_TOKEN), tiny.tokenizer.token_to_id("<|im_end|>")]


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    path = write_header_only_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'") as info:
        import_gguf(path, tmp_path / "out", progress=False)
    assert "llama" in str(info.value) and "qwen2" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_or_invalid_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(UnsupportedModelError, match="text.gguf"):
        import_gguf(tmp_path / "text.gguf", tmp_path / "out", progress=False)


def test_reimport_of_the_same_file_does_no_work(fresh: TinyGguf, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = import_gguf(fresh.path, tmp_path / "out", progress=False)
    record = import_record(out)

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_import, "_build", no_conversion)
    assert import_gguf(fresh.path, tmp_path / "out", progress=False) == out
    assert import_record(out) == record
    assert record is not None and record["source"] == "model.gguf" and record["size"] == fresh.path.stat().st_size


def test_a_changed_file_is_imported_again(fresh: TinyGguf, tmp_path: Path) -> None:
    out = import_gguf(fresh.path, tmp_path / "out", progress=False)
    first = import_record(out)
    write_tiny_gguf(fresh.path, types=MIXED_TYPES, seed=1)
    import_gguf(fresh.path, out, progress=False)
    second = import_record(out)
    assert first is not None and second is not None and first["sha256"] != second["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "out"]  # nothing left beside it


def test_interrupted_import_leaves_nothing_that_looks_complete(fresh: TinyGguf, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf_import, "_write_tokenizer", crash)  # after the weights are written
    with pytest.raises(RuntimeError, match="interrupted"):
        import_gguf(fresh.path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_interrupted_reimport_keeps_the_earlier_import(fresh: TinyGguf, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = import_gguf(fresh.path, tmp_path / "out", progress=False)
    before = import_record(out)
    write_tiny_gguf(fresh.path, seed=2)
    monkeypatch.setattr(gguf_import, "_write_tokenizer", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        import_gguf(fresh.path, out, progress=False)
    assert import_record(out) == before
    assert (out / "model.safetensors").is_file() and (out / IMPORT_RECORD).is_file()


def test_refuses_to_replace_a_directory_it_did_not_make(fresh: TinyGguf, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="out_dir"):
        import_gguf(fresh.path, out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
