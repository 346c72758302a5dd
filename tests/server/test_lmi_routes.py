"""SageMaker/LMI routes: /invocations and /predictions/{model}, plain and streamed."""

from __future__ import annotations

import json

import httpx

from tests.server.conftest import MODEL_NAME


def greedy_words(prompt_ids: list[int], n: int) -> list[str]:
    """What the fake engine generates greedily for a prompt with these token ids."""
    return [f"w{(sum(prompt_ids) + i) % 40}" for i in range(n)]


# "hello world" is ids [43, 44] in the tiny tokenizer (no BOS is added by it).
HELLO = [43, 44]


def test_invocations_returns_generated_text(http: httpx.Client) -> None:
    r = http.post("/invocations", json={"inputs": "hello world", "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200, r.text
    assert r.json() == {"generated_text": " ".join(greedy_words(HELLO, 4))}


def test_list_input_gives_a_list_and_details_describe_tokens(http: httpx.Client) -> None:
    r = http.post("/invocations", json={"inputs": ["hello world", "the cat"],
                                        "parameters": {"max_new_tokens": 3, "details": True}})  # fmt: skip
    assert r.status_code == 200, r.text
    first, second = r.json()
    assert first["generated_text"] == " ".join(greedy_words(HELLO, 3))
    details = first["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 3
    assert details["inputs"] == "hello world"
    assert [t["text"] for t in details["tokens"]] == greedy_words(HELLO, 3)
    assert all(isinstance(t["id"], int) and t["log_prob"] <= 0 for t in details["tokens"])
    assert second["details"]["inputs"] == "the cat"


def test_return_full_text_prepends_the_prompt(http: httpx.Client) -> None:
    r = http.post("/invocations", json={"inputs": "hello world",
                                        "parameters": {"max_new_tokens": 2, "return_full_text": True}})  # fmt: skip
    assert r.json()["generated_text"] == "hello world" + " ".join(greedy_words(HELLO, 2))


def test_stop_sequence_ends_generation(http: httpx.Client) -> None:
    words = greedy_words(HELLO, 6)
    r = http.post("/invocations", json={"inputs": "hello world", "parameters": {
        "max_new_tokens": 6, "stop_sequences": [words[2]], "details": True}})  # fmt: skip
    body = r.json()
    assert body["generated_text"] == " ".join(words[:2]) + " "
    assert body["details"]["finish_reason"] == "stop_sequence"


def test_do_sample_false_is_greedy_whatever_the_temperature(http: httpx.Client) -> None:
    payload = {"inputs": "hello world", "parameters": {"max_new_tokens": 5, "do_sample": False,
                                                       "temperature": 1.5, "seed": 3}}  # fmt: skip
    assert http.post("/invocations", json=payload).json()["generated_text"] == " ".join(greedy_words(HELLO, 5))


def test_sampling_follows_the_seed(http: httpx.Client) -> None:
    def run(seed: int) -> str:
        payload = {"inputs": "hello world", "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": seed}}
        return http.post("/invocations", json=payload).json()["generated_text"]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1) != " ".join(greedy_words(HELLO, 8))


def test_predictions_route_checks_the_model_name(http: httpx.Client) -> None:
    ok = http.post(f"/predictions/{MODEL_NAME}", json={"inputs": "hello", "parameters": {"max_new_tokens": 1}})
    assert ok.status_code == 200 and ok.json()["generated_text"]
    missing = http.post("/predictions/other", json={"inputs": "hello"})
    assert missing.status_code == 404 and missing.json()["code"] == 404 and "other" in missing.json()["error"]


def test_the_direct_routes_keep_the_schema_query_and_methods_of_their_fastapi_twins(http: httpx.Client) -> None:
    # /invocations and /predictions/{model} are served by plain routes ahead of FastAPI's (less CPU a
    # request); what a client sees must not change.
    named = http.post(f"/invocations?model_name={MODEL_NAME}", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
    assert named.status_code == 200 and named.json()["generated_text"]
    other = http.post("/invocations?model_name=other", json={"inputs": "hi"})
    assert other.status_code == 404 and "other" in other.json()["error"]
    assert http.get("/invocations").status_code == 405 and http.get(f"/predictions/{MODEL_NAME}").status_code == 405
    bad = http.post("/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": "many"}})
    assert bad.status_code == 400 and bad.json()["field"] == "parameters.max_new_tokens"  # the error table's shape
    paths = http.get("/openapi.json").json()["paths"]
    assert "post" in paths["/invocations"] and "post" in paths["/predictions/{model_name}"]
    assert any(p["name"] == "model_name" for p in paths["/invocations"]["post"]["parameters"])


def test_stream_is_json_lines_one_token_each_and_a_final_text(http: httpx.Client) -> None:
    payload = {"inputs": "hello world", "stream": True, "parameters": {"max_new_tokens": 4, "details": True}}
    with http.stream("POST", "/invocations", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/jsonlines")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) == 4
    assert [line["token"]["text"] for line in lines] == \
        [w if i == 0 else " " + w for i, w in enumerate(greedy_words(HELLO, 4))]  # fmt: skip
    assert all(line["generated_text"] is None for line in lines[:-1])
    assert all(line["token"]["log_prob"] <= 0 for line in lines)
    assert lines[-1]["generated_text"] == " ".join(greedy_words(HELLO, 4))
    assert lines[-1]["details"]["finish_reason"] == "length" and lines[-1]["details"]["generated_tokens"] == 4
