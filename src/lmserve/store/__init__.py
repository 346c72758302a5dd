"""lmserve.store: turn a model location (directory, archive, s3://, Hub id, GGUF) into a local directory.

``resolve_model`` is the entry point; ``install_requirements`` installs a custom handler's
``requirements.txt``. The modules below are one per kind of location.
"""

from lmserve.store.requirements import install_requirements
from lmserve.store.resolve import ResolvedModel, accepted_forms, resolve_model

__all__ = ["ResolvedModel", "accepted_forms", "install_requirements", "resolve_model"]
