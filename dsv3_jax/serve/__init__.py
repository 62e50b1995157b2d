"""OpenAI-compatible HTTP serving of the engine: `worker.py` (the one thread that owns the JAX loop, and the
asyncio bridge to it), `app.py` (FastAPI endpoints, request validation, streaming, metrics), `chat.py` (chat
templates, incremental detokenisation). `python serve.py` starts it."""
