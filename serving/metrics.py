"""The service's Prometheus metrics (prometheus_client), served on BentoML's /metrics.

Correct with several workers: BentoML sets PROMETHEUS_MULTIPROC_DIR before it starts a worker,
every worker writes its samples there, and /metrics aggregates them (MultiProcessCollector).
prometheus_client picks its storage when a metric is created, so the metrics are created on
first use (`get_metrics()`), inside the worker, never at import.

    polytask_predictions_total{task,label}          counter    answers given (valid requests)
    polytask_prediction_confidence{task}            histogram  probability of the answered label
    polytask_inference_latency_seconds              histogram  one model call (tokenize + ORT)
    polytask_batch_size_texts                       histogram  texts per model call
    polytask_rejected_requests_total{reason}        counter    refused requests: 4xx by reason,
                                                               503 as reason="unavailable"
    polytask_model_active{version}                  gauge      1 for the version a worker serves
                                                               (one series per worker: see
                                                               `ActiveVersion`)
    polytask_model_swaps_total                      counter    hot swaps to a newer model
    polytask_model_load_failures_total              counter    models that failed to load or to
                                                               answer known texts (once per
                                                               worker and version)
    polytask_model_fallback                         gauge      1 while a worker serves another
                                                               version than the store designates,
                                                               because that one failed to load

Drift (per task; tasks and labels come from the served artifact, never from clients, so the
label sets are bounded; `Metrics.set_dev_reference` sets the gauges and creates every
task's and label's counters at 0 when a model is loaded, so that a label never answered is a
0 and `increase()` sees the first answers):
    polytask_truncated_texts_total{task}            counter    answered texts cut to max length
    polytask_dev_label_share{task,label}            gauge      share of dev texts the served
                                                               model answers with the label
    polytask_dev_confidence_mean{task}              gauge      its mean top-class probability on
                                                               dev (temperature applied)
    polytask_dev_confidence_quantile{task,quantile} gauge      quantiles 0.1 0.25 0.5 0.75 0.9
    polytask_dev_truncated_share{task}              gauge      share of dev texts cut
The recent label mix, mean confidence and truncated share come from the counters above and
polytask_predictions_total / polytask_prediction_confidence; the recording and alert rules
that compare them with dev's are in infra/prometheus/alerts.yml (group polytask-drift).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Each server's own Prometheus multiprocess directory: `<tempdir>/polytask-prometheus-<pid>`.
PRIVATE_DIR_PREFIX = "polytask-prometheus-"

CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Metrics:
    predictions: Any
    confidence: Any
    latency: Any
    batch_size: Any
    rejected: Any
    model_active: Any
    swaps: Any
    load_failures: Any
    fallback: Any
    truncated: Any
    dev_label_share: Any
    dev_confidence_mean: Any
    dev_confidence_quantile: Any
    dev_truncated_share: Any

    def record_answers(self, task: str, labels: list[str], confidences: list[float]) -> None:
        """Count one answer per text for `task`."""
        counts: dict[str, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        for label, n in counts.items():
            self.predictions.labels(task=task, label=label).inc(n)
        hist = self.confidence.labels(task=task)
        for p in confidences:
            hist.observe(p)

    def record_truncated(self, task: str, n: int) -> None:
        """Count `n` answered texts of `task` that were cut to the model's max length."""
        if n:
            self.truncated.labels(task=task).inc(n)

    def set_dev_reference(self, tasks: list[Any], previous: list[Any] | None = None) -> None:
        """Export the served model's dev reference (`serving.artifact.TaskInfo.dev_reference`)
        and create its tasks' and labels' counters at 0. Tasks or labels of the `previous`
        model that the new one lacks get a share of 0 (multiprocess gauges cannot be removed).
        """
        for info in previous or []:
            for label in info.labels:
                self.dev_label_share.labels(task=info.name, label=label).set(0)
        for info in tasks:
            for label in info.labels:
                self.predictions.labels(task=info.name, label=label).inc(0)
            self.truncated.labels(task=info.name).inc(0)
            self.confidence.labels(task=info.name)
            ref = info.dev_reference
            if ref is None:
                continue
            for label in info.labels:
                share = ref.label_share.get(label, 0.0)
                self.dev_label_share.labels(task=info.name, label=label).set(share)
            self.dev_confidence_mean.labels(task=info.name).set(ref.confidence_mean)
            for q, value in ref.confidence_quantiles.items():
                self.dev_confidence_quantile.labels(task=info.name, quantile=q).set(value)
            self.dev_truncated_share.labels(task=info.name).set(ref.truncated_share)

    def set_active_version(self, version: str, previous: str | None = None) -> None:
        """`polytask_model_active{version}`: 1 for `version`; `previous` (and every other
        version this worker served) has no series any more."""
        self.model_active.set(version)


@functools.cache
def get_metrics() -> Metrics:
    """The process's metrics, created on first call (after BentoML set up multiprocess mode)."""
    from prometheus_client import Counter, Gauge, Histogram

    return Metrics(
        predictions=Counter(
            "polytask_predictions",
            "Answers given, by task and predicted label.",
            ["task", "label"],
        ),
        confidence=Histogram(
            "polytask_prediction_confidence",
            "Probability of the predicted label, by task.",
            ["task"],
            buckets=CONFIDENCE_BUCKETS,
        ),
        latency=Histogram(
            "polytask_inference_latency_seconds",
            "Seconds per model call (tokenization and onnxruntime, all tasks).",
            buckets=LATENCY_BUCKETS,
        ),
        batch_size=Histogram(
            "polytask_batch_size_texts",
            "Texts per model call (after requests are merged).",
            buckets=BATCH_BUCKETS,
        ),
        rejected=Counter(
            "polytask_rejected_requests",
            "Requests refused: bad input (4xx) by reason, or unavailable (503).",
            ["reason"],
        ),
        model_active=ActiveVersion(),
        swaps=Counter("polytask_model_swaps", "Hot swaps to a newer model."),
        load_failures=Counter(
            "polytask_model_load_failures",
            "Models that failed to load or to answer known texts (once per worker and version).",
        ),
        # livemax: 1 while any live worker serves a fallback.
        fallback=Gauge(
            "polytask_model_fallback",
            "1 while a worker serves another version than the store designates (it failed).",
            multiprocess_mode="livemax",
        ),
        truncated=Counter(
            "polytask_truncated_texts",
            "Answered texts cut to the model's max length, by task.",
            ["task"],
        ),
        # livemostrecent: the value a live worker set last, so a hot swap replaces the old
        # model's reference at once.
        dev_label_share=Gauge(
            "polytask_dev_label_share",
            "Share of dev texts the served model answers with this label (from the artifact).",
            ["task", "label"],
            multiprocess_mode="livemostrecent",
        ),
        dev_confidence_mean=Gauge(
            "polytask_dev_confidence_mean",
            "Mean probability of the answered label on dev (from the artifact).",
            ["task"],
            multiprocess_mode="livemostrecent",
        ),
        dev_confidence_quantile=Gauge(
            "polytask_dev_confidence_quantile",
            "Quantiles of the probability of the answered label on dev (from the artifact).",
            ["task", "quantile"],
            multiprocess_mode="livemostrecent",
        ),
        dev_truncated_share=Gauge(
            "polytask_dev_truncated_share",
            "Share of dev texts cut to the model's max length (from the artifact).",
            ["task"],
            multiprocess_mode="livemostrecent",
        ),
    )


# --------------------------------------------------------------------------- active version
ACTIVE_METRIC = "polytask_model_active"
ACTIVE_HELP = "1 for the model version a worker serves."
# The collector reads every `*.db` of the directory, takes the metric type and multiprocess
# mode from the name (`gauge_livemax_...`) and drops the pid for livemax: 1 while any worker
# serves that version.
ACTIVE_FILE = re.compile(r"gauge_livemax_(\d+)-active\.db")


class ActiveVersion:
    """`polytask_model_active{version}` with exactly one series per worker.

    A prometheus_client gauge cannot drop a label set in multiprocess mode (its samples live in
    the worker's mmap file until the worker ends), so a worker that swapped models a few hundred
    times kept a series per version at 0. In multiprocess mode each worker writes its one sample
    to its own file, `gauge_livemax_<pid>-active.db` in PROMETHEUS_MULTIPROC_DIR, rewritten
    whole (a temporary file renamed over it) at each swap: /metrics sees the old file or the
    new one. A worker removes its file when it exits, and each write removes the files of
    workers that died without doing so (a crash, SIGKILL), which the regular gauge files keep.
    In one process (tests, no PROMETHEUS_MULTIPROC_DIR) it is a plain gauge, cleared at each
    swap.
    """

    # What a prometheus_client metric says of itself (tests/test_infra.py lists the metrics).
    _type = "gauge"
    _name = ACTIVE_METRIC

    def __init__(self) -> None:
        self._gauge: Any = None
        self._cleanup_registered = False

    def set(self, version: str) -> None:
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            self._write(Path(directory), version)
            return
        if self._gauge is None:
            from prometheus_client import Gauge

            self._gauge = Gauge(ACTIVE_METRIC, ACTIVE_HELP, ["version"])
        self._gauge.clear()
        self._gauge.labels(version=version).set(1)

    def _write(self, directory: Path, version: str) -> None:
        import atexit
        import time

        from prometheus_client.mmap_dict import MmapedDict, mmap_key

        pid = os.getpid()
        path = directory / f"gauge_livemax_{pid}-active.db"
        tmp = directory / f".gauge_livemax_{pid}-active.tmp"  # not *.db: never collected
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        values = MmapedDict(str(tmp))
        try:
            key = mmap_key(ACTIVE_METRIC, ACTIVE_METRIC, ["version"], [version], ACTIVE_HELP)
            values.write_value(key, 1.0, time.time())
        finally:
            values.close()
        os.replace(tmp, path)
        if not self._cleanup_registered:
            self._cleanup_registered = True
            atexit.register(_remove_quietly, path)
        remove_dead_active_files(directory)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def remove_dead_active_files(directory: Path) -> list[Path]:
    """Remove the `polytask_model_active` files of workers that no longer run."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = ACTIVE_FILE.fullmatch(entry.name)
            if match is not None and not _alive(int(match.group(1))):
                _remove_quietly(Path(entry.path))
                removed.append(Path(entry.path))
    return removed


# --------------------------------------------------------------------------- multiprocess dir
def use_private_multiproc_dir() -> Path | None:
    """Give this server its own Prometheus multiprocess directory, in the temporary directory.

    BentoML keeps the files in `$BENTOML_HOME/prometheus_multiproc_dir` and empties that
    directory whenever a server starts (`ensure_prometheus_dir`). BENTOML_HOME is the model
    store, which replicas share (infra/k8s/serve.yaml mounts one volume in every pod; two
    `polytask serve` on one machine share it too): a replica that started wiped the others'
    counters, their later samples went to deleted files, and each /metrics showed the newest
    replica's traffic. So the supervisor points BentoML at `<tempdir>/polytask-prometheus-
    <pid>` (a pod's own /tmp; one per server on a machine) and removes such directories left
    by servers that no longer run.

    Called when serving.service is imported: BentoML's supervisor imports it before it starts
    the server (`bentoml serve` and `polytask serve` alike). In a worker, whose
    PROMETHEUS_MULTIPROC_DIR the supervisor set, it does nothing; so too where the variable
    was set by hand.

    Returns:
        The directory chosen, or None when nothing was changed.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    from bentoml._internal.configuration.containers import BentoMLContainer

    root = Path(tempfile.gettempdir())
    remove_dead_multiproc_dirs(root)
    path = root / f"{PRIVATE_DIR_PREFIX}{os.getpid()}"
    BentoMLContainer.prometheus_multiproc_dir.set(str(path))
    return path


def remove_dead_multiproc_dirs(root: Path) -> list[Path]:
    """Remove `root/polytask-prometheus-<pid>` directories of this user whose process is gone;
    nothing else (other names, links, other users', live servers')."""
    removed: list[Path] = []
    pattern = re.compile(re.escape(PRIVATE_DIR_PREFIX) + r"(\d+)")
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                continue
            if _alive(int(match.group(1))):
                continue
            shutil.rmtree(entry.path)
            removed.append(Path(entry.path))
    if removed:
        logger.info("removed %d metrics directories of servers no longer running", len(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
