"""The default text-classification handler, picked from a ...ForSequenceClassification checkpoint:
label and score match transformers run directly on the same (small, random) model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.handlers.conftest import minilm_dir, start_handler_server

TEXTS = ["what a lovely day", "this is terrible", "lmserve"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    import transformers

    path = tmp_path_factory.mktemp("classifier")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, path / name)  # a real BERT tokenizer for a small random model
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3,
                                     id2label={0: "sad", 1: "neutral", 2: "happy"},
                                     label2id={"sad": 0, "neutral": 1, "happy": 2})  # fmt: skip
    transformers.BertForSequenceClassification(config).eval().save_pretrained(path)
    return path


def test_labels_and_scores_match_transformers(classifier: Path) -> None:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(classifier)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    want = []
    for text in TEXTS:
        with torch.inference_mode():
            probs = model(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
        want.append((model.config.id2label[int(probs.argmax())], float(probs.max())))
    server = start_handler_server(classifier, batch_size=4, max_batch_delay_ms=5)
    try:
        with server.client() as http:
            many = http.post("/invocations", json={"inputs": TEXTS})
            one = http.post("/invocations", json={"inputs": TEXTS[0]})
    finally:
        server.stop()
    assert many.status_code == 200, many.text
    got = [(answer["label"], answer["score"]) for answer in many.json()]
    assert [label for label, _ in got] == [label for label, _ in want]
    assert all(abs(g - w) < 1e-4 for (_, g), (_, w) in zip(got, want, strict=True))
    assert one.json()[0]["label"] == want[0][0] and abs(one.json()[0]["score"] - want[0][1]) < 1e-4
