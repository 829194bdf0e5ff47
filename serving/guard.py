"""The HTTP trust boundary, before any work is done: API keys and the request body's size.

`ApiKeyGuard` is an ASGI middleware on the whole service (BentoML's routes included), so that
`/metrics` can be protected as well as `/predict` and `/tasks`:

    /predict, /tasks     need a key of POLYTASK_API_KEYS(_FILE), when any is configured
    /metrics             needs a key of POLYTASK_METRICS_API_KEYS(_FILE), when any is configured
    everything else      open (health probes must answer without credentials)

A refused request gets 401 with `WWW-Authenticate: Bearer` and a JSON body
`{"error", "reason"}`, reason `missing_api_key` or `invalid_api_key`, counted in
`polytask_rejected_requests_total{reason}`. Keys are compared in constant time
(`serving.settings.KeySet`) and never logged.

`read_body` reads a request body under a byte limit: a declared Content-Length over the limit
is refused before one byte is read, and a body without one (chunked) is refused as soon as
the bytes received pass the limit, so an oversized body is never held in memory.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from serving.schemas import RequestError
from serving.settings import MAX_BODY_BYTES_ENV, KeySet, get_settings

PREDICT_PATHS = ("/predict", "/tasks")
METRICS_PATHS = ("/metrics",)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The bearer token of an Authorization header; None when there is none."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def check_key(keys: KeySet, headers: list[tuple[bytes, bytes]]) -> str | None:
    """None when the request may pass; else the reason it may not."""
    if not keys.enabled:
        return None
    token = _bearer(headers)
    if token is None:
        return "missing_api_key"
    return None if keys.accepts(token) else "invalid_api_key"


class ApiKeyGuard:
    """ASGI middleware: 401 for protected paths without a valid bearer key (module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            settings = get_settings()
            path = scope.get("path", "")
            keys = None
            if path in PREDICT_PATHS:
                keys = settings.api_keys
            elif path in METRICS_PATHS:
                keys = settings.metrics_api_keys
            reason = check_key(keys, scope.get("headers", [])) if keys is not None else None
            if reason is not None:
                await _unauthorized(reason, send)
                return
        await self.app(scope, receive, send)


async def _unauthorized(reason: str, send: Any) -> None:
    from serving.metrics import get_metrics

    get_metrics().rejected.labels(reason=reason).inc()
    message = (
        "this endpoint needs an API key: send `Authorization: Bearer <key>`"
        if reason == "missing_api_key"
        else "the API key is not valid"
    )
    body = json.dumps({"error": message, "reason": reason}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="polytask"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def check_content_type(request: Request) -> None:
    """415 unless the body is declared as JSON (`application/json`, charset UTF-8 if any)."""
    raw = request.headers.get("content-type")
    if raw is None:
        raise RequestError(
            415, "unsupported_media_type", "missing Content-Type: send application/json"
        )
    media, *params = (p.strip().lower() for p in raw.split(";"))
    charset = next((p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")), "")
    if media != "application/json" or charset not in ("", "utf-8", "utf8"):
        raise RequestError(
            415,
            "unsupported_media_type",
            "unsupported Content-Type: send application/json (UTF-8)",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes (see the module docstring).

    Raises:
        RequestError: 413 `body_too_large` past the limit; 400 for a bad Content-Length.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, "bad_content_length", "Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int | None, limit: int) -> RequestError:
    got = f"{size:,} bytes" if size is not None else "more"
    return RequestError(
        413,
        "body_too_large",
        f"request body of {got}; at most {limit:,} bytes ({MAX_BODY_BYTES_ENV})",
    )
