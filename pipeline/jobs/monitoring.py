"""Training metrics for Prometheus: what `polytask retrain` pushes to the Pushgateway.

Ray exports no training-quality metrics, so the retraining job pushes its own
(infra/README.md, "Training metrics", is the contract; the alerts and the dashboard read these
names). The three per-epoch gauges are pushed after every stage-1 epoch by a Ray Train callback
(`epoch_callback`, run by Ray's controller; Ray Train's local mode, `num_workers: 0`, runs no
callbacks) and again, with the last epoch's values, when the job ends; the rest once, at the end:

    polytask_train_epoch                              gauge    last stage-1 epoch of the run
    polytask_train_loss{task}                         gauge    training loss, last stage-1 epoch
    polytask_train_epoch_dev_accuracy{task}           gauge    dev accuracy, last stage-1 epoch
    polytask_train_dev_accuracy{task}                 gauge    dev accuracy of the selected model
    polytask_train_stage_dev_accuracy{task,stage}     gauge    stage: joint (best stage-1 epoch),
                                                               align (best stage-2 epoch), final
    polytask_train_task_weight{task}                  gauge    the task's loss weight
    polytask_train_alignment_gain{task}               gauge    final minus stage-1 dev accuracy
    polytask_retrain_duration_seconds                 gauge    wall time of the whole job
    polytask_retrain_last_success_timestamp_seconds   gauge    when the job succeeded
    polytask_promotion_decisions_total{decision}      counter  promoted / refused, cumulative
    polytask_retrain_last_failure_timestamp_seconds   gauge    when a job failed (failures only)

Accuracies and gains are ratios in [0, 1] (run.json keeps percentages). Labels are bounded:
`task` (the config's tasks), `stage` (3 values), `decision` (2 values). Epochs are never a
label: each push overwrites the previous epoch's values and Prometheus keeps the history (at
its scrape interval); the complete per-epoch curves live in `RUN/run.json` ("history") and in
Ray Train's results.

Grouping key: `job` (`monitoring.job`, default `polytask_retrain`) and `config` (the config's
name). Never a run id: the Pushgateway keeps every group until it is deleted.

Pushes use POST (`pushadd_to_gateway`): a pushed metric replaces the metric of that name in
the group and leaves the others, so a failed run updates its failure timestamp without erasing
the last success (and its per-task values), and a successful run replaces every training
metric (a task dropped from the config loses its series).

Counters across pushes: the Pushgateway stores what it is given; it does not add. So the
decision counter is read back from the Pushgateway (`/metrics`, this group's samples), one is
added to the decision taken, and both decisions are pushed, so `increase()` sees the step. If
the Pushgateway restarts, the counter starts again from 0, which Prometheus treats as a counter
reset. Two jobs of one config finishing together would both read the same value and lose an
increment (two schedules of one config, or a manual `retrain` beside a scheduled one), so the
read-back and the push run under a lock file in the model store, which such jobs share
(`$BENTOML_HOME/polytask/decisions.lock`); a lock not had within the per-request timeout is
given up on with a warning, and the push goes ahead without it.

Monitoring never fails a retraining job, nor holds it open: no Pushgateway configured logs one
line; a network error logs a warning; a push (reading the counter back included) that has no
complete answer within `PUSH_DEADLINE_FACTOR` times its per-request timeout is abandoned with a
warning.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pipeline.runs import RunRecord

logger = logging.getLogger(__name__)
# A push (the counter's read-back and the POST) gets this many times its per-read timeout in
# all: a Pushgateway that trickles its answer never times a read out.
PUSH_DEADLINE_FACTOR = 3

DECISIONS: tuple[str, ...] = ("promoted", "refused")
STAGES: dict[str, str] = {"joint": "joint", "align_best": "align", "final": "final"}
DECISIONS_METRIC = "polytask_promotion_decisions_total"
Decision = Literal["promoted", "refused"]


class _Families:
    """A collector that yields fixed, already-built metric families (one push's worth)."""

    def __init__(self, families: list[Any]):
        self._families = families

    def collect(self) -> Iterator[Any]:
        yield from self._families


def _ratio(percent: float | None) -> float | None:
    return None if percent is None else percent / 100.0


def _last_epoch(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    joint = [h for h in history if h.get("stage") == "joint"]
    return joint[-1] if joint else None


def build_registry(
    run_record: RunRecord,
    *,
    duration_seconds: float,
    decision: Decision,
    decisions_before: dict[str, float],
    finished: float,
) -> Any:
    """The metrics of one successful retraining job, in a registry of their own.

    Args:
        run_record: The training run's record (pipeline.runs.RunRecord).
        duration_seconds: Wall time of the whole job.
        decision: The promotion gate's verdict.
        decisions_before: The decision counter's values already in the Pushgateway.
        finished: Unix time the job succeeded.

    Returns:
        A `prometheus_client.CollectorRegistry` (ready for `generate_latest` or a push).
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    tasks = list(run_record.tasks)
    history = run_record.history
    families: list[Any] = []

    def gauge(name: str, doc: str, labels: list[str], values: list[tuple[list[str], float]]):
        fam = GaugeMetricFamily(name, doc, labels=labels)
        for label_values, value in values:
            fam.add_metric(label_values, value)
        families.append(fam)

    last = _last_epoch(history)
    if last is not None:
        families += epoch_families(
            last["epoch"],
            last["train_loss"],
            {t: m["accuracy"] for t, m in last["dev"].items()},
        )
    gauge(
        "polytask_train_dev_accuracy",
        "Dev accuracy (ratio) of the run's selected model.",
        ["task"],
        [([t], _ratio(run_record.dev[t]["accuracy"])) for t in tasks],
    )
    stages = run_record.stages
    gauge(
        "polytask_train_stage_dev_accuracy",
        "Dev accuracy (ratio) by stage: joint = best stage-1 epoch, align = best stage-2 "
        "epoch, final = the selected model.",
        ["task", "stage"],
        [
            ([t, stage], _ratio(getattr(stages[t], key)))
            for t in tasks
            if t in stages
            for key, stage in STAGES.items()
            if getattr(stages[t], key) is not None
        ],
    )
    gauge(
        "polytask_train_task_weight",
        "The task's loss weight (SVD or size weighting; 1 with none).",
        ["task"],
        [([t], float(w)) for t, w in run_record.task_weights.items()],
    )
    gauge(
        "polytask_train_alignment_gain",
        "Dev accuracy (ratio) after covariance alignment minus after stage 1.",
        ["task"],
        [
            ([t], (stages[t].final - stages[t].joint) / 100.0)
            for t in tasks
            if t in stages and stages[t].final is not None and stages[t].joint is not None
        ],
    )
    gauge(
        "polytask_retrain_duration_seconds",
        "Wall time of the whole retraining run.",
        [],
        [([], float(duration_seconds))],
    )
    gauge(
        "polytask_retrain_last_success_timestamp_seconds",
        "Unix time the last retraining run succeeded (whatever the decision).",
        [],
        [([], float(finished))],
    )
    counter = CounterMetricFamily(
        DECISIONS_METRIC, "Promotion gate decisions, cumulative over runs.", labels=["decision"]
    )
    for d in DECISIONS:
        counter.add_metric([d], decisions_before.get(d, 0.0) + (1.0 if d == decision else 0.0))
    families.append(counter)

    registry = CollectorRegistry()
    registry.register(_Families(families))
    return registry


def failure_registry(failed_at: float) -> Any:
    """The one metric a failed job pushes (the last success and its values stay)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily

    fam = GaugeMetricFamily(
        "polytask_retrain_last_failure_timestamp_seconds",
        "Unix time the last retraining run failed.",
    )
    fam.add_metric([], float(failed_at))
    registry = CollectorRegistry()
    registry.register(_Families([fam]))
    return registry


def grouping_key(config_name: str) -> dict[str, str]:
    return {"config": config_name}


def previous_decisions(
    pushgateway: str, job: str, config_name: str, timeout: float
) -> dict[str, float]:
    """The decision counter's current values in this job's group of the Pushgateway.

    Raises:
        OSError: the Pushgateway cannot be read.
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    base = pushgateway if "://" in pushgateway else f"http://{pushgateway}"
    with urllib.request.urlopen(f"{base.rstrip('/')}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    want = {"job": job, **grouping_key(config_name)}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name != DECISIONS_METRIC or s.labels.get("decision") not in DECISIONS:
                continue
            if all(s.labels.get(k) == v for k, v in want.items()):
                out[s.labels["decision"]] = s.value
    return out


def _not_configured() -> None:
    logger.info(
        "training metrics not pushed: no Pushgateway configured "
        "(set monitoring.pushgateway in the run config)"
    )


def _pushadd(
    what: str,
    pushgateway: str,
    job: str,
    config_name: str,
    make_registry: Callable[[], Any],
    timeout: float,
    lock_path: Path | None = None,
) -> bool:
    """POST the registry `make_registry()` builds to this job's group; never raises, and
    returns within `PUSH_DEADLINE_FACTOR * timeout` seconds.

    `timeout` bounds each socket read, not a request: a Pushgateway (or a proxy) that trickles
    its answer a byte at a time would hold the job open for good, after its work is done. So
    the push runs in a daemon thread, abandoned at the deadline (it cannot keep the process
    alive; one thread per push at most). With `lock_path`, the registry is built (which may
    read the Pushgateway) and pushed while that lock file is held."""
    from prometheus_client import pushadd_to_gateway

    outcome: list[BaseException | None] = []

    def push() -> None:
        try:
            with _held(lock_path, timeout, what):
                pushadd_to_gateway(
                    pushgateway,
                    job=job,
                    registry=make_registry(),
                    grouping_key=grouping_key(config_name),
                    timeout=timeout,
                )
        except Exception as err:  # network or HTTP errors, an unexpected record: never fatal
            outcome.append(err)
        else:
            outcome.append(None)

    deadline = PUSH_DEADLINE_FACTOR * timeout
    worker = threading.Thread(target=push, name=f"pushgateway-{what}", daemon=True)
    worker.start()
    worker.join(deadline)
    if not outcome:
        logger.warning(
            "%s not pushed to %s: no complete answer within %g s; the push was abandoned",
            what,
            pushgateway,
            deadline,
        )
        return False
    err = outcome[0]
    if err is not None:
        logger.warning("%s not pushed to %s: %s: %s", what, pushgateway, type(err).__name__, err)
        return False
    return True


@contextlib.contextmanager
def _held(lock_path: Path | None, timeout: float, what: str) -> Iterator[None]:
    """Hold the lock file `lock_path` (nothing when None) for the block; if another process
    holds it for `timeout` seconds, warn and run the block without it."""
    if lock_path is None:
        yield
        return
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path), timeout=timeout)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except (Timeout, OSError) as err:
        logger.warning(
            "%s: pushing without the lock %s (%s): a job of this config finishing at the same "
            "time may lose one decision count",
            what,
            lock_path,
            type(err).__name__,
        )
        yield
        return
    try:
        yield
    finally:
        lock.release()


def push_retrain_metrics(
    pushgateway: str | None,
    job: str,
    config_name: str,
    run_record: RunRecord,
    *,
    duration_seconds: float,
    promoted: bool,
    finished: float | None = None,
    timeout: float = 10.0,
    lock_path: Path | None = None,
) -> bool:
    """Push a successful job's metrics. Never raises: returns whether they were pushed.

    Args:
        pushgateway: Pushgateway URL (`http://host:9091`); None logs one line and pushes nothing.
        job: The `job` grouping label.
        config_name: The `config` grouping label.
        run_record: The training run's record (pipeline.runs.RunRecord).
        duration_seconds: Wall time of the whole job.
        promoted: The gate's decision.
        finished: Unix time of success; default now.
        timeout: Seconds per HTTP request.
        lock_path: A lock file shared by the jobs of this config (`retrain` uses the model
            store's), held while the decision counter is read back and pushed.
    """
    if pushgateway is None:
        _not_configured()
        return False
    decision: Decision = "promoted" if promoted else "refused"

    def registry() -> Any:
        return build_registry(
            run_record,
            duration_seconds=duration_seconds,
            decision=decision,
            decisions_before=previous_decisions(pushgateway, job, config_name, timeout),
            finished=time.time() if finished is None else finished,
        )

    pushed = _pushadd(
        "training metrics", pushgateway, job, config_name, registry, timeout, lock_path
    )
    if not pushed:
        return False
    logger.info(
        "training metrics pushed to %s (job=%s, config=%s, decision=%s)",
        pushgateway,
        job,
        config_name,
        decision,
    )
    return True


def push_retrain_failure(
    pushgateway: str | None,
    job: str,
    config_name: str,
    *,
    failed_at: float | None = None,
    timeout: float = 10.0,
) -> bool:
    """Push the failure timestamp of a failed job. Never raises: returns whether it was pushed."""
    if pushgateway is None:
        _not_configured()
        return False
    at = time.time() if failed_at is None else failed_at
    if not _pushadd(
        "retraining failure",
        pushgateway,
        job,
        config_name,
        lambda: failure_registry(at),
        timeout,
    ):
        return False
    logger.info(
        "retraining failure pushed to %s (job=%s, config=%s)", pushgateway, job, config_name
    )
    return True


def epoch_families(
    epoch: int, losses: dict[str, float], dev_accuracy: dict[str, float]
) -> list[Any]:
    """The three per-epoch gauges: epoch number, loss per task, dev accuracy (percent in,
    ratio out) per task."""
    from prometheus_client.core import GaugeMetricFamily

    epoch_fam = GaugeMetricFamily("polytask_train_epoch", "Last finished stage-1 epoch of the run.")
    epoch_fam.add_metric([], float(epoch))
    loss = GaugeMetricFamily(
        "polytask_train_loss",
        "Mean training loss of the task over the last stage-1 epoch.",
        labels=["task"],
    )
    for t, value in losses.items():
        loss.add_metric([t], float(value))
    acc = GaugeMetricFamily(
        "polytask_train_epoch_dev_accuracy",
        "Dev accuracy (ratio) of the task after the last stage-1 epoch.",
        labels=["task"],
    )
    for t, value in dev_accuracy.items():
        acc.add_metric([t], float(value) / 100.0)
    return [epoch_fam, loss, acc]


def epoch_registry(metrics: dict[str, Any], tasks: list[str]) -> Any:
    """The per-epoch gauges from one `ray.train.report` (pipeline.train.loop.flat_metrics:
    `epoch`, `dev_accuracy_<task>` in percent, `train_loss_<task>`)."""
    from prometheus_client import CollectorRegistry

    families = epoch_families(
        metrics["epoch"],
        {t: metrics[f"train_loss_{t}"] for t in tasks if f"train_loss_{t}" in metrics},
        {t: metrics[f"dev_accuracy_{t}"] for t in tasks if f"dev_accuracy_{t}" in metrics},
    )
    registry = CollectorRegistry()
    registry.register(_Families(families))
    return registry


def push_epoch_metrics(
    pushgateway: str,
    job: str,
    config_name: str,
    metrics: dict[str, Any],
    tasks: list[str],
    timeout: float = 5.0,
) -> bool:
    """Push one stage-1 epoch's gauges (other stages are skipped). Never raises."""
    if metrics.get("stage") != "joint":
        return False
    return _pushadd(
        "epoch metrics",
        pushgateway,
        job,
        config_name,
        lambda: epoch_registry(metrics, tasks),
        timeout,
    )


def epoch_callback(
    pushgateway: str | None, job: str, config_name: str, tasks: list[str]
) -> Any | None:
    """A `ray.train.UserCallback` that pushes every stage-1 epoch's gauges; None when no
    Pushgateway is configured. Ray runs it in the Train controller (not in local mode), after
    every report; rank 0's metrics are used (all ranks report the same dev metrics)."""
    if pushgateway is None:
        return None
    from ray.train import UserCallback

    class EpochPush(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
            if metrics:
                push_epoch_metrics(pushgateway, job, config_name, metrics[0], tasks)

    return EpochPush()
