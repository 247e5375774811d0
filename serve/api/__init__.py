"""OpenAI-compatible HTTP server for the slimlm engine: `create_app(engine)` and `serve(engine)`.

Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics. The engine runs
in one background thread (see worker.py); handlers only talk to it through queues.
"""
from .app import create_app, serve

__all__ = ["create_app", "serve"]
