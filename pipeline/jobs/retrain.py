"""One retraining job: train, export, compare with the promoted model, promote or refuse.

    train (pipeline.train.driver) -> export_run (ONNX artifact, registered as a new version)
      -> evaluate challenger AND champion on one fixed evaluation set -> gate -> promote/refuse
      -> RUN/retrain.json + the log

Fair comparison: both models are evaluated the same way, here and now: their exported ONNX
artifacts, loaded, checked and run by the service's own runtime (`serving.runtime`; the
champion's is its directory in the model store, so no run directory is needed) on the same
files (`promotion.eval_data_dir`, split dev; default the config's dev files). The dev numbers
in a model's metadata are not used: they come from whatever data that run had, and per-task
model selection made them optimistic.

The challenger is registered labelled `stage=candidate`, so while the gate runs no service
serves it, not even as the latest version when nothing is promoted; promotion replaces the
label with `stage=production`. A refused challenger stays in the store as a candidate (so
`polytask models promote TAG` can override the gate), except when nothing is promoted yet: it
is deleted from the store then. Its artifact stays in `RUN/artifact` (`polytask export RUN`
registers it again). A challenger that does not load or does not answer known texts
(`serving.runtime.load_checked`) is broken, not just worse: it is deleted from the store and
the job fails with the reason. So does the job when the promoted champion is broken (roll back
or promote a working version first).

A gate that does not finish (an error, Ctrl-C, SIGTERM) removes its undecided challenger. A job
killed outright (SIGKILL: the OOM killer, a pod's hard deadline) cannot, so the challenger is
labelled with a token whose lock the job holds while it runs
(`serving.model_store.candidate_owner`); the next retraining job of that model name removes
candidates whose job is gone before it trains (`remove_orphaned_candidates`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError, RunConfig
from pipeline.jobs.gate import (
    GateDecision,
    compare_calibration,
    decide,
    format_decision,
    with_calibration,
)
from pipeline.jobs.models import PromotionError, promote, promoted_tag
from pipeline.runs import RunRecord
from serving.runtime import ModelCheckError

logger = logging.getLogger(__name__)

RETRAIN_RECORD = "retrain.json"
EVAL_SPLIT = "dev"


@dataclass
class RetrainRecord:
    """What one retraining job did; also written to `run_dir/retrain.json`.

    Attributes:
        run_name: The training run's name.
        run_dir: Its directory.
        model_name: The model store name.
        tag: The challenger's tag (registered even when refused, see the module docstring).
        champion: The tag promoted before this job, None for the first model.
        promoted: Whether the challenger is now the promoted model.
        removed_from_store: The refused first model was deleted from the store.
        decision: The gate's verdict and per-task table.
        evaluation: Evaluation set and per-task metrics of both models.
        durations: Seconds spent in train, export, evaluate and in total.
        started: UTC, ISO 8601.
    """

    run_name: str
    run_dir: Path
    model_name: str
    tag: str
    champion: str | None
    promoted: bool
    removed_from_store: bool
    decision: GateDecision
    evaluation: dict[str, Any]
    durations: dict[str, float]
    started: str

    def to_dict(self) -> dict[str, Any]:
        out = {"status": "decided", **asdict(self)}
        out["run_dir"] = str(self.run_dir)
        return out


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write `run_dir/retrain.json` atomically: a reader sees a whole record."""
    from serving.model_store import atomic_write

    atomic_write(run_dir / RETRAIN_RECORD, json.dumps(record, indent=1).encode())


def check_promotion_config(config: RunConfig) -> None:
    """Minimums must name tasks of the config; checked before any training."""
    unknown = sorted(set(config.promotion.minimums) - set(config.task_names))
    if unknown:
        raise ConfigError(
            "config",
            [f"promotion.minimums: unknown task(s) {unknown}; the config has {config.task_names}"],
        )


class RetrainStopped(KeyboardInterrupt):
    """The retraining process got SIGTERM (`ray job stop`, a pod's deadline, a drain). A
    KeyboardInterrupt, so it unwinds like Ctrl-C: the gate's clean-up removes an undecided
    challenger and the failure is pushed, where SIGTERM's default would just end the process."""


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into RetrainStopped while the block runs (main thread only: a handler can
    only be set there), then put the previous handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise RetrainStopped(f"retraining stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_evaluation_data(config: RunConfig) -> None:
    """The gate's own evaluation set (`promotion.eval_data_dir`), when set, must hold every
    task's `dev` file with labels the task knows: checked before any training (by `validate`
    and `retrain`), not found missing after a whole training and export.

    Raises:
        DataError: a missing or bad file (file:line), or a label the task does not have.
    """
    if config.promotion.eval_data_dir is None:
        return
    from pipeline.data import load_tasks

    labels = {t.name: t.labels for t in load_tasks(config)}
    load_tasks(evaluation_config(config), [EVAL_SPLIT], labels)


def evaluation_config(config: RunConfig) -> RunConfig:
    """The config whose dev files are the fixed evaluation set."""
    path = config.promotion.eval_data_dir
    if path is None:
        return config
    path = path.expanduser()
    root = path if path.is_absolute() or config.data_root is None else config.data_root / path
    tasks = [
        t.model_copy(update={"data_dir": None, "train": None, "dev": None}) for t in config.tasks
    ]
    return config.model_copy(update={"data_root": root.resolve(), "tasks": tasks})


def evaluate_artifact(
    artifact_dir: Path,
    eval_config: RunConfig,
    answers: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    cross_fit: bool = False,
) -> dict[str, Any]:
    """Per-task accuracy, macro-F1 and expected calibration error (percent; 15 bins, with the
    artifact's calibration maps) of an exported artifact, on the evaluation set's tasks that the
    artifact answers, run exactly as the service runs it: loaded and checked by
    `serving.runtime.load_checked` (threads, providers, truncation, temperatures and all).

    Args:
        answers: If given, filled with task -> (top-class confidence, correct) per evaluation
            text, for the gate's calibration comparison.
        cross_fit: Fill `answers` out of fold: each half of a task's evaluation texts scored
            with the artifact's calibration method refitted on the other half (from its raw
            logits), instead of with the maps it carries. For an evaluation set that is the
            dev set those maps were fitted on: in-sample, a top-label map scores itself
            almost perfectly calibrated, and a model calibrated that way would look better
            than one calibrated by a temperature alone for that reason only.

    Returns:
        {"tasks": {task: {"accuracy", "macro_f1", "n", "ece"}}, "missing": [artifact tasks
         without evaluation data]}

    Raises:
        ModelCheckError: the artifact does not load or does not answer known texts.
    """
    from functools import partial

    from pipeline.calibration import (
        confidences,
        cross_fitted,
        expected_calibration_error,
        fit_map,
        probabilities,
    )
    from pipeline.data import load_tasks
    from pipeline.metrics import classification_metrics
    from serving.runtime import load_checked

    runtime = load_checked(artifact_dir)
    labels = runtime.labels
    methods = {
        i.name: i.calibration.method if i.calibration is not None else None
        for i in runtime.metadata.tasks
    }
    tasks = [t for t in eval_config.tasks if t.name in labels]
    data = load_tasks(eval_config.model_copy(update={"tasks": tasks}), [EVAL_SPLIT], labels)
    per_task = {}
    for t in data:
        split = t.splits[EVAL_SPLIT]
        out = runtime.run(split.texts, [t.name])
        probs = out.probabilities[t.name]
        pred = probs.argmax(axis=-1)
        per_task[t.name] = classification_metrics(split.labels, pred, t.num_classes)
        confidence, correct = confidences(probs, split.labels)
        per_task[t.name]["ece"] = expected_calibration_error(confidence, correct)
        if answers is not None and cross_fit:
            calibration = methods.get(t.name)
            labels_ = np.asarray(split.labels)
            if calibration is None:  # an uncalibrated artifact serves T = 1
                held_out = probabilities(out.logits[t.name])
            else:
                fit = partial(fit_map, method=calibration)
                held_out = cross_fitted(out.logits[t.name], labels_, fit)
            answers[t.name] = confidences(held_out, labels_)
        elif answers is not None:
            answers[t.name] = (confidence, correct)
    return {"tasks": per_task, "missing": [t for t in labels if t not in per_task]}


def _champion_accuracies(artifact_dir: Path, evaluation: dict[str, Any]) -> dict[str, float]:
    """Task -> accuracy for the gate; a champion task without evaluation data keeps its
    metadata dev accuracy, or 0 (the challenger lacks that task, so the gate refuses anyway)."""
    from serving.artifact import ArtifactMetadata

    acc = {t: m["accuracy"] for t, m in evaluation["tasks"].items()}
    for info in ArtifactMetadata.read(artifact_dir).tasks:
        if info.name not in acc:
            acc[info.name] = info.dev.accuracy if info.dev is not None else 0.0
    return acc


def retrain(
    config: RunConfig,
    run_name: str | None = None,
    model_name: str | None = None,
    incremental: bool = False,
) -> RetrainRecord:
    """Train a new model and promote it only if the gate lets it through; push the training
    metrics (or the failure) to the Pushgateway of `config.monitoring`, if any.

    Args:
        config: The run config; its `promotion` section configures the gate.
        run_name: Default `<name>-<timestamp>-<id>`.
        model_name: Model store name; default `polytask-<config name>`.
        incremental: Instead of training every task, add the config's tasks that the promoted
            model lacks to its run (`pipeline.incremental.add_tasks_to_promoted`): the promoted
            model's tasks keep their exact answers and the gate judges only the new ones.

    Returns:
        The record also written to `run_dir/retrain.json`.

    Raises:
        ConfigError, DataError, TrainingError, ExportError: as `train` and `export_run`.
        PromotionError: the challenger or the promoted champion is broken (the reason is in
            the message).
    """
    from pipeline.jobs.monitoring import push_retrain_failure, push_retrain_metrics
    from serving.model_store import decisions_lock_path

    mon = config.monitoring
    try:
        with _stop_on_sigterm():
            record, run_record = _retrain(config, run_name, model_name, incremental)
    except (Exception, KeyboardInterrupt):  # a stopped run (Ctrl-C, `ray job stop`) failed too
        push_retrain_failure(mon.pushgateway, mon.job, config.name)
        raise
    push_retrain_metrics(
        mon.pushgateway,
        mon.job,
        config.name,
        run_record,
        duration_seconds=record.durations["total"],
        promoted=record.promoted,
        lock_path=decisions_lock_path(),
    )
    return record


def _retrain(
    config: RunConfig, run_name: str | None, model_name: str | None, incremental: bool = False
) -> tuple[RetrainRecord, RunRecord]:
    """`retrain` without monitoring: the record and the training run's record."""
    from pipeline.export import default_model_name, export_run
    from pipeline.jobs.monitoring import epoch_callback
    from pipeline.train.driver import train
    from serving.model_store import candidate_owner, remove_orphaned_candidates

    check_promotion_config(config)
    check_evaluation_data(config)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    name = model_name or default_model_name(config.name)
    # Challengers of jobs killed outright (SIGKILL runs no clean-up) are removed here.
    remove_orphaned_candidates(name)
    # What the challenger will be compared with, as the run starts: a champion that is gone
    # by the time of the gate must not turn the comparison into the first model's rules.
    champion_at_start = promoted_tag(name)

    mon = config.monitoring  # per-epoch gauges to the Pushgateway, if one is configured
    push_epochs = epoch_callback(mon.pushgateway, mon.job, config.name, config.task_names)
    callbacks = [push_epochs] if push_epochs is not None else []
    if incremental:
        from pipeline.incremental import add_tasks_to_promoted

        result: Any = add_tasks_to_promoted(config, name, run_name=run_name)
    else:
        result = train(config, run_name=run_name, callbacks=callbacks)
    t_train = time.monotonic()
    with candidate_owner() as owner:
        # A candidate until the gate decides: never served as the latest version meanwhile.
        exported = export_run(
            result.run_dir, model_name=name, register=True, candidate=True, candidate_owner=owner
        )
        return _gate_or_remove(
            config, result, exported, name, champion_at_start, started, t0, t_train
        )


def _gate_or_remove(
    config: RunConfig,
    result: Any,
    exported: Any,
    name: str,
    champion_at_start: str | None,
    started: str,
    t0: float,
    t_train: float,
) -> tuple[RetrainRecord, RunRecord]:
    """`_gate`, removing the challenger if the gate does not finish (`_retrain`).

    `retrain.json` says `"status": "gating"` from here on, `"failed"` (with the error) if the
    gate does not finish, and `"decided"` with the whole record once it has: a job killed
    outright leaves `gating`, not nothing."""
    import bentoml

    tag = str(exported.tag)
    t_export = time.monotonic()
    partial = {
        "run_name": result.run_dir.name,
        "run_dir": str(result.run_dir),
        "model_name": name,
        "tag": tag,
        "champion": champion_at_start,
        "started": started,
    }
    _write_record(result.run_dir, {"status": "gating", **partial})
    try:
        return _gate(
            config, result, exported, name, champion_at_start, started, t0, t_train, t_export
        )
    except BaseException as err:
        with contextlib.suppress(Exception):
            error = f"{type(err).__name__}: {err}"
            _write_record(result.run_dir, {"status": "failed", "error": error, **partial})
        # Whatever stopped the gate (a data error, a deleted champion, Ctrl-C), the challenger
        # must not stay behind as a candidate nobody decided on; unless it was promoted.
        if not _is_promoted(tag):
            with contextlib.suppress(Exception):
                bentoml.models.delete(tag)
                logger.warning("challenger %s removed from the store: the gate did not finish", tag)
        raise


def _is_promoted(tag: str) -> bool:
    import bentoml

    from serving.model_store import PROMOTION_LABEL

    try:
        model = bentoml.models.get(tag)
    except Exception:
        return False
    key, value = PROMOTION_LABEL
    return model.info.labels.get(key) == value


def _gate(
    config: RunConfig,
    result: Any,
    exported: Any,
    name: str,
    champion_at_start: str | None,
    started: str,
    t0: float,
    t_train: float,
    t_export: float,
) -> tuple[RetrainRecord, RunRecord]:
    """Evaluate the exported challenger and the champion, decide, promote or not, and write the
    record (`_retrain` after the export)."""
    import bentoml
    from bentoml.exceptions import NotFound

    from serving.model_store import keep_candidate

    tag = str(exported.tag)

    eval_config = evaluation_config(config)
    # Without its own evaluation set the gate scores the dev texts the calibration maps were
    # fitted on: compare them out of fold (`evaluate_artifact`).
    cross_fit = config.promotion.eval_data_dir is None
    # Per task, (confidence, correct) on the evaluation texts: the gate compares calibration.
    challenger_answers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    champion_answers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        challenger_eval = evaluate_artifact(
            exported.artifact_dir, eval_config, challenger_answers, cross_fit
        )
    except ModelCheckError as err:
        # Broken: nobody may serve it, not even as the latest version.
        bentoml.models.delete(tag)
        raise PromotionError(
            f"challenger {tag} refused and removed from the store, the model is broken: {err} "
            f"(artifact kept in {exported.artifact_dir})"
        ) from None
    champion = promoted_tag(name)
    if champion is None and champion_at_start is not None:
        raise PromotionError(
            f"champion {champion_at_start} was promoted when this retrain started and no "
            f"version of {name} is promoted now (deleted or unlabelled meanwhile): the gate "
            f"has nothing to compare {tag} with; promote the version that should be served "
            f"(`polytask models promote TAG`), then retrain"
        )
    champion_eval = None
    champion_acc = None
    unchanged: list[str] = []
    if champion is not None:
        try:
            champion_dir = Path(bentoml.models.get(champion).path)
        except NotFound:
            raise PromotionError(
                f"champion {champion} was removed from the store during the gate: nothing to "
                f"compare {tag} with; promote the version that should be served "
                f"(`polytask models promote TAG`), then retrain"
            ) from None
        try:
            champion_eval = evaluate_artifact(
                champion_dir, eval_config, champion_answers, cross_fit
            )
        except ModelCheckError as err:
            raise PromotionError(
                f"champion {champion} cannot be evaluated, the promoted model is broken: {err}; "
                f"roll back (`polytask models rollback --name {name}`) or promote a working "
                f"version (`polytask models promote TAG`), then retrain"
            ) from None
        champion_acc = _champion_accuracies(champion_dir, champion_eval)
        from pipeline.incremental import unchanged_tasks
        from serving.artifact import ArtifactMetadata

        unchanged = unchanged_tasks(exported.metadata, ArtifactMetadata.read(champion_dir))
    t_eval = time.monotonic()

    p = config.promotion
    decision = decide(
        {t: m["accuracy"] for t, m in challenger_eval["tasks"].items()},
        champion_acc,
        tolerance=p.tolerance,
        minimums=p.minimums,
        min_macro=p.min_macro,
        unchanged=unchanged,
    )
    if champion is not None:
        decision = with_calibration(
            decision, compare_calibration(challenger_answers, champion_answers)
        )
    removed = False
    if decision.promote:
        promote(tag, by="retrain", reason=f"{result.run_dir.name}: {decision.reason}")
    elif champion is None:
        bentoml.models.delete(tag)
        removed = True
    else:  # refused, kept as a candidate for `models promote`: no longer this job's to remove
        keep_candidate(tag)
    logger.info(
        "promotion gate for %s (champion %s):\n%s", tag, champion, format_decision(decision)
    )

    record = RetrainRecord(
        run_name=result.run_dir.name,
        run_dir=result.run_dir,
        model_name=name,
        tag=tag,
        champion=champion,
        promoted=decision.promote,
        removed_from_store=removed,
        decision=decision,
        evaluation={
            "data_dir": str(eval_config.data_root),
            "split": EVAL_SPLIT,
            "challenger": challenger_eval,
            "champion": champion_eval,
            # The challenger's temperatures and dev ECE before/after, fitted at export.
            "calibration": {
                t.name: t.calibration.model_dump() if t.calibration else None
                for t in exported.metadata.tasks
            },
        },
        durations={
            "train": round(t_train - t0, 1),
            "export": round(t_export - t_train, 1),
            "evaluate": round(t_eval - t_export, 1),
            "total": round(time.monotonic() - t0, 1),
        },
        started=started,
    )
    _write_record(result.run_dir, record.to_dict())
    logger.info(
        "retrain %s: %s %s in %.1fs",
        record.run_name,
        tag,
        "promoted" if record.promoted else "refused",
        record.durations["total"],
    )
    return record, result.record
