"""Training and serving metrics end to end, with the real servers on loopback: Debian's
`prometheus-pushgateway` and `prometheus` (CI installs them; a missing binary fails the test).

    tiny `retrain` (local mode, isolated model store) --push--> Pushgateway <--scrape-- Prometheus
    `polytask serve` (tests/test_serving_http.py's fixture) <------/metrics---------/

Claims: after one retraining job and some /predict traffic, PromQL over Prometheus's HTTP API
returns per-task training series with the values of the run record (ratios, grouping labels
kept by honor_labels) and the promotion decision, and per-task serving counters that equal the
texts sent.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import daemon, tiny_config_dict, use_bentoml_home
from test_serving_http import MODEL_NAME, TASKS, _free_port, _post, server  # noqa: F401

from pipeline.config import parse_config

pytestmark = pytest.mark.integration

PUSHGATEWAY = "prometheus-pushgateway"
PROMETHEUS = "prometheus"
JOB = "polytask_retrain"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # fail, not skip: CI installs them (.ci/run)
        pytest.fail(
            f"{name} not found on PATH: apt-get install -y prometheus prometheus-pushgateway"
        )
    return path


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("pushgateway") / "pushgateway.log"
    command = [
        binary(PUSHGATEWAY),
        f"--web.listen-address=127.0.0.1:{port}",
        # Debian's default is /var/lib/prometheus/pushgateway.data: shared between runs.
        "--persistence.file=",
    ]
    with daemon(command, f"{url}/-/ready", log):
        yield url


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, tiny_data_dir, tiny_encoder_dir, pushgateway):
    """One tiny retraining job that pushes to the Pushgateway; yields (record, run.json)."""
    from pipeline.jobs.retrain import retrain

    binary(PROMETHEUS)  # fail before training if the second server is missing
    tmp = tmp_path_factory.mktemp("retrain")
    raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp / "runs", tmp / "cache")
    raw["train"]["epochs"] = 2
    raw["monitoring"] = {"pushgateway": pushgateway, "job": JOB}
    with use_bentoml_home(tmp / "bentoml") as home:
        record = retrain(parse_config(raw), run_name="monitored", model_name=MODEL_NAME)
    assert record.promoted
    run = json.loads((record.run_dir / "run.json").read_text())
    return home, record, run


@pytest.fixture(scope="module")
def store(retrained):
    """Overrides test_serving_http's `store`: its `server` fixture then serves the model the
    retraining job promoted."""
    home, record, _ = retrained
    return home, None, record.tag


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, pushgateway, server):  # noqa: F811
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "pushgateway",
                "honor_labels": True,  # keep the pushed job/config labels
                "static_configs": [{"targets": [pushgateway.removeprefix("http://")]}],
            },
            {
                "job_name": "polytask-serve",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [server.removeprefix("http://")]}],
            },
        ],
    }
    with run_prometheus(tmp, config) as url:
        yield url


@contextlib.contextmanager
def run_prometheus(tmp: Path, config: dict) -> Iterator[str]:
    """A real Prometheus on loopback with `config` (written to tmp/prometheus.yml), its data
    and log under `tmp`; yields its URL once /-/ready answers."""
    (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        binary(PROMETHEUS),
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with daemon(command, f"{url}/-/ready", tmp / "prometheus.log"):
        yield url


def query_until(prometheus: str, promql: str, want: int, timeout: float = 30) -> list[dict]:
    """Instant query (GET /api/v1/query) until it returns `want` series; the result vector."""
    deadline = time.monotonic() + timeout
    while True:
        resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", body
        assert body["data"]["resultType"] == "vector"
        result = body["data"]["result"]
        if len(result) >= want:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{promql}: {len(result)} series after {timeout} s, want {want}")
        time.sleep(0.5)


def by_task(result: list[dict]) -> dict[str, float]:
    return {r["metric"]["task"]: float(r["value"][1]) for r in result}


def test_prometheus_answers_per_task_training_and_serving_queries(
    retrained,
    server,  # noqa: F811
    prometheus,
):
    _, record, run = retrained
    texts = {"sentiment": 0, "topic": 0}
    with httpx.Client() as client:
        for i in range(10):
            body = {"texts": ["good great film", "the soup was awful"][: 1 + i % 2]}
            if i % 3 == 0:
                body["tasks"] = ["topic"]
            assert _post(server, body, client).status_code == 200
            for task in body.get("tasks", TASKS):
                texts[task] += len(body["texts"])

    # Training: the pushed group, labels kept by honor_labels, ratios of the run record.
    result = query_until(prometheus, 'polytask_train_dev_accuracy{task="sentiment"}', 1)
    assert result[0]["metric"]["job"] == JOB and result[0]["metric"]["config"] == "tiny"
    dev = by_task(query_until(prometheus, "polytask_train_dev_accuracy", len(TASKS)))
    assert dev == pytest.approx({t: run["dev"][t]["accuracy"] / 100 for t in TASKS})
    gain = by_task(query_until(prometheus, "polytask_train_alignment_gain", len(TASKS)))
    stages = run["stages"]
    assert gain == pytest.approx(
        {t: (stages[t]["final"] - stages[t]["joint"]) / 100 for t in TASKS}
    )
    per_stage = query_until(prometheus, 'polytask_train_stage_dev_accuracy{stage="final"}', 2)
    assert by_task(per_stage) == pytest.approx(dev)
    [promoted] = query_until(
        prometheus, 'polytask_promotion_decisions_total{decision="promoted"}', 1
    )
    assert float(promoted["value"][1]) == 1
    [success] = query_until(prometheus, "polytask_retrain_last_success_timestamp_seconds", 1)
    assert time.time() - 600 < float(success["value"][1]) <= time.time()

    # Serving: every text answered is counted once per task it asked for.
    deadline = time.monotonic() + 30
    while True:
        served = by_task(
            query_until(prometheus, "sum by (task) (polytask_predictions_total)", len(TASKS))
        )
        if served == texts or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert served == texts
