"""An OpenAI-compatible server for one base model and many adapters (`tunesmith serve`).

Layered like vLLM's entrypoints: protocol (the wire schemas), routes (thin FastAPI), handlers (requests to
engine rows and back), engine (queue and batching) over batch (one generate) and adapters (which adapters
serve each row), registry (names to adapters, /v1/models), server (uvicorn).
"""
