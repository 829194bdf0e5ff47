"""Training metrics pushed by the retraining job (pipeline/jobs/monitoring.py), fast tier.

Claims: the registry built from a run record holds the contract's series (infra/README.md) with
bounded labels only and accuracies as ratios; the alignment gain is final minus stage 1; the
decision counter continues from the value already in the Pushgateway (only this group's); with
no Pushgateway nothing is sent and one line says so; a push is a POST of the text exposition to
/metrics/job/<job>/config/<config>; an unreachable Pushgateway never fails the job; `retrain`
pushes the failure and re-raises when training fails. The real servers are in
tests/test_prometheus_integration.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from conftest import tiny_config_dict

from pipeline.config import parse_config
from pipeline.jobs import monitoring
from pipeline.runs import EncoderRecord, RunRecord, TaskRecord
from pipeline.train.driver import stage_summary

TASKS = ["sentiment", "topic"]


def entry(stage: str, epoch: int, acc: dict[str, float], loss: dict[str, float]) -> dict:
    """One history entry as the training loop writes it (accuracies in percent)."""
    dev = {t: {"accuracy": a, "macro_f1": a - 1, "n": 24} for t, a in acc.items()}
    return {
        "stage": stage,
        "epoch": epoch,
        "train_loss": loss,
        "dev": dev,
        "dev_macro_accuracy": sum(acc.values()) / len(acc),
        "dev_macro_f1": sum(acc.values()) / len(acc) - 1,
        "seconds": 0.1,
    }


@pytest.fixture
def run_record() -> RunRecord:
    """A run.json as pipeline.train.driver.build_record writes it (the parts monitoring reads):
    2 stage-1 epochs (the 2nd is best), 2 alignment epochs, then the selected model, where
    alignment was kept for sentiment (75 -> 80) and not for topic (stays 60)."""
    history = [
        entry("joint", 1, {"sentiment": 60.0, "topic": 50.0}, {"sentiment": 0.9, "topic": 1.2}),
        entry("joint", 2, {"sentiment": 75.0, "topic": 60.0}, {"sentiment": 0.5, "topic": 0.8}),
        entry("align", 1, {"sentiment": 78.0, "topic": 55.0}, {"sentiment": 0.4, "topic": 0.9}),
        entry("align", 2, {"sentiment": 80.0, "topic": 58.0}, {"sentiment": 0.3, "topic": 0.9}),
        entry("final", 0, {"sentiment": 80.0, "topic": 60.0}, {}),
    ]
    return RunRecord(
        polytask_version="0",
        run_name="tiny-20261122-093000-abcdef",
        created="2026-11-22T09:30:00+00:00",
        tasks={
            t: TaskRecord(labels=["a", "b"], n_train=48, n_dev=24, data_fingerprint="0")
            for t in TASKS
        },
        task_weights={"sentiment": 1.25, "topic": 0.75},
        encoder=EncoderRecord(path="e", fingerprint="0", dim=8, max_length=16, pooling="mean"),
        config={},
        dev=history[-1]["dev"],
        dev_macro_accuracy=history[-1]["dev_macro_accuracy"],
        dev_macro_f1=history[-1]["dev_macro_f1"],
        stages=stage_summary(history, TASKS),
        history=history,
    )


def samples(registry) -> dict[tuple[str, frozenset], float]:
    """The registry's text exposition, parsed back: {(sample name, labels): value}."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: dict, name: str, **labels: str) -> float:
    return got[(name, frozenset(labels.items()))]


def test_registry_from_a_run_record_has_the_contract_series(run_record):
    registry = monitoring.build_registry(
        run_record,
        duration_seconds=42.5,
        decision="refused",
        decisions_before={"promoted": 3.0, "refused": 1.0},
        finished=1_800_000_000.0,
    )
    got = samples(registry)
    for t, acc in (("sentiment", 0.80), ("topic", 0.60)):
        assert value(got, "polytask_train_dev_accuracy", task=t) == pytest.approx(acc)
    # The last stage-1 epoch, not the best one, and not an alignment epoch.
    assert value(got, "polytask_train_epoch") == 2
    assert value(got, "polytask_train_loss", task="topic") == pytest.approx(0.8)
    assert value(got, "polytask_train_epoch_dev_accuracy", task="sentiment") == pytest.approx(0.75)
    # Per stage: best stage-1 epoch, best stage-2 epoch, the selected model.
    stage = {
        (t, s): value(got, "polytask_train_stage_dev_accuracy", task=t, stage=s)
        for t in TASKS
        for s in ("joint", "align", "final")
    }
    assert stage == pytest.approx(
        {
            ("sentiment", "joint"): 0.75,
            ("sentiment", "align"): 0.80,
            ("sentiment", "final"): 0.80,
            ("topic", "joint"): 0.60,
            ("topic", "align"): 0.58,
            ("topic", "final"): 0.60,
        }
    )
    assert value(got, "polytask_train_alignment_gain", task="sentiment") == pytest.approx(0.05)
    assert value(got, "polytask_train_alignment_gain", task="topic") == pytest.approx(0.0)
    assert value(got, "polytask_train_task_weight", task="sentiment") == 1.25
    assert value(got, "polytask_retrain_duration_seconds") == 42.5
    assert value(got, "polytask_retrain_last_success_timestamp_seconds") == 1_800_000_000.0
    # Cumulative: the refused decision adds one; both decisions are always present.
    assert value(got, "polytask_promotion_decisions_total", decision="promoted") == 3
    assert value(got, "polytask_promotion_decisions_total", decision="refused") == 2
    # Bounded labels only (no run id, no epoch), and no _created samples.
    allowed = {"task", "stage", "decision"}
    assert all({k for k, _ in labels} <= allowed for _, labels in got)
    assert not [name for name, _ in got if name.endswith("_created")]
    assert all(0.0 <= v <= 1.0 for (n, _), v in got.items() if "accuracy" in n)


def test_first_decision_starts_the_counter_at_one(run_record):
    got = samples(
        monitoring.build_registry(
            run_record, duration_seconds=1, decision="promoted", decisions_before={}, finished=1
        )
    )
    assert value(got, "polytask_promotion_decisions_total", decision="promoted") == 1
    assert value(got, "polytask_promotion_decisions_total", decision="refused") == 0


class StubPushgateway:
    """A Pushgateway stand-in on loopback: records every request; GET /metrics answers
    `exposition`."""

    def __init__(self, exposition: str = ""):
        self.requests: list[SimpleNamespace] = []
        self.exposition = exposition
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                stub.requests.append(
                    SimpleNamespace(
                        method=self.command,
                        path=self.path,
                        content_type=self.headers.get("Content-Type"),
                        body=self.rfile.read(n).decode(),
                    )
                )

            def do_GET(self) -> None:
                self._record()
                body = stub.exposition.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self._record()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def pushes(self) -> list[SimpleNamespace]:
        return [r for r in self.requests if r.method != "GET"]


@pytest.fixture
def stub() -> Iterator[StubPushgateway]:
    gw = StubPushgateway(
        # Another config's group must not be counted.
        "# TYPE polytask_promotion_decisions_total counter\n"
        'polytask_promotion_decisions_total{config="tiny",decision="promoted",job="polytask_retrain"} 4\n'
        'polytask_promotion_decisions_total{config="tiny",decision="refused",job="polytask_retrain"} 2\n'
        'polytask_promotion_decisions_total{config="other",decision="refused",job="polytask_retrain"} 9\n'
    )
    thread = threading.Thread(target=gw.server.serve_forever, daemon=True)
    thread.start()
    yield gw
    gw.server.shutdown()
    gw.server.server_close()
    thread.join()


def test_push_posts_the_exposition_to_the_group_path(stub, run_record):
    from prometheus_client.parser import text_string_to_metric_families

    assert monitoring.push_retrain_metrics(
        stub.url, "polytask_retrain", "tiny", run_record, duration_seconds=3.0, promoted=False
    )
    [push] = stub.pushes()
    # POST (pushadd): replaces these metric names in the group, keeps the failure timestamp.
    assert push.method == "POST"
    assert push.path == "/metrics/job/polytask_retrain/config/tiny"
    assert push.content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(push.body)}
    assert families["polytask_promotion_decisions"].type == "counter"
    assert families["polytask_train_dev_accuracy"].type == "gauge"
    decisions = {
        s.labels["decision"]: s.value for s in families["polytask_promotion_decisions"].samples
    }
    assert decisions == {"promoted": 4, "refused": 3}  # read back, +1 refused, other group ignored
    dev = {s.labels["task"]: s.value for s in families["polytask_train_dev_accuracy"].samples}
    assert dev == pytest.approx({"sentiment": 0.8, "topic": 0.6})


def test_no_pushgateway_sends_nothing_and_says_so_once(stub, run_record, caplog, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pushed without a Pushgateway")

    monkeypatch.setattr("prometheus_client.pushadd_to_gateway", fail)
    with caplog.at_level(logging.INFO, logger="pipeline.jobs.monitoring"):
        pushed = monitoring.push_retrain_metrics(
            None, "polytask_retrain", "tiny", run_record, duration_seconds=1, promoted=True
        )
    assert pushed is False
    lines = [r for r in caplog.records if r.name == "pipeline.jobs.monitoring"]
    assert len(lines) == 1
    assert "not pushed" in lines[0].getMessage()
    assert "monitoring.pushgateway" in lines[0].getMessage()
    assert stub.requests == []


def test_unreachable_pushgateway_warns_and_never_raises(run_record, caplog):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with caplog.at_level(logging.WARNING, logger="pipeline.jobs.monitoring"):
        assert not monitoring.push_retrain_metrics(
            url, "j", "tiny", run_record, duration_seconds=1, promoted=True, timeout=2
        )
        assert not monitoring.push_retrain_failure(url, "j", "tiny", timeout=2)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def tiny_run_config(tmp_path, pushgateway: str | None):
    raw = tiny_config_dict(tmp_path / "data", tmp_path / "enc", tmp_path / "runs", tmp_path / "c")
    raw["monitoring"] = {"pushgateway": pushgateway}
    return parse_config(raw)


def test_retrain_pushes_the_failure_and_reraises(stub, tmp_path, monkeypatch):
    from pipeline.jobs import retrain as job
    from pipeline.train.driver import TrainingError

    def broken(*args):
        raise TrainingError("run tiny failed: boom")

    monkeypatch.setattr(job, "_retrain", broken)
    with pytest.raises(TrainingError, match="boom"):
        job.retrain(tiny_run_config(tmp_path, stub.url))
    [push] = stub.pushes()
    assert push.method == "POST" and push.path == "/metrics/job/polytask_retrain/config/tiny"
    assert "polytask_retrain_last_failure_timestamp_seconds " in push.body
    assert "polytask_retrain_last_success_timestamp_seconds" not in push.body


def test_retrain_pushes_its_record_on_success(stub, tmp_path, monkeypatch, run_record):
    from pipeline.jobs import retrain as job

    record = SimpleNamespace(durations={"total": 12.5}, promoted=True)
    monkeypatch.setattr(job, "_retrain", lambda *args: (record, run_record))
    assert job.retrain(tiny_run_config(tmp_path, stub.url)) is record
    [push] = stub.pushes()
    assert 'polytask_promotion_decisions_total{decision="promoted"} 5.0' in push.body
    assert "polytask_retrain_duration_seconds 12.5" in push.body


def test_monitoring_section_is_optional_and_validated(tmp_path):
    from pipeline.config import ConfigError

    assert tiny_run_config(tmp_path, None).monitoring.pushgateway is None
    assert tiny_run_config(tmp_path, None).monitoring.job == "polytask_retrain"
    raw = tiny_config_dict(tmp_path, tmp_path, tmp_path, tmp_path)
    raw["monitoring"] = {"pushgatway": "http://x:9091"}
    with pytest.raises(ConfigError, match="monitoring.pushgatway: unknown key"):
        parse_config(raw)


def test_each_stage1_epoch_report_is_pushed_by_the_ray_callback(stub):
    """What the training loop reports (pipeline.train.loop.flat_metrics) becomes the per-epoch
    gauges; alignment and final reports are not pushed (their epochs restart at 1 and 0)."""
    from prometheus_client.parser import text_string_to_metric_families
    from ray.train import UserCallback

    report = {
        "stage": "joint",
        "epoch": 3,
        "dev_macro_accuracy": 70.0,
        "dev_accuracy_sentiment": 75.0,
        "dev_accuracy_topic": 65.0,
        "train_loss_sentiment": 0.5,
        "train_loss_topic": 0.7,
    }
    assert monitoring.epoch_callback(None, "polytask_retrain", "tiny", TASKS) is None
    callback = monitoring.epoch_callback(stub.url, "polytask_retrain", "tiny", TASKS)
    assert isinstance(callback, UserCallback)
    callback.after_report(None, [report, report], None)  # one dict per worker
    callback.after_report(None, [report | {"stage": "align", "epoch": 1}], None)
    callback.after_report(None, [report | {"stage": "final", "epoch": 0}], None)
    [push] = stub.pushes()
    assert push.method == "POST" and push.path == "/metrics/job/polytask_retrain/config/tiny"
    got = {
        (s.name, s.labels.get("task")): s.value
        for f in text_string_to_metric_families(push.body)
        for s in f.samples
    }
    assert got == pytest.approx(
        {
            ("polytask_train_epoch", None): 3,
            ("polytask_train_loss", "sentiment"): 0.5,
            ("polytask_train_loss", "topic"): 0.7,
            ("polytask_train_epoch_dev_accuracy", "sentiment"): 0.75,
            ("polytask_train_epoch_dev_accuracy", "topic"): 0.65,
        }
    )


@pytest.fixture
def trickling_pushgateway() -> Iterator[str]:
    """A server that answers one byte every 0.2 s, forever: no socket read ever times out."""
    import socket
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                    if stop.is_set():
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(0.2)
            except OSError:
                pass

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()


def test_a_trickling_pushgateway_cannot_hold_a_job_open(trickling_pushgateway, run_record, caplog):
    # Review s24 #11: each read got its timeout, but the answer never ended, so retrain's last
    # push (after the gate had decided) blocked for good.
    import time

    result: dict[str, object] = {}

    def push() -> None:
        result["metrics"] = monitoring.push_retrain_metrics(
            trickling_pushgateway,
            "j",
            "c",
            run_record,
            duration_seconds=1.0,
            promoted=True,
            timeout=0.5,
        )
        result["failure"] = monitoring.push_retrain_failure(
            trickling_pushgateway, "j", "c", timeout=0.5
        )

    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.jobs.monitoring"):
        caller = threading.Thread(target=push, daemon=True)
        caller.start()
        caller.join(60)  # generous: the deadline is 3 x 0.5 s per push
    assert not caller.is_alive(), "a push is still blocked"
    assert result == {"metrics": False, "failure": False}
    assert time.monotonic() - start < 60
    abandoned = [r for r in caplog.records if "no complete answer within 1.5 s" in r.getMessage()]
    assert len(abandoned) == 2


class CountingPushgateway(StubPushgateway):
    """A Pushgateway stand-in that keeps what is pushed, as the real one does: GET /metrics
    answers the last pushed decision counter of the group (after `delay` seconds, the window
    in which two jobs read the same value)."""

    def __init__(self, delay: float):
        super().__init__()
        self.decisions = {"promoted": 0.0, "refused": 0.0}
        self.delay = delay
        original = self.server.RequestHandlerClass
        gw = self

        class Handler(original):
            def do_GET(self) -> None:
                time.sleep(gw.delay)
                gw.exposition = "# TYPE polytask_promotion_decisions_total counter\n" + "".join(
                    f'polytask_promotion_decisions_total{{config="tiny",decision="{d}",'
                    f'job="polytask_retrain"}} {v}\n'
                    for d, v in gw.decisions.items()
                )
                super().do_GET()

            def do_POST(self) -> None:
                super().do_POST()
                from prometheus_client.parser import text_string_to_metric_families

                for family in text_string_to_metric_families(gw.requests[-1].body):
                    for s in family.samples:
                        if s.name == monitoring.DECISIONS_METRIC:
                            gw.decisions[s.labels["decision"]] = s.value

        self.server.RequestHandlerClass = Handler


def test_two_jobs_of_one_config_finishing_together_both_count(run_record, tmp_path):
    # Review s24, jobs 14: both read the counter back before either pushed, so one decision
    # was lost. The read-back and push now run under one lock file.
    gw = CountingPushgateway(delay=0.5)
    server = threading.Thread(target=gw.server.serve_forever, daemon=True)
    server.start()
    try:
        lock = tmp_path / "store" / "polytask" / "decisions.lock"
        results: list[bool] = []

        def job(promoted: bool) -> None:
            results.append(
                monitoring.push_retrain_metrics(
                    gw.url,
                    "polytask_retrain",
                    "tiny",
                    run_record,
                    duration_seconds=1.0,
                    promoted=promoted,
                    lock_path=lock,
                )
            )

        jobs = [threading.Thread(target=job, args=(p,)) for p in (True, True, False)]
        for j in jobs:
            j.start()
        for j in jobs:
            j.join()
    finally:
        gw.server.shutdown()
        gw.server.server_close()
        server.join()
    assert results == [True, True, True]
    assert gw.decisions == {"promoted": 2.0, "refused": 1.0}
