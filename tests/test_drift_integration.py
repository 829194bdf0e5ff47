"""Per-task drift end to end: a real `polytask serve` (tests/test_serving_http.py's fixture: a
tiny model exported with its dev reference, 2 HTTP and 2 model workers) scraped by a real
Prometheus (Debian's `prometheus`) that evaluates the drift rules of
infra/prometheus/alerts.yml. The rules are the file's own group `polytask-drift`, with the
windows shortened from 1h to 20s, the minimum count from 200 to 30 answers and `for` to 0s,
so that the test takes seconds.

Claims: /tasks shows every task's temperature and dev ECE before/after; dev-like traffic (the dev texts the reference was computed on) keeps the label-mix
alert's expression false and the alert inactive while the task has enough answers; a stream of
texts the model answers with one label, for one task only, makes Prometheus fire
PolytaskLabelMixDrift for that task, and not for the other.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import make_task_rows
from test_prometheus_integration import run_prometheus
from test_serving_http import _free_port, _post, server, store  # noqa: F401

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parents[1] / "infra" / "prometheus" / "alerts.yml"
WINDOW = "20s"
MIN_COUNT = 30
ALERT = "PolytaskLabelMixDrift"
TASK = "sentiment"


def drift_rules(window: str = WINDOW, min_count: int = MIN_COUNT) -> dict:
    """alerts.yml's polytask-drift group with shorter windows, a lower minimum count, no `for`."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    (group,) = [g for g in groups if g["name"] == "polytask-drift"]
    rules = []
    for rule in group["rules"]:
        rule = dict(rule)
        if "alert" in rule:
            assert ">= 200" in rule["expr"], rule["alert"]
            rule["for"] = "0s"
        rule["expr"] = rule["expr"].replace("[1h]", f"[{window}]")
        rule["expr"] = rule["expr"].replace(">= 200", f">= {min_count}")
        rules.append(rule)
    assert sum("[1h]" in r["expr"] for r in group["rules"]) >= 3
    return {"groups": [{"name": group["name"], "interval": "1s", "rules": rules}]}


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, server):  # noqa: F811
    tmp = tmp_path_factory.mktemp("prometheus-drift")
    (tmp / "drift.yml").write_text(yaml.safe_dump(drift_rules(), sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "drift.yml")],
        "scrape_configs": [
            {
                "job_name": "polytask-serve",
                "static_configs": [{"targets": [server.removeprefix("http://")]}],
            }
        ],
    }
    with run_prometheus(tmp, config) as url:
        yield url


def query(prometheus: str, promql: str) -> dict[str, float]:
    """Instant query -> {task: value}."""
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", body
    return {r["metric"].get("task", ""): float(r["value"][1]) for r in body["data"]["result"]}


def firing(prometheus: str) -> set[str]:
    """Tasks for which the label-mix alert is firing."""
    body = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()
    return {
        a["labels"].get("task", "")
        for a in body["data"]["alerts"]
        if a["labels"]["alertname"] == ALERT and a["state"] == "firing"
    }


class Traffic:
    """Sends `batches` (request bodies) round and round from a thread until stopped."""

    def __init__(self, url: str, batches: list[dict]) -> None:
        self.url, self.batches, self.sent = url, batches, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                for body in self.batches:
                    if self._stop.is_set():
                        return
                    assert _post(self.url, body, client).status_code == 200
                    self.sent += len(body["texts"])
                    time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def bodies(texts: list[str], tasks: list[str], size: int = 8) -> list[dict]:
    return [{"texts": texts[i : i + size], "tasks": tasks} for i in range(0, len(texts), size)]


def test_label_mix_alert_quiet_on_dev_like_traffic_fires_on_a_skewed_task(
    store,  # noqa: F811
    server,  # noqa: F811
    prometheus,
    tiny_data_dir,
):
    from serving.artifact import ArtifactMetadata
    from serving.runtime import Runtime

    _, artifact, _ = store
    meta = ArtifactMetadata.read(artifact)
    reference = {t.name: t.dev_reference for t in meta.tasks}
    assert all(ref is not None for ref in reference.values()), "export wrote no dev reference"
    # /tasks shows each task's calibration method, temperature and dev ECE before/after, from
    # metadata.json
    described = httpx.get(f"{server}/tasks", timeout=10).json()["tasks"]
    for t in meta.tasks:
        got = described[t.name]["calibration"]
        want = {k: getattr(t.calibration, k) for k in ("temperature", "ece_before", "ece_after")}
        assert set(got) == {*want, "method"}, t.name
        assert got["method"] == t.calibration.method, t.name
        assert {k: got[k] for k in want} == pytest.approx(want), t.name
    dev = {
        t.name: [
            json.loads(line)["text"]
            for line in (tiny_data_dir / t.name / "dev.jsonl").read_text().splitlines()
        ]
        for t in meta.tasks
    }
    # The skew: texts the model answers with the label dev answers least.
    share = reference[TASK].label_share
    label = min(share, key=share.__getitem__)
    assert share[label] <= 0.6, f"the tiny model answers {share} on dev: no room for a skew"
    runtime = Runtime(artifact, threads=1)
    candidates = [r["text"] for r in make_task_rows("sentiment", 400, seed=7)]
    answers = runtime.predict(candidates, [TASK]).results
    skewed = [t for t, a in zip(candidates, answers, strict=True) if a.tasks[TASK].label == label]
    assert len(skewed) >= 16, f"only {len(skewed)} texts answered {label!r}"

    count = f'task:polytask_predictions:increase1h{{task="{TASK}"}}'
    tvd = f'task:polytask_label_mix_tvd:1h{{task="{TASK}"}}'
    alert_expr = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in alert_expr["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    expr = rule["expr"].replace("[1h]", f"[{WINDOW}]").replace(">= 200", f">= {MIN_COUNT}")

    # Dev-like: every task's own dev texts, shuffled, round and round.
    rng = random.Random(0)
    dev_like = []
    for name, texts in dev.items():
        texts = texts[:]
        rng.shuffle(texts)
        dev_like += bodies(texts, [name])
    checked = 0
    with Traffic(server, dev_like):
        deadline = time.monotonic() + 60
        while checked < 5:
            assert time.monotonic() < deadline, (
                f"dev-like: {query(prometheus, count)} answers, TVD {query(prometheus, tvd)}"
            )
            time.sleep(1)
            if query(prometheus, count).get(TASK, 0) < MIN_COUNT:
                continue
            distance = query(prometheus, tvd)
            assert distance.get(TASK, 1) < 0.2, distance
            assert TASK not in query(prometheus, expr), distance
            assert TASK not in firing(prometheus)
            checked += 1

    # Skewed: one task gets only texts the model answers with `label`.
    with Traffic(server, bodies(skewed, [TASK])) as traffic:
        deadline = time.monotonic() + 60
        while TASK not in firing(prometheus):
            assert time.monotonic() < deadline, (
                f"no alert after {traffic.sent} skewed texts: TVD {query(prometheus, tvd)}, "
                f"answers {query(prometheus, count)}"
            )
            time.sleep(1)
        assert query(prometheus, expr)[TASK] > 0.2
    assert firing(prometheus) <= {TASK}  # the other task saw no skew
