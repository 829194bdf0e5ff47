"""The HTTP trust boundary without a server: request parsing under hostile bodies, limits and
API-key settings, the API-key middleware and the bounded body reader (on a small Starlette
app), the runtime's cut before tokenization, and the one-by-one fallback of a failed batch.

Each probe of issue 9 is a test here or in test_serving_http.py (over real HTTP).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from test_serving import artifact  # noqa: F401  (a fixture: a tiny exported model)

from serving.guard import ApiKeyGuard, check_content_type, read_body
from serving.schemas import RequestError, parse_predict_request
from serving.settings import ServingSettings, SettingsError, get_settings

KEY = "k" * 20 + "-predict"
METRICS_KEY = "m" * 20 + "-metrics"

# Strings that would mean Python internals or server paths leaked into a client's answer.
INTERNALS = re.compile(r"Traceback|File \"|sys\.set_int_max_str_digits|codec|/work/|\.py\b")


def _rejected(body: bytes, **limits: int) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_predict_request(body, **limits)
    assert not INTERNALS.search(info.value.message), info.value.message
    return info.value


# --------------------------------------------------------------------------- hostile bodies
@pytest.mark.parametrize(
    ("body", "status", "reason", "message"),
    [
        # a lone surrogate: valid JSON, not Unicode text; the tokenizer raised on it
        (b'{"texts": ["fine", "ok \\ud800"]}', 422, "invalid_text", r"texts\[1\].*surrogate"),
        (b'{"texts": ["\\udfff"]}', 422, "invalid_text", r"texts\[0\]"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "json_too_deep", "nested too deeply"),
        (b'{"texts": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "json_too_deep", "deeply"),
        (b'{"texts": ["a"], "n": ' + b"9" * 5000 + b"}", 400, "malformed_json", "5,000 digits"),
        (b'{"texts": ["a"], "n": NaN}', 400, "malformed_json", "NaN"),
        (b'{"texts": ["a"], "n": -Infinity}', 400, "malformed_json", "Infinity"),
        (b'{"texts": ["caf\xe9"]}', 400, "invalid_utf8", r"not valid UTF-8 \(byte 15\)"),
        (b"\xff\xfe{\x00}\x00", 400, "invalid_utf8", "UTF-8"),
        (b'{"texts": ["a"', 400, "malformed_json", "line 1, column 15"),
        (b'{"texts": ["a"], "return_all_probabilities": "yes"}', 422, "invalid_field", "bool"),
        (b'{"texts": ["a"], "return_all_probabilities": 1}', 422, "invalid_field", "bool"),
        (b'"just a string"', 422, "not_an_object", "got a string"),
        (b"null", 422, "not_an_object", "got null"),
    ],
)
def test_hostile_bodies_get_a_4xx_with_a_plain_message(body, status, reason, message):
    err = _rejected(body)
    assert (err.status, err.reason) == (status, reason)
    assert re.search(message, err.message), err.message


def test_a_utf8_byte_order_mark_is_tolerated():
    req = parse_predict_request(b'\xef\xbb\xbf{"texts": ["a"]}')
    assert req.texts == ["a"]


def test_text_length_limit_names_the_index():
    err = _rejected(
        json.dumps({"texts": ["ok", "x" * 101, "y" * 500]}).encode(), max_text_chars=100
    )
    assert (err.status, err.reason) == (422, "text_too_long")
    assert err.message.startswith("texts[1, 2]: 101 characters; at most 100 per text")
    assert "POLYTASK_MAX_TEXT_CHARS" in err.message
    ok = parse_predict_request(json.dumps({"texts": ["x" * 100]}).encode(), max_text_chars=100)
    assert ok.texts == ["x" * 100]


def test_valid_unicode_survives_validation():
    texts = ["emoji \U0001f600 and a pair \U00010000", "a\x00b", "\u200b visible after"]
    req = parse_predict_request(json.dumps({"texts": texts}).encode())
    assert req.texts == texts


# --------------------------------------------------------------------------- settings
def test_settings_from_env_and_their_errors(tmp_path):
    s = ServingSettings.from_env({})
    assert (s.max_texts, s.max_body_bytes, s.max_text_chars) == (64, 1 << 20, 10_000)
    assert not s.api_keys.enabled and not s.metrics_api_keys.enabled
    env = {
        "POLYTASK_MAX_TEXTS": "8",
        "POLYTASK_MAX_BODY_BYTES": "65_536",
        "POLYTASK_MAX_TEXT_CHARS": "500",
        "POLYTASK_API_KEYS": f" {KEY} , {KEY}x ",
    }
    s = ServingSettings.from_env(env)
    assert (s.max_texts, s.max_body_bytes, s.max_text_chars) == (8, 65536, 500)
    assert s.api_keys.accepts(KEY) and s.api_keys.accepts(KEY + "x")
    assert not s.api_keys.accepts(KEY[:-1]) and not s.api_keys.accepts("")
    assert KEY not in repr(s) and KEY not in str(s.model_dump())
    for name, value in [("POLYTASK_MAX_BODY_BYTES", "0"), ("POLYTASK_MAX_TEXT_CHARS", "ten")]:
        with pytest.raises(SettingsError, match=name):
            ServingSettings.from_env({name: value})


def test_api_keys_from_a_file_and_bad_key_files(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# operators\n{KEY}\n\n  {METRICS_KEY}  \n")
    s = ServingSettings.from_env({"POLYTASK_API_KEYS_FILE": str(keys)})
    assert s.api_keys.accepts(KEY) and s.api_keys.accepts(METRICS_KEY)
    assert not s.api_keys.accepts("# operators")
    with pytest.raises(SettingsError, match="cannot read"):
        ServingSettings.from_env({"POLYTASK_API_KEYS_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(SettingsError, match="holds no key"):
        ServingSettings.from_env({"POLYTASK_API_KEYS_FILE": str(tmp_path / "empty")})
    with pytest.raises(SettingsError, match="key #2 is shorter") as info:
        ServingSettings.from_env({"POLYTASK_API_KEYS": f"{KEY},short-secret"})
    assert "short-secret" not in str(info.value)  # a key never reaches a message


# --------------------------------------------------------------------------- middleware + body
@pytest.fixture
def client(monkeypatch):
    """A small Starlette app behind ApiKeyGuard, with the bounded body reader on /predict."""
    monkeypatch.setenv("POLYTASK_API_KEYS", KEY)
    monkeypatch.setenv("POLYTASK_METRICS_API_KEYS", METRICS_KEY)
    monkeypatch.setenv("POLYTASK_MAX_BODY_BYTES", "1000")
    get_settings.cache_clear()

    async def predict(request: Request) -> JSONResponse:
        try:
            check_content_type(request)
            body = await read_body(request, get_settings().max_body_bytes)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse({"bytes": len(body)})

    async def ok(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/tasks", ok),
            Route("/metrics", ok),
            Route("/readyz", ok),
            Route("/livez", ok),
        ]
    )
    with TestClient(ApiKeyGuard(app)) as c:
        yield c
    get_settings.cache_clear()


def _json(key: str | None = KEY) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return headers


def test_api_keys_guard_predict_tasks_and_metrics_but_not_health(client):
    from prometheus_client import REGISTRY

    def rejected(reason: str) -> float:
        return (
            REGISTRY.get_sample_value("polytask_rejected_requests_total", {"reason": reason}) or 0
        )

    before = {r: rejected(r) for r in ("missing_api_key", "invalid_api_key")}
    r = client.post("/predict", content=b"{}", headers=_json(None))
    assert r.status_code == 401 and r.json()["reason"] == "missing_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.post("/predict", content=b"{}", headers=_json("wrong-key-of-some-length"))
    assert r.status_code == 401 and r.json()["reason"] == "invalid_api_key"
    assert KEY not in r.text
    assert client.post("/predict", content=b"{}", headers=_json()).status_code == 200
    assert client.get("/tasks").status_code == 401
    assert client.get("/tasks", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    # /metrics has keys of its own: the predict key does not open it
    assert client.get("/metrics", headers={"authorization": f"Bearer {KEY}"}).status_code == 401
    assert client.get("/metrics", headers={"authorization": f"Bearer {METRICS_KEY}"}).text == "ok"
    assert client.get("/readyz").status_code == 200 and client.get("/livez").status_code == 200
    assert rejected("missing_api_key") - before["missing_api_key"] == 2
    assert rejected("invalid_api_key") - before["invalid_api_key"] == 2


def test_body_limit_by_content_length_and_while_streaming(client):
    r = client.post("/predict", content=b"x" * 1000, headers=_json())
    assert r.json() == {"bytes": 1000}
    r = client.post("/predict", content=b"x" * 1001, headers=_json())
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"
    assert "1,001 bytes; at most 1,000" in r.json()["error"]

    read = []

    def chunks():  # no Content-Length: chunked transfer; refused once past the limit
        for _ in range(100):
            read.append(1)
            yield b"y" * 300

    r = client.post("/predict", content=chunks(), headers=_json())
    assert r.status_code == 413 and "at most 1,000 bytes" in r.json()["error"]


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
def test_wrong_or_missing_content_type_is_415(client, content_type):
    headers = {"authorization": f"Bearer {KEY}"}
    if content_type:
        headers["content-type"] = content_type
    r = client.post("/predict", content=b'{"texts": ["a"]}', headers=headers)
    assert r.status_code == 415 and r.json()["reason"] == "unsupported_media_type"
    ok = {**headers, "content-type": "Application/JSON; charset=UTF-8"}
    assert client.post("/predict", content=b"{}", headers=ok).status_code == 200


# --------------------------------------------------------------------------- runtime and batch
def test_runtime_cuts_huge_texts_before_the_tokenizer(artifact):  # noqa: F811
    from serving.runtime import CHARS_PER_TOKEN, Runtime

    runtime = Runtime(artifact, threads=1)
    seen: list[int] = []
    encode = runtime.tokenizer.encode_batch

    class Spy:
        def __getattr__(self, name):
            return getattr(runtime.tokenizer_real, name)

        def encode_batch(self, texts):
            seen.extend(len(t) for t in texts)
            return encode(texts)

    runtime.tokenizer_real = runtime.tokenizer
    runtime.tokenizer = Spy()
    cut = runtime.metadata.encoder.max_length * CHARS_PER_TOKEN
    huge = "good " * 200_000  # 1 MB
    out = runtime.run([huge, "pizza"])
    assert max(seen) == cut
    assert out.truncated.tolist() == [True, False]
    # The cut keeps every token the model reads: the answer equals the uncut text's.
    ref = runtime.run([huge[:cut]])
    for task, p in out.probabilities.items():
        np.testing.assert_allclose(p[0], ref.probabilities[task][0], atol=1e-6)


class _FlakyRuntime:
    """Fails on any batch holding a text with 'BAD'; `broken` fails everything."""

    version = "m:1"
    labels = {"t": ["no", "yes"]}

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken

    def run(self, texts):
        from serving.runtime import BatchOutput

        if self.broken or any("BAD" in t for t in texts):
            raise TypeError("tokenizer exploded")
        probs = np.tile(np.array([[0.25, 0.75]], dtype=np.float32), (len(texts), 1))
        return BatchOutput({"t": probs}, np.zeros(len(texts), dtype=bool), self.version)


def test_a_failed_batch_is_answered_one_by_one(caplog):
    from serving.service import _one_by_one

    texts = ["good", "BAD one", "fine"]
    with caplog.at_level("WARNING"):
        rows = _one_by_one(_FlakyRuntime(), texts, TypeError("tokenizer exploded"))
    assert [("error" in r) for r in rows] == [False, True, False]
    assert rows[0]["probabilities"]["t"] == {"no": 0.25, "yes": 0.75}
    assert "BAD" not in caplog.text and "Traceback" not in caplog.text
    # Every text failing alone is still the client's when a probe text works...
    assert all("error" in r for r in _one_by_one(_FlakyRuntime(), ["BAD"], TypeError("x")))
    # ...and the model's when it does not: the batch error propagates (a 503).
    with pytest.raises(TypeError, match="tokenizer exploded"):
        _one_by_one(_FlakyRuntime(broken=True), ["a", "b"], TypeError("tokenizer exploded"))
