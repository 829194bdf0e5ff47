"""Add or remove a task without retraining the others (issue 14).

    add-task:    parent run -> its encoder E, shared module B, standardization, every task's
                 R_i / A_i, all fixed -> the new task's features (cached pooled features of a
                 frozen E; E's own features when it was fine-tuned) -> train A_new (+ a_new)
                 against fixed B with R_new = I, then Algorithm 1 (R_new, A_new) when the
                 parent's config aligns -> a new run whose tensors are the parent's, copied
                 unchanged, plus the new task's
    remove-task: parent run -> the same tensors without the task's -> a new run (no training)

Both write a new run directory whose record (`pipeline.runs.RunRecord.lineage`) names its
parent and what was added or removed. Export (`pipeline.export`) then checks on a probe set
that every kept task's logits equal the parent's (`check_parent_parity`), and the promotion
gate judges only the changed tasks when that check holds and the champion is the parent
(`unchanged_tasks`).

Why the parent's tasks stay bit-identical: their parameters are never handed to an optimizer
(requires_grad is off for everything but the new task's modules) and the child's weights file
is the parent's tensors copied as they are, plus new keys; `add_tasks` verifies it.

Why no Ray: the new task's modules are a few small matrices trained on cached [n, d]
features, seconds of work on one core; Ray's start-up (~40 s here) and a worker process would
cost more than the training, so it runs in-process, reusing the loop's epoch and step code
(`pipeline.train.loop`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import RunConfig, TaskConfig, config_to_dict, parse_config
from pipeline.runs import (
    MODEL_DIR,
    LineageRecord,
    RunRecord,
    StageRecord,
    TaskRecord,
    check_new_run,
    load_run,
    model_path,
    point_latest,
    read_record,
    write_run,
)

if TYPE_CHECKING:
    import torch

    from pipeline.runs import LoadedRun
    from serving.artifact import ArtifactMetadata, LineageInfo
    from serving.runtime import Runtime

logger = logging.getLogger(__name__)

PROBE_BATCH = 8  # rows per probe shape of the parent-parity check
PROBE_LENGTHS = (5, 16, 64)  # its sequence lengths, each padded and unpadded
# Algorithm 1 for a new task. B never saw the new task, so R_new (d x d, before B) must carry
# most of the fit, unlike R_i of a task B was trained on (whose alignment only fine-tunes):
# more epochs and a 10x higher learning rate than the config's stage 2. Chosen on dev: TREC
# added to the five other SentEval tasks reached 57.3 with A_new alone, 76.9 after the
# config's stage 2 (3 epochs, lr 1e-4), 86.3 with these settings (docs/results.md).
ALIGN_EPOCHS = 10
ALIGN_LR = 1e-3


class IncrementalError(ValueError):
    """add-task / remove-task cannot proceed; the message says why (the CLI prints it)."""


@dataclass
class IncrementalResult:
    """What `add_tasks` / `remove_tasks` wrote."""

    run_dir: Path
    record: RunRecord
    seconds: float


# ---------------------------------------------------------------------------- naming helpers
def child_run_name(parent: str, added: Sequence[str], removed: Sequence[str]) -> str:
    """`<parent>+trec-<6 hex>` / `<parent>-trec-<6 hex>`: readable and unique."""
    import uuid

    change = "".join(f"+{t}" for t in added) + "".join(f"-{t}" for t in removed)
    base = parent[:80]
    return f"{base}{change}-{uuid.uuid4().hex[:6]}"


def per_task_containers(heads: Any) -> list[str]:
    """Names of the heads' per-task containers (alignment, towers, aux, and whatever a later
    path adds, e.g. routing's private heads): the ModuleDict/ParameterDict children keyed by
    task names."""
    from torch import nn

    tasks = set(heads.tasks)
    return [
        name
        for name, child in heads.named_children()
        if isinstance(child, nn.ModuleDict | nn.ParameterDict)
        and len(child) > 0
        and set(child.keys()) <= tasks
    ]


def task_keys(state: dict[str, Any], containers: Sequence[str], task: str) -> list[str]:
    """The weights-file keys of one task's modules: `heads.<container>.<task>[.…]`."""
    out = []
    for key in state:
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] == "heads" and parts[1] in containers and parts[2] == task:
            out.append(key)
    return out


# ------------------------------------------------------------------------------ task configs
def new_task_config(
    name: str,
    data_dir: str | Path | None = None,
    train: str | Path | None = None,
    dev: str | Path | None = None,
    format: str | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    labels: Sequence[str] | None = None,
) -> TaskConfig:
    """A `tasks` entry from command-line fields. Relative file paths are taken from the
    current directory; with none, the data is `<data_dir or parent's data_root>/<name>`."""
    raw: dict[str, Any] = {"name": name}
    if data_dir is not None:
        raw["data_dir"] = str(Path(data_dir).expanduser().resolve() / name)
    for key, path in (("train", train), ("dev", dev)):
        if path is not None:
            raw[key] = str(Path(path).expanduser().resolve())
    for key, value in (
        ("format", format),
        ("text_field", text_field),
        ("label_field", label_field),
    ):
        if value is not None:
            raw[key] = value
    if labels is not None:
        raw["labels"] = list(labels)
    try:
        return TaskConfig.model_validate(raw)
    except Exception as err:  # pydantic's ValidationError: one line per problem
        raise IncrementalError(f"--task {name}: {err}") from None


def tasks_from_config(path: str | Path, parent: RunRecord) -> list[TaskConfig]:
    """The tasks of a config file that the parent lacks (its paths resolved as `polytask
    train` resolves them)."""
    from pipeline.config import load_config

    config = load_config(path)
    new = [t for t in config.tasks if t.name not in parent.tasks]
    if not new:
        raise IncrementalError(
            f"{path}: every task it names is already in run {parent.run_name} "
            f"({', '.join(parent.tasks)}); nothing to add"
        )
    return absolute_entries(new, config.data_root)


def absolute_entries(tasks: Sequence[TaskConfig], root: Path | None) -> list[TaskConfig]:
    """The entries with their data paths made absolute against `root`: the child's config
    keeps the parent's data_root, which may differ from the one these were written for."""
    out = []
    for t in tasks:
        update: dict[str, Any] = {}
        if t.train is None or t.dev is None:
            base = t.data_dir if t.data_dir is not None else Path(t.name)
            update["data_dir"] = base if base.is_absolute() or root is None else root / base
        for key in ("train", "dev"):
            value = getattr(t, key)
            if value is not None and not value.is_absolute() and root is not None:
                update[key] = root / value
        out.append(t.model_copy(update=update))
    return out


# ------------------------------------------------------------------------------- add-task
def add_tasks(
    parent_dir: str | Path,
    tasks: Sequence[TaskConfig],
    run_name: str | None = None,
    seed: int | None = None,
    epochs: int | None = None,
    align_epochs: int | None = None,
    align_lr: float | None = None,
) -> IncrementalResult:
    """Train only the new tasks' modules against the parent's fixed encoder and shared module,
    and write a new run recording its parent.

    Args:
        parent_dir: A finished run directory.
        tasks: The new tasks (`tasks` entries of a config).
        run_name: Default `<parent>+<task>-<hex>`.
        seed: Default the parent config's `train.seed`.
        epochs: Stage-1 epochs for the new heads; default the parent config's `train.epochs`.
        align_epochs: Stage-2 (Algorithm 1: R_new and A_new) epochs; 0 skips it. Default
            ALIGN_EPOCHS.
        align_lr: Stage-2 learning rate of R_new (A_new keeps `alignment.tower_lr`). Default
            ALIGN_LR.

    Returns:
        The new run's directory and record.

    Raises:
        RunNotFoundError: `parent_dir` is not a finished run (or its encoder changed).
        IncrementalError: a task already in the parent, or a duplicate name.
        DataError: the new task's data is missing or bad.
    """
    import torch

    from pipeline.data import fingerprint_files, load_tasks

    start = time.monotonic()
    parent_dir = Path(parent_dir)
    parent_record = read_record(parent_dir)  # RunNotFoundError first, before any loading
    names = [t.name for t in tasks]
    if not names:
        raise IncrementalError("add-task: no task given")
    dupes = sorted({n for n in names if names.count(n) > 1})
    present = [n for n in names if n in parent_record.tasks]
    if dupes or present:
        raise IncrementalError(
            f"add-task: task(s) {dupes or present} "
            + ("given twice" if dupes else f"already in run {parent_record.run_name}")
            + f" (it has {', '.join(parent_record.tasks)}); use remove-task first to replace one"
        )
    refuse_own_paths(parent_record, "add-task")
    if epochs is not None and epochs < 1:
        raise IncrementalError(f"add-task: epochs {epochs}; at least 1")
    if align_epochs is not None and align_epochs < 0:
        raise IncrementalError(f"add-task: align_epochs {align_epochs}; at least 0")
    if align_lr is not None and not (np.isfinite(align_lr) and align_lr > 0):
        raise IncrementalError(f"add-task: align_lr {align_lr}; a finite number > 0")
    parent = load_run(parent_dir)
    config = parent.config
    if run_name is not None:  # before the data and the training, as `train` checks it
        check_new_run(config.storage_path, run_name)
    child_config = parse_config(
        config_to_dict(config)
        | {"tasks": [t.model_dump(mode="json") for t in [*config.tasks, *tasks]]},
        "add-task",
    )
    if getattr(parent_record, "routing", None) is None:
        logger.info("the parent chose no routes: the new task(s) take the shared path (R, B, A)")

    new_config = config.model_copy(update={"tasks": list(tasks)})
    data = load_tasks(new_config)  # DataError names file and line
    feats = task_features(parent, data)
    seed = config.train.seed if seed is None else seed
    # Small matmuls on one core: intra-op threads only spin and wait on shared cores (one
    # thread trained TREC's heads in 16 s where the default two took 438 s on this machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained, history, stages = train_new_heads(
            parent,
            data,
            feats,
            seed,
            epochs,
            ALIGN_EPOCHS if align_epochs is None else align_epochs,
            ALIGN_LR if align_lr is None else align_lr,
        )
    finally:
        torch.set_num_threads(threads)

    # The child's weights: the parent's tensors as they are, plus the new tasks' modules.
    from pipeline.train.checkpoint import load_tensors

    parent_state = load_tensors(model_path(parent_dir))
    child_state = dict(parent_state)
    child_state.update(trained)
    for key, value in parent_state.items():
        if not torch.equal(child_state[key], value):  # cannot happen; guards the contract
            raise IncrementalError(f"add-task: parent tensor {key} changed")

    dev = {t: dict(m) for t, m in parent_record.dev.items()}
    dev.update(history[-1]["dev"])
    record = parent_record.model_copy(deep=True)
    run_name = run_name or child_run_name(parent_record.run_name, names, [])
    for i, t in enumerate(data):
        cfg = tasks[i]
        record.tasks[t.name] = TaskRecord(
            labels=t.labels,
            n_train=len(t.splits["train"]),
            n_dev=len(t.splits["dev"]),
            data_fingerprint=fingerprint_files(
                [s.path for s in t.splits.values()],
                extra=json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
            ),
        )
        # α weights a task's loss in joint training; a task trained alone has nothing to be
        # weighed against (its optimizer sees only its own loss): 1.
        record.task_weights[t.name] = 1.0
        record.stages[t.name] = stages[t.name]
        route = getattr(stages[t.name], "route", None)
        if route is not None:  # the parent routes its tasks: so does the child
            record.routing[t.name] = route
    seconds = round(time.monotonic() - start, 1)
    record = child_record(
        record,
        parent_dir,
        run_name,
        child_config,
        dev,
        seconds,
        added=names,
        history=[*parent_record.history, *history],
    )
    run_dir = _write_child(parent, run_name, record, child_config, child_state)
    logger.info(
        "add-task: %s added to %s in %.1fs (dev %s); run directory %s",
        ", ".join(names),
        parent_record.run_name,
        seconds,
        ", ".join(f"{t} {dev[t]['accuracy']:.2f}" for t in names),
        run_dir,
    )
    return IncrementalResult(run_dir=run_dir, record=record, seconds=seconds)


def add_tasks_to_promoted(
    config: RunConfig, model_name: str, run_name: str | None = None
) -> IncrementalResult:
    """`polytask retrain --add-tasks`: add the config's tasks that the promoted model of
    `model_name` lacks to that model's run (found as `<storage_path>/<its run id>`).

    Raises:
        IncrementalError: nothing promoted, its run is not under storage_path, or the config
            names no new task.
    """
    import bentoml

    from pipeline.jobs.models import promoted_tag
    from serving.artifact import ArtifactMetadata

    tag = promoted_tag(model_name)
    if tag is None:
        raise IncrementalError(
            f"retrain --add-tasks: no promoted version of {model_name} to add tasks to; run a "
            "full `polytask retrain` first"
        )
    meta = ArtifactMetadata.read(Path(bentoml.models.get(tag).path))
    parent_dir = Path(config.storage_path) / meta.run_id
    if not (parent_dir / "run.json").is_file():
        raise IncrementalError(
            f"retrain --add-tasks: the promoted model {tag} was exported from run {meta.run_id}, "
            f"which is not in {config.storage_path}; add tasks with `polytask add-task RUN`"
        )
    parent = read_record(parent_dir)
    new = [t for t in config.tasks if t.name not in parent.tasks]
    if not new:
        raise IncrementalError(
            f"retrain --add-tasks: the promoted model {tag} already answers every task of the "
            f"config ({', '.join(config.task_names)}); nothing to add"
        )
    entries = absolute_entries(new, config.data_root)
    logger.info(
        "retrain --add-tasks: adding %s to %s (%s)", [t.name for t in new], meta.run_id, tag
    )
    return add_tasks(parent_dir, entries, run_name=run_name)


def task_features(parent: LoadedRun, data: Sequence[Any]) -> dict[str, dict[str, np.ndarray]]:
    """Pooled features [n, d] of each new task's train and dev texts under the parent's encoder:
    the frozen-encoder feature cache (filled once per text, shared with `polytask train`), or,
    for a fine-tuned encoder, the run's own encoder run eagerly in length buckets."""
    from pipeline.features import FeatureCache, encode_texts, load_tokenizer

    enc = parent.record.encoder
    batch_size = parent.config.encoder.batch_size
    out: dict[str, dict[str, np.ndarray]] = {}
    if not enc.fine_tuned:
        cache = FeatureCache(
            parent.config.resolved_cache_dir(), enc.path, enc.max_length, enc.pooling
        )
        for t in data:
            out[t.name] = {
                s: cache.get(
                    t.splits[s].texts, desc=f"features {t.name}/{s}", batch_size=batch_size
                )
                for s in ("train", "dev")
            }
        return out
    # Fine-tuned: the parent's own encoder (its trained top layers), not the pretrained one.
    tokenizer = load_tokenizer(enc.path)
    encoder = parent.model.encoder.eval()
    for t in data:
        out[t.name] = {
            s: encode_texts(
                encoder,
                tokenizer,
                t.splits[s].texts,
                enc.max_length,
                batch_size,
                f"fine-tuned encoder features {t.name}/{s}",
            )
            for s in ("train", "dev")
        }
    return out


def train_new_heads(
    parent: LoadedRun,
    data: Sequence[Any],
    feats: dict[str, dict[str, np.ndarray]],
    seed: int,
    epochs: int | None = None,
    align_epochs: int = ALIGN_EPOCHS,
    align_lr: float = ALIGN_LR,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, StageRecord]]:
    """The new tasks' modules trained against the parent's fixed B (and standardization).

    Stage 1: A_new and a_new (self-auxiliary, when the model has them) under the loop's joint
    step, R_new = I, B fixed (B's dropout acts as in joint training; its weights get no
    update), `train.epochs` epochs with the parent's optimizer settings, the best dev epoch
    kept. Stage 2: Algorithm 1 for the new task (alternating A_new and R_new, B fixed;
    `align_epochs` at `align_lr`, see ALIGN_EPOCHS), kept only if dev improves (or always,
    when the config's `alignment.keep_only_if_better` is off), as the loop does. It runs even
    when the parent's config has no stage 2: R_new is what lets a B that never saw the new
    task serve it.

    Returns:
        The new tasks' tensors (weights-file keys), history entries, per-task stage records.
    """
    import torch

    from pipeline.model import build_heads
    from pipeline.train import sampler
    from pipeline.train.device import select_precision
    from pipeline.train.driver import loop_config
    from pipeline.train.loop import (
        Context,
        TaskTensors,
        TrainModule,
        alignment_epoch,
        evaluate,
        history_entry,
        joint_epoch,
        make_optimizer,
        make_scheduler,
    )

    config = parent.config
    parent_heads = parent.model.heads
    names = [t.name for t in data]
    num_classes = {t: len(v) for t, v in parent.labels.items()} | {
        t.name: t.num_classes for t in data
    }
    torch.manual_seed(seed)
    extra: dict[str, Any] = {}
    if len(getattr(parent_heads, "private", ())):  # routing's private heads (issue 13)
        extra["private"] = config.routing.private
    heads = build_heads(
        parent.record.encoder.dim, num_classes, config.shared, config.towers, config.aux, **extra
    )
    if hasattr(parent_heads, "routes"):  # the new tasks answer through the shared path
        heads.routes = {**parent_heads.routes, **dict.fromkeys(names, "shared")}
    # Every parent tensor (B, R_i, A_i, a_i, the standardization buffers) as trained.
    missing, unexpected = heads.load_state_dict(parent_heads.state_dict(), strict=False)
    containers = per_task_containers(heads)
    stray = [
        k for k in missing if k.split(".")[0] not in containers or k.split(".")[1] not in names
    ]
    if unexpected or stray:
        raise IncrementalError(
            f"add-task: the parent's heads do not fit its config (missing {stray[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    heads.requires_grad_(False)
    for t in names:
        heads.towers[t].requires_grad_(True)
        if t in heads.aux:
            heads.aux[t].requires_grad_(True)
    module = TrainModule(heads)
    device = torch.device("cpu")
    cfg = loop_config(config, parent.record.encoder.dim, None)
    tcfg = config.train.model_copy(
        update={"seed": seed, "epochs": config.train.epochs if epochs is None else epochs}
    )
    cfg = dataclasses.replace(cfg, train=tcfg)

    def split(t: Any, s: str) -> TaskTensors:
        return TaskTensors(
            {"features": torch.tensor(feats[t.name][s])}, torch.tensor(t.splits[s].labels)
        )

    ctx = Context(
        tasks=names,
        weights=dict.fromkeys(names, 1.0),
        train={t.name: split(t, "train") for t in data},
        dev={t.name: split(t, "dev") for t in data},
        cfg=cfg,
        rank=0,
        world_size=1,
        device=device,
        precision=select_precision(config.train.precision, "cpu", False),
        report=lambda metrics, checkpoint: None,
    )
    ocfg = config.optim
    probs = sampler.task_probabilities(ctx.sizes, config.sampler.kind, config.sampler.temperature)
    steps = sampler.steps_per_epoch(ctx.sizes, tcfg.batch_size, 1)
    optimizer = make_optimizer(module, ocfg)  # only the new towers require grad
    scheduler = make_scheduler(optimizer, ocfg, steps * tcfg.epochs)

    def new_state() -> dict[str, torch.Tensor]:
        state = module.state_dict()
        keys = [k for t in names for k in task_keys(state, containers, t)]
        return {k: state[k].detach().clone() for k in keys}

    history: list[dict[str, Any]] = []
    best_macro, bad, best, stage1_dev = -1.0, 0, new_state(), None
    for epoch in range(tcfg.epochs):
        t0 = time.monotonic()
        torch.manual_seed(seed * 100003 + epoch * 101)
        losses = joint_epoch(module, module, optimizer, scheduler, ctx, probs, steps, epoch)
        dev = evaluate(module, ctx)
        entry = history_entry("add-joint", epoch + 1, losses, dev, time.monotonic() - t0)
        history.append(entry)
        logger.info(
            "add-task joint epoch %d: %s",
            epoch + 1,
            " ".join(f"{t} {m['accuracy']:.2f}" for t, m in dev.items()),
        )
        if entry["dev_macro_accuracy"] > best_macro:
            best_macro, bad, best, stage1_dev = entry["dev_macro_accuracy"], 0, new_state(), dev
        else:
            bad += 1
            if tcfg.patience is not None and bad >= tcfg.patience:
                break
    module.load_state_dict(best, strict=False)
    assert stage1_dev is not None
    best_acc = {t: stage1_dev[t]["accuracy"] for t in names}
    align_best: dict[str, float | None] = dict.fromkeys(names)

    acfg = config.alignment
    if align_epochs > 0:
        for t in names:
            heads.alignment[t].requires_grad_(True)
        towers = [p for t in names for p in heads.towers[t].parameters()]
        tower_opt = torch.optim.Adam(towers, lr=acfg.tower_lr)
        align_opt = torch.optim.Adam([heads.alignment[t] for t in names], lr=align_lr)
        for epoch in range(align_epochs):
            t0 = time.monotonic()
            torch.manual_seed(seed * 100003 + 50000 + epoch * 101)
            losses = alignment_epoch(module, module, tower_opt, align_opt, ctx, probs, steps, epoch)
            dev = evaluate(module, ctx)
            history.append(
                history_entry("add-align", epoch + 1, losses, dev, time.monotonic() - t0)
            )
            current = new_state()
            for t in names:
                acc = dev[t]["accuracy"]
                align_best[t] = max(acc, align_best[t] or acc)
                if acc > best_acc[t] or not acfg.keep_only_if_better:
                    best_acc[t] = acc
                    best.update({k: current[k] for k in task_keys(current, containers, t)})
        module.load_state_dict(best, strict=False)
    final = served = evaluate(module, ctx)  # the shared path (every new task's route so far)
    routes: dict[str, Any] = {}
    if getattr(parent.record, "routing", None) is not None and len(heads.private):
        # The parent chose each task's path (issue 13): the new task gets the same choice.
        routes = route_new_tasks(heads, ctx, config.routing, seed)
        state = module.state_dict()
        best.update(
            {k: state[k].detach().clone() for t in names for k in task_keys(state, containers, t)}
        )
        served = evaluate(module, ctx)
    history.append(history_entry("add-final", 0, {}, served, 0.0))
    stages = {
        t: StageRecord(
            joint=stage1_dev[t]["accuracy"],
            joint_best_epoch=max(
                (h for h in history if h["stage"] == "add-joint"),
                key=lambda h: h["dev_macro_accuracy"],
            )["epoch"],
            align_best=align_best[t],
            final=final[t]["accuracy"],
            alignment_kept=final[t]["accuracy"] > stage1_dev[t]["accuracy"],
            route=routes.get(t),
        )
        for t in names
    }
    # TrainModule's keys (`heads.…`) are the run weights file's keys.
    return best, history, stages


def route_new_tasks(heads: Any, ctx: Any, rcfg: Any, seed: int) -> dict[str, Any]:
    """Fit each new task's private head and choose its path on dev, with pipeline/routing.py's
    rule, as the training loop's routing stage does; sets `heads.routes`. Returns the
    decisions (RouteDecision) by task."""
    from pipeline.routing import format_route, route_task

    def split(s: Any) -> tuple[Any, Any]:
        return s.inputs["features"].float(), s.labels

    out = {}
    for i, t in enumerate(ctx.tasks):
        out[t], _ = route_task(heads, t, split(ctx.train[t]), split(ctx.dev[t]), rcfg, seed, i)
        logger.info("route %s: %s", t, format_route(out[t]))
    return out


# ---------------------------------------------------------------------------- remove-task
def remove_tasks(
    parent_dir: str | Path, names: Sequence[str], run_name: str | None = None
) -> IncrementalResult:
    """A new run without `names`: the parent's tensors minus those tasks' (no training).

    Raises:
        RunNotFoundError: `parent_dir` is not a finished run.
        IncrementalError: an unknown task, or removing every task.
    """
    from pipeline.train.checkpoint import load_tensors

    start = time.monotonic()
    parent_dir = Path(parent_dir)
    parent_record = read_record(parent_dir)
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise IncrementalError(f"remove-task: task(s) {dupes} given twice")
    unknown = [n for n in names if n not in parent_record.tasks]
    if unknown:
        raise IncrementalError(
            f"remove-task: unknown task(s) {unknown}; run {parent_record.run_name} has "
            f"{', '.join(parent_record.tasks)}"
        )
    keep = [t for t in parent_record.tasks if t not in names]
    if not keep:
        raise IncrementalError("remove-task: a run needs at least one task; nothing would remain")
    refuse_own_paths(parent_record, "remove-task")
    parent = load_run(parent_dir)
    containers = per_task_containers(parent.model.heads)
    state = load_tensors(model_path(parent_dir))
    drop = {k for t in names for k in task_keys(state, containers, t)}
    child_state = {k: v for k, v in state.items() if k not in drop}
    config = parent.config
    raw = config_to_dict(config)
    # A removed task's teacher (distill.teachers) goes with it.
    raw["distill"]["teachers"] = {t: p for t, p in raw["distill"]["teachers"].items() if t in keep}
    child_config = parse_config(
        raw | {"tasks": [t.model_dump(mode="json") for t in config.tasks if t.name in keep]},
        "remove-task",
    )
    dev = {t: parent_record.dev[t] for t in keep}
    run_name = run_name or child_run_name(parent_record.run_name, [], list(names))
    seconds = round(time.monotonic() - start, 1)
    # Every per-task mapping of the record (tasks, weights, dev, stages, and any a later
    # feature adds, e.g. routing decisions) loses the removed tasks.
    per_task = {
        field: {t: v for t, v in value.items() if t in keep}
        for field, value in parent_record
        if isinstance(value, dict) and value and set(value) <= set(parent_record.tasks)
    }
    record = child_record(
        parent_record.model_copy(deep=True, update=per_task),
        parent_dir,
        run_name,
        child_config,
        dev,
        seconds,
        removed=list(names),
    )
    run_dir = _write_child(parent, run_name, record, child_config, child_state)
    logger.info(
        "remove-task: %s removed from %s; run directory %s",
        ", ".join(names),
        parent_record.run_name,
        run_dir,
    )
    return IncrementalResult(run_dir=run_dir, record=record, seconds=seconds)


# ------------------------------------------------------------------------------ shared steps
def child_record(
    record: RunRecord,
    parent_dir: Path,
    run_name: str,
    config: RunConfig,
    dev: dict[str, Any],
    seconds: float,
    added: Sequence[str] = (),
    removed: Sequence[str] = (),
    history: list[dict[str, Any]] | None = None,
) -> RunRecord:
    """`record` (the parent's, its per-task fields already edited) as the child run's: its
    name, config, dev metrics and macro averages, and the lineage back to the parent."""
    from pipeline.metrics import macro_average

    avg = macro_average(dev)
    update: dict[str, Any] = {
        "run_name": run_name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": config_to_dict(config),
        "dev": dev,
        "dev_macro_accuracy": avg["accuracy"],
        "dev_macro_f1": avg["macro_f1"],
        "resumed_from": None,
        "duration_seconds": seconds,
        "lineage": LineageRecord(
            parent=record.run_name,
            parent_dir=str(Path(parent_dir).resolve()),
            added=list(added),
            removed=list(removed),
            seconds=seconds,
        ),
    }
    if history is not None:
        update["history"] = history
    return record.model_copy(update=update)


def _write_child(
    parent: LoadedRun,
    run_name: str,
    record: RunRecord,
    config: RunConfig,
    state: dict[str, torch.Tensor],
) -> Path:
    """Write the child run next to the parent's storage, check it against the parent
    (`check_child`) and point `latest` at it.

    The child is written and checked in a hidden sibling, `.<run name>.partial-<hex>`, and
    renamed into place only once it passed: a process killed meanwhile leaves no run directory
    that looks complete but never passed the check (only the hidden partial one)."""
    import uuid

    from pipeline.train.checkpoint import save_tensors

    storage = Path(config.storage_path)
    run_dir = storage / run_name
    if run_dir.exists():
        raise IncrementalError(f"{run_dir}: already exists; choose another --run-name")
    work = storage / f".{run_name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        (work / MODEL_DIR).mkdir(parents=True)
        save_tensors(model_path(work), state)
        write_run(work, record, config)
        check_child(parent, work)
        if run_dir.exists():  # taken meanwhile: rename would merge or fail obscurely
            raise IncrementalError(f"{run_dir}: already exists; choose another --run-name")
        work.rename(run_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # never leave a run that breaks the contract
        raise
    point_latest(storage, run_dir)
    return run_dir


def probe_features(dim: int, mean: Any, std: Any, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Random pooled features spread like the training features: [n, d]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, dim, generator=g)


def refuse_own_paths(record: Any, verb: str) -> None:
    """add-task and remove-task copy a parent's per-task head modules; a task's own path
    (routing.own) also holds encoder blocks, which they do not carry yet: refuse, naming it."""
    own = [t for t, d in (getattr(record, "routing", None) or {}).items() if d.path == "own"]
    if own:
        raise IncrementalError(
            f"{verb}: run {record.run_name} answers {', '.join(own)} through an own path "
            "(routing.own: the task's own copy of the encoder's top blocks), which "
            f"{verb} cannot carry to a child run yet; train a new run with the tasks you want"
        )


def check_child(parent: LoadedRun, run_dir: Path) -> None:
    """Load the written child as every reader does (`load_run`) and require its kept tasks'
    logits to equal the parent's exactly on probe features."""
    import torch

    child = load_run(run_dir)
    heads = parent.model.heads
    x = probe_features(int(heads.feature_mean.shape[0]), heads.feature_mean, heads.feature_std)
    with torch.inference_mode():
        for t in child.model.heads.tasks:
            if t not in heads.tasks:
                continue
            if not torch.equal(child.model.heads(x, t)[0], heads(x, t)[0]):
                raise IncrementalError(f"{run_dir}: task {t}'s logits differ from the parent's")


def check_parent_parity(
    run: LoadedRun, runtime: Runtime, tolerance: float, vocab_size: int, pad_id: int
) -> LineageInfo | None:
    """Export's lineage check: on probe token batches (several shapes, padded and unpadded),
    every task the run shares with its parent must give the parent's logits, in PyTorch
    exactly (same weights, same encoder) and from the graph `runtime` runs within
    `tolerance`. Export passes the graph it ships, after the int8 choice: an int8 graph
    differs from the parent's logits by more than the tolerance, so its record says so
    (`passed` False, `exact` still about the weights). None for a run without a parent."""
    from pipeline.export import eager_logits, parity_inputs
    from serving.artifact import INPUT_NAMES, LineageInfo, ParentParity

    lineage = run.record.lineage
    if lineage is None:
        return None
    parent_dir = Path(lineage.parent_dir)
    info = {"parent_run": lineage.parent, "added": lineage.added, "removed": lineage.removed}
    try:
        parent = load_run(parent_dir)
    except Exception as err:  # the parent moved or its encoder changed: nothing proven
        logger.warning(
            "lineage: parent %s cannot be loaded (%s); parity not checked", parent_dir, err
        )
        return LineageInfo(**info, parity=None)
    tasks = [t for t in run.record.tasks if t in parent.record.tasks]
    eager_diff, onnx_diff, cases = 0.0, 0.0, 0
    for i, seq_len in enumerate(PROBE_LENGTHS):
        for padded in (False, True):
            ids, mask = parity_inputs(PROBE_BATCH, seq_len, padded, vocab_size, pad_id, 1000 + i)
            want = eager_logits(parent.model, tasks, ids, mask)
            got = eager_logits(run.model, tasks, ids, mask)
            served = runtime.session.run(
                [runtime.outputs[t] for t in tasks], {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask}
            )
            for w, g, s in zip(want, got, served, strict=True):
                eager_diff = max(eager_diff, float(np.abs(g - w).max()))
                onnx_diff = max(onnx_diff, float(np.abs(s - w).max()))
            cases += 1
    passed = not (eager_diff > tolerance or onnx_diff > tolerance or np.isnan(onnx_diff))
    parity = ParentParity(
        tasks=tasks,
        cases=cases,
        exact=eager_diff == 0.0,
        eager_max_abs_diff=eager_diff,
        onnx_max_abs_diff=onnx_diff,
        tolerance=tolerance,
        passed=passed,
    )
    logger.info(
        "lineage: %d task(s) shared with parent %s: PyTorch max diff %.2e (%s), served graph "
        "%.2e vs the parent's PyTorch logits: %s",
        len(tasks),
        lineage.parent,
        eager_diff,
        "exact" if parity.exact else "not exact",
        onnx_diff,
        "passed" if passed else "FAILED",
    )
    return LineageInfo(**info, parity=parity)


def unchanged_tasks(challenger: ArtifactMetadata, champion: ArtifactMetadata | None) -> list[str]:
    """The tasks the gate need not judge: those whose served answers are the champion's.

    A task is unchanged only when all of these hold:
      - the champion is the challenger's parent, and the challenger's export proved the
        task's logits, from the graph it ships, within tolerance of the parent's PyTorch
        logits (`lineage.parity.passed`);
      - both artifacts are fp32. The lineage check compares with the parent's PyTorch
        logits, and only an fp32 champion's graph is known to give those (its own `parity`
        is checked before the int8 choice; an int8 graph moves the logits by ~1e-3, and two
        int8 exports of the same weights differ when their variants or calibration texts
        do). This also keeps out an int8 child exported before the lineage check moved to
        the shipped graph, whose record described the fp32 graph that int8 replaced;
      - both read texts alike (same encoder fingerprint and max_length: truncation);
      - the task has the same labels and the same calibration in both (method, temperature,
        isotonic knots): calibration changes the probabilities served, and the ECE the gate
        compares. A task only one of the two answers is left as recorded: the gate compares
        only the tasks both answer.
    Empty when the first three fail (judge everything)."""
    import math

    lineage = challenger.lineage
    if champion is None or lineage is None or lineage.parity is None:
        return []
    if not lineage.parity.passed or champion.run_id != lineage.parent_run:
        return []
    if challenger.precision != "fp32" or champion.precision != "fp32":
        return []
    if not champion.parity.passed:
        return []
    if (challenger.encoder.fingerprint, challenger.encoder.max_length) != (
        champion.encoder.fingerprint,
        champion.encoder.max_length,
    ):
        return []

    def same_calibration(a: Any, b: Any) -> bool:
        # Only what changes the answers (not the fit's ECE/NLL diagnostics). Refitted at
        # each export on the graph's dev logits: measured on fp32 children and their
        # parents, the same T to the last bit, while the diagnostics moved by ~1e-8 between
        # exports (onnxruntime's threaded sums). The tolerances forgive such float noise
        # only, far below what the logits' 1e-4 tolerance allows.
        if a is None or b is None:
            return a is None and b is None  # None: T = 1 (older artifacts)
        if a.method != b.method or not math.isclose(a.temperature, b.temperature, rel_tol=1e-6):
            return False
        for xs, ys in ((a.knots_x, b.knots_x), (a.knots_y, b.knots_y)):
            if (xs is None) != (ys is None):
                return False
            if xs is not None and (
                len(xs) != len(ys) or any(abs(x - y) > 1e-6 for x, y in zip(xs, ys, strict=True))
            ):
                return False
        return True

    mine = {t.name: t for t in challenger.tasks}
    theirs = {t.name: t for t in champion.tasks}
    out = []
    for task in lineage.parity.tasks:
        a, b = mine.get(task), theirs.get(task)
        if (
            a is not None
            and b is not None
            and (a.labels != b.labels or not same_calibration(a.calibration, b.calibration))
        ):
            logger.info(
                "gate: %s is judged: its labels or calibration differ from the champion's", task
            )
            continue
        out.append(task)
    return out
