"""Connections below the ASGI app (serving/connections.py), against the review's #4 and #7
(/work/review/http.md): a request head has a deadline, idle connections are closed, a worker
holds a bounded number of connections, and the HTTP parser's own refusals are JSON and counted.

Offline: a real uvicorn server (the protocol BentoML's workers get, as `install` puts it in
place) in a thread on a loopback port, driven with raw sockets. Times are lower bounds (a timer
does not fire early) or generous upper bounds; no test measures speed. The last test runs
`polytask serve` itself (integration tier) to check that the guard is in the HTTP workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from test_http_hardening import rejected
from test_serving_http import MODEL_NAME, _metrics, _sum, running, store  # noqa: F401  (store: a fixture)
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving import connections
from serving.connections import ConnectionGuard, ConnectionLimits, guarded
from serving.guard import FrontDoor
from serving.settings import ServingSettings, SettingsError

GENEROUS_S = 15.0  # an upper bound far above any timeout used below
GET = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"


async def _livez(_: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def _slow(_: Request) -> PlainTextResponse:
    await asyncio.sleep(2.5)  # longer than the 1 s header timeout of the tests
    return PlainTextResponse("done")


async def _predict(request: Request) -> JSONResponse:
    return JSONResponse({"got": len(await request.body())})


ROUTES = {"/livez": ("GET",), "/slow": ("GET",), "/predict": ("POST",)}
APP = FrontDoor(
    Starlette(
        routes=[
            Route("/livez", _livez),
            Route("/slow", _slow),
            Route("/predict", _predict, methods=["POST"]),
        ]
    ),
    routes=ROUTES,
)


@contextlib.contextmanager
def server(protocol: type, keep_alive: int = 60) -> Iterator[int]:
    """uvicorn with `protocol` on a free loopback port, in a thread; yields the port.
    uvicorn's own keep-alive timeout is long by default here, so that what closes an idle
    connection in these tests is the guard."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    config = uvicorn.Config(
        APP, http=protocol, lifespan="off", log_config=None, timeout_keep_alive=keep_alive
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + GENEROUS_S
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = srv.force_exit = True
        thread.join(GENEROUS_S)
        sock.close()


def limited(header_timeout_s: float = 1, max_connections: int = 100) -> type:
    return guarded(AutoHTTPProtocol, ConnectionLimits(header_timeout_s, max_connections))


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=GENEROUS_S)


def until_closed(
    s: socket.socket, within: float = GENEROUS_S, since: float | None = None
) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds from
    `since` (default: now) to the close; fails if it is still open after `within` seconds."""
    start = time.monotonic() if since is None else since
    s.settimeout(within)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            pytest.fail(f"still open after {within} s; got {data[:200]!r}")
        except ConnectionResetError:
            break  # closed with unread data: a reset, after what was sent
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def still_open_after(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(1) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


def response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response read off a keep-alive connection (Content-Length framed)."""
    s.settimeout(GENEROUS_S)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = _head(head)
    while len(body) < int(headers.get("content-length", 0)):
        body += s.recv(65536)
    return status, headers, body


def _head(head: bytes) -> tuple[int, dict[str, str]]:
    line, *rest = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest)}
    return int(line.split()[1]), headers


def parse(data: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = _head(head)
    return status, headers, json.loads(body[: int(headers["content-length"])])


# --------------------------------------------------------------------------- 4: header deadline
def test_the_control_stock_uvicorn_holds_a_silent_connection():
    """What the guard fixes: without it nothing closes a connection that sends nothing (this
    harness would see the guard's close)."""
    with server(AutoHTTPProtocol) as port, connect(port) as s:
        assert still_open_after(s, 2.5)


def test_a_silent_connection_is_closed_without_an_answer_after_the_header_timeout():
    before = rejected("header_timeout")
    with server(limited(header_timeout_s=1)) as port:
        start = time.monotonic()  # before the server sees the connection: a lower bound holds
        with connect(port) as s:
            data, took = until_closed(s, since=start)
    assert data == b""  # nothing was asked: nothing is answered (a preconnect is not an error)
    assert took >= 0.99
    assert rejected("header_timeout") == before


def test_half_a_head_gets_a_408_in_json_counted():
    before = rejected("header_timeout")
    with server(limited(header_timeout_s=1)) as port:
        start = time.monotonic()
        with connect(port) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            data, took = until_closed(s, since=start)
    status, headers, body = parse(data)
    assert (status, body["reason"]) == (408, "header_timeout")
    assert "POLYTASK_HEADER_TIMEOUT_S" in body["error"]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert took >= 0.99
    assert rejected("header_timeout") == before + 1


def test_a_trickled_head_does_not_move_the_deadline():
    with server(limited(header_timeout_s=1)) as port, connect(port) as s:
        s.sendall(b"GET /livez HTTP/1.1\r\n")
        start = time.monotonic()
        with contextlib.suppress(OSError):  # a byte every 0.2 s until the server answers
            while time.monotonic() - start < GENEROUS_S:
                s.sendall(b"X")
                if select.select([s], [], [], 0.2)[0]:
                    break
        data, _ = until_closed(s)
    assert parse(data)[2]["reason"] == "header_timeout"
    assert time.monotonic() - start < GENEROUS_S


def test_an_idle_keep_alive_connection_is_closed_and_a_partial_next_head_gets_408():
    with server(limited(header_timeout_s=1)) as port:
        with connect(port) as s:
            for _ in range(3):  # keep-alive works: requests within the deadline are answered
                start = time.monotonic()  # the deadline runs from the answer, sent after this
                s.sendall(GET)
                assert response(s)[0] == 200
            data, took = until_closed(s, since=start)  # then idle
            assert data == b"" and took >= 0.99
        with connect(port) as s:
            s.sendall(GET)
            assert response(s)[0] == 200
            s.sendall(b"GET /livez HTTP/1.1\r\nHo")
            assert parse(until_closed(s)[0])[:1] == (408,)


def test_a_request_in_progress_is_not_cut_by_the_header_timeout():
    with server(limited(header_timeout_s=1)) as port, connect(port) as s:
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = response(s)
        assert (status, body) == (200, b"done")
        s.sendall(b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{"')
        time.sleep(0.3)
        s.sendall(b"}")  # the body is the application's deadline (POLYTASK_BODY_TIMEOUT_S)
        assert response(s)[0] == 200


def test_the_rest_of_a_body_after_an_early_answer_is_not_answered_twice():
    """A 404 sent before its request's body arrived; the body then stalls: the connection is
    closed at the deadline, without a second answer."""
    with server(limited(header_timeout_s=1)) as port, connect(port) as s:
        s.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert response(s)[0] == 404
        data, _ = until_closed(s)
    assert data == b""


# --------------------------------------------------------------------------- 4: connection cap
def test_a_connection_beyond_the_limit_gets_503_with_retry_after_and_is_closed():
    before = rejected("too_many_connections")
    with server(limited(header_timeout_s=30, max_connections=3)) as port:
        held = [connect(port) for _ in range(3)]
        with connect(port) as extra:
            extra.sendall(GET)
            data, _ = until_closed(extra)
        status, headers, body = parse(data)
        assert (status, body["reason"]) == (503, "too_many_connections")
        assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
        assert rejected("too_many_connections") == before + 1
        held[0].sendall(GET)  # the connections within the limit are served
        assert response(held[0])[0] == 200
        with connect(port) as silent:  # one beyond that sends nothing is not held long
            data, took = until_closed(silent, within=10)
            assert data == b""
        for s in held:
            s.close()
        time.sleep(0.3)
        with connect(port) as s:  # room again
            s.sendall(GET)
            assert response(s)[0] == 200


# --------------------------------------------------------------------------- 7: parser refusals
CASES = {
    "negative Content-Length": (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        400,
        "invalid_http_request",
    ),
    "two Content-Lengths": (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        "invalid_http_request",
    ),
    "Transfer-Encoding gzip, chunked": (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        400,
        "unsupported_transfer_encoding",
    ),
    "a 2 MB header": (
        b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
    "20,000 headers": (
        b"GET /livez HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: y\r\n" % i for i in range(20_000))
        + b"\r\n",
        431,
        "headers_too_large",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_parsers_refusals_are_json_and_counted(case):
    """h11's refusals (uvicorn's parser without httptools, as in the service's environment;
    httptools lets a 2 MB header and this Transfer-Encoding through)."""
    raw, status, reason = CASES[case]
    before = rejected(reason)
    protocol = guarded(H11Protocol, ConnectionLimits(1, 100))
    with server(protocol) as port, connect(port) as s:
        with contextlib.suppress(OSError):  # the server may hang up before it read it all
            s.sendall(raw)
        data, _ = until_closed(s)
    got, headers, body = parse(data)
    assert (got, body["reason"]) == (status, reason), body
    assert headers["content-type"] == "application/json"
    assert rejected(reason) == before + 1


# --------------------------------------------------------------------------- installation
@pytest.fixture
def restore_protocols():
    saved = dict(HTTP_PROTOCOLS)
    connections.uninstall()
    yield
    connections.uninstall()
    HTTP_PROTOCOLS.clear()
    HTTP_PROTOCOLS.update(saved)


def test_install_makes_uvicorns_default_protocol_the_guarded_one(restore_protocols):
    limits = ConnectionLimits(3, 7)
    assert connections.install(limits)
    assert connections.install(limits)  # idempotent
    config = uvicorn.Config(APP)  # as BentoML's worker builds it: `http` left at "auto"
    config.load()
    cls = config.http_protocol_class
    assert issubclass(cls, ConnectionGuard) and issubclass(cls, AutoHTTPProtocol)
    assert cls.limits == limits
    connections.uninstall()
    config = uvicorn.Config(APP)
    config.load()
    assert config.http_protocol_class is AutoHTTPProtocol


def test_install_leaves_uvicorn_alone_when_its_protocol_is_not_what_it_expects(
    restore_protocols, caplog
):
    HTTP_PROTOCOLS["auto"] = "asyncio:Protocol"  # no send_400_response, no on_response_complete
    with caplog.at_level(logging.WARNING, logger="serving.connections"):
        assert not connections.install(ConnectionLimits(3, 7))
    assert HTTP_PROTOCOLS["auto"] == "asyncio:Protocol"
    assert "lacks the expected methods" in caplog.text


def test_the_guard_turns_itself_off_when_the_protocol_lacks_what_it_reads(caplog):
    class Bare(asyncio.Protocol):  # the methods, none of the attributes (another uvicorn)
        def connection_made(self, transport):
            self.seen = transport

        def data_received(self, data):
            self.data = data

        def on_response_complete(self):
            pass

        def send_400_response(self, msg):
            self.refused = msg

    cls = guarded(Bare, ConnectionLimits(1, 1))
    with caplog.at_level(logging.WARNING, logger="serving.connections"):
        protocol = cls()
        protocol.connection_made("transport")
        protocol.data_received(b"GET")
        protocol.send_400_response("bad")
    assert cls._disabled and "lacks transport, connections, app, cycle, loop" in caplog.text
    assert (protocol.seen, protocol.data, protocol.refused) == ("transport", b"GET", "bad")
    assert protocol._header_timer is None


def test_the_service_installs_the_guard_with_its_settings(restore_protocols, monkeypatch):
    from serving.service import Polytask
    from serving.settings import get_settings

    monkeypatch.setenv("POLYTASK_HEADER_TIMEOUT_S", "4")
    monkeypatch.setenv("POLYTASK_MAX_CONNECTIONS", "9")
    get_settings.cache_clear()
    try:
        Polytask.to_asgi()  # what each HTTP worker calls before it builds its uvicorn server
        config = uvicorn.Config(APP)
        config.load()
        assert config.http_protocol_class.limits == ConnectionLimits(4, 9)
    finally:
        get_settings.cache_clear()


def test_settings_defaults_and_errors():
    settings = ServingSettings.from_env({})
    assert (settings.header_timeout_s, settings.max_connections) == (10, 1000)
    got = ServingSettings.from_env(
        {"POLYTASK_HEADER_TIMEOUT_S": "2", "POLYTASK_MAX_CONNECTIONS": "5_000"}
    )
    assert (got.header_timeout_s, got.max_connections) == (2, 5000)
    for name in ("POLYTASK_HEADER_TIMEOUT_S", "POLYTASK_MAX_CONNECTIONS"):
        for bad in ("0", "-1", "1.5", "ten"):
            with pytest.raises(SettingsError, match=name):
                ServingSettings.from_env({name: bad})


# --------------------------------------------------------------------------- live service
@pytest.mark.integration
def test_polytask_serve_workers_enforce_the_limits(store, tmp_path):  # noqa: F811
    """`polytask serve` with 2 HTTP workers: the guard is in the processes that serve HTTP."""
    home, _, _ = store
    env = {
        "BENTOML_HOME": str(home),
        "POLYTASK_MODEL_NAME": MODEL_NAME,
        "POLYTASK_MODEL": "",
        "POLYTASK_ORT_THREADS": "1",
        "POLYTASK_API_WORKERS": "2",
        "POLYTASK_HEADER_TIMEOUT_S": "1",
        "POLYTASK_MAX_CONNECTIONS": "20",
    }
    command = [sys.executable, "-m", "pipeline.cli", "serve"]
    with running(command, env, tmp_path / "serve.log", wait_ready=False) as url:
        port = int(url.rsplit(":", 1)[1])
        with connect(port) as silent, connect(port) as half:
            half.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            assert until_closed(silent)[0] == b""
            assert parse(until_closed(half)[0])[2]["reason"] == "header_timeout"
        with connect(port) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
            assert parse(until_closed(s)[0])[2]["reason"] == "invalid_http_request"
        # 2 workers x 20: more than 40 connections, and one of them is refused.
        held = [connect(port) for _ in range(45)]
        answers = []
        for s in held:
            s.sendall(GET)
        for s in held:
            answers.append(response(s)[0])
            s.close()
        assert set(answers) == {200, 503} and answers.count(503) >= 5, answers
        metrics = _metrics(url)
        for reason in ("header_timeout", "invalid_http_request", "too_many_connections"):
            assert _sum(metrics, "polytask_rejected_requests_total", reason=reason) >= 1, reason
