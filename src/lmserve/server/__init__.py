"""The HTTP frontend: one FastAPI app speaking SageMaker/LMI, TGI and OpenAI, in front of the engine
processes.

A request's path: a route (``routes/``) validates the body (``protocol/``), turns the dialect's
parameters into ``SamplingParams`` (``params``), tokenizes and checks the prompt and submits it
through the router (``generation``), then answers whole or streams (``streaming``). Every error
becomes an HTTP status in one table (``errors``). ``runtime`` holds one model's lifecycle,
``registry`` the models by name (and the server's health over them), ``routes/management`` the API
that registers, describes, scales and unregisters them; ``middleware`` checks the API key. ``app``
builds the app, ``serve`` runs it under uvicorn and drains on SIGTERM.
"""
