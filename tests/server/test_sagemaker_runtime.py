"""The SageMaker Runtime API served locally, called with boto3's own ``sagemaker-runtime`` client,
unchanged, over the fake engine."""

from __future__ import annotations

import json
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.server.conftest import MODEL_NAME, LiveServer


@pytest.fixture
def runtime(live: LiveServer) -> Any:
    return boto3.client("sagemaker-runtime", endpoint_url=live.url, region_name="us-east-1",
                        aws_access_key_id="local", aws_secret_access_key="local",
                        config=Config(retries={"max_attempts": 1}))  # fmt: skip


def invoke(runtime: Any, body: dict[str, Any], endpoint: str = MODEL_NAME) -> dict[str, Any]:
    answer = runtime.invoke_endpoint(EndpointName=endpoint, ContentType="application/json", Body=json.dumps(body))
    return json.loads(answer["Body"].read())


def test_invoke_endpoint_answers_like_invocations(runtime: Any, http: httpx.Client) -> None:
    body = {"inputs": "hello world", "parameters": {"max_new_tokens": 6}}
    expected = http.post("/invocations", json=body).json()
    assert invoke(runtime, body) == expected
    assert expected["generated_text"]
    batch = invoke(runtime, {"inputs": ["a", "b"], "parameters": {"max_new_tokens": 2}})
    assert [len(item["generated_text"]) > 0 for item in batch] == [True, True]


def test_response_stream_tokens_join_to_the_non_streamed_text(runtime: Any) -> None:
    body = {"inputs": "hello world", "parameters": {"max_new_tokens": 8}}
    whole = invoke(runtime, body)["generated_text"]
    answer = runtime.invoke_endpoint_with_response_stream(EndpointName=MODEL_NAME, ContentType="application/json",
                                                          Body=json.dumps(body | {"stream": True}))  # fmt: skip
    assert answer["ContentType"] == "application/jsonlines"
    parts = [event["PayloadPart"]["Bytes"] for event in answer["Body"]]
    assert len(parts) > 1  # cut as the tokens are made, not one part at the end
    lines = [json.loads(line) for line in b"".join(parts).decode().splitlines() if line]
    assert "".join(line["token"]["text"] for line in lines) == whole
    assert lines[-1]["generated_text"] == whole


def test_response_stream_without_stream_flag_sends_the_whole_answer_in_one_part(runtime: Any) -> None:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 3}}
    answer = runtime.invoke_endpoint_with_response_stream(EndpointName=MODEL_NAME, ContentType="application/json",
                                                          Body=json.dumps(body))  # fmt: skip
    [part] = [event["PayloadPart"]["Bytes"] for event in answer["Body"]]
    assert json.loads(part) == invoke(runtime, body)


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_errors_name_the_problem(runtime: Any, stream: bool) -> None:
    call = runtime.invoke_endpoint_with_response_stream if stream else runtime.invoke_endpoint
    with pytest.raises(ClientError) as unknown:
        call(EndpointName="nope", ContentType="application/json", Body=b'{"inputs": "x"}')
    assert unknown.value.response["Error"]["Code"] == "ValidationError"
    assert "'nope'" in unknown.value.response["Error"]["Message"]
    assert unknown.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as bad:
        call(EndpointName=MODEL_NAME, ContentType="application/json",
             Body=json.dumps({"inputs": "x", "parameters": {"top_p": 2}}))  # fmt: skip
    assert bad.value.response["Error"]["Code"] == "ValidationError"
    assert "parameters.top_p" in bad.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as not_json:
        call(EndpointName=MODEL_NAME, ContentType="application/json", Body=b"{not json")
    assert "not valid JSON" in not_json.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as csv:
        call(EndpointName=MODEL_NAME, ContentType="text/csv", Body=b"a,b")
    assert "text/csv" in csv.value.response["Error"]["Message"]


def test_the_sagemaker_sdks_own_predictor_works_unchanged(runtime: Any, tmp_path: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no user sagemaker config is read
    sagemaker = pytest.importorskip("sagemaker")
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer

    session = sagemaker.Session(boto_session=boto3.Session(region_name="us-east-1", aws_access_key_id="local",
                                                           aws_secret_access_key="local"),
                                sagemaker_runtime_client=runtime)  # fmt: skip
    predictor = Predictor(MODEL_NAME, sagemaker_session=session, serializer=JSONSerializer(),
                          deserializer=JSONDeserializer())  # fmt: skip
    body = {"inputs": "hello world", "parameters": {"max_new_tokens": 5}}
    assert predictor.predict(body) == invoke(runtime, body)
