"""Request bodies of every HTTP dialect, as pydantic models (they also make ``/openapi.json``)."""
