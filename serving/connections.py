"""Connection limits below the ASGI app: a deadline for each request head, a cap on open
connections, and the server's own protocol errors in the service's JSON error format.

uvicorn (0.55, under BentoML 1.4.39) arms no timer before a request head is complete: a
connection that sends nothing, or part of its headers, is held for good (the
session 23 review, docs/review-s23.md, HTTP #4). Nothing caps open connections either, and its own 400s for
malformed requests (a negative or duplicate Content-Length, a 2 MB header, 20k headers,
`Transfer-Encoding: gzip, chunked`) are plain text, written before any application code runs,
and not counted (#7). BentoML builds the uvicorn `Config` of each HTTP worker itself
(`_bentoml_impl/worker/service.py`) and passes none of `http`, `limit_concurrency` or
`h11_max_incomplete_event_size`; a service config cannot set them. So `install` puts a
subclass of uvicorn's HTTP protocol in place, in the worker, before uvicorn loads its config:

    POLYTASK_HEADER_TIMEOUT_S  a request head must be complete this many seconds after the
                               connection opened or the previous answer was sent (default 10).
                               Nothing sent: closed without an answer (an idle keep-alive
                               connection is closed earlier, by uvicorn's keep-alive timeout,
                               5 s under BentoML). Part of a head: 408 `header_timeout`. The
                               deadline is not moved by bytes that trickle in.
    POLYTASK_MAX_CONNECTIONS   open connections per HTTP worker (default 1000). One beyond them
                               gets 503 `too_many_connections` with `Retry-After: 1` as soon as
                               its request head arrives (within 1 s, else it is closed) and is
                               closed; it never reaches the application.

A request head uvicorn's parser refuses gets `{"error", "reason"}` (400 `invalid_http_request`,
400 `unsupported_transfer_encoding`, 431 `headers_too_large`) instead of uvicorn's text. All of
them are counted in `polytask_rejected_requests_total{reason}`.

How it is installed: `uvicorn.config.HTTP_PROTOCOLS` maps the `http` setting ("auto", which
BentoML leaves, "h11", "httptools") to a protocol class; `install` maps each to the guarded
subclass of the class it named. The subclass only extends methods both of uvicorn's protocols
have (`connection_made`, `data_received`, `on_response_complete`, `connection_lost`,
`send_400_response`) and reads attributes both set (`transport`, `connections`, `app`,
`cycle`, `loop`). When these are not there (another uvicorn), nothing is installed, or the
guard turns itself off, with one warning; uvicorn then behaves as it does by default. A uvicorn
version other than the one checked here gets a warning too.
"""

from __future__ import annotations

import asyncio
import http
import logging
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from serving.guard import count_rejected, error_body, send_error
from serving.settings import get_settings

logger = logging.getLogger(__name__)

# The uvicorn versions whose protocol classes this module was checked against.
CHECKED_UVICORN = ("0.55.",)
# Methods the guard extends and attributes it reads, in both of uvicorn's HTTP/1.1 protocols.
_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_response_complete",
    "send_400_response",
)
_ATTRIBUTES = ("transport", "connections", "app", "cycle", "loop")
# How long a connection beyond the limit may take to send its request head.
OVER_LIMIT_GRACE_S = 1.0
RETRY_AFTER_S = 1
_LIMIT_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class ConnectionLimits:
    """What the guard enforces (see the module docstring)."""

    header_timeout_s: float
    max_connections: int


class ConnectionGuard:
    """Mixin in front of a uvicorn HTTP protocol class (`guarded` makes the subclass).

    One timer per connection, armed while no request is in progress (from the connection's
    start, then from each answer), cancelled when a request head is complete. When it fires:
    nothing received, or the rest of a body whose answer was already sent: the connection is
    closed; part of a new head: 408 JSON, then closed."""

    limits: ClassVar[ConnectionLimits]
    _disabled: ClassVar[bool] = False

    # What the uvicorn protocol provides (checked at the first connection).
    transport: Any
    connections: set[Any]
    app: Any
    cycle: Any
    loop: asyncio.AbstractEventLoop

    _header_timer: asyncio.TimerHandle | None = None
    _idle_bytes = 0  # bytes received since the connection became idle
    _after_early_answer = False  # the last answer went out before its request body was read
    _over_limit = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if not self._usable():
            return
        if len(self.connections) > self.limits.max_connections:
            self._over_limit = True
            self.app = _too_many_connections  # read by uvicorn for each request head
            _log_limit(len(self.connections), self.limits.max_connections)
        self._idle(after_early_answer=False)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:
            self._idle_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if not self._disabled:
            self._sync()

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # type: ignore[misc]
        if not self._disabled:
            self._cancel()  # a new deadline from this answer on
            # Its request body was still coming: what arrives next is that body, not a head.
            self._sync(after_early_answer=bool(getattr(answered, "more_body", False)))

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request head its parser refused (it calls this in its
        `except` clause, so the parser's error is the one being handled)."""
        if self._disabled:
            super().send_400_response(msg)  # type: ignore[misc]
            return
        self._cancel()
        error = sys.exc_info()[1]
        hint = getattr(error, "error_status_hint", 400)  # h11's; httptools' errors have none
        if hint == 431:
            status, reason, message = (
                431,
                "headers_too_large",
                "the request head is too large (request line and headers)",
            )
        elif hint == 501:
            status, reason, message = (
                400,
                "unsupported_transfer_encoding",
                "unsupported Transfer-Encoding: only chunked is accepted",
            )
        else:
            status, reason, message = (400, "invalid_http_request", "invalid HTTP request")
        self._answer_and_close(status, reason, message)

    # ------------------------------------------------------------------ internals
    def _usable(self) -> bool:
        if self._disabled:
            return False
        missing = [a for a in _ATTRIBUTES if not hasattr(self, a)]
        if missing:
            type(self)._disabled = True
            logger.warning(
                "uvicorn's HTTP protocol lacks %s: no header timeout or connection limit "
                "(serving/connections.py needs checking against this uvicorn)",
                ", ".join(missing),
            )
            return False
        return True

    def _sync(self, after_early_answer: bool = False) -> None:
        """Arm the timer while no request is in progress; cancel it while one is."""
        if self.transport.is_closing():
            self._cancel()
            return
        cycle = self.cycle
        # (Were `response_complete` ever missing, the guard would stay off after a request.)
        waiting = cycle is None or getattr(cycle, "response_complete", False)
        if not waiting:
            self._cancel()
        elif self._header_timer is None:
            self._idle(after_early_answer)

    def _idle(self, after_early_answer: bool) -> None:
        self._idle_bytes = 0
        self._after_early_answer = after_early_answer
        delay = self.limits.header_timeout_s
        if self._over_limit:
            delay = min(delay, OVER_LIMIT_GRACE_S)
        self._header_timer = self.loop.call_later(delay, self._expired)

    def _cancel(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not getattr(cycle, "response_complete", False):
            return  # a request is in progress (the timer should have been cancelled)
        if self._idle_bytes == 0 or self._after_early_answer:
            logger.debug("closing a connection idle for %g s", self.limits.header_timeout_s)
            self.transport.close()
        elif self._over_limit:
            self._answer_and_close(*_TOO_MANY)
        else:
            self._answer_and_close(
                408,
                "header_timeout",
                "the request head did not arrive within "
                f"{self.limits.header_timeout_s:g} s (POLYTASK_HEADER_TIMEOUT_S)",
            )

    def _answer_and_close(self, status: int, reason: str, message: str) -> None:
        """A complete answer written straight to the socket (no request was parsed, so
        uvicorn's per-request machinery has nothing to answer), then the connection closed."""
        try:
            self.transport.write(_raw_response(status, reason, message))
        finally:
            self.transport.close()
        count_rejected(reason)


_TOO_MANY = (
    503,
    "too_many_connections",
    "too many open connections to this server; retry later",
)


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = error_body(reason, message)
    headers = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if status == 503:
        headers.append(f"retry-after: {RETRY_AFTER_S}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body


async def _too_many_connections(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI app of a connection beyond the limit: 503, and uvicorn closes it (Connection:
    close)."""
    status, reason, message = _TOO_MANY
    await send_error(
        send,
        status,
        reason,
        message,
        [(b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")],
    )


_last_limit_log = 0.0


def _log_limit(open_now: int, limit: int) -> None:
    global _last_limit_log
    now = time.monotonic()
    if now - _last_limit_log >= _LIMIT_LOG_EVERY_S:
        _last_limit_log = now
        logger.warning(
            "%d open connections, over the limit of %d (POLYTASK_MAX_CONNECTIONS): answering "
            "503 too_many_connections (logged at most once a minute)",
            open_now,
            limit,
        )


# --------------------------------------------------------------------------- installation
_GUARDED: dict[tuple[type, ConnectionLimits], type] = {}
_ORIGINAL: dict[str, str] = {}  # what HTTP_PROTOCOLS named before `install`


def guarded(base: type, limits: ConnectionLimits) -> type:
    """The subclass of the uvicorn protocol class `base` that enforces `limits`; usable as
    `uvicorn.Config(http=...)`."""
    key = (base, limits)
    if key not in _GUARDED:
        _GUARDED[key] = type(
            f"Guarded{base.__name__}",
            (ConnectionGuard, base),
            {"limits": limits, "__module__": __name__},
        )
    return _GUARDED[key]


def install(limits: ConnectionLimits) -> bool:
    """Make uvicorn, in this process, serve HTTP with the guarded protocol classes: each entry
    of `uvicorn.config.HTTP_PROTOCOLS` whose class can be imported now names its guarded
    subclass. Call before uvicorn loads its `Config` (BentoML's worker calls the service's
    `to_asgi` first). Idempotent. Returns whether it is installed; when uvicorn's internals
    are not what this module expects, logs why once and leaves uvicorn as it is."""
    try:
        import uvicorn
        from uvicorn.config import HTTP_PROTOCOLS
        from uvicorn.importer import import_from_string
    except ImportError as err:
        logger.warning("no header timeout or connection limit: %s", err)
        return False
    if not isinstance(HTTP_PROTOCOLS, dict) or "auto" not in HTTP_PROTOCOLS:
        logger.warning(
            "uvicorn %s has no HTTP_PROTOCOLS['auto']: no header timeout or connection limit",
            uvicorn.__version__,
        )
        return False
    version = uvicorn.__version__
    if not version.startswith(CHECKED_UVICORN):
        logger.warning(
            "uvicorn %s: serving/connections.py was checked against %s only; installing the "
            "connection guard as its protocol classes have the expected methods",
            version,
            ", ".join(CHECKED_UVICORN),
        )
    installed = []
    for name in ("auto", "h11", "httptools"):
        original = _ORIGINAL.get(name, HTTP_PROTOCOLS.get(name))
        if not isinstance(original, str):
            continue
        try:
            base = import_from_string(original)
        except Exception:  # httptools not installed: nothing to guard
            continue
        if not isinstance(base, type) or not all(
            callable(getattr(base, m, None)) for m in _METHODS
        ):
            logger.warning(
                "uvicorn %s: %s lacks the expected methods; %r left unguarded",
                version,
                original,
                name,
            )
            continue
        attribute = f"_Guarded_{name}"
        setattr(sys.modules[__name__], attribute, guarded(base, limits))
        _ORIGINAL[name] = original
        HTTP_PROTOCOLS[name] = f"{__name__}:{attribute}"
        installed.append(name)
    if "auto" not in installed:
        return False
    _warn_if_over_fd_limit(limits.max_connections)
    logger.info(
        "connection guard: request heads within %g s, at most %d connections per worker "
        "(uvicorn %s)",
        limits.header_timeout_s,
        limits.max_connections,
        version,
    )
    return True


def install_connection_guard() -> bool:
    """`install` with the limits of this process's settings (POLYTASK_HEADER_TIMEOUT_S,
    POLYTASK_MAX_CONNECTIONS; a bad value raises SettingsError, naming the variable)."""
    settings = get_settings()
    return install(ConnectionLimits(settings.header_timeout_s, settings.max_connections))


def uninstall() -> None:
    """Undo `install` (for tests)."""
    from uvicorn.config import HTTP_PROTOCOLS

    HTTP_PROTOCOLS.update(_ORIGINAL)
    _ORIGINAL.clear()


def _warn_if_over_fd_limit(max_connections: int) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A worker holds ~100 other descriptors (libraries, prometheus files, its sockets).
    if soft != resource.RLIM_INFINITY and max_connections > soft - 128:
        logger.warning(
            "POLYTASK_MAX_CONNECTIONS=%d is near or over this process's file limit (%d): "
            "connections may be refused by the kernel before the limit answers 503",
            max_connections,
            soft,
        )
