"""Configuration: serving.properties, environment and CLI flags into frozen dataclasses."""

from lmserve.config.settings import (
    BatchingConfig,
    EngineConfig,
    ModelSpec,
    ServerConfig,
    ServingConfig,
    WorkerConfig,
)

__all__ = ["BatchingConfig", "EngineConfig", "ModelSpec", "ServerConfig", "ServingConfig", "WorkerConfig"]
