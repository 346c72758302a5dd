"""Request-level (dynamic) batching: ``DynamicBatcher`` groups queued requests into batches."""

from lmserve.batching.batcher import DynamicBatcher, Job

__all__ = ["DynamicBatcher", "Job"]
