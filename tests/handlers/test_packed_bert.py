"""The padding-free BERT forward of the embedding handler gives transformers' numbers: the same
token states for texts of very different lengths in one batch, in fp32 and with bf16 matmuls."""

from __future__ import annotations

from typing import Any

import pytest

from lmserve.handlers.encoders import _use_bf16
from tests.handlers.conftest import minilm_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["lmserve", "The cat sits on the mat.", "A quick brown fox jumps over the lazy dog, twice, and then "
         "once more for good measure, because a batch needs one long text beside the short ones.", "ok?"]


@pytest.fixture(scope="module")
def bert() -> tuple[Any, Any]:
    path = minilm_dir()
    return transformers.AutoTokenizer.from_pretrained(path), transformers.AutoModel.from_pretrained(path).eval()


def padded_states(tokenizer: Any, model: Any) -> list[Any]:
    """Each text's token states from transformers' padded batch, padding rows dropped."""
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    return [hidden[i, : int(n)] for i, n in enumerate(batch["attention_mask"].sum(dim=1))]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-matmuls"])
@pytest.mark.parametrize("attention", ["matmul", "sdpa", "kernel"])
def test_packed_states_match_transformers_padded_batch(bert: tuple[Any, Any], bf16: bool, attention: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from lmserve.handlers import packed_bert
    from lmserve.handlers.packed_bert import PackedBert, first_token, mean_pool

    # Short texts take the batched-matmul attention, long ones scaled_dot_product_attention: both
    # are checked on the same texts by moving the limit below them.
    monkeypatch.setattr(packed_bert, "MATMUL_ATTENTION_UP_TO", 512 if attention == "matmul" else 1)

    tokenizer, model = bert
    assert PackedBert.supports(model)
    ids = tokenizer(TEXTS)["input_ids"]
    lengths = [len(i) for i in ids]
    forward = PackedBert(model)
    forward.set_matmul_dtype(torch.bfloat16 if bf16 else torch.float32)
    if attention == "kernel":
        if not forward.attention_kernel_available():
            pytest.skip("the compiled attention does not run here (no AVX-512 build of the CPU kernels)")
        forward.use_attention_kernel(True)
        assert forward.attention_kernel
    with torch.inference_mode():
        packed = forward(ids)
    want = padded_states(tokenizer, model)

    assert packed.shape == (sum(lengths), model.config.hidden_size)
    got = list(packed.split(lengths))
    for g, w in zip(got, want, strict=True):
        cosine = torch.nn.functional.cosine_similarity(g, w, dim=1).min().item()
        assert cosine > (0.999 if bf16 else 0.99999)
    pooled = torch.nn.functional.cosine_similarity(mean_pool(packed, lengths), torch.stack([w.mean(0) for w in want]))
    assert pooled.min().item() > (0.999 if bf16 else 0.99999)
    assert torch.equal(first_token(packed, lengths), torch.stack([g[0] for g in got]))
    with torch.inference_mode():  # one text alone: no padding anywhere, attention without a mask
        alone = forward([ids[2]])
    assert torch.nn.functional.cosine_similarity(alone, want[2], dim=1).min().item() > (0.999 if bf16 else 0.99999)


def test_an_explicit_dtype_is_taken_without_measuring() -> None:
    def never(texts: list[str]) -> Any:
        raise AssertionError("measured although the operator chose")

    assert _use_bf16("fp32", never, lambda on: None) is False
    assert _use_bf16("bf16", never, lambda on: None) is True


def test_attention_stays_in_torch_where_the_compiled_kernel_does_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmserve.handlers import encoders
    from lmserve.handlers.packed_bert import PackedBert

    class Embedder:  # what _choose_attention_kernel reads of an embedder
        packed = PackedBert.__new__(PackedBert)

        def vectors(self, texts: list[str]) -> Any:
            raise AssertionError("measured although the kernel cannot run")

    monkeypatch.setattr(PackedBert, "attention_kernel_available", lambda self: False)
    assert encoders._choose_attention_kernel(Embedder()) is False  # type: ignore[arg-type]
