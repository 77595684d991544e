"""``tp-numa serve``: an OpenAI-compatible HTTP server over a continuously batched engine.

- ``requests.py``: what a generation request is (``GenRequest``) and what the engine sends
  back while it runs (``Event``);
- ``engine.py``: ``BatchEngine``, the scheduler and step loop (every rank runs it; rank 0
  decides the steps and samples);
- ``app.py`` / ``protocol.py``: the FastAPI application on rank 0 (OpenAI request parsing,
  responses, SSE streaming, metrics).
"""
