"""The default text-embedding handler on a real sentence-transformers checkpoint (all-MiniLM-L6-v2):
its vectors match mean pooling + L2 normalisation computed directly with transformers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.handlers.conftest import minilm_dir, start_handler_server
from tests.server.conftest import LiveServer

TEXTS = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog, twice.", "lmserve"]


@pytest.fixture(scope="module")
def minilm() -> Path:
    return minilm_dir()


@pytest.fixture(scope="module")
def reference(minilm: Path) -> list[list[float]]:
    """sentence-transformers' computation, written out with transformers."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    model = transformers.AutoModel.from_pretrained(minilm).eval()
    vectors = []
    for text in TEXTS:  # one at a time: no padding at all in the reference
        batch = tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state[0]
        vectors.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist())
    return vectors


@pytest.fixture(scope="module")
def live(minilm: Path) -> Iterator[LiveServer]:
    server = start_handler_server(minilm, batch_size=8, max_batch_delay_ms=20)
    yield server
    server.stop()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def test_invocations_match_mean_pooling_computed_with_transformers(live: LiveServer,
                                                                   reference: list[list[float]]) -> None:  # fmt: skip
    with live.client() as http:
        many = http.post("/invocations", json={"inputs": TEXTS})
        one = http.post("/invocations", json={"inputs": TEXTS[1]})
    assert many.status_code == 200 and one.status_code == 200, (many.text, one.text)
    vectors = many.json()
    assert len(vectors) == len(TEXTS) and len(vectors[0]) == 384
    for got, want in zip(vectors, reference, strict=True):
        assert cosine(got, want) > 0.999
    assert cosine(one.json()[0], reference[1]) > 0.999


def test_openai_client_embeddings_create_works_unchanged(live: LiveServer, reference: list[list[float]]) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    result = client.embeddings.create(model=live.runtime.name, input=TEXTS)  # the client asks for base64
    assert [item.index for item in result.data] == [0, 1, 2]
    for item, want in zip(result.data, reference, strict=True):
        assert cosine(item.embedding, want) > 0.999
    assert result.usage.prompt_tokens > len(TEXTS)
    floats = client.embeddings.create(model=live.runtime.name, input=TEXTS[0], encoding_format="float")
    assert cosine(floats.data[0].embedding, reference[0]) > 0.999


def test_a_bad_request_gets_its_own_400_and_generation_routes_refuse_by_name(live: LiveServer) -> None:
    with live.client() as http:
        bad = http.post("/invocations", json={"text": "no inputs"})
        generate = http.post("/generate", json={"inputs": "hello"})
        tokens = http.post("/v1/embeddings", json={"input": [[1, 2, 3]]})
    assert bad.status_code == 400 and bad.json()["field"] == "inputs"
    assert generate.status_code == 400 and "/invocations" in generate.json()["error"]
    assert tokens.status_code == 400 and tokens.json()["field"] == "input"


def test_a_batch_in_pieces_gives_the_vectors_of_one_piece(minilm: Path, reference: list[list[float]]) -> None:
    import torch

    from lmserve.handlers.encoders import _Embedder, _pieces

    assert _pieces([5, 5, 5, 5], 10) == [(0, 2), (2, 4)]
    assert _pieces([12, 3], 10) == [(0, 1), (1, 2)]  # a text over the limit goes alone
    assert _pieces([3, 3], None) == [(0, 2)]
    embedder = _Embedder(str(minilm))
    whole, counts = embedder.vectors(TEXTS * 4)
    embedder.chunk_tokens = 16  # about one text a piece
    pieces, counts_in_pieces = embedder.vectors(TEXTS * 4)
    assert counts_in_pieces == counts
    assert float(torch.nn.functional.cosine_similarity(whole, pieces).min()) > 0.99999
    expected = torch.tensor(reference * 4)
    assert float(torch.nn.functional.cosine_similarity(pieces, expected).min()) > 0.999
