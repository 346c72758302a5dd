"""The Python SDK: the seed's notebook journey with the names SageMaker Python SDK users know.

    from lmserve.sdk import Model, S3Uploader
    uri = S3Uploader.upload("mymodel.tar.gz", "s3://bucket/models/")
    predictor = Model(model_data=uri).deploy(instance_type="local")
    predictor.predict({"inputs": "Hello", "parameters": {"max_new_tokens": 20}})
    predictor.delete_endpoint()

It starts and talks to lmserve servers over HTTP only; it imports no part of the server.
"""

from lmserve.sdk.endpoints import EndpointNotFoundError, EndpointRecord, list_endpoints
from lmserve.sdk.model import DeployError, Model
from lmserve.sdk.packaging import package
from lmserve.sdk.predictor import AsyncPredictor, PredictionError, Predictor
from lmserve.sdk.s3 import S3Downloader, S3Uploader
from lmserve.sdk.serializers import (
    BytesDeserializer,
    IdentitySerializer,
    JSONDeserializer,
    JSONSerializer,
    StringDeserializer,
)

__all__ = ["AsyncPredictor", "BytesDeserializer", "DeployError", "EndpointNotFoundError", "EndpointRecord",
           "IdentitySerializer", "JSONDeserializer", "JSONSerializer", "Model", "PredictionError", "Predictor",
           "S3Downloader", "S3Uploader", "StringDeserializer", "list_endpoints", "package"]  # fmt: skip
