"""Configuration: serving.properties, environment and CLI flags into frozen dataclasses.

``load_serving_config`` is the one function that builds a ``ServingConfig``; ``keys.KEYS`` is the one
table of supported keys; ``add_serve_arguments``/``cli_overrides`` turn it into CLI flags and
``render_keys_markdown`` into the key reference.
"""

from lmserve.config.flags import add_serve_arguments, cli_overrides
from lmserve.config.keys import KEYS, Key
from lmserve.config.load import default_model_name, load_serving_config
from lmserve.config.properties import PropertiesFile, Property, parse_properties, read_properties
from lmserve.config.reference import render_keys_markdown
from lmserve.config.settings import (
    BatchingConfig,
    EngineConfig,
    ModelSpec,
    ServerConfig,
    ServingConfig,
    WorkerConfig,
)
from lmserve.config.values import DEFAULT_ENTRY_POINT, TENSOR_PARALLEL_MAX

__all__ = [
    "DEFAULT_ENTRY_POINT",
    "KEYS",
    "TENSOR_PARALLEL_MAX",
    "BatchingConfig",
    "EngineConfig",
    "Key",
    "ModelSpec",
    "PropertiesFile",
    "Property",
    "ServerConfig",
    "ServingConfig",
    "WorkerConfig",
    "add_serve_arguments",
    "cli_overrides",
    "default_model_name",
    "load_serving_config",
    "parse_properties",
    "read_properties",
    "render_keys_markdown",
]
