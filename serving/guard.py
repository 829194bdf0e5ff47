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
the bytes received pass the limit, so an oversized body is never held in memory. The whole
body must arrive within POLYTASK_BODY_TIMEOUT_S (default 10 s), else 408 `body_timeout`: a
stalled or trickled body does not hold a handler until BentoML's 60 s request timeout.

`FrontDoor` is the outermost ASGI layer of the HTTP service, in front of BentoML's own
middlewares (request metrics, access log): a path the service does not serve gets a JSON 404
(`not_found`), a served path with another method a 405 (`method_not_allowed`), both counted in
`polytask_rejected_requests_total`, before BentoML labels its request metrics with the path.
A client can therefore not create metric series (or access-log lines) with paths of its own.
A Content-Type that is not ASCII gets a 415 there too (BentoML's access log could not decode
it). `AccessLogEscaper` escapes control characters in BentoML's access log lines (defence in
depth).

Below the ASGI app, `serving.connections` bounds how long a request head may take and how many
connections a worker holds, and answers the HTTP parser's own refusals (a malformed or
oversized request head) in the same JSON format, counted the same way.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request

from serving.schemas import RequestError
from serving.settings import MAX_BODY_BYTES_ENV, KeySet, _positive_int, get_settings

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
    message = (
        "this endpoint needs an API key: send `Authorization: Bearer <key>`"
        if reason == "missing_api_key"
        else "the API key is not valid"
    )
    await send_error(
        send, 401, reason, message, [(b"www-authenticate", b'Bearer realm="polytask"')]
    )


def check_content_type(request: Request) -> None:
    """415 unless the body is declared as JSON (`application/json`, charset UTF-8 if any) and
    not compressed (no Content-Encoding but `identity`: a gzip body is not decoded, and would
    otherwise get a misleading `invalid_utf8`)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RequestError(
            415,
            "unsupported_content_encoding",
            "unsupported Content-Encoding: send the body uncompressed (identity)",
        )
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


BODY_TIMEOUT_ENV = "POLYTASK_BODY_TIMEOUT_S"
DEFAULT_BODY_TIMEOUT_S = 10


@functools.cache
def body_timeout_s() -> int:
    """Seconds a request body may take to arrive: $POLYTASK_BODY_TIMEOUT_S, default 10.
    (Its home is `ServingSettings`; it is read here until that model takes it.)

    Raises:
        SettingsError: not a positive integer.
    """
    return _positive_int(os.environ, BODY_TIMEOUT_ENV, DEFAULT_BODY_TIMEOUT_S)


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, at most `limit` bytes, within `timeout_s` seconds (default
    `body_timeout_s()`; see the module docstring).

    Raises:
        RequestError: 413 `body_too_large` past the limit; 400 for a bad Content-Length;
            408 `body_timeout` when the body is not complete in time; 400
            `client_disconnected` when the client went away before sending it all.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, "bad_content_length", "Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    timeout_s = body_timeout_s() if timeout_s is None else timeout_s
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(None, limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(
            408,
            "body_timeout",
            f"the request body did not arrive within {timeout_s:g} s ({BODY_TIMEOUT_ENV})",
        ) from None
    except ClientDisconnect:
        raise RequestError(
            400, "client_disconnected", "the client closed the connection during the body"
        ) from None
    return b"".join(chunks)


def _too_large(size: int | None, limit: int) -> RequestError:
    got = f"of {size:,} bytes" if size is not None else "over the limit"
    return RequestError(
        413,
        "body_too_large",
        f"request body {got}; at most {limit:,} bytes ({MAX_BODY_BYTES_ENV})",
    )


# --------------------------------------------------------------------------- front door
class FrontDoor:
    """ASGI middleware, outermost: 404/405 in JSON for what the service does not serve (module
    docstring), 415 for a Content-Type that is not ASCII. A websocket is closed (none is
    served); lifespan events pass through.

    Args:
        app: The service's ASGI app (BentoML's, with its middlewares).
        routes: Every served path and the methods it accepts (HEAD is implied by GET).
    """

    def __init__(self, app: Any, routes: Mapping[str, tuple[str, ...]]) -> None:
        self.app = app
        self.routes = {
            path: frozenset(methods) | ({"HEAD"} if "GET" in methods else set())
            for path, methods in routes.items()
        }

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            methods = self.routes.get(scope.get("path", ""))
            if methods is None:
                await send_error(send, 404, "not_found", "no such endpoint")
                return
            if scope.get("method") not in methods:
                allow = ", ".join(sorted(methods))
                await send_error(
                    send,
                    405,
                    "method_not_allowed",
                    f"method not allowed here; allowed: {allow}",
                    [(b"allow", allow.encode())],
                )
                return
            # BentoML's access log decodes Content-Type as UTF-8: other bytes raised there,
            # after the answer had started (a truncated answer and a logged traceback).
            if any(k == b"content-type" and not v.isascii() for k, v in scope.get("headers", ())):
                await send_error(
                    send, 415, "unsupported_media_type", "Content-Type: send application/json"
                )
                return
        elif scope["type"] == "websocket":  # the service serves no websocket
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)


async def send_error(
    send: Any,
    status: int,
    reason: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer with `{"error", "reason"}` and count it by reason (a bounded label)."""
    count_rejected(reason)
    body = error_body(reason, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def error_body(reason: str, message: str) -> bytes:
    """The JSON body of every refusal: `{"error": message, "reason": reason}`."""
    return json.dumps({"error": message, "reason": reason}).encode()


def count_rejected(reason: str) -> None:
    """Count a refusal in `polytask_rejected_requests_total{reason}` (a bounded label)."""
    from serving.metrics import get_metrics

    get_metrics().rejected.labels(reason=reason).inc()


# --------------------------------------------------------------------------- access log
ACCESS_LOGGER = "bentoml.access"  # bentoml/_internal/server/http/access.py


def escape_for_log(text: str) -> str:
    """`text` with control, format and other non-printable characters (CR, LF, lone
    surrogates from undecodable bytes) as escapes: one log record stays one valid line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class AccessLogEscaper(logging.Filter):
    """Escapes the string arguments of access-log records (`escape_for_log`); a client's path
    or header cannot forge log lines or write invalid UTF-8 to the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(escape_for_log(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = escape_for_log(record.msg)
        return True


def install_access_log_escaper() -> None:
    """Add `AccessLogEscaper` to BentoML's access logger, once per process."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, AccessLogEscaper) for f in logger.filters):
        logger.addFilter(AccessLogEscaper())
