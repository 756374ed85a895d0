"""The HTTP surface: thin FastAPI routes over the handlers, the API key check, and OpenAI-shaped errors.

Every failure leaves as `{"error": {"message", "type", "param", "code"}}` with its status: 400 bad parameters
(including malformed JSON, which FastAPI would call 422), 401 a missing or wrong key, 404 an unknown model or
path, 429 a full queue, 500 a bug; the server keeps serving after each.
"""
from __future__ import annotations

import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .handlers import Serving
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body.model_dump(), status_code=error.status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem in a request body, as one line naming the field, and that field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON in the request body: {first.get('ctx', {}).get('error', first['msg'])}", None
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first["msg"].removeprefix("Value error, ")
    return (f"{where}: {message}" if where else message), (where or None)


def key_matches(header: str | None, api_key: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def create_app(serving: Serving, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await serving.engine.start()
        yield
        await serving.engine.stop()

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1") and not key_matches(request.headers.get("authorization"), api_key):
            return error_response(ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                           code="invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(ApiError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return serving.models()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        return _respond(await serving.chat(req))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return _respond(await serving.completions(req))

    return app


def _respond(result):
    if hasattr(result, "model_dump"):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
