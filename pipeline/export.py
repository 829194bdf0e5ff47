"""Export a finished run to the serving artifact (DESIGN section 3) and register it.

    run directory -> MultiTaskModel (encoder + R_i + B + A_i; no self-auxiliary towers)
      -> model.onnx (torch.onnx.export: TorchScript, dynamo as the fallback) + tokenizer
         files + metadata.json
      -> parity: the artifact run by serving.runtime vs PyTorch eager (a TorchScript graph
         that fails it is exported again with dynamo)
      -> [int8: quantize_dynamic, kept only if no task's dev accuracy drops too much]
      -> [add-task / remove-task child: its kept tasks vs the parent's logits, checked on
         the final graph, int8 or not (`_lineage`)]
      -> temperature scaling: one T per task fitted on dev logits of the final graph, with dev
         ECE before/after and the drift metrics' dev reference (pipeline/calibration.py)
      -> BentoML model store (a new version per export)

The checks run the artifact with `serving.runtime.Runtime`, the one way an artifact is run
(the service, `polytask predict`, promotion and the retraining gate use it too); only the
PyTorch reference is computed here. The artifact is built in a temporary sibling directory
and moved into place only when every check passed, so a failed export never leaves a
half-written artifact behind. One export or registration of an artifact directory runs at a
time (`artifact_lock`, a lock file beside it), and an export first removes the temporaries
that killed exports of the same directory left (`remove_stale_temporaries`); a registration
likewise removes BentoML's temporary copies of killed registrations
(`remove_stale_bentoml_temporaries`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline import __version__
from pipeline.calibration import calibrate_artifact
from serving.artifact import (
    INPUT_NAMES,
    METADATA_FILE,
    ONNX_FILE,
    ArtifactMetadata,
    EncoderInfo,
    LineageInfo,
    ParityCase,
    ParityReport,
    QuantizationReport,
    QuantizedTask,
    QuantizedVariant,
    TaskInfo,
    TaskMetrics,
    TaskOwnRoute,
    TaskRoute,
    output_name,
)
from serving.graph import head_nodes
from serving.runtime import TOKENIZER_FILE, Runtime, pad_batch

logger = logging.getLogger(__name__)

DEFAULT_ARTIFACT_DIR = "artifact"
PARITY_BATCH_SIZES = (1, 3, 8)
# Training texts that calibrate the activation scales of static int8 variants.
CALIBRATION_TEXTS = 256
# BentoML's rule for a tag's name (bentoml/_internal/tag.py), checked before any work is done.
MODEL_NAME_PATTERN = re.compile(r"^[a-z0-9]([-._a-z0-9]*[a-z0-9])?$")
MODEL_NAME_MAX_LENGTH = 63
# How long an export (or registration) of an artifact directory waits for another one of the
# same directory to finish before failing (`artifact_lock`). Short on purpose: an export holds
# the lock for its whole run (minutes: graph export, parity, int8, calibration, registration),
# and a second export of the same directory would only replace the first one's artifact when it
# finished; that is rarely what was meant (two jobs writing one output), and a command that
# sits silent for minutes looks hung. Failing after a few seconds says what is going on; the
# few seconds ride out a registration of the directory that is finishing.
ARTIFACT_LOCK_TIMEOUT_S = 10.0
_LOCK_POLL_S = 0.05

Quantize = Literal["none", "int8"]


class ExportError(Exception):
    """The run cannot be exported, or the exported graph failed a check; the message says why."""


@dataclass
class ExportResult:
    """What `export_run` produced.

    Attributes:
        artifact_dir: The artifact directory (model.onnx, tokenizer files, metadata.json).
        tag: `name:version` in the BentoML model store, None when not registered.
        metadata: The artifact's metadata, as written to metadata.json.
    """

    artifact_dir: Path
    tag: str | None
    metadata: ArtifactMetadata


# --------------------------------------------------------------------------- entry point
def export_run(
    run_dir: str | Path,
    quantize: Quantize = "none",
    model_name: str | None = None,
    register: bool = True,
    output_dir: str | Path | None = None,
    tolerance: float = 1e-4,
    candidate: bool = False,
    candidate_owner: str | None = None,
) -> ExportResult:
    """Export a finished run to an artifact directory and register it in the model store.

    Args:
        run_dir: A finished run directory (what `polytask train` prints).
        quantize: "int8" tries dynamic int8 quantization, kept only if no task's dev accuracy
            drops by more than 0.5 points.
        model_name: Name in the model store; default `polytask-<config name>`.
        register: Copy the artifact into the BentoML model store (under BENTOML_HOME).
        output_dir: Where the artifact goes; default `<run_dir>/artifact`. An existing
            artifact there is replaced.
        tolerance: Largest max-abs logit difference allowed between onnxruntime and PyTorch.
        candidate: Register it labelled `stage=candidate` (see `register_artifact`).
        candidate_owner: With `candidate`, the token of the retraining job's
            `serving.model_store.candidate_owner` lock, as the label `candidate_owner`.

    Returns:
        The artifact directory, the store tag (None if not registered) and the metadata.

    Raises:
        ExportError: a bad model name, an export that fails parity, a tokenizer without
            tokenizer.json, ...
        RunNotFoundError: `run_dir` is not a finished run, or its encoder changed.
    """
    from pipeline.runs import read_record

    run_dir = Path(run_dir)
    name = model_name or default_model_name(read_record(run_dir).run_config().name)
    check_model_name(name)
    out = Path(output_dir) if output_dir is not None else run_dir / DEFAULT_ARTIFACT_DIR
    start = time.monotonic()
    # One lock over writing and registering: another export of `out` cannot replace the
    # artifact while BentoML copies it into the store.
    with _locked_output(out):
        metadata = _write_artifact(
            run_dir, out, quantize=quantize, tolerance=tolerance, model_name=name
        )
        tag = (
            _register_artifact(out, name, candidate=candidate, owner=candidate_owner)
            if register
            else None
        )
    logger.info(
        "export of %s done in %.1fs: %s%s",
        metadata.run_id,
        time.monotonic() - start,
        out,
        f" registered as {tag}" if tag else "",
    )
    return ExportResult(artifact_dir=out, tag=tag, metadata=metadata)


def fine_tuned_blocks(trainable_layers: int | str, encoder: Any) -> list[int]:
    """1-based indices of the encoder blocks a run trained: the top `trainable_layers` of
    `encoder.n_layers`, every block for "all", none for a frozen encoder."""
    total = int(encoder.n_layers)
    first = 1 if trainable_layers == "all" else total - int(trainable_layers) + 1
    return list(range(first, total + 1))


def default_model_name(config_name: str) -> str:
    """`polytask-<config name>`, lower-cased and trimmed to a valid BentoML model name."""
    name = f"polytask-{config_name}".lower()[:MODEL_NAME_MAX_LENGTH]
    return name.rstrip("-._")


def check_model_name(name: str) -> None:
    """Raise ExportError unless `name` is a valid BentoML model name."""
    if len(name) > MODEL_NAME_MAX_LENGTH or not MODEL_NAME_PATTERN.match(name):
        raise ExportError(
            f"model name {name!r}: must be at most {MODEL_NAME_MAX_LENGTH} characters of "
            "lower-case letters, digits, '-', '_' or '.', starting and ending with a letter or "
            "digit"
        )


# --------------------------------------------------------------------------- the artifact
def write_artifact(
    run_dir: Path,
    out_dir: Path,
    quantize: Quantize = "none",
    tolerance: float = 1e-4,
    max_int8_drop: float = 0.5,
    model_name: str | None = None,
    min_int8_speedup: float = 1.0,
) -> ArtifactMetadata:
    """Write the artifact of a finished run: model.onnx, tokenizer files and metadata.json.

    Everything is written into a temporary sibling of `out_dir` and moved into place at the
    end: when a check fails, `out_dir` is left as it was.

    Args:
        run_dir: A finished run directory.
        out_dir: The artifact directory to create (replaced if it holds an earlier artifact).
        quantize: "int8" tries dynamic int8 quantization of the exported graph.
        tolerance: Largest max-abs logit difference allowed between onnxruntime and PyTorch.
        max_int8_drop: int8 is kept only if no task's dev accuracy drops by more than this
            many points.
        min_int8_speedup: ...and only if it runs at least this many times as fast as fp32
            (dev texts through serving.runtime, measured side by side).
        model_name: Name recorded in the metadata; default `polytask-<config name>`.

    Returns:
        The metadata written to `out_dir/metadata.json`.

    Raises:
        ExportError: parity above `tolerance`, unexpected graph inputs or outputs, a tokenizer
            without tokenizer.json, an `out_dir` that holds something else than an artifact,
            or another export of `out_dir` running (`artifact_lock`).
    """
    out_dir = Path(out_dir)
    with _locked_output(out_dir):
        return _write_artifact(
            run_dir,
            out_dir,
            quantize=quantize,
            tolerance=tolerance,
            max_int8_drop=max_int8_drop,
            model_name=model_name,
            min_int8_speedup=min_int8_speedup,
        )


def _write_artifact(
    run_dir: Path,
    out_dir: Path,
    quantize: Quantize = "none",
    tolerance: float = 1e-4,
    max_int8_drop: float = 0.5,
    model_name: str | None = None,
    min_int8_speedup: float = 1.0,
) -> ArtifactMetadata:
    """`write_artifact`, for a caller that holds `artifact_lock(out_dir)`."""
    from pipeline.data import load_tasks
    from pipeline.runs import load_run

    if quantize not in ("none", "int8"):
        raise ExportError(f"quantize: {quantize!r}; expected 'none' or 'int8'")
    _check_replaceable(out_dir)
    # Under the lock no other export of `out_dir` runs: temporaries of earlier ones are orphans.
    remove_stale_temporaries(out_dir)
    run = load_run(run_dir)
    record = run.record
    enc = record.encoder
    tasks = list(run.model.heads.tasks)
    if tasks != list(record.tasks):
        raise ExportError(
            f"{run_dir}: the model's tasks {tasks} differ from run.json's {list(record.tasks)}"
        )
    name = model_name or default_model_name(run.config.name)
    check_model_name(name)

    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        onnx_path = work / ONNX_FILE
        step = time.monotonic()
        # int8 variants pick their nodes by the dynamo graph's weight names and Gelu nodes
        # (`int8_nodes`); the TorchScript graph names weights by number and spells GELU out.
        exporter = export_onnx(
            run.model,
            tasks,
            enc.max_length,
            onnx_path,
            "dynamo" if quantize == "int8" else "torchscript",
        )
        logger.info(
            "exported %s in %.1fs (%s exporter)", onnx_path.name, time.monotonic() - step, exporter
        )

        tokenizer = save_tokenizer(enc.path, work, enc.max_length)
        # Written now, with the parity check pending (replaced below), so that the checks can
        # run the artifact as the service does: with serving.runtime, from this directory.
        metadata = ArtifactMetadata(
            model_name=name,
            run_id=record.run_name,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            polytask_version=__version__,
            precision="fp32",
            encoder=EncoderInfo(
                name=enc.path,
                fingerprint=enc.fingerprint,
                max_length=enc.max_length,
                pooling=enc.pooling,
                dim=enc.dim,
                trainable_layers=enc.trainable_layers,
                fine_tuned_blocks=fine_tuned_blocks(enc.trainable_layers, run.model.encoder),
            ),
            tasks=[
                TaskInfo(
                    name=t,
                    labels=list(record.tasks[t].labels),
                    output=output_name(t),
                    dev=_task_metrics(record.dev.get(t)),
                    route=_task_route(record, t),
                )
                for t in tasks
            ],
            dev_macro_accuracy=record.dev_macro_accuracy,
            config_fingerprint=config_fingerprint(record.config),
            data_fingerprints={t: record.tasks[t].data_fingerprint for t in tasks},
            parity=ParityReport(tolerance=tolerance, max_abs_diff=0.0, passed=False, cases=[]),
        )
        metadata.write(work)

        def graph_parity() -> ParityReport:
            step = time.monotonic()
            report = check_parity(
                run.model,
                # On CPU whatever POLYTASK_ORT_DEVICE says: parity is about the graph, against
                # PyTorch eager on CPU; GPU kernels (TF32 matmuls) may differ by more than 1e-4.
                Runtime(work, device="cpu"),
                tasks,
                vocab_size=int(run.model.encoder.transformer.config.vocab_size),
                pad_id=int(tokenizer.pad_token_id or 0),
                max_length=enc.max_length,
                tolerance=tolerance,
            )
            logger.info(
                "parity (%s graph): max abs diff %.2e over %d cases (tolerance %.0e) in %.1fs",
                exporter,
                report.max_abs_diff,
                len(report.cases),
                tolerance,
                time.monotonic() - step,
            )
            return report.model_copy(update={"exporter": exporter})

        parity = graph_parity()
        if not parity.passed and exporter == "torchscript":
            # The traced graph may have baked in a shape of its example batch: dynamo's graph
            # carries the shapes symbolically.
            logger.warning("the TorchScript graph fails parity; exporting again with dynamo")
            exporter = export_onnx(run.model, tasks, enc.max_length, onnx_path, "dynamo")
            parity = graph_parity()
        if not parity.passed:
            worst = max(parity.cases, key=lambda c: c.max_abs_diff)
            raise ExportError(
                f"{run_dir}: onnxruntime and PyTorch disagree: max abs logit difference "
                f"{parity.max_abs_diff:.3g} > tolerance {tolerance:g} (worst case: batch "
                f"{worst.batch_size}, seq {worst.seq_len}, "
                f"{'padded' if worst.padded else 'unpadded'})"
            )
        parity = parity.model_copy(update={"checked": "shipped"})
        metadata = metadata.model_copy(update={"parity": parity})

        if quantize == "int8":
            data = load_tasks(run.config, splits=["train", "dev"], labels=run.labels)
            quantization = quantize_if_accurate(
                work,
                {t.name: (t.splits["dev"].texts, t.splits["dev"].labels) for t in data},
                max_drop=max_int8_drop,
                calibration_texts=calibration_sample([t.splits["train"].texts for t in data]),
                min_speedup=min_int8_speedup,
            )
            if quantization.kept:
                # model.onnx is the int8 graph now: say which graph the parity cases ran, and
                # what the shipped one's gap to PyTorch is on the same cases.
                shipped = graph_parity()
                parity = parity.model_copy(
                    update={"checked": "fp32", "shipped_max_abs_diff": shipped.max_abs_diff}
                )
            metadata = metadata.model_copy(
                update={
                    "precision": "int8" if quantization.kept else "fp32",
                    "quantization": quantization,
                    "parity": parity,
                }
            )
        if record.lineage is not None:  # add-task / remove-task: kept tasks vs the parent
            metadata = metadata.model_copy(
                update={"lineage": _lineage(run, work, metadata, tokenizer, tolerance)}
            )
        # Temperature scaling per task, fitted on the final graph's dev logits as served, and
        # the dev reference of the drift metrics (pipeline/calibration.py).
        step = time.monotonic()
        dev = load_tasks(run.config, splits=["dev"], labels=run.labels)
        metadata = calibrate_artifact(
            work, metadata, {t.name: (t.splits["dev"].texts, t.splits["dev"].labels) for t in dev}
        )
        logger.info("calibration fitted in %.1fs", time.monotonic() - step)
        metadata.write(work)
        _publish(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("artifact written: %s (%s, %d tasks)", out_dir, metadata.precision, len(tasks))
    return metadata


def _lineage(
    run: Any, work: Path, metadata: ArtifactMetadata, tokenizer: Any, tolerance: float
) -> LineageInfo | None:
    """The lineage record of an add-task / remove-task run, its parent-parity check run on
    the graph that ships: `work`'s model.onnx after the int8 choice.

    Why on the shipped graph: the record says whether the kept tasks answer as the parent's,
    and the promotion gate skips judging them on that word (`incremental.unchanged_tasks`).
    An int8 graph does not answer as the parent: quantization moves the logits by ~1e-3
    (above the 1e-4 tolerance), and int8 exports of parent and child are not even alike in
    general (the static variant calibrates its activation scales on every task's training
    texts, and which variant is kept depends on timings). So an int8 child records the
    difference it has, `passed` False, and the gate judges every task; `exact` still says
    what is true of the weights (PyTorch logits bit-identical to the parent's). Refusing
    the combination instead would take int8 away from incremental runs for no reason, and
    comparing with a parent's int8 artifact would need that artifact, which export does not
    know (the champion is chosen later, in the store).
    """
    from pipeline.incremental import check_parent_parity

    lineage = check_parent_parity(
        run,
        Runtime(work, device="cpu"),
        tolerance,
        vocab_size=int(run.model.encoder.transformer.config.vocab_size),
        pad_id=int(tokenizer.pad_token_id or 0),
    )
    parity = lineage.parity if lineage is not None else None
    if parity is not None and metadata.precision == "int8" and not parity.passed:
        logger.warning(
            "lineage: %s keep the parent's weights (PyTorch logits %s), but the shipped int8 "
            "graph differs from the parent's logits by %.2e > tolerance %.0e; recorded as not "
            "passed, so the promotion gate judges every task",
            ", ".join(parity.tasks),
            "bit-identical" if parity.exact else f"max abs diff {parity.eager_max_abs_diff:.2e}",
            parity.onnx_max_abs_diff,
            parity.tolerance,
        )
    return lineage


def calibration_sample(texts: list[list[str]], n: int = CALIBRATION_TEXTS) -> list[str]:
    """Up to `n` training texts, the same share from each task, spread over each list."""
    per_task = max(1, n // max(len(texts), 1))
    out: list[str] = []
    for task_texts in texts:
        step = max(1, len(task_texts) // per_task)
        out += task_texts[::step][:per_task]
    return out


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _task_metrics(m: dict[str, Any] | None) -> TaskMetrics | None:
    if m is None:
        return None
    return TaskMetrics(accuracy=m["accuracy"], macro_f1=m["macro_f1"], n=int(m["n"]))


def _task_route(record: Any, task: str) -> TaskRoute | None:
    """The run's routing decision for `task` as the artifact records it."""
    decision = (record.routing or {}).get(task)
    if decision is None:
        return None
    fields = decision.model_dump(include=set(TaskRoute.model_fields) - {"own"})
    if decision.own is not None:
        fields["own"] = TaskOwnRoute(
            **decision.own.model_dump(include=set(TaskOwnRoute.model_fields))
        )
    return TaskRoute(**fields)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that is neither empty nor an earlier artifact."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / METADATA_FILE).is_file():
        raise ExportError(
            f"{out_dir}: not empty and not a polytask artifact; choose another output directory"
        )


def _publish(work: Path, out_dir: Path) -> None:
    """Move the finished artifact into place, replacing an earlier one."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
        try:
            work.rename(out_dir)
        except OSError:
            old.rename(out_dir)  # put the earlier artifact back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(out_dir)


# --------------------------------------------------------------------------- output lock
def lock_file(out_dir: Path) -> Path:
    """The lock file of the artifact directory `out_dir`: `.<name>.lock` beside it."""
    return out_dir.with_name(f".{out_dir.name}.lock")


def _check_output_name(out_dir: Path) -> None:
    """Refuse a path without a name of its own ("/", ".", ".."): its temporaries, old copy and
    lock file are named after it, beside it."""
    if out_dir.name in ("", ".", ".."):
        raise ExportError(f"{out_dir}: give the artifact directory by a path that ends in its name")


@contextlib.contextmanager
def artifact_lock(
    out_dir: Path, timeout: float | None = None, optional: bool = False
) -> Iterator[None]:
    """Hold the lock of the artifact directory `out_dir`: one export or registration of it at a
    time, across processes (and threads).

    The lock is an flock on `lock_file(out_dir)`, beside `out_dir` on the same volume, so that
    processes sharing the volume (containers, a network file system) see it; the kernel
    releases it when its holder dies, even by SIGKILL. The file holds the holder's pid and host,
    for the message of the export that waits. It is removed on release, while still locked:
    whoever then locks the removed file sees that it is no longer the one at the path and tries
    again, so every holder holds the file that is there. (filelock's UnixFileLock keeps its file
    on purpose, and removing it from outside is unsafe; hence flock here, with that check.)

    Args:
        out_dir: The artifact directory; its parent must exist.
        timeout: Seconds to wait for another holder; default ARTIFACT_LOCK_TIMEOUT_S.
        optional: Go on without the lock when its file cannot be created (a read-only or
            missing directory, which no export can be writing either): for registration.

    Raises:
        ExportError: another export held the lock for `timeout` seconds (the message names the
            lock file and its holder).
    """
    import fcntl

    out_dir = Path(out_dir)
    _check_output_name(out_dir)
    path = lock_file(out_dir)
    wait = ARTIFACT_LOCK_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + wait
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as err:
            if not optional:
                raise ExportError(f"{path}: cannot create the export's lock file: {err}") from err
            logger.debug("%s: not locked (%s)", out_dir, err)
            fd = None
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                # A file system without flock: export as before the lock existed.
                logger.warning("%s: not locked, the file system has no locks", out_dir)
                path.unlink(missing_ok=True)
                fd = None
                break
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                raise ExportError(
                    f"{out_dir}: another export of this artifact directory is running "
                    f"({_holder(path)}; lock file {path}), still after {wait:g} s; wait for it "
                    f"to finish or choose another output directory"
                ) from None
            time.sleep(_LOCK_POLL_S)
            continue
        except BaseException:
            os.close(fd)
            raise
        if _is_at(fd, path):
            break
        os.close(fd)  # its holder removed it as we locked it: lock the one there now
    if fd is None:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # only for the message of an export that waits
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        try:
            if _is_at(fd, path):
                path.unlink()
        finally:
            os.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    """Whether the file open as `fd` is the one at `path` (no link followed)."""
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return f"held by {text}" if text else "holder unknown"


@contextlib.contextmanager
def _locked_output(out_dir: Path) -> Iterator[None]:
    """Create `out_dir`'s parent if needed and hold `artifact_lock(out_dir)`; when the body
    fails, remove the parent directories created here again if they are empty."""
    _check_output_name(out_dir)
    created = None
    for parent in reversed(out_dir.parents):  # the outermost missing one is created first
        if not parent.exists():
            created = parent
            break
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with artifact_lock(out_dir):
            yield
    except BaseException:
        if created is not None:
            for parent in (out_dir.parent, *out_dir.parent.parents):
                try:
                    parent.rmdir()
                except OSError:
                    break
                if parent == created:
                    break
        raise


# The names of the temporaries `write_artifact` makes beside `<name>`: its work directory
# (tempfile.mkdtemp: 8 characters of [a-z0-9_]) and the earlier artifact while it is replaced
# (8 hex digits).
_TEMP_SUFFIX = r"\.(?:tmp-[a-z0-9_]{8}|old-[0-9a-f]{8})"


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the temporary siblings of `out_dir` that earlier exports of it left behind when
    they were killed (`.<name>.tmp-*`, a partial artifact of ~100 MB) or could not finish
    replacing it (`.<name>.old-*`).

    Call it holding `artifact_lock(out_dir)`: no other export of `out_dir` runs then, so every
    such sibling is an orphan. Only directories with exactly these names, as this module makes
    them, are removed; anything else (other names, links, files) is left alone. Each removal is
    logged with its size.

    Returns:
        The directories removed.
    """
    pattern = re.compile(re.escape(f".{out_dir.name}") + _TEMP_SUFFIX)
    removed = []
    try:
        entries = list(os.scandir(out_dir.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        size = _tree_size(path)
        try:
            shutil.rmtree(path)
        except OSError as err:
            logger.warning("could not remove %s, left by an earlier export: %s", path, err)
            continue
        removed.append(path)
        logger.warning(
            "removed %s (%.1f MB), left by an earlier export of %s that did not finish",
            path,
            size / 1e6,
            out_dir,
        )
    return removed


def _tree_size(root: Path) -> int:
    """Bytes in the files under `root` (no link followed)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


# --------------------------------------------------------------------------- ONNX graph
def export_onnx(
    model: Any,
    tasks: list[str],
    max_length: int,
    path: Path,
    exporter: Literal["torchscript", "dynamo"] = "torchscript",
) -> Literal["torchscript", "dynamo"]:
    """Write the serving graph of `model` (a MultiTaskModel) to `path` as one ONNX file;
    returns the exporter that wrote it.

    Inputs `input_ids` and `attention_mask` (int64 [batch, seq], both dynamic, seq up to
    `max_length`); outputs `logits_<task>` (float [batch, C_task]) in task order. The
    self-auxiliary towers are never called, so they are not in the graph.

    The TorchScript exporter by default (falling back to dynamo when it fails): its graph ran
    1.12x the dynamo graph's speed through serving.runtime on the idle machine (docs/results.md,
    issue 11), and exports in seconds rather than minutes. A traced graph can bake in a shape
    of its example batch, so `export_run` checks parity on other shapes and re-exports with
    dynamo when the traced graph fails it.
    """
    import onnx

    from pipeline.onnx_graph import export_graph

    graph = _serving_module(model, tasks).eval()
    outputs = [output_name(t) for t in tasks]
    try:
        with eager_attention(getattr(model.encoder, "transformer", None)):
            used = export_graph(graph, path, outputs, max_length, exporter=exporter)
    except Exception as err:  # the exporter raises many types; name the cause in one line
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err
    proto = onnx.load(str(path))
    if fix_io_names(proto, list(INPUT_NAMES), outputs):
        onnx.save(proto, str(path))
    aux = [i.name for i in proto.graph.initializer if i.name.startswith("heads.aux.")]
    if aux:
        raise ExportError(f"self-auxiliary weights leaked into the graph: {aux[:3]}")
    onnx.checker.check_model(str(path))
    return used


@contextlib.contextmanager
def eager_attention(transformer: Any) -> Iterator[None]:
    """Trace `transformer` (a Hugging Face model, or None) with its eager attention, then
    restore the implementation it had.

    The eager attention's graph (MatMul, Softmax) ran 1.03-1.05x the SDPA one's (which adds
    Where/IsNaN masking around the softmax) in onnxruntime, one thread, dev texts in length
    buckets (docs/results.md, issue 11, run 8); the logits differ by ~2e-5, and export's
    parity check against PyTorch (SDPA) holds the graph to its tolerance either way. A model
    that cannot switch keeps its own.
    """
    config = getattr(transformer, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switched = False
    if before not in (None, "eager"):
        try:
            transformer.set_attn_implementation("eager")
            switched = True
        except Exception as err:  # any model-specific refusal: export as it is
            logger.info("attention stays %s for export: %s", before, err)
    try:
        yield
    finally:
        if switched:
            transformer.set_attn_implementation(before)


def _serving_module(model: Any, tasks: list[str]) -> Any:
    """A module whose forward is exactly the serving path: one encoder pass, then every task's
    main tower (R_i -> B -> A_i), returning a tuple of logits in task order."""
    from torch import nn

    class ServingGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = model.encoder
            self.heads = model.heads

        def forward(self, input_ids, attention_mask):  # int64 [B, L] x 2
            x = self.encoder(input_ids, attention_mask)  # [B, d]
            return tuple(self.heads(x, t, with_aux=False)[0] for t in tasks)  # [B, C_t] each

    return ServingGraph()


def fix_io_names(proto: Any, inputs: list[str], outputs: list[str]) -> bool:
    """Rename the graph's inputs and outputs (in order) to the contract's names.

    Both exporters name inputs after `input_names` and honour `output_names` today; this
    guards the contract against exporter versions that do not.

    Returns:
        Whether anything was renamed.

    Raises:
        ExportError: the graph has a different number of inputs or outputs, or wrong dtypes.
    """
    import onnx

    graph = proto.graph
    got_in, got_out = [i.name for i in graph.input], [o.name for o in graph.output]
    if len(got_in) != len(inputs) or len(got_out) != len(outputs):
        raise ExportError(
            f"exported graph has inputs {got_in} and outputs {got_out}; expected {inputs} and "
            f"{outputs}"
        )
    for value in graph.input:
        if value.type.tensor_type.elem_type != onnx.TensorProto.INT64:
            raise ExportError(f"graph input {value.name} is not int64")
    for value in graph.output:
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"graph output {value.name} is not float32")
    mapping = {a: b for a, b in zip(got_in + got_out, inputs + outputs, strict=True) if a != b}
    if not mapping:
        return False
    for value in [*graph.input, *graph.output]:
        value.name = mapping.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    logger.info("renamed graph inputs/outputs: %s", mapping)
    return True


# --------------------------------------------------------------------------- parity
def parity_inputs(
    batch_size: int, seq_len: int, padded: bool, vocab_size: int, pad_id: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random int64 input_ids and attention_mask [batch_size, seq_len].

    Padded: like a tokenizer's padded batch, the first row is full length and the others are
    shorter (a single row is shorter), with `pad_id` and mask 0 after their end.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch_size, seq_len), dtype=np.int64)
    mask = np.ones((batch_size, seq_len), dtype=np.int64)
    if padded:
        lengths = rng.integers(1, seq_len, size=batch_size)
        if batch_size > 1:
            lengths[0] = seq_len
        for row, n in enumerate(lengths):
            ids[row, n:] = pad_id
            mask[row, n:] = 0
    return ids, mask


def check_parity(
    model: Any,
    runtime: Runtime,
    tasks: list[str],
    vocab_size: int,
    pad_id: int,
    max_length: int,
    tolerance: float,
) -> ParityReport:
    """The artifact's logits, from the serving runtime's onnxruntime session, vs PyTorch
    eager on batch sizes 1, 3, 8, short/medium/max sequence lengths, padded and unpadded; the
    max abs difference over all tasks' logits per case.

    Args:
        model: The run's MultiTaskModel (the reference).
        runtime: The artifact loaded by `serving.runtime.Runtime`.
        tasks: Task order of the graph's outputs.
        vocab_size: Token ids are drawn below this.
        pad_id: The tokenizer's padding id.
        max_length: The longest sequence tried.
        tolerance: Largest max-abs logit difference that passes.
    """
    outputs = [runtime.outputs[t] for t in tasks]
    lengths = sorted({min(5, max_length), max(max_length // 2, 2), max_length})
    cases: list[ParityCase] = []
    seed = 0
    for batch_size in PARITY_BATCH_SIZES:
        for seq_len in lengths:
            for padded in (False, True):
                seed += 1
                ids, mask = parity_inputs(batch_size, seq_len, padded, vocab_size, pad_id, seed)
                got = runtime.session.run(outputs, {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask})
                want = eager_logits(model, tasks, ids, mask)
                diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
                cases.append(
                    ParityCase(
                        batch_size=batch_size, seq_len=seq_len, padded=padded, max_abs_diff=diff
                    )
                )
    worst = max(c.max_abs_diff for c in cases)
    # `not worst > tol` rather than `worst <= tol`: a NaN difference must fail the check.
    passed = not (worst > tolerance or np.isnan(worst))
    return ParityReport(tolerance=tolerance, max_abs_diff=worst, passed=passed, cases=cases)


def eager_logits(
    model: Any, tasks: list[str], ids: np.ndarray, mask: np.ndarray
) -> list[np.ndarray]:
    """PyTorch eager main logits of every task, in task order (the parity reference)."""
    import torch

    with torch.inference_mode():
        x = model.encoder(torch.from_numpy(ids), torch.from_numpy(mask))
        return [model.heads(x, t)[0].numpy() for t in tasks]


# --------------------------------------------------------------------------- tokenizer
def save_tokenizer(encoder_path: str, out_dir: Path, max_length: int) -> Any:
    """Save the encoder's fast tokenizer into `out_dir` and return it.

    Serving tokenizes with the `tokenizers` library (no transformers), so tokenizer.json must
    exist; truncation to `max_length` and padding to the longest text are written into it,
    so `Tokenizer.from_file(...).encode_batch(texts)` gives the model's inputs as they are.
    """
    from tokenizers import Tokenizer

    from pipeline.features import load_tokenizer

    tokenizer = load_tokenizer(encoder_path)
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(
            f"{encoder_path}: the tokenizer has no fast (tokenizers) version, which serving "
            f"needs as {TOKENIZER_FILE}"
        )
    tokenizer.save_pretrained(str(out_dir))
    path = out_dir / TOKENIZER_FILE
    if not path.is_file():
        raise ExportError(f"{encoder_path}: saving the tokenizer wrote no {TOKENIZER_FILE}")
    fast = Tokenizer.from_file(str(path))
    fast.enable_truncation(max_length)
    fast.enable_padding(pad_id=int(tokenizer.pad_token_id or 0), pad_token=tokenizer.pad_token)
    fast.save(str(path))
    return tokenizer


# --------------------------------------------------------------------------- int8
@dataclass(frozen=True)
class Int8Variant:
    """One way to quantize the graph to int8 (weights int8, one scale per output channel).

    Attributes:
        name: Recorded in the metadata when kept.
        method: Dynamic (activations quantized on the fly) or static QDQ (activation scales
            calibrated on training texts).
        description: One line for reports.
        heads: Also quantize the task heads (R_i, B, A_i): little time, some accuracy.
        ffn_out: Also quantize each block's FFN output projection, whose input (after GELU)
            is long-tailed and loses the most to a per-tensor activation scale.
    """

    name: str
    method: Literal["dynamic-int8", "static-int8-qdq"]
    description: str
    heads: bool = False
    ffn_out: bool = True


INT8_VARIANTS = (
    Int8Variant(
        "dynamic-all",
        "dynamic-int8",
        "dynamic; every weight MatMul and Gemm, heads included (the earlier default)",
        heads=True,
    ),
    Int8Variant("dynamic-encoder", "dynamic-int8", "dynamic; encoder weight MatMuls, heads fp32"),
    Int8Variant(
        "dynamic-encoder-ffn-out-fp32",
        "dynamic-int8",
        "dynamic; encoder weight MatMuls but the FFN output projections, heads fp32",
        ffn_out=False,
    ),
    Int8Variant(
        "static-qdq-encoder",
        "static-int8-qdq",
        "static QDQ, activations calibrated on training texts; encoder weight MatMuls, heads fp32",
    ),
)


def int8_nodes(proto: Any, variant: Int8Variant) -> list[str]:
    """Names of the weight MatMul/Gemm nodes `variant` quantizes (attention's activation x
    activation MatMuls never: they have no weights; a private ensemble's stacked [K, in, out]
    weights neither: onnxruntime's int8 MatMul takes only a 2-D weight, and refuses the
    quantized node at run time)."""
    weights = {i.name for i in proto.graph.initializer if len(i.dims) == 2}
    producers = {out: node.op_type for node in proto.graph.node for out in node.output}
    heads = head_nodes(proto)
    names = []
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in weights:
            continue
        if node.name in heads and not variant.heads:
            continue
        if not variant.ffn_out and producers.get(node.input[0]) == "Gelu":
            continue
        names.append(node.name)
    return names


def quantize_int8(
    src: Path,
    dst: Path,
    variant: Int8Variant = INT8_VARIANTS[0],
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Quantize `src` to int8 as `variant` says, into `dst`.

    Measured on a six-task MiniLM run (dev accuracy, points lost, average over tasks): the
    quantizer's defaults (per-tensor scales, embedding Gather quantized too) lost 1.6;
    per-channel scales with the embedding lookups left in fp32 lost 0.2. A lookup does no
    arithmetic, so quantizing it saves memory but no time.

    Args:
        src: The fp32 graph.
        dst: Where the int8 graph goes.
        variant: Which weights, dynamic or static.
        calibration: For a static variant: input_ids and attention_mask [n, L] of training
            texts (padded), run in batches of 16 to calibrate the activation scales.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    proto = onnx.load(str(src))
    # The dynamo exporter's value_info carries shapes the quantizer's type inference trips
    # over; without it (and with float as the default tensor type) quantization succeeds.
    del proto.graph.value_info[:]
    unshare_gemm_weights(proto)
    nodes = int8_nodes(proto, variant)
    options = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    # The quantizer logs a line per tensor at INFO through the root logger.
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.INFO))
    try:
        if variant.method == "dynamic-int8":
            quantize_dynamic(
                proto,
                str(dst),
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=nodes,
                per_channel=True,
                weight_type=QuantType.QInt8,
                extra_options=options,
            )
        else:
            if calibration is None:
                raise ExportError(f"int8 variant {variant.name}: needs calibration texts")
            quantize_static(
                proto,
                str(dst),
                _CalibrationReader(*calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=nodes,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options=options,
            )
    finally:
        logging.disable(previous)


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader over padded token batches of 16 texts."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, batch: int = 16) -> None:
        self._batches = iter(
            [
                {INPUT_NAMES[0]: ids[i : i + batch], INPUT_NAMES[1]: mask[i : i + batch]}
                for i in range(0, len(ids), batch)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def unshare_gemm_weights(proto: Any) -> int:
    """Give every Gemm node a weight initializer of its own.

    The shared module B runs once per task, so its Linear layers become k Gemm nodes reading
    the same weights. onnxruntime's quantizer rewrites Gemm(transB=1) as MatMul by transposing
    the weight initializer in place, once per node: a shared weight is transposed k times and
    the int8 graph fails to load ("Incompatible dimensions for matrix multiplication"). Copies
    cost (k - 1) x |B| bytes, small next to the encoder.

    Returns:
        The number of copies made.
    """
    import onnx

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    copies = 0
    for index, node in enumerate(graph.node):
        if node.op_type != "Gemm" or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight in initializers and uses[weight] > 1:
            uses[weight] -= 1  # the last consumer keeps the original
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[weight])
            copy.name = f"{weight}.copy{index}"
            graph.initializer.append(copy)
            node.input[1] = copy.name
            copies += 1
    return copies


def quantization_decision(
    fp32: dict[str, float], int8: dict[str, float], max_drop: float
) -> QuantizationReport:
    """Keep int8 only if no task's accuracy (percent) drops by more than `max_drop` points."""
    tasks = {
        t: QuantizedTask(fp32_accuracy=fp32[t], int8_accuracy=int8[t], drop=fp32[t] - int8[t])
        for t in fp32
    }
    kept = all(q.drop <= max_drop for q in tasks.values())
    return QuantizationReport(max_drop_allowed=max_drop, kept=kept, tasks=tasks)


def _score(
    runtime: Runtime, dev: dict[str, tuple[list[str], np.ndarray]]
) -> tuple[dict[str, float], float]:
    """Per-task dev accuracy (percent) of an artifact run as served, and its texts/s over all
    dev texts (every task's logits come from one pass, so each text is run once)."""
    texts = [t for task_texts, _ in dev.values() for t in task_texts]
    step = time.monotonic()
    out = runtime.run(texts)
    speed = len(texts) / max(time.monotonic() - step, 1e-9)
    accuracy: dict[str, float] = {}
    start = 0
    for task, (task_texts, labels) in dev.items():
        probs = out.probabilities[task][start : start + len(task_texts)]
        start += len(task_texts)
        # Percent, as in pipeline.metrics and the run's dev metrics.
        accuracy[task] = (
            100.0 * float(np.mean(probs.argmax(axis=-1) == labels)) if len(task_texts) else 0.0
        )
    return accuracy, speed


def quantize_if_accurate(
    artifact_dir: Path,
    dev: dict[str, tuple[list[str], np.ndarray]],
    max_drop: float,
    calibration_texts: list[str] | None = None,
    variants: tuple[Int8Variant, ...] = INT8_VARIANTS,
    min_speedup: float = 1.0,
) -> QuantizationReport:
    """Try each int8 variant and replace the artifact's model.onnx by the fastest that passes
    the accuracy gate, if it is faster than fp32 (by `min_speedup`).

    Every graph is scored as the service would run it: as an artifact directory loaded by
    `serving.runtime.Runtime` (each int8 one a candidate copy with the same tokenizer and
    metadata, removed afterwards), on every task's dev texts; the speed is texts/s over them.

    Args:
        artifact_dir: A complete fp32 artifact; its model.onnx is replaced by the kept variant.
        dev: Per task, dev texts and their label indices.
        max_drop: Largest dev accuracy drop (points) allowed on any task.
        calibration_texts: Training texts for static variants (skipped without them).
        variants: The variants to try.
        min_speedup: A passing variant is kept only if at least this many times as fast as
            fp32.

    Returns:
        Per variant, per-task fp32 and int8 dev accuracy and speed; which variant was kept.
    """
    onnx_path = artifact_dir / ONNX_FILE
    meta = ArtifactMetadata.read(artifact_dir)
    fp32_runtime = Runtime(artifact_dir)
    fp32_accuracy, fp32_speed = _score(fp32_runtime, dev)
    calibration = None
    if calibration_texts:
        enc = fp32_runtime.tokenizer.encode_batch(calibration_texts[:CALIBRATION_TEXTS])
        calibration = pad_batch([e.ids for e in enc], fp32_runtime.pad_id)
    tried: list[QuantizedVariant] = []
    candidates: list[tuple[Path, QuantizedVariant]] = []
    best: tuple[float, Path, QuantizedVariant] | None = None
    work = artifact_dir / ".int8"
    work.mkdir()
    try:
        for variant in variants:
            if variant.method != "dynamic-int8" and calibration is None:
                continue
            candidate = work / variant.name
            candidate.mkdir()
            report = QuantizedVariant(
                name=variant.name,
                method=variant.method,
                description=variant.description,
                passed=False,
                fp32_texts_per_s=fp32_speed,
            )
            step = time.monotonic()
            try:
                quantize_int8(onnx_path, candidate / ONNX_FILE, variant, calibration)
                shutil.copyfile(artifact_dir / TOKENIZER_FILE, candidate / TOKENIZER_FILE)
                meta.model_copy(update={"precision": "int8"}).write(candidate)
                accuracy, speed = _score(Runtime(candidate), dev)
            except Exception as err:  # the quantizer raises many types; record and go on
                logger.warning(
                    "int8 variant %s failed: %s: %s", variant.name, type(err).__name__, err
                )
                tried.append(report.model_copy(update={"error": f"{type(err).__name__}: {err}"}))
                continue
            decision = quantization_decision(fp32_accuracy, accuracy, max_drop)
            report = report.model_copy(
                update={"passed": decision.kept, "tasks": decision.tasks, "texts_per_s": speed}
            )
            tried.append(report)
            candidates.append((candidate / ONNX_FILE, report))
            worst = max(decision.tasks.items(), key=lambda kv: kv[1].drop)
            logger.info(
                "int8 %s: %s (worst %s, %.2f points lost), %.0f texts/s vs fp32 %.0f, built "
                "and scored in %.0fs",
                variant.name,
                "passes" if decision.kept else "refused",
                worst[0],
                worst[1].drop,  # fp32 minus int8, as the table and metadata.json give it
                speed,
                fp32_speed,
                time.monotonic() - step,
            )
        # fp32 once more, after the variants: the machine's load moves during the run, and the
        # faster of the two fp32 passes is what a variant must beat.
        fp32_speed = max(fp32_speed, _score(fp32_runtime, dev)[1])
        tried = [v.model_copy(update={"fp32_texts_per_s": fp32_speed}) for v in tried]
        for path, report in candidates:
            speed = report.texts_per_s or 0.0
            fast = speed >= min_speedup * fp32_speed
            if report.passed and fast and (best is None or speed > best[0]):
                best = (speed, path, report.model_copy(update={"fp32_texts_per_s": fp32_speed}))
        if best is not None:
            best[1].replace(onnx_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if best is not None:
        kept = best[2]
        return QuantizationReport(
            method=kept.method,
            max_drop_allowed=max_drop,
            kept=True,
            tasks=kept.tasks,
            variant=kept.name,
            variants=tried,
        )
    scored = [v for v in tried if v.tasks]
    closest = min(scored, key=lambda v: max(q.drop for q in v.tasks.values()), default=None)
    logger.warning(
        "int8 not kept (no variant passes the gate and is faster than fp32); keeping fp32"
    )
    return QuantizationReport(
        method=closest.method if closest else "dynamic-int8",
        max_drop_allowed=max_drop,
        kept=False,
        tasks=closest.tasks if closest else {},
        variants=tried,
    )


def format_quantization(report: QuantizationReport) -> str:
    """Per variant: speed against fp32 and per-task dev accuracy drop; then the verdict."""
    lines = []
    if report.variants:
        tasks = list(next((v.tasks for v in report.variants if v.tasks), report.tasks))
        lines.append(
            f"{'variant':<30} {'texts/s':>8} {'x fp32':>7} "
            + " ".join(f"{t:>7}" for t in tasks)
            + "  (dev points lost per task)"
        )
        for v in report.variants:
            if v.error:
                lines.append(f"{v.name:<30} failed: {v.error[:80]}")
                continue
            ratio = (v.texts_per_s or 0) / (v.fp32_texts_per_s or 1)
            drops = " ".join(f"{v.tasks[t].drop:>7.2f}" for t in tasks)
            mark = "pass" if v.passed else "fail"
            lines.append(f"{v.name:<30} {v.texts_per_s or 0:>8.1f} {ratio:>6.2f}x {drops}  {mark}")
    lines.append(f"{'task':<12} {'fp32':>8} {'int8':>8} {'drop':>8}")
    for task, q in report.tasks.items():
        lines.append(f"{task:<12} {q.fp32_accuracy:>8.2f} {q.int8_accuracy:>8.2f} {q.drop:>8.2f}")
    verdict = f"kept ({report.variant})" if report.kept else "not kept (fp32 exported)"
    lines.append(f"int8 {verdict}: max drop allowed {report.max_drop_allowed:.2f} points")
    return "\n".join(lines)


# --------------------------------------------------------------------------- model store
def lineage_text(metadata: ArtifactMetadata) -> str | None:
    """`<parent run> +added -removed`, None for a model trained from scratch."""
    lin = metadata.lineage
    if lin is None:
        return None
    return " ".join(
        [lin.parent_run, *(f"+{t}" for t in lin.added), *(f"-{t}" for t in lin.removed)]
    )


def _check_plain_tree(root: Path) -> None:
    """Raise ExportError naming the first entry under `root` that is a symbolic link or
    anything but a regular file or directory (a FIFO would block the copy, a link would copy
    what it points to, possibly from outside the artifact, into the store)."""
    pending = [root]
    while pending:
        for entry in sorted(pending.pop().iterdir()):
            if entry.is_symlink():
                raise ExportError(
                    f"{entry}: a symbolic link (to {entry.readlink()}); an artifact holds only "
                    f"regular files and directories, and nothing outside it is copied into the "
                    f"model store"
                )
            if entry.is_dir():
                pending.append(entry)
            elif not entry.is_file():
                raise ExportError(
                    f"{entry}: not a regular file or directory; an artifact holds only those"
                )


# BentoML's temporary directory for a new version (bentoml/_internal/models/model.py,
# `Model.create`: tempfile.mkdtemp(prefix=f"bentoml-model-{name}-")), and the marker that a
# registration of this module puts beside it while it runs.
_BENTOML_TEMP = re.compile(r"bentoml-model-[-._a-z0-9]+-[a-z0-9_]{8}")
_BENTOML_MARKER = re.compile(r"\.polytask-register-(?P<temp>.+)\.lock")


@contextlib.contextmanager
def _bentoml_temp_marker(temp: Path) -> Iterator[None]:
    """Keep `.polytask-register-<temp name>.lock` beside BentoML's temporary directory `temp`,
    flock-ed for the duration (the kernel releases it when this process dies, even by
    SIGKILL). The marker is created and locked under another name and renamed into place, so
    it is never seen unlocked while its registration lives. Best effort: without a marker
    (an unexpected name, a full disk), the directory is simply never cleaned by us."""
    import fcntl

    if not _BENTOML_TEMP.fullmatch(temp.name):
        yield
        return
    marker = temp.with_name(f".polytask-register-{temp.name}.lock")
    pending = temp.with_name(f".polytask-register-{temp.name}.{uuid.uuid4().hex[:8]}.pending")
    try:
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        logger.debug("%s: no marker (%s)", temp, err)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else has it
        pending.rename(marker)
    except OSError as err:
        logger.debug("%s: no marker (%s)", temp, err)
        pending.unlink(missing_ok=True)
        os.close(fd)
        yield
        return
    try:
        yield
    finally:
        try:
            if _is_at(fd, marker):
                marker.unlink()
        finally:
            os.close(fd)


def remove_stale_bentoml_temporaries(tmp_dir: Path | None = None) -> list[Path]:
    """Remove BentoML's temporary copies of versions whose registration was killed (a full
    artifact each, ~100 MB, in tempfile.gettempdir()).

    Only directories named by a marker of `_bentoml_temp_marker` whose lock is free, that is
    whose registration no longer runs, are removed, with the marker, and only if they are
    `bentoml-model-*` directories of this user; nothing else in the directory is touched (other
    processes' temporary directories, unmarked ones, markers that are held).

    Args:
        tmp_dir: Where to look; default tempfile.gettempdir(), where BentoML puts them.

    Returns:
        The directories removed.
    """
    import fcntl

    tmp_dir = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
    removed = []
    try:
        names = [
            m
            for m in map(_BENTOML_MARKER.fullmatch, os.listdir(tmp_dir))
            if m and _BENTOML_TEMP.fullmatch(m["temp"])
        ]
    except OSError:
        return removed
    for match in names:
        marker = tmp_dir / match.string
        try:
            fd = os.open(marker, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or another user's
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its registration is running
            if not _is_at(fd, marker):
                continue  # removed by another cleaner as we locked it
            temp = tmp_dir / match["temp"]
            try:
                info = temp.lstat()
            except FileNotFoundError:
                info = None
            if info is not None:
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                    continue
                size = _tree_size(temp)
                try:
                    shutil.rmtree(temp)
                except OSError as err:
                    logger.warning("could not remove %s: %s", temp, err)
                    continue
                removed.append(temp)
                logger.warning(
                    "removed %s (%.1f MB), BentoML's copy of a model version whose "
                    "registration did not finish",
                    temp,
                    size / 1e6,
                )
            marker.unlink()
        finally:
            os.close(fd)
    return removed


def register_artifact(
    artifact_dir: Path, model_name: str | None = None, candidate: bool = False
) -> str:
    """Copy an artifact directory into the BentoML model store as a new version.

    The store is `$BENTOML_HOME/models` (default `~/bentoml/models`); BentoML reads
    BENTOML_HOME once per process, when the store is first used.

    Args:
        artifact_dir: A directory written by `write_artifact`.
        model_name: Name in the store; default the metadata's `model_name`. The stored copy's
            metadata.json carries the name it is registered under.
        candidate: Label the version `stage=candidate` (the retraining job's challenger before
            its gate): never served as the latest version nor as a fallback; promotion
            replaces the label. Without it (`polytask export`), the version is served as the
            latest when nothing is promoted.

    Returns:
        The tag, `name:version`.

    Raises:
        ExportError: the directory holds a symbolic link or something other than regular
            files and directories (named in the message), or an export of it is running.
    """
    artifact_dir = Path(artifact_dir)
    # Locked so that no export replaces the artifact while it is copied; optional, so that a
    # read-only artifact directory (which no export can be writing) can still be registered.
    with artifact_lock(artifact_dir, optional=True):
        return _register_artifact(artifact_dir, model_name, candidate)


def _register_artifact(
    artifact_dir: Path, model_name: str | None, candidate: bool, owner: str | None = None
) -> str:
    """`register_artifact`, for a caller that holds `artifact_lock(artifact_dir)`; `owner`
    labels a candidate with its retraining job's token (`export_run`)."""
    import bentoml

    from serving.model_store import CANDIDATE_LABEL, CANDIDATE_OWNER_LABEL

    metadata = ArtifactMetadata.read(artifact_dir)
    _check_plain_tree(artifact_dir)
    name = model_name or metadata.model_name
    check_model_name(name)
    renamed = name != metadata.model_name
    if renamed:
        metadata = metadata.model_copy(update={"model_name": name})
    remove_stale_bentoml_temporaries()
    with (
        contextlib.ExitStack() as stack,
        bentoml.models.create(
            name,
            labels={
                "run_id": metadata.run_id,
                "precision": metadata.precision,
                "polytask_version": metadata.polytask_version,
                **({CANDIDATE_LABEL[0]: CANDIDATE_LABEL[1]} if candidate else {}),
                **({CANDIDATE_OWNER_LABEL: owner} if candidate and owner else {}),
            },
            # Small, for `bentoml models get`; the full record is metadata.json inside the model.
            metadata={
                "tasks": metadata.task_names,
                "encoder": metadata.encoder.name,
                "max_length": metadata.encoder.max_length,
                "dev_macro_accuracy": metadata.dev_macro_accuracy,
                "parity_max_abs_diff": metadata.parity.max_abs_diff,
                "config_fingerprint": metadata.config_fingerprint,
                # add-task / remove-task: "<parent run> +new -old" (`polytask models list`)
                "lineage": lineage_text(metadata) or "",
            },
        ) as model,
    ):
        # BentoML builds the version in a temporary directory of its own (`bentoml-model-
        # <name>-*` under tempfile.gettempdir(), no way to choose it short of changing
        # tempfile.tempdir for the whole process) and copies it into the store on leaving this
        # block. A marker beside it, locked while this process lives, lets a later
        # registration remove it if this one is killed (`remove_stale_bentoml_temporaries`).
        stack.enter_context(_bentoml_temp_marker(Path(model.path)))
        stack.callback(shutil.rmtree, model.path, ignore_errors=True)  # before the marker goes
        # symlinks=True: a link that appeared since the check is copied as a link, never as
        # the file outside the artifact it points to.
        shutil.copytree(artifact_dir, model.path, dirs_exist_ok=True, symlinks=True)
        if renamed:
            metadata.write(Path(model.path))
    tag = str(model.tag)
    logger.info("registered %s in the BentoML model store", tag)
    return tag
