"""`potion serve`: one model behind an OpenAI-compatible HTTP API and a live page that looks inside it.

served.py (the model, reloaded when a training saves new weights), worker.py (the one thread that runs it),
completions.py (OpenAI's completions without the HTTP), api.py (the /v1 routes), live.py (the page and its JSON),
errors.py (4xx JSON errors), app.py (the Starlette application), server.py (uvicorn, the address, signals).
The HTTP stack is imported only when a server starts.
"""

from __future__ import annotations

from potion.errors import require


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> int:
    """Serve the model until Ctrl-C or SIGTERM; returns the exit code."""
    for module in ("starlette", "uvicorn", "pydantic"):
        require(module, "serve", "potion serve")
    from potion.serve.server import serve as run_server

    return run_server(model, host, port, api_key)


__all__ = ["serve"]
