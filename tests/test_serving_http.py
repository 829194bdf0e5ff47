"""The service over real HTTP: `polytask serve` (BentoML) in a subprocess on loopback, on a
tiny exported model in a temporary model store, with 2 HTTP workers and 2 model workers.

Claims: /predict answers every task for each text, as the runtime does; every bad input gets a
4xx naming the problem and /readyz stays 200; /tasks lists the labels; /metrics (aggregated
over workers) counts exactly the valid predictions per task and the rejections by reason;
promoting a new model swaps it in under load with zero failed requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import daemon, train_tiny_run, use_bentoml_home
from test_serving import REPO

pytestmark = pytest.mark.integration

MODEL_NAME = "polytask-tiny"
TASKS = ["sentiment", "topic"]
API_KEY = "test-key-0123456789abcdef"
METRICS_KEY = "metrics-key-0123456789abcdef"
SERVERS: dict[str, object] = {}  # url -> the server's Popen (its process group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_data_dir, tiny_encoder_dir):
    """A model store with one exported tiny model; yields (home, artifact dir, tag)."""
    from pipeline.export import export_run

    tmp = tmp_path_factory.mktemp("serving-http")
    run_dir = train_tiny_run(tmp, tiny_data_dir, tiny_encoder_dir)
    home = tmp / "bentoml"
    with use_bentoml_home(home):
        result = export_run(
            run_dir, register=True, output_dir=tmp / "artifact", model_name=MODEL_NAME
        )
    return home, result.artifact_dir, result.tag


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], log: Path, wait_ready: bool = True):
    """Run a server command in its own process group on a free loopback port; yield its URL
    (after /readyz is 200 when `wait_ready`, else once /livez answers); stop it after."""
    port = _free_port()
    command = [*command, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    probe = "/readyz" if wait_ready else "/livez"
    full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **env}
    with daemon(command, f"{url}{probe}", log, timeout=90, env=full_env, cwd=REPO) as proc:
        SERVERS[url] = proc
        yield url


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """`polytask serve` with 2 HTTP and 2 model workers; yields its URL once ready."""
    home, _, _ = store
    env = {
        "BENTOML_HOME": str(home),
        "POLYTASK_MODEL_NAME": MODEL_NAME,
        "POLYTASK_RELOAD_SECONDS": "1",
        "POLYTASK_API_WORKERS": "2",
        "POLYTASK_ORT_THREADS": "1",
        "POLYTASK_MAX_TEXTS": "8",
        "POLYTASK_MAX_TEXT_CHARS": "1000",
        "POLYTASK_MAX_BODY_BYTES": "65536",
        "POLYTASK_MODEL": "",
    }
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--workers", "2"]
    with running(command, env, log) as url:
        yield url
    text = log.read_text()
    assert "Traceback" not in text, text[-5000:]


def _metrics(url: str) -> dict[tuple[str, frozenset], float]:
    """/metrics as {(sample name, labels): value}, polytask_* samples only."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("polytask_"):
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _sum(metrics: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= ls)


def _post(url: str, body: object, client: httpx.Client | None = None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    client = client or httpx.Client()
    return client.post(
        f"{url}/predict", content=raw, headers={"content-type": "application/json"}, timeout=30
    )


# --------------------------------------------------------------------------- tests
def test_predict_returns_every_task_like_the_runtime(server, store):
    from serving.runtime import Runtime

    _, artifact, tag = store
    texts = ["good great film", "the soup was awful", "phone " * 40]
    resp = _post(server, {"texts": texts, "return_all_probabilities": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_version"] == tag
    want = Runtime(artifact, threads=1).predict(texts, return_all=True)
    assert [r["truncated"] for r in body["results"]] == [False, False, True]
    for got, ref in zip(body["results"], want.results, strict=True):
        assert list(got["tasks"]) == TASKS
        for task in TASKS:
            assert got["tasks"][task]["label"] == ref.tasks[task].label
            assert got["tasks"][task]["probability"] == pytest.approx(
                ref.tasks[task].probability, abs=1e-5
            )
            assert set(got["tasks"][task]["probabilities"]) == set(ref.tasks[task].probabilities)
    subset = _post(server, {"texts": ["good"], "tasks": ["topic"]}).json()
    assert list(subset["results"][0]["tasks"]) == ["topic"]
    assert "probabilities" not in subset["results"][0]["tasks"]["topic"]


def test_tasks_lists_labels(server, store):
    body = httpx.get(f"{server}/tasks", timeout=10).json()
    assert body["model_version"] == store[2]
    assert body["tasks"]["sentiment"]["labels"] == ["negative", "positive"]
    assert body["tasks"]["topic"]["labels"] == ["food", "sport", "tech"]
    assert body["max_length"] == 16
    spec = httpx.get(f"{server}/openapi.json", timeout=10).json()
    assert spec["components"]["schemas"]["PredictRequest"]["examples"]


BAD_INPUTS = [
    (b'{"texts": ["good"', 400, "malformed_json", "malformed JSON"),
    (b"not json at all", 400, "malformed_json", "malformed JSON"),
    ({"text": ["good"]}, 422, "missing_texts", "texts: required"),
    ({"texts": []}, 422, "empty_list", "empty"),
    ({"texts": ["good", "   "]}, 422, "empty_text", r"texts\[1\]"),
    ({"texts": ["good", 7]}, 422, "non_string_text", "texts.1"),
    ({"texts": ["good"] * 9}, 422, "too_many_texts", "at most 8"),
    ({"texts": ["good"], "tasks": ["mr"]}, 422, "unknown_task", r"\['sentiment', 'topic'\]"),
    # hostile bodies (issue 9): each was a 503 or a traceback, or was accepted
    (b'{"texts": ["fine", "ok \\ud800"]}', 422, "invalid_text", r"texts\[1\]"),
    (b"[" * 20_000 + b"]" * 20_000, 400, "json_too_deep", "nested too deeply"),
    (b'{"texts": ["a"], "n": ' + b"7" * 5000 + b"}", 400, "malformed_json", "5,000 digits"),
    (b'{"texts": ["a"], "return_all_probabilities": "yes"}', 422, "invalid_field", "boolean"),
    (b'{"texts": ["caf\xe9"]}', 400, "invalid_utf8", "UTF-8"),
    (b'{"texts": ["ok", "' + b"x" * 1001 + b'"]}', 422, "text_too_long", r"texts\[1\]: 1,001"),
    (b'{"texts": ["' + b"x" * 70_000 + b'"]}', 413, "body_too_large", "at most 65,536 bytes"),
]


@pytest.mark.parametrize(("body", "status", "reason", "message"), BAD_INPUTS)
def test_bad_input_gets_4xx_and_service_stays_ready(server, body, status, reason, message):
    resp = _post(server, body)
    assert resp.status_code == status, resp.text
    assert resp.json()["reason"] == reason
    assert re.search(message, resp.json()["error"]), resp.json()
    assert httpx.get(f"{server}/readyz", timeout=10).status_code == 200
    assert _post(server, {"texts": ["still works"]}).status_code == 200


def test_metrics_count_exactly_the_valid_predictions(server):
    """1,000 requests at concurrency 32, a fifth of them bad, over 2 HTTP workers: no 5xx, the
    service stays ready, and the aggregated counters equal what was sent."""
    before = _metrics(server)
    bodies: list[object] = []
    for i in range(1000):
        if i % 5 == 0:
            bodies.append(BAD_INPUTS[i // 5 % len(BAD_INPUTS)][0])
        else:
            bodies.append({"texts": ["good film"] * (1 + i % 3)})
    statuses: list[int] = []

    def worker(chunk: list[object]) -> None:
        with httpx.Client() as client:
            statuses.extend(_post(server, b, client).status_code for b in chunk)

    threads = [threading.Thread(target=worker, args=(bodies[k::32],)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _metrics(server)

    valid_texts = sum(len(b["texts"]) for b in bodies if isinstance(b, dict) and _valid(b))
    n_bad = sum(1 for b in bodies if not (isinstance(b, dict) and _valid(b)))
    assert max(statuses) < 500 and statuses.count(200) == len(bodies) - n_bad
    for task in TASKS:
        delta = _sum(after, "polytask_predictions_total", task=task) - _sum(
            before, "polytask_predictions_total", task=task
        )
        assert delta == valid_texts, task
        hist = "polytask_prediction_confidence_count"
        assert _sum(after, hist, task=task) - _sum(before, hist, task=task) == valid_texts
    rejected = _sum(after, "polytask_rejected_requests_total") - _sum(
        before, "polytask_rejected_requests_total"
    )
    assert rejected == n_bad
    # Every valid text went through the model exactly once, in some adaptive batch.
    batched = _sum(after, "polytask_batch_size_texts_sum") - _sum(
        before, "polytask_batch_size_texts_sum"
    )
    assert batched == valid_texts
    calls = _sum(after, "polytask_batch_size_texts_count") - _sum(
        before, "polytask_batch_size_texts_count"
    )
    # Adaptive batching: concurrent requests share model calls.
    assert calls < statuses.count(200), (calls, statuses.count(200))
    assert _sum(after, "polytask_inference_latency_seconds_count") > 0
    assert httpx.get(f"{server}/readyz", timeout=10).status_code == 200


def _valid(body: dict) -> bool:
    texts = body.get("texts")
    return (
        isinstance(texts, list)
        and 0 < len(texts) <= 8
        and all(isinstance(t, str) and t.strip() for t in texts)
        and body.get("tasks") in (None, ["sentiment"], ["topic"], TASKS)
        and set(body) <= {"texts", "tasks", "return_all_probabilities"}
    )


def test_promoted_model_is_swapped_in_under_load_without_failures(server, store):
    from test_serving import register_copy

    from serving.model_store import promote

    home, artifact, old_tag = store
    stop = threading.Event()
    seen: Counter[str] = Counter()
    failures: list[str] = []

    def load() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                r = _post(server, {"texts": ["good film", "pizza"]}, client)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    seen[r.json()["model_version"]] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        with use_bentoml_home(home):
            new_tag = register_copy(artifact, MODEL_NAME)
            promote(new_tag)
        deadline = time.monotonic() + 30
        while seen[new_tag] < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    assert seen[old_tag] > 0 and seen[new_tag] >= 20, seen
    deadline = time.monotonic() + 10  # both model workers check every second
    while True:
        metrics = _metrics(server)
        active = [_sum(metrics, "polytask_model_active", version=v) for v in (old_tag, new_tag)]
        if active == [0, 1] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert active == [0, 1]
    # No series left for the version swapped out (review s24, jobs 16).
    assert not [
        ls for (n, ls) in metrics if n == "polytask_model_active" and ("version", old_tag) in ls
    ]
    assert _sum(metrics, "polytask_model_swaps_total") >= 2  # each of the 2 model workers
    assert httpx.get(f"{server}/tasks", timeout=10).json()["model_version"] == new_tag


def test_not_ready_until_a_model_is_loaded(store, tmp_path):
    """An empty store: alive but not ready, /predict 503 with a message; once a model is
    exported the service loads it and becomes ready, without a restart."""
    from test_serving import register_copy

    _, artifact, _ = store
    home = tmp_path / "bentoml"
    env = {
        "BENTOML_HOME": str(home),
        "POLYTASK_MODEL_NAME": MODEL_NAME,
        "POLYTASK_RELOAD_SECONDS": "1",
        "POLYTASK_ORT_THREADS": "1",
        "POLYTASK_MODEL": "",
    }
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:Polytask"]
    with running(command, env, tmp_path / "serve.log", wait_ready=False) as url:
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
        assert httpx.get(f"{url}/livez", timeout=10).status_code == 200
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        resp = _post(url, {"texts": ["good"]})
        assert resp.status_code == 503 and resp.json()["reason"] == "not_ready"
        assert "no model named 'polytask-tiny'" in resp.json()["error"]
        with use_bentoml_home(home):
            tag = register_copy(artifact, MODEL_NAME)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "not ready 30 s after a model was exported"
            time.sleep(0.5)
        resp = _post(url, {"texts": ["good"]})
        assert resp.status_code == 200 and resp.json()["model_version"] == tag


# --------------------------------------------------------------------------- trust boundary
def _server_rss(url: str) -> int:
    """Resident bytes of the server and every process under it (BentoML's workers start their
    own sessions, so its process group would miss them)."""
    import psutil

    root = psutil.Process(SERVERS[url].pid)
    procs = [root, *root.children(recursive=True)]
    assert len(procs) >= 3, procs  # the supervisor and at least one worker of each service
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 415), ({"content-type": "text/plain"}, 415), ({"content-type": "application/json"}, 200)],
)
def test_content_type_must_be_json(server, headers, status):
    resp = httpx.post(f"{server}/predict", content=b'{"texts": ["good"]}', headers=headers)
    assert resp.status_code == status, resp.text
    if status == 415:
        assert resp.json()["reason"] == "unsupported_media_type"


def test_a_20mb_body_is_refused_before_it_is_read_and_memory_does_not_grow(server):
    """Over Content-Length and chunked: 413 each time, the service's memory stays put, and
    valid requests are answered throughout."""
    huge = b'{"texts": ["' + b"x" * (20 << 20) + b'"]}'
    _post(server, {"texts": ["warm up"]})
    before = _server_rss(server)
    for _ in range(3):
        resp = _post(server, huge)
        assert resp.status_code == 413 and resp.json()["reason"] == "body_too_large"

        def chunks():
            for i in range(0, len(huge), 1 << 20):
                yield huge[i : i + (1 << 20)]

        with contextlib.suppress(httpx.TransportError):  # the server may close mid-upload
            resp = httpx.post(
                f"{server}/predict",
                content=chunks(),
                headers={"content-type": "application/json"},
                timeout=30,
            )
            assert resp.status_code == 413
        assert _post(server, {"texts": ["still answered"]}).status_code == 200
    grown = _server_rss(server) - before
    # 6 x 20 MB were sent; holding even one of them would show as 20 MB.
    assert grown < 15 << 20, f"server memory grew by {grown / 2**20:.1f} MiB"
    assert httpx.get(f"{server}/readyz", timeout=10).status_code == 200


def test_poison_texts_never_fail_other_clients_requests(server):
    """Poison (lone surrogates, over-long texts, deep JSON) mixed into concurrent valid
    traffic that shares adaptive batches: every valid request succeeds, every poison one gets
    a 4xx, and the log has no traceback (checked when the server fixture stops)."""
    poison = [
        b'{"texts": ["ok \\ud800"]}',
        b'{"texts": ["good", "\\udfff bad"]}',
        b'{"texts": ["' + b"y" * 5000 + b'"]}',
        b"[" * 20_000,
    ]
    bodies = [
        poison[i % 4] if i % 10 == 0 else {"texts": ["good film", "pizza"]} for i in range(400)
    ]
    results: list[tuple[bool, int]] = []

    def worker(chunk: list[object]) -> None:
        with httpx.Client() as client:
            results.extend(
                (isinstance(b, bytes), _post(server, b, client).status_code) for b in chunk
            )

    threads = [threading.Thread(target=worker, args=(bodies[k::16],)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    valid = [code for is_poison, code in results if not is_poison]
    bad = [code for is_poison, code in results if is_poison]
    assert valid.count(200) == len(valid) == 360, Counter(valid)
    assert all(400 <= code < 500 for code in bad), Counter(bad)


@pytest.fixture(scope="module")
def keyed_server(store, tmp_path_factory):
    """The service with API keys for /predict and /tasks, and another for /metrics."""
    home, _, _ = store
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# one key per line\n{API_KEY}\n")
    env = {
        "BENTOML_HOME": str(home),
        "POLYTASK_MODEL_NAME": MODEL_NAME,
        "POLYTASK_ORT_THREADS": "1",
        "POLYTASK_MODEL": "",
        "POLYTASK_API_KEYS_FILE": str(keys),
        "POLYTASK_METRICS_API_KEYS": METRICS_KEY,
    }
    log = tmp_path_factory.mktemp("keyed-log") / "serve.log"
    command = [sys.executable, "-m", "pipeline.cli", "serve"]
    with running(command, env, log) as url:
        yield url
    text = log.read_text()
    assert API_KEY not in text and METRICS_KEY not in text  # keys are never logged
    assert "Traceback" not in text, text[-5000:]


def test_api_keys_protect_predict_tasks_and_metrics(keyed_server):
    url = keyed_server
    auth = {"authorization": f"Bearer {API_KEY}"}
    body = {"texts": ["good"]}
    assert _post(url, body).status_code == 401
    resp = httpx.post(
        f"{url}/predict",
        json=body,
        headers={"authorization": "Bearer not-the-key-000000000"},
    )
    assert resp.status_code == 401 and resp.json()["reason"] == "invalid_api_key"
    resp = httpx.post(f"{url}/predict", json=body, headers=auth, timeout=30)
    assert resp.status_code == 200 and list(resp.json()["results"][0]["tasks"]) == TASKS
    assert httpx.get(f"{url}/tasks").status_code == 401
    assert httpx.get(f"{url}/tasks", headers=auth).status_code == 200
    for probe in ("/readyz", "/livez", "/healthz", "/openapi.json"):
        assert httpx.get(f"{url}{probe}").status_code == 200, probe
    assert httpx.get(f"{url}/metrics", headers=auth).status_code == 401
    text = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {METRICS_KEY}"}).text
    counted = {
        reason: sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("polytask_rejected_requests_total") and f'"{reason}"' in line
        )
        for reason in ("missing_api_key", "invalid_api_key")
    }
    assert counted == {"missing_api_key": 2, "invalid_api_key": 2}, counted
    spec = httpx.get(f"{url}/openapi.json").json()
    assert spec["paths"]["/predict"]["post"]["security"] == [{"bearer": []}]
    assert "413" in spec["paths"]["/predict"]["post"]["responses"]
