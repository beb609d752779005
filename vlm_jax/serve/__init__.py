"""`vlm-jax serve`: an OpenAI-compatible chat server with images, streaming and continuous batching.

engine.py (decode slots over one KV cache), messages.py (request bodies -> turns, images, settings),
api.py (the HTTP routes, uvicorn), page/ (the chat page at /).
"""
