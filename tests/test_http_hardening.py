"""The HTTP boundary against the attacks of the review in /work/review/http.md (issue numbers
below are its sections): no 5xx or traceback for a client's input, errors that stay small
whatever the body holds, no metric series or log lines made of a client's path, a deadline
for the body. Offline and in-process: small Starlette apps, and the service's own ASGI app
built without starting its workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient
from test_boundary import KEY, _json, _rejected, client  # noqa: F401  (client: a fixture)

from serving.guard import (
    AccessLogEscaper,
    FrontDoor,
    escape_for_log,
    read_body,
)
from serving.schemas import (
    MAX_ECHO,
    MAX_REPORTED,
    PredictRequest,
    RequestError,
    parse_predict_request,
    request_error,
)

# An error message about a 1 MB body stays about this small (it was 24 MB).
SMALL = 600


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("polytask_rejected_requests_total", {"reason": reason}) or 0


# --------------------------------------------------------------------------- 2: empty loc
@pytest.mark.parametrize(
    ("body", "reason"),
    [(b'{"texts": ["a"], "\\ud800": 1}', "unknown_field"), (b'{"\\udfff": 1}', "missing_texts")],
)
def test_a_lone_surrogate_field_name_is_a_422_naming_it_escaped(body, reason):
    err = _rejected(body)
    assert (err.status, err.reason) == (422, reason)
    assert "\\ud" in err.message  # escaped, so the answer is valid UTF-8 JSON
    json.dumps(err.body(), ensure_ascii=False).encode("utf-8")


def test_a_validation_error_without_location_is_a_422_not_an_index_error():
    # pydantic reports a non-Unicode key with an empty `loc` (this raised IndexError -> 503).
    with pytest.raises(ValidationError) as info:
        PredictRequest.model_validate({"texts": ["a"], "\ud800": 1})
    err = request_error(info.value)
    assert (err.status, err.reason) == (422, "invalid_field")
    assert "not valid Unicode" in err.message


@pytest.fixture
def predict_client(monkeypatch):
    """The service's real `_predict` handler on a bare Starlette app, with a stub service."""
    import bentoml

    import serving.service as service

    class Stub:
        async def predict(self, req):
            raise RuntimeError("encoder exploded")

    monkeypatch.setattr(bentoml, "get_current_service", lambda: Stub())
    app = Starlette(routes=[Route("/predict", service._predict, methods=["POST"])])
    with TestClient(app) as c:
        yield c


def test_a_validation_gap_is_a_400_not_an_outage(predict_client, monkeypatch, caplog):
    import serving.service as service

    def gap(*args, **kwargs):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(service, "parse_predict_request", gap)
    before = {r: rejected(r) for r in ("invalid_request", "unavailable")}
    with caplog.at_level(logging.WARNING, logger="serving.service"):
        for _ in range(3):
            r = predict_client.post("/predict", content=b"{}", headers=_json(None))
            assert r.status_code == 400 and r.json()["reason"] == "invalid_request"
            assert "IndexError" not in r.text
    assert rejected("invalid_request") - before["invalid_request"] == 3
    assert rejected("unavailable") == before["unavailable"]
    # The gap is logged with a traceback once, then in one line: no log flood.
    assert caplog.text.count("Traceback") == 1


def test_a_model_failure_is_a_503_without_python_names(predict_client):
    r = predict_client.post("/predict", content=b'{"texts": ["a"]}', headers=_json(None))
    assert r.status_code == 503 and r.json()["reason"] == "unavailable"
    assert "RuntimeError" not in r.text and "exploded" not in r.text


# --------------------------------------------------------------------------- 3: amplification
def test_a_huge_list_is_refused_by_its_length_before_its_items_are_validated():
    body = ('{"texts": [' + ",".join(["0"] * 524_000) + "]}").encode()  # 1 MB of numbers
    err = _rejected(body)
    assert (err.status, err.reason) == (422, "too_many_texts")
    assert "524,000 texts; at most 64" in err.message and len(err.message) < SMALL
    err = _rejected(json.dumps({"texts": ["a"], "tasks": ["t"] * 50_000}).encode())
    assert (err.reason, len(err.message) < SMALL) == ("too_many_tasks", True)


def test_many_validation_errors_are_reported_as_the_first_few_and_a_count():
    err = _rejected(json.dumps({"texts": list(range(64))}).encode())
    assert err.reason == "non_string_text"
    assert err.message.count("Input should be") == MAX_REPORTED
    assert err.message.endswith(f"and {64 - MAX_REPORTED} more")


def test_a_misspelt_texts_is_missing_texts_naming_the_unknown_field():
    err = _rejected(json.dumps({"text": ["a"], **{str(i): 0 for i in range(100_000)}}).encode())
    assert err.reason == "missing_texts"
    assert err.message.startswith("texts: required field is missing; unknown field(s) 'text'")
    assert len(err.message) < SMALL


def test_unknown_fields_are_named_few_and_short():
    err = _rejected(json.dumps({"texts": ["a"], **{str(i): 0 for i in range(100_000)}}).encode())
    assert err.reason == "unknown_field" and "and 99,997 more" in err.message
    assert len(err.message) < SMALL
    err = _rejected(json.dumps({"texts": ["a"], "k" * 1_000_000: 0}).encode())
    assert err.reason == "unknown_field" and "1,000,000 characters" in err.message
    assert "k" * (MAX_ECHO + 1) not in err.message and len(err.message) < SMALL


def test_unknown_tasks_are_named_few_and_short():
    from serving.service import _check_tasks

    known = ["sst2", "trec"]
    with pytest.raises(RequestError) as info:
        _check_tasks([f"t{i}" for i in range(100_000)] + ["x" * 10**6], known)
    err = info.value
    assert err.reason == "unknown_task" and "100,001 in all" in err.message
    assert "['sst2', 'trec']" in err.message and len(err.message) < SMALL
    with pytest.raises(RequestError, match=r"\['mr'\]; valid tasks are"):
        _check_tasks(["mr", "mr"], known)
    with pytest.raises(RequestError, match=r"\\n"):  # escaped, never raw
        _check_tasks(["a\nb"], known)


# --------------------------------------------------------------------------- 1 + 7: front door
async def _inner_app(scope, receive, send):
    """Stands for BentoML's app (its request metrics label every path it sees)."""
    SEEN.append(scope.get("path"))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


SEEN: list[str | None] = []


def test_front_door_answers_unknown_paths_and_methods_itself():
    SEEN.clear()
    door = FrontDoor(_inner_app, routes={"/predict": ("POST",), "/livez": ("GET",)})
    c = TestClient(door)
    before = {r: rejected(r) for r in ("not_found", "method_not_allowed")}
    for _ in range(20):
        r = c.get(f"/x{uuid.uuid4().hex}")
        assert r.status_code == 404
        assert r.json() == {"error": "no such endpoint", "reason": "not_found"}
    r = c.get("/predict")
    assert (r.status_code, r.json()["reason"], r.headers["allow"]) == (
        405,
        "method_not_allowed",
        "POST",
    )
    assert c.put("/livez").status_code == 405
    assert c.head("/livez").status_code == 200  # HEAD goes with GET
    assert c.post("/predict").status_code == 200 and c.get("/livez").status_code == 200
    assert SEEN == ["/livez", "/predict", "/livez"]  # nothing else reached the inner app
    assert rejected("not_found") - before["not_found"] == 20
    assert rejected("method_not_allowed") - before["method_not_allowed"] == 2


def test_front_door_refuses_a_content_type_bentomls_access_log_cannot_decode():
    SEEN.clear()
    door = FrontDoor(_inner_app, routes={"/predict": ("POST",)})
    c = TestClient(door)
    r = c.post("/predict", content=b"{}", headers={"content-type": b"\xff\xfe"})
    assert r.status_code == 415 and r.json()["reason"] == "unsupported_media_type"
    assert SEEN == []
    assert c.post("/predict", content=b"{}", headers=_json(None)).status_code == 200


def _endpoint_labels() -> set[str]:
    return {
        s.labels["endpoint"]
        for family in REGISTRY.collect()
        for s in family.samples
        if "endpoint" in s.labels
    }


def test_the_service_app_keeps_unknown_paths_out_of_bentomls_metrics():
    """The real service app, built as a worker builds it (no lifespan: no model needed)."""
    from serving.service import Polytask

    app = Polytask.to_asgi()
    assert isinstance(app, FrontDoor)
    c = TestClient(app, raise_server_exceptions=False)
    assert c.get("/livez").status_code == 200
    paths = [f"/probe-{uuid.uuid4().hex}" for _ in range(50)]
    for path in [*paths, "/", "/docs.json", "/schema.json", "/static_content/x", "/tasks/"]:
        r = c.get(path)
        assert r.status_code == 404 and r.json()["reason"] == "not_found", path
    assert c.delete("/metrics").json()["reason"] == "method_not_allowed"
    labels = _endpoint_labels()
    assert "/livez" in labels  # BentoML's metrics work...
    assert not any(label.startswith("/probe-") for label in labels)  # ...on known paths only


# --------------------------------------------------------------------------- 5: body deadline
def _request(messages: list[dict] | None, headers: list[tuple[bytes, bytes]] = ()) -> Request:
    """A request whose body is `messages`, then nothing ever again (None: nothing at all)."""
    queue = list(messages or [])

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()  # a stalled client

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": list(headers)}
    return Request(scope, receive)


def test_a_stalled_body_is_a_408_after_the_deadline():
    partial = [{"type": "http.request", "body": b'{"texts"', "more_body": True}]
    for messages in (None, partial):
        with pytest.raises(RequestError) as info:
            asyncio.run(read_body(_request(messages), limit=1000, timeout_s=0.01))
        assert (info.value.status, info.value.reason) == (408, "body_timeout")
        assert "POLYTASK_BODY_TIMEOUT_S" in info.value.message


def test_a_client_gone_mid_body_is_a_client_error():
    gone = [
        {"type": "http.request", "body": b"{", "more_body": True},
        {"type": "http.disconnect"},
    ]
    with pytest.raises(RequestError) as info:
        asyncio.run(read_body(_request(gone), limit=1000, timeout_s=5))
    assert info.value.reason == "client_disconnected"


def test_body_timeout_setting(monkeypatch):
    from serving.guard import body_timeout_s
    from serving.settings import SettingsError

    body_timeout_s.cache_clear()
    try:
        assert body_timeout_s() == 10
        monkeypatch.setenv("POLYTASK_BODY_TIMEOUT_S", "3")
        body_timeout_s.cache_clear()
        assert body_timeout_s() == 3
        monkeypatch.setenv("POLYTASK_BODY_TIMEOUT_S", "0")
        body_timeout_s.cache_clear()
        with pytest.raises(SettingsError, match="POLYTASK_BODY_TIMEOUT_S"):
            body_timeout_s()
    finally:
        monkeypatch.delenv("POLYTASK_BODY_TIMEOUT_S", raising=False)
        body_timeout_s.cache_clear()


def test_a_chunked_body_over_the_limit_reads_plainly(client):  # noqa: F811
    r = client.post("/predict", content=iter([b"y" * 600, b"y" * 600]), headers=_json())
    assert r.status_code == 413
    assert r.json()["error"] == (
        "request body over the limit; at most 1,000 bytes (POLYTASK_MAX_BODY_BYTES)"
    )


# --------------------------------------------------------------------------- 8, 9, 11, 12
def test_a_non_list_tasks_is_counted_under_tasks():
    err = _rejected(b'{"texts": ["a"], "tasks": "sst2"}')
    assert (err.status, err.reason) == (422, "invalid_tasks")


@pytest.mark.parametrize(
    "invisible",
    ["\x00", "\u200b\u200b", "\x01\x02\x7f\ufeff", "\u2028\u00a0", "\ue000", "\U000e0001"],
)
def test_a_text_with_nothing_visible_is_empty(invisible):
    err = _rejected(json.dumps({"texts": ["fine", invisible]}).encode())
    assert (err.status, err.reason) == (422, "empty_text")
    assert err.message.startswith("texts[1]: empty text")


@pytest.mark.parametrize(
    ("number", "message"),
    [
        (b"0." + b"1" * 1_000_000, "a number of 1,000,002 characters; at most 40"),
        (b"1e999", "out of range"),
        (b"-" + b"1" * 21, "a number with 21 digits; at most 20"),
        (b"1" * 20, None),  # accepted by the parser (then refused as an unknown field)
        (b"-1.5e10", None),
    ],
)
def test_absurd_numbers_are_malformed_json(number, message):
    err = _rejected(b'{"texts": ["a"], "n": ' + number + b"}")
    if message is None:
        assert err.reason == "unknown_field"
    else:
        assert (err.status, err.reason) == (400, "malformed_json")
        assert message in err.message


def test_json_error_messages_read_plainly():
    err = _rejected(b'{"texts": ["a\x01"]}')
    assert err.message == "malformed JSON body: Invalid control character at line 1, column 14"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "gzip, identity"])
def test_a_compressed_body_is_415(client, encoding):  # noqa: F811
    headers = {**_json(), "content-encoding": encoding}
    r = client.post("/predict", content=b'{"texts": ["a"]}', headers=headers)
    assert r.status_code == 415 and r.json()["reason"] == "unsupported_content_encoding"
    ok = {**_json(), "content-encoding": "identity"}
    assert client.post("/predict", content=b"{}", headers=ok).status_code == 200


def test_parse_still_accepts_ordinary_requests():
    req = parse_predict_request(
        json.dumps({"texts": ["a\x00b", "\u200b visible"], "tasks": ["x"] * 100}).encode()
    )
    assert req.texts == ["a\x00b", "\u200b visible"]


# --------------------------------------------------------------------------- 6: access log
def test_access_log_records_are_escaped():
    forged = "/x\r\n2026-12-03T16:06:00+0000 [ERROR] FORGED\udcff\x1b[31m"
    record = logging.LogRecord(
        "bentoml.access",
        logging.INFO,
        __file__,
        1,
        "%s (%s) %.3fms",
        ("1.2.3.4:5", forged, 1.5),
        None,
    )
    assert AccessLogEscaper().filter(record)
    line = record.getMessage()
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "\\r\\n2026" in line and "\\udcff" in line
    line.encode("utf-8")  # valid UTF-8: no lone surrogate left
    assert escape_for_log("/predict") == "/predict"


def test_the_service_installs_the_escaper_on_bentomls_access_logger():
    from serving.service import Polytask

    Polytask.to_asgi()
    Polytask.to_asgi()
    filters = logging.getLogger("bentoml.access").filters
    assert sum(isinstance(f, AccessLogEscaper) for f in filters) == 1
