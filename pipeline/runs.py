"""The run directory: its one owner. Layout, the typed run record, and loading a finished run
back into a model (evaluation, affinity, export, retraining).

    <storage_path>/<run name>/          Ray's experiment directory (its checkpoint_* folders)
        run.json                        RunRecord, written by the training driver
        config.yaml                     the resolved config
        model/model.safetensors         the selected model (heads; the encoder when fine-tuned)
    <storage_path>/latest               -> the newest finished run
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.config import (
    MAX_RUN_NAME,
    RUN_NAME_PATTERN,
    RunConfig,
    config_to_dict,
    parse_config,
)
from pipeline.features import encoder_fingerprint
from pipeline.routing import RouteDecision

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
CONFIG_FILE = "config.yaml"
MODEL_DIR = "model"
MODEL_FILE = "model.safetensors"
LATEST = "latest"
SCHEMA_VERSION = 1


class RunNotFoundError(Exception):
    """The path is not a finished polytask run."""


class RunNameError(ValueError):
    """A run name that cannot name a new run directory; says which flag and why."""


def check_run_name(name: str, flag: str = "--run-name") -> None:
    """A run name is one plain directory name under storage_path: letters, digits, '_', '.'
    and '-' (not first), at most MAX_RUN_NAME characters, and not `latest` (the link to the
    newest run).

    Raises:
        RunNameError: naming `flag` and the rule broken.
    """
    if not re.fullmatch(RUN_NAME_PATTERN, name):
        raise RunNameError(
            f"{flag} {name!r}: a run name is one directory name: letters, digits, '_', '.' "
            "and '-', starting with a letter or digit (no '/', no '..')"
        )
    if len(name) > MAX_RUN_NAME:
        raise RunNameError(
            f"{flag}: a run name has at most {MAX_RUN_NAME} characters, got {len(name)}"
        )
    if name == LATEST:
        raise RunNameError(
            f"{flag} {LATEST!r}: reserved for the link to the newest run; choose another name"
        )


def check_new_run(storage: Path, name: str, flag: str = "--run-name") -> None:
    """Before any work: `name` is a valid run name (`check_run_name`), no run directory of that
    name exists under `storage` (it would be overwritten), and `<storage>/latest` is a link or
    absent (a real directory there could not be replaced at the end of the run).

    Raises:
        RunNameError: naming `flag` (or `latest`) and the path.
    """
    check_run_name(name, flag)
    target = Path(storage) / name
    if target.exists() or target.is_symlink():
        raise RunNameError(
            f"{flag} {name!r}: {target} already exists; choose another run name (a run is "
            "never overwritten)"
        )
    link = Path(storage) / LATEST
    if link.exists() and not link.is_symlink():
        raise RunNameError(
            f"{link} is not a link but a real {'directory' if link.is_dir() else 'file'}; "
            f"it is where the link to the newest run goes: move it away first"
        )


class _Record(BaseModel):
    # Unknown keys of newer writers are ignored rather than fatal to older readers.
    model_config = ConfigDict(extra="ignore")


class TaskRecord(_Record):
    labels: list[str]  # index order of the model's outputs
    n_train: int
    n_dev: int
    data_fingerprint: str  # sha256 of the task's split files and task config


class EncoderRecord(_Record):
    path: str
    fingerprint: str
    dim: int
    max_length: int
    pooling: str
    trainable_layers: int | Literal["all"] = 0
    cached_layers: int = 0  # bottom blocks whose token states training read from the cache

    @property
    def fine_tuned(self) -> bool:
        return self.trainable_layers != 0


class StageRecord(_Record):
    """What each stage did for one task (dev accuracy, %)."""

    joint: float | None  # best stage-1 epoch
    joint_best_epoch: int | None
    align_best: float | None  # best stage-2 epoch
    final: float | None  # the selected model
    alignment_kept: bool
    route: RouteDecision | None = None  # its path and the dev evidence (routing on)
    # The shared path as selected (stage-1 epoch, stage-2 R_i), that selection made on one half
    # of dev and scored on the other (pipeline/selection.py); None in runs without the record.
    selection_crossfit: float | None = None


class LineageRecord(_Record):
    """How an incremental run was made from its parent (`polytask add-task` / `remove-task`,
    pipeline/incremental.py): every parameter of the parent's kept tasks is copied unchanged."""

    parent: str  # the parent run's name
    parent_dir: str  # the parent's run directory when this run was written
    added: list[str] = []  # tasks trained here against the parent's fixed encoder and B
    removed: list[str] = []  # tasks dropped here (no training)
    seconds: float | None = None  # wall time of the add/remove


class RunRecord(_Record):
    """run.json: everything needed to evaluate, export or compare the run later."""

    schema_version: int = SCHEMA_VERSION
    polytask_version: str
    run_name: str
    created: str
    tasks: dict[str, TaskRecord]
    task_weights: dict[str, float]
    encoder: EncoderRecord
    config: dict[str, Any]  # the resolved RunConfig as JSON (see `run_config`)
    dev: dict[str, dict[str, float | int]]  # per task: accuracy, macro_f1 (%), n
    dev_macro_accuracy: float
    dev_macro_f1: float
    stages: dict[str, StageRecord]
    resumed_from: str | None = None
    history: list[dict[str, Any]]  # every epoch of both stages plus "final"
    data_overlap: dict[str, Any] | None = None
    duration_seconds: float | None = None
    # Per task: the path that answers it and the evidence (pipeline/routing.py); None for runs
    # without routing, whose weights hold no private heads.
    routing: dict[str, RouteDecision] | None = None
    lineage: LineageRecord | None = None  # set on runs made by add-task / remove-task

    @property
    def labels(self) -> dict[str, list[str]]:
        return {t: v.labels for t, v in self.tasks.items()}

    def run_config(self, source: str = RUN_RECORD) -> RunConfig:
        return parse_config(stored_config(self.config), source)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def stored_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config as the code that trained it read it. A stored config is a full
    dump, so a setting it lacks is one added after the run: where the new default changes what
    the weights are, the old behaviour is filled in here."""
    routing = config.get("routing")
    private = routing.get("private") if isinstance(routing, dict) else None
    if isinstance(private, dict) and "members" not in private:
        # Runs before `routing.private.members` trained one private MLP per task.
        config = {**config, "routing": {**routing, "private": {**private, "members": 1}}}
    return config


def record_path(run_dir: Path) -> Path:
    return Path(run_dir) / RUN_RECORD


def model_path(run_dir: Path) -> Path:
    """The selected model's weights."""
    return Path(run_dir) / MODEL_DIR / MODEL_FILE


def write_run(run_dir: Path, record: RunRecord, config: RunConfig) -> None:
    """Write run.json and config.yaml (the model is copied in by the driver first)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path(run_dir).write_text(json.dumps(record.to_json(), indent=1))
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def point_latest(storage: Path, run_dir: Path) -> None:
    """`<storage>/latest` -> the newest finished run (replaced atomically)."""
    link = storage / LATEST
    if link.exists() and not link.is_symlink():
        raise RunNameError(
            f"{link} is a real {'directory' if link.is_dir() else 'file'}, not the link to the "
            f"newest run; the run is in {run_dir}"
        )
    tmp = storage / f".latest-{uuid.uuid4().hex[:8]}"
    tmp.symlink_to(run_dir.name)
    try:
        tmp.replace(link)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class LoadedRun:
    run_dir: Path
    record: RunRecord
    config: RunConfig
    model: Any  # pipeline.model.MultiTaskModel, in eval mode

    @property
    def labels(self) -> dict[str, list[str]]:
        return self.record.labels


def read_record(run_dir: Path) -> RunRecord:
    path = record_path(run_dir)
    if not path.is_file():
        raise RunNotFoundError(
            f"{run_dir}: not a finished run (no {RUN_RECORD}); `polytask train` prints the run "
            "directory when it finishes"
        )
    try:
        return RunRecord.model_validate_json(path.read_bytes())
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RunNotFoundError(
            f"{path}: not a readable run record ({where + ': ' if where else ''}{first['msg']}; "
            f"{err.error_count()} problem(s))"
        ) from None
    except OSError as err:
        raise RunNotFoundError(f"{path}: cannot read: {err.strerror or err}") from None


def add_own_paths(encoder: Any, heads: Any, record: RunRecord, config: RunConfig) -> None:
    """The modules of the tasks routed to their own path (routing.own), in task order (the
    features' column order), shaped for the stored weights to load into."""
    from pipeline.model import private_head

    routing = record.routing or {}
    pcfg = config.routing.private
    for task in config.task_names:
        decision = routing.get(task)
        if decision is None or decision.path != "own" or decision.own is None:
            continue
        encoder.add_own_blocks(task, encoder.pretrained_top_blocks(decision.own.layers))
        heads.add_own_head(
            task,
            private_head(
                encoder.dim,
                len(record.tasks[task].labels),
                pcfg.hidden_sizes,
                pcfg.dropout,
                pcfg.members,
            ),
        )


def load_run(run_dir: str | Path) -> LoadedRun:
    """The run's MultiTaskModel (encoder + selected heads) and its record.

    A frozen-encoder run refers to its encoder by path; the encoder's fingerprint is checked so
    a changed encoder directory is an error, not silently different predictions.
    """
    from pipeline.model import MultiTaskModel, build_heads, load_encoder
    from pipeline.train.checkpoint import load_tensors

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    config = record.run_config(str(record_path(run_dir)))
    enc = record.encoder
    if not Path(enc.path).exists():
        raise RunNotFoundError(f"{run_dir}: the run's encoder is missing: {enc.path}")
    if encoder_fingerprint(enc.path) != enc.fingerprint:
        raise RunNotFoundError(
            f"{run_dir}: the encoder at {enc.path} changed since training (fingerprint "
            "mismatch); evaluate with the encoder the run was trained on"
        )
    encoder = load_encoder(enc.path, enc.pooling)
    if record.routing is not None:  # the private heads' extra pooled blocks, if any
        encoder.set_pooled_layers(config.pooled_layers)
    heads = build_heads(
        enc.dim,
        {t: len(v.labels) for t, v in record.tasks.items()},
        config.shared,
        config.towers,
        config.aux,
        config.routing.private if record.routing is not None else None,
    )
    for task, decision in (record.routing or {}).items():
        heads.routes[task] = decision.path
    add_own_paths(encoder, heads, record, config)
    model = MultiTaskModel(encoder, heads)
    state = load_tensors(model_path(run_dir))
    # Frozen runs store only the heads; the encoder weights are the pretrained ones.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("encoder.") for k in missing):
        raise RunNotFoundError(
            f"{run_dir}: model weights do not match the run's config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if enc.fine_tuned and missing:
        raise RunNotFoundError(f"{run_dir}: the fine-tuned encoder's weights are missing")
    model.eval()
    return LoadedRun(run_dir=run_dir, record=record, config=config, model=model)
