"""The server's one Starlette application: routes, the API key, errors as JSON, and the model thread's life.

GET  /                     the live page (no key needed: it holds no data, and asks for the key if needed)
GET  /v1/models            OpenAI-compatible
GET  /v1/models/{model}
POST /v1/completions
POST /v1/chat/completions  through the model's chat template
POST /tokenize             vLLM's tokenizer routes (lm-evaluation-harness's tokenizer_backend=remote reads them)
POST /detokenize
GET  /tokenizer_info
POST /api/explain          the Explanation `potion explain` computes, as JSON
GET  /api/training         the run's losses, probes, and whether it is still training
GET  /api/health           the model's name, and how many requests it is generating and holding
"""

from __future__ import annotations

import contextlib
import hmac
import sys
import traceback

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from potion.serve.api import OpenAIRoutes
from potion.serve.errors import ApiError
from potion.serve.live import LiveRoutes
from potion.serve.served import ServedModel
from potion.serve.tokenize import TokenizerRoutes
from potion.serve.worker import ModelWorker

LOCAL_NAMES = {"127.0.0.1", "localhost", "[::1]"}


def build_app(
    served: ServedModel,
    api_key: str | None = None,
    worker: ModelWorker | None = None,
    on_start=None,
    local_only: bool = True,
) -> Starlette:
    """The application; on_start() is called once the model thread runs and before requests are taken.
    local_only: answer only requests addressed to this machine by name (for a server on a loopback address)."""
    worker = worker or ModelWorker()
    api, live = OpenAIRoutes(served, worker), LiveRoutes(served, worker, needs_key=bool(api_key))
    tokens = TokenizerRoutes(served, api.check_model)

    def keyed(endpoint):
        async def checked(request: Request) -> Response:
            check_key(request, api_key)
            return await endpoint(request)

        return checked

    routes = [
        Route("/", live.page, methods=["GET"]),
        Route("/v1/models", keyed(api.models), methods=["GET"]),
        Route("/v1/models/{model:path}", keyed(api.model), methods=["GET"]),
        Route("/v1/completions", keyed(api.completions), methods=["POST"]),
        Route("/v1/chat/completions", keyed(api.chat_completions), methods=["POST"]),
        Route("/tokenize", keyed(tokens.tokenize), methods=["POST"]),
        Route("/detokenize", keyed(tokens.detokenize), methods=["POST"]),
        Route("/tokenizer_info", keyed(tokens.tokenizer_info), methods=["GET"]),
        Route("/api/explain", keyed(live.explain), methods=["POST"]),
        Route("/api/training", keyed(live.training_state), methods=["GET"]),
        Route("/api/health", keyed(live.health), methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        if on_start:
            on_start()
        try:
            yield
        finally:
            worker.stop()

    handlers = {ApiError: api_error, HTTPException: http_error, Exception: internal_error}
    middleware = [Middleware(LocalNamesOnly)] if local_only else []
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan, middleware=middleware)
    app.state.worker = worker
    return app


class LocalNamesOnly:
    """A web page on another site can make the browser send requests to 127.0.0.1, and with DNS rebinding read
    the answers too; such requests name the other site in their Host header, so a loopback server answers only
    requests that name this machine."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
            if name.lower() not in LOCAL_NAMES:
                message = (
                    f"this server answers requests for 127.0.0.1 or localhost only, not {host!r}; start potion serve "
                    "with --host to serve it under another name"
                )
                await ApiError(message, status=403).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_key(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(
            "this server needs an API key: send the header 'Authorization: Bearer KEY' with the key given to "
            "potion serve --api-key",
            status=401,
            code="invalid_api_key",
        )


async def api_error(request: Request, error: ApiError) -> Response:
    return error.response({"WWW-Authenticate": "Bearer"} if error.status == 401 else None)


async def http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own refusals (no such path, wrong method) in the same JSON shape as every other error."""
    if error.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path} (see GET / and /v1/models)"
    elif error.status_code == 405:
        message = f"{request.url.path} does not take {request.method}"
    else:
        message = str(error.detail)
    return ApiError(message, status=error.status_code).response(error.headers)


async def internal_error(request: Request, error: Exception) -> Response:
    traceback.print_exception(error, file=sys.stderr)
    return ApiError(
        f"internal error ({type(error).__name__}); the server's log has the traceback", status=500
    ).response()
