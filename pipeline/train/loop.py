"""The per-worker training loop: stage 1 (joint) then stage 2 (covariance alignment).

Layers, top to bottom: `train_loop_per_worker` (one Ray Train worker) -> `run_joint_stage` /
`run_alignment_stage` (epochs, evaluation, checkpoints) -> `joint_epoch` / `alignment_epoch`
(batches) -> `joint_step` / `alignment_step` (one batch).

Every rank evaluates the whole dev set (small) so that all ranks take identical decisions
(early stopping, per-task selection) without extra communication.

The model reads one of three inputs (see spec.py): cached pooled features (frozen encoder),
cached token states of the bottom layers (partial fine-tuning: only the top layers run), or
token ids (whole-encoder fine-tuning). With a fine-tuned encoder, batches are length-bucketed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DistillConfig, OptimConfig
from pipeline.metrics import classification_metrics, macro_average
from pipeline.model import Encoder, MultiTaskHeads, build_heads, load_encoder, transformer_layers
from pipeline.selection import pack
from pipeline.train import sampler
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.device import autocast_context, select_precision
from pipeline.train.spec import (
    CachedStateSplit,
    FeatureSplit,
    LoopConfig,
    SplitData,
    TokenSplit,
    WorkerData,
)

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- the model wrapper
class TrainModule(nn.Module):
    """Heads on cached features (frozen encoder), or encoder + heads (fine-tuning) on cached
    bottom-layer token states (from block `start_layer` up) or on token ids."""

    def __init__(self, heads: MultiTaskHeads, encoder: Encoder | None = None, start_layer: int = 0):
        super().__init__()
        self.heads = heads
        self.encoder = encoder
        self.start_layer = start_layer

    def features(self, inputs: Batch) -> torch.Tensor:
        """[B, d] pooled features: given, from cached token states, or from token ids."""
        if "features" in inputs:
            return inputs["features"]
        assert self.encoder is not None
        if "states" in inputs:
            return self.encoder.forward_from(
                inputs["states"], inputs["attention_mask"], self.start_layer
            )
        return self.encoder(inputs["input_ids"], inputs["attention_mask"])

    def forward(
        self, inputs: Batch, task: str, with_aux: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Main logits [B, C] and aux logits [B, C] (or None) of one task."""
        return self.heads(self.features(inputs), task, with_aux)


def set_stage_trainable(module: TrainModule, stage: str) -> None:
    """Stage 1 trains B, A_i, a_i (and the top encoder layers); R_i stays the identity.
    Stage 2 (Algorithm 1) trains only R_i and A_i; B and E are fixed."""
    heads = module.heads
    heads.requires_grad_(stage == "joint")
    heads.alignment.requires_grad_(stage == "align")
    heads.towers.requires_grad_(True)
    heads.private.requires_grad_(False)  # fitted on its own after stage 2 (run_routing_stage)
    if module.encoder is not None:
        if stage == "joint":
            module.encoder.set_trainable_layers(module.encoder.trainable_layers)
        else:
            module.encoder.requires_grad_(False)


def wrap_ddp(module: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """DDP over the parameters that currently require grad. Each step trains one task's heads,
    so the other heads are unused: find_unused_parameters is required."""
    if world_size <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


# ------------------------------------------------------------------------------------ the data
class Split(Protocol):
    """One split of one task on a worker: labels, optional token lengths, batches."""

    labels: torch.Tensor  # int64 [n], on the worker's device

    def __len__(self) -> int: ...

    @property
    def lengths(self) -> np.ndarray | None:
        """Tokens per example (length bucketing); None for pooled features."""
        ...

    def batch(self, idx: np.ndarray) -> tuple[Batch, torch.Tensor]:
        """The inputs and labels of rows `idx`."""
        ...


@dataclass
class TaskTensors:
    """A split held in memory as tensors on the worker's device: pooled features or token ids."""

    inputs: Batch  # {"features": [n, d]} or {"input_ids": [n, L], "attention_mask": [n, L]}
    labels: torch.Tensor  # int64 [n]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def lengths(self) -> np.ndarray | None:
        if "attention_mask" not in self.inputs:
            return None
        return self.inputs["attention_mask"].sum(dim=1).cpu().numpy()

    def batch(self, idx: np.ndarray | slice) -> tuple[Batch, torch.Tensor]:
        inputs = {k: v[idx] for k, v in self.inputs.items()}
        if "attention_mask" in inputs:  # drop the all-padding columns of this batch
            width = max(int(inputs["attention_mask"].sum(dim=1).max()), 1)
            inputs = {k: v[:, :width] for k, v in inputs.items()}
        return inputs, self.labels[idx]


@dataclass
class CachedStates:
    """A split whose bottom-layer token states are a memory-mapped cache entry: each batch is
    read from it (padded to its longest row), so no worker holds the whole cache."""

    states: Any  # pipeline.token_cache.TokenStates
    rows: np.ndarray  # entry row of each example
    labels: torch.Tensor  # int64 [n]
    device: torch.device

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return self.states.lengths[self.rows]

    def batch(self, idx: np.ndarray) -> tuple[Batch, torch.Tensor]:
        states, mask = self.states.batch(self.rows[idx])
        inputs = {
            "states": torch.from_numpy(states).to(self.device),
            "attention_mask": torch.from_numpy(mask).to(self.device),
        }
        return inputs, self.labels[torch.as_tensor(idx, device=self.labels.device)]


def to_split(data: SplitData, device: torch.device) -> Split:
    """A worker-side split from the driver's prepared data."""

    def tensor(a: np.ndarray) -> torch.Tensor:
        # Object-store arrays are read-only; torch.tensor copies instead of aliasing them.
        return torch.tensor(np.asarray(a)).to(device)

    if isinstance(data, FeatureSplit):
        return TaskTensors({"features": tensor(data.features)}, tensor(data.labels))
    if isinstance(data, TokenSplit):
        inputs = {
            "input_ids": tensor(data.input_ids),
            "attention_mask": tensor(data.attention_mask),
        }
        return TaskTensors(inputs, tensor(data.labels))
    if isinstance(data, CachedStateSplit):
        from pipeline.token_cache import TokenStates

        states = TokenStates.open(data.path)
        rows = np.arange(len(states)) if data.rows is None else np.asarray(data.rows)
        return CachedStates(states, rows, tensor(data.labels), device)
    raise TypeError(f"unknown split data {type(data).__name__}")


# --------------------------------------------------------------------------- state and context
@dataclass
class LoopState:
    """What a checkpoint must hold to resume a run exactly where it stopped."""

    stage: str = "joint"  # joint -> align -> done
    epoch: int = 0  # completed epochs within the current stage
    history: list[dict[str, Any]] = field(default_factory=list)
    best_macro: float = -1.0
    bad_epochs: int = 0
    best_task_acc: dict[str, float] = field(default_factory=dict)
    stage1_dev: dict[str, dict[str, float]] = field(default_factory=dict)
    routing: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> RouteDecision
    # "joint:3" / "align:1" -> task -> which dev texts that epoch got right (selection.pack):
    # what pipeline.selection replays to score the run's model selection without its bias.
    dev_correct: dict[str, dict[str, str]] = field(default_factory=dict)
    resumed_from: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Context:
    """Everything the epoch functions need besides the model and optimizers."""

    tasks: list[str]
    weights: dict[str, float]
    train: dict[str, Split]
    dev: dict[str, Split]
    cfg: LoopConfig
    rank: int
    world_size: int
    device: torch.device
    precision: str
    report: Callable[[dict[str, Any], Path | None], None]
    last_local_checkpoint: Path | None = None
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)  # WorkerData.teacher

    @property
    def sizes(self) -> list[int]:
        return [len(self.train[t]) for t in self.tasks]


# ------------------------------------------------------------------------------ the worker loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the model, resume if a checkpoint exists, run both stages.

    `config` is Ray's train_loop_config: {"loop": LoopConfig, "data": WorkerData or an
    object-store reference to it}, so workers on other nodes need no shared filesystem for
    the prepared arrays (cached token states are read from `cache_dir`, see spec.py).
    """
    import ray
    import ray.train
    import ray.train.torch

    _worker_logging()
    cfg: LoopConfig = config["loop"]
    ctx_ray = ray.train.get_context()
    rank, world_size = ctx_ray.get_world_rank(), ctx_ray.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    data: WorkerData = config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)

    torch.manual_seed(cfg.train.seed)
    module = build_train_module(data, cfg).to(device)
    precision = select_precision(
        cfg.train.precision,
        device.type,
        device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    if rank == 0:
        logger.info("worker: %d rank(s), device %s, precision %s", world_size, device, precision)
        if cfg.encoder is not None:
            logger.info(
                "fine-tuning: %s of %d encoder layers train%s",
                cfg.encoder.trainable_layers,
                module.encoder.n_layers,
                f"; layers 1-{cfg.encoder.cached_layers} are read from the token-state cache"
                if cfg.encoder.cached_layers
                else "",
            )

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    ctx = build_context(data, cfg, device, precision, report, rank, world_size)
    run_stages(module, ctx, ray.train.get_checkpoint())


def build_context(
    data: WorkerData,
    cfg: LoopConfig,
    device: torch.device,
    precision: str,
    report: Callable[[dict[str, Any], Path | None], None],
    rank: int = 0,
    world_size: int = 1,
    splits: tuple[str, ...] = ("train", "dev"),
) -> Context:
    """A worker's Context: the prepared `splits` moved to `device` (bench/gpu_path.py builds one
    without Ray; a split left out stays empty)."""
    return Context(
        tasks=list(data.tasks),
        weights=dict(data.weights),
        train={t: to_split(s, device) for t, s in data.train.items()} if "train" in splits else {},
        dev={t: to_split(s, device) for t, s in data.dev.items()} if "dev" in splits else {},
        cfg=cfg,
        rank=rank,
        world_size=world_size,
        device=device,
        precision=precision,
        report=report,
        teacher={t: torch.from_numpy(p).to(device) for t, p in data.teacher.items()}
        if "train" in splits
        else {},
    )


def _worker_logging() -> None:
    """Our progress lines reach the driver's console through Ray's worker log forwarding;
    only the pipeline's logger gets a handler."""
    # Ray Train logs every report at INFO (two long lines per epoch, per rank) through a logger
    # named after its source file; keep its warnings only.
    for name in list(logging.Logger.manager.loggerDict):
        if name.endswith(os.path.join("train", "v2", "_internal", "execution", "context.py")):
            logging.getLogger(name).setLevel(logging.WARNING)
    log = logging.getLogger("pipeline")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def build_train_module(data: WorkerData, cfg: LoopConfig) -> TrainModule:
    """The trainable model from prepared data and the loop config."""
    private = cfg.routing.private if cfg.routing is not None and cfg.routing.enabled else None
    heads = build_heads(
        cfg.in_dim, dict(data.num_classes), cfg.shared, cfg.towers, cfg.aux, private
    )
    encoder = None
    if cfg.encoder is not None:
        enc = cfg.encoder
        encoder = load_encoder(enc.path, enc.pooling, enc.trainable_layers)
        encoder.set_pooled_layers(enc.pooled_layers)
    heads.set_feature_stats(torch.tensor(data.feature_mean), torch.tensor(data.feature_std))
    start = cfg.encoder.cached_layers if cfg.encoder is not None else 0
    return TrainModule(heads, encoder, start_layer=start)


def run_stages(module: TrainModule, ctx: Context, checkpoint: Any | None) -> None:
    """Stage 1, then stage 2, then a final report whose checkpoint is the selected model."""
    state = LoopState()
    optim_state: dict[str, Any] | None = None
    best: dict[str, torch.Tensor] | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model_sd, best, optim_state, raw = load_checkpoint(Path(d))
        module.load_state_dict(model_sd)
        state = LoopState(**raw)
        state.resumed_from = f"{state.stage}:{state.epoch}"
        if ctx.rank == 0:
            logger.info("resuming from checkpoint after %s epoch %d", state.stage, state.epoch)

    if state.stage == "joint":
        best = run_joint_stage(module, ctx, state, best, optim_state)
        optim_state = None
        state.stage, state.epoch = "align", 0
    if state.stage == "align":
        if ctx.cfg.alignment.enabled:
            best = run_alignment_stage(module, ctx, state, best, optim_state)
        state.stage = "route"
    if state.stage == "route":
        if len(module.heads.private):
            assert best is not None
            best = run_routing_stage(module, ctx, state, best)
        state.stage = "done"
    for task, decision in state.routing.items():
        module.heads.routes[task] = decision["path"]

    # The final report: the selected parameters, their dev metrics, the whole history.
    assert best is not None
    module.load_state_dict(best)
    dev = evaluate(module, ctx)
    entry = history_entry("final", 0, {}, dev, 0.0)
    state.history.append(entry)
    log_epoch(ctx, entry)
    report_epoch(module, ctx, state, best, None, entry)


# ------------------------------------------------------------------------------------ stage 1
def run_joint_stage(
    module: TrainModule,
    ctx: Context,
    state: LoopState,
    best: dict[str, torch.Tensor] | None,
    optim_state: dict[str, Any] | None,
) -> dict[str, torch.Tensor]:
    """Stage 1: B, A_i, a_i (and top encoder layers) under the weighted, sampled loss."""
    tcfg, ocfg = ctx.cfg.train, ctx.cfg.optim
    set_stage_trainable(module, "joint")
    model = wrap_ddp(module, ctx.world_size, ctx.device)
    optimizer = make_optimizer(module, ocfg)
    steps = sampler.steps_per_epoch(ctx.sizes, tcfg.batch_size, ctx.world_size)
    scheduler = make_scheduler(optimizer, ocfg, steps * tcfg.epochs)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])
    probs = sampler.task_probabilities(ctx.sizes, ctx.cfg.sampler.kind, ctx.cfg.sampler.temperature)

    for epoch in range(state.epoch, tcfg.epochs):
        start = time.monotonic()
        torch.manual_seed(tcfg.seed * 100003 + epoch * 101 + ctx.rank)  # dropout, resumable
        losses = joint_epoch(model, module, optimizer, scheduler, ctx, probs, steps, epoch)
        dev = evaluate(module, ctx, correct=state.dev_correct.setdefault(f"joint:{epoch + 1}", {}))
        entry = history_entry("joint", epoch + 1, losses, dev, time.monotonic() - start)
        state.history.append(entry)
        state.epoch = epoch + 1
        if entry["dev_macro_accuracy"] > state.best_macro:
            state.best_macro = entry["dev_macro_accuracy"]
            state.bad_epochs = 0
            state.stage1_dev = dev
            best = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            state.bad_epochs += 1
        log_epoch(ctx, entry)
        optim = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        report_epoch(module, ctx, state, best, optim, entry)
        maybe_inject_fault(ctx, "joint", epoch + 1)
        patience = tcfg.patience
        if patience is not None and state.bad_epochs >= patience:
            if ctx.rank == 0:
                logger.info(
                    "stage 1: no better dev macro-average for %d epochs, stopping", patience
                )
            break
    assert best is not None
    module.load_state_dict(best)
    return best


def joint_epoch(
    model: nn.Module,
    module: TrainModule,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ctx: Context,
    probs: np.ndarray,
    steps: int,
    epoch: int,
) -> dict[str, float]:
    """One stage-1 epoch; returns the mean main loss per task."""
    module.train()
    losses = LossMeans()
    for task, inputs, labels in sampled_batches(ctx, probs, steps, epoch, stage_index=0):
        losses.add(task, joint_step(model, optimizer, ctx, task, inputs, labels))
        scheduler.step()
    return losses.means()


def joint_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: Context,
    task: str,
    inputs: Batch,
    labels: torch.Tensor,
) -> float:
    """w_t [CE(main) + γ CE(aux)] on one batch of one task; returns the main loss."""
    gamma = ctx.cfg.aux.gamma
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(ctx.precision, ctx.device.type):
        logits, aux = model(inputs, task, with_aux=True)
        main = F.cross_entropy(logits.float(), labels)
        loss = main if aux is None else main + gamma * F.cross_entropy(aux.float(), labels)
        loss = ctx.weights[task] * loss
    loss.backward()
    clip = ctx.cfg.optim.grad_clip
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
    optimizer.step()
    return float(main.detach())


# ------------------------------------------------------------------------------------ stage 2
def run_alignment_stage(
    module: TrainModule,
    ctx: Context,
    state: LoopState,
    best: dict[str, torch.Tensor] | None,
    optim_state: dict[str, Any] | None,
) -> dict[str, torch.Tensor]:
    """Stage 2, Algorithm 1: with B and E fixed, alternate updates of A_i and R_i.

    R_i has d^2 parameters per task and can overfit, so (keep_only_if_better) each task keeps
    the R_i, A_i of its best stage-2 dev epoch only if that beats its stage-1 accuracy; the
    selected model is assembled task by task in `best`.
    """
    assert best is not None
    if not state.best_task_acc:
        state.best_task_acc = {t: state.stage1_dev[t]["accuracy"] for t in ctx.tasks}
    set_stage_trainable(module, "align")
    if module.encoder is not None:
        # E is fixed (and in eval mode) in stage 2: its pooled features are computed once.
        splits = ctx.train, ctx.dev
        ctx.train, ctx.dev = (
            pooled_features(module, ctx, ctx.train),
            pooled_features(module, ctx, ctx.dev),
        )
        try:
            return run_alignment_epochs(module, ctx, state, best, optim_state)
        finally:
            ctx.train, ctx.dev = splits
    return run_alignment_epochs(module, ctx, state, best, optim_state)


def run_alignment_epochs(
    module: TrainModule,
    ctx: Context,
    state: LoopState,
    best: dict[str, torch.Tensor],
    optim_state: dict[str, Any] | None,
) -> dict[str, torch.Tensor]:
    """The epochs of stage 2 (see run_alignment_stage)."""
    acfg, tcfg = ctx.cfg.alignment, ctx.cfg.train
    model = wrap_ddp(module, ctx.world_size, ctx.device)
    heads = module.heads
    tower_opt = torch.optim.Adam(heads.towers.parameters(), lr=acfg.tower_lr)
    align_opt = torch.optim.Adam(heads.alignment.parameters(), lr=acfg.lr)
    if optim_state is not None:
        tower_opt.load_state_dict(optim_state["tower"])
        align_opt.load_state_dict(optim_state["align"])
    probs = sampler.task_probabilities(ctx.sizes, ctx.cfg.sampler.kind, ctx.cfg.sampler.temperature)
    steps = sampler.steps_per_epoch(ctx.sizes, tcfg.batch_size, ctx.world_size)

    for epoch in range(state.epoch, acfg.epochs):
        start = time.monotonic()
        torch.manual_seed(tcfg.seed * 100003 + 50000 + epoch * 101 + ctx.rank)
        losses = alignment_epoch(model, module, tower_opt, align_opt, ctx, probs, steps, epoch)
        dev = evaluate(module, ctx, correct=state.dev_correct.setdefault(f"align:{epoch + 1}", {}))
        entry = history_entry("align", epoch + 1, losses, dev, time.monotonic() - start)
        current = module.state_dict()
        for task in ctx.tasks:
            acc = dev[task]["accuracy"]
            if acc > state.best_task_acc[task] or not acfg.keep_only_if_better:
                state.best_task_acc[task] = acc
                for key, value in current.items():
                    if key == f"heads.alignment.{task}" or key.startswith(f"heads.towers.{task}."):
                        best[key] = value.detach().clone()
        state.history.append(entry)
        state.epoch = epoch + 1
        log_epoch(ctx, entry)
        optim = {"tower": tower_opt.state_dict(), "align": align_opt.state_dict()}
        report_epoch(module, ctx, state, best, optim, entry)
        maybe_inject_fault(ctx, "align", epoch + 1)
    return best


def alignment_epoch(
    model: nn.Module,
    module: TrainModule,
    tower_opt: torch.optim.Optimizer,
    align_opt: torch.optim.Optimizer,
    ctx: Context,
    probs: np.ndarray,
    steps: int,
    epoch: int,
) -> dict[str, float]:
    """One stage-2 epoch; returns the mean main loss per task."""
    module.train()
    module.heads.shared.eval()  # B is a fixed function in stage 2: no dropout noise for R_i
    if module.encoder is not None:
        module.encoder.eval()
    losses = LossMeans()
    for task, inputs, labels in sampled_batches(ctx, probs, steps, epoch, stage_index=1):
        loss = alignment_step(model, module, tower_opt, align_opt, ctx, task, inputs, labels)
        losses.add(task, loss)
    return losses.means()


def alignment_step(
    model: nn.Module,
    module: TrainModule,
    tower_opt: torch.optim.Optimizer,
    align_opt: torch.optim.Optimizer,
    ctx: Context,
    task: str,
    inputs: Batch,
    labels: torch.Tensor,
) -> float:
    """Algorithm 1 on one batch of task i: a gradient step on A_i, then one on R_i."""
    penalty = ctx.cfg.alignment.identity_penalty
    loss_value = 0.0
    for opt, is_align in ((tower_opt, False), (align_opt, True)):
        tower_opt.zero_grad(set_to_none=True)
        align_opt.zero_grad(set_to_none=True)
        with autocast_context(ctx.precision, ctx.device.type):
            logits, _ = model(inputs, task)
            loss = F.cross_entropy(logits.float(), labels)
        if not is_align:
            loss_value = float(loss.detach())
        if is_align and penalty > 0:
            r = module.heads.alignment[task]
            loss = loss + penalty * (r - torch.eye(r.shape[0], device=r.device)).pow(2).sum()
        loss.backward()
        opt.step()
    return loss_value


# ------------------------------------------------------------------------------------ routing
def run_routing_stage(
    module: TrainModule, ctx: Context, state: LoopState, best: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Fit each task's private head on the selected model's features, then choose each task's
    path on dev with pipeline.routing's rule. Returns `best` with the private heads added; the
    decisions go to `state.routing`."""
    from pipeline.routing import format_route, route_task

    module.load_state_dict(best)
    heads = module.heads
    rcfg = ctx.cfg.routing
    assert rcfg is not None
    train, dev = ctx.train, ctx.dev
    if module.encoder is not None:  # the final encoder's pooled features, computed once
        train, dev = pooled_features(module, ctx, train), pooled_features(module, ctx, dev)
    start = time.monotonic()
    for i, task in enumerate(ctx.tasks):
        decision, fit = route_task(
            heads,
            task,
            _features_and_labels(train[task]),
            _features_and_labels(dev[task]),
            rcfg,
            ctx.cfg.train.seed,
            i,
        )
        state.routing[task] = {**decision.model_dump(), "private_fit": fit}
        if ctx.rank == 0:
            logger.info("route %s: %s", task, format_route(decision))
    if ctx.rank == 0:
        logger.info(
            "routing: private heads fitted and paths chosen in %.1fs", time.monotonic() - start
        )
    best = dict(best)
    for key, value in module.state_dict().items():
        if key.startswith("heads.private."):
            best[key] = value.detach().clone()
    return best


def _features_and_labels(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """float [n, d] pooled features and int64 [n] labels of a split that holds features."""
    assert isinstance(split, TaskTensors) and "features" in split.inputs
    return split.inputs["features"].float(), split.labels


# ----------------------------------------------------------------------- shared epoch helpers
def sampled_batches(
    ctx: Context, probs: np.ndarray, steps: int, epoch: int, stage_index: int
) -> Iterator[tuple[str, Batch, torch.Tensor]]:
    """(task, inputs, labels) for each step of one epoch, with progress lines.

    The task sequence and each task's batches are seeded by (seed, stage, epoch): identical on
    every rank, and replayed exactly by a resumed run.
    """
    seed, batch_size = ctx.cfg.train.seed, ctx.cfg.train.batch_size
    schedule = sampler.task_schedule(probs, steps, seed + stage_index, epoch)
    batch_epoch = epoch + 10_000 * stage_index
    batches: dict[str, Iterator[np.ndarray]] = {}
    for i, t in enumerate(ctx.tasks):
        lengths = ctx.train[t].lengths
        if lengths is None:  # pooled features: every batch costs the same
            batches[t] = sampler.rank_batches(
                len(ctx.train[t]), batch_size, seed, batch_epoch, i, ctx.rank, ctx.world_size
            )
        else:  # token inputs: batches of similar lengths pad little
            batches[t] = sampler.bucketed_batches(
                lengths, batch_size, seed, batch_epoch, i, ctx.rank, ctx.world_size
            )
    stage = ("joint", "align")[stage_index]
    progress = Progress(ctx, f"{stage} epoch {epoch + 1}", steps)
    distill = ctx.cfg.distill
    for step, ti in enumerate(schedule):
        task = ctx.tasks[ti]
        idx = next(batches[task])
        inputs, labels = ctx.train[task].batch(idx)
        teacher = ctx.teacher.get(task) if stage_index == 0 else None
        if teacher is not None and distill is not None:
            share = teacher_share(distill, epoch * steps + step, ctx.cfg.train.epochs * steps)
            labels = soft_targets(labels, teacher[torch.from_numpy(idx).to(teacher.device)], share)
        yield task, inputs, labels
        progress.update(step + 1)


def teacher_share(distill: DistillConfig, step: int, total_steps: int) -> float:
    """The teacher's weight in stage 1's target at `step` of `total_steps`: annealed linearly
    from 1 at the first step towards 0 at the last (BAM!'s teacher annealing), else fixed."""
    if not distill.anneal:
        return distill.teacher_weight
    return 1.0 - step / max(1, total_steps)


def soft_targets(labels: torch.Tensor, teacher: torch.Tensor, share: float) -> torch.Tensor:
    """float [b, C] class probabilities: `share` of the teacher's [b, C], the rest the one-hot
    gold labels [b] (F.cross_entropy takes such targets as they are)."""
    gold = F.one_hot(labels, teacher.shape[1]).to(teacher.dtype)
    return share * teacher + (1.0 - share) * gold


class LossMeans:
    """Mean training loss per task over an epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, task: str, loss: float) -> None:
        self.sums[task] = self.sums.get(task, 0.0) + loss
        self.counts[task] = self.counts.get(task, 0) + 1

    def means(self) -> dict[str, float]:
        return {t: self.sums[t] / self.counts[t] for t in self.sums}


def eval_batches(split: Split, batch_size: int) -> Iterator[np.ndarray]:
    """Index batches covering a split once, by length when it has token inputs."""
    lengths = split.lengths
    order = np.arange(len(split)) if lengths is None else np.argsort(lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


@torch.no_grad()
def evaluate(
    module: TrainModule,
    ctx: Context,
    batch_size: int = 256,
    correct: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Per-task dev accuracy and macro-F1 (percent); with `correct`, also which dev texts each
    task got right, packed (pipeline.selection.pack), into that dict."""
    module.eval()
    out = {}
    for task in ctx.tasks:
        split = ctx.dev[task]
        y_pred = np.zeros(len(split), dtype=np.int64)
        for idx in eval_batches(split, batch_size):
            inputs, _ = split.batch(idx)
            with autocast_context(ctx.precision, ctx.device.type):
                logits, _ = module(inputs, task)
            y_pred[idx] = logits.argmax(dim=-1).cpu().numpy()
        n_classes = module.heads.towers[task][-1].out_features
        y_true = split.labels.cpu().numpy()
        out[task] = classification_metrics(y_true, y_pred, n_classes)
        if correct is not None:
            correct[task] = pack(y_pred == y_true)
    return out


@torch.no_grad()
def pooled_features(
    module: TrainModule, ctx: Context, splits: dict[str, Split], batch_size: int = 256
) -> dict[str, Split]:
    """Each split as the pooled features of the current encoder (eval mode): what stage 2
    reads, since E is fixed there. Each rank computes every world_size-th batch and one
    all-reduce (of rows that only one rank filled, the others holding zeros) gives every rank
    all of them."""
    module.eval()
    encoder = module.encoder
    assert encoder is not None
    plan = {t: list(eval_batches(split, batch_size)) for t, split in splits.items()}
    progress = Progress(
        ctx, "stage 2 features", sum(len(b[ctx.rank :: ctx.world_size]) for b in plan.values())
    )
    done = 0
    out: dict[str, Split] = {}
    for task, split in splits.items():
        feats = torch.zeros(len(split), encoder.out_dim, device=ctx.device)
        for idx in plan[task][ctx.rank :: ctx.world_size]:
            inputs, _ = split.batch(idx)
            with autocast_context(ctx.precision, ctx.device.type):
                x = module.features(inputs)
            feats[torch.as_tensor(idx, device=ctx.device)] = x.float()
            done += 1
            progress.update(done)
        if ctx.world_size > 1:
            torch.distributed.all_reduce(feats)
        out[task] = TaskTensors({"features": feats}, split.labels)
    return out


def history_entry(
    stage: str, epoch: int, losses: dict[str, float], dev: dict[str, dict], seconds: float
) -> dict[str, Any]:
    avg = macro_average(dev)
    return {
        "stage": stage,
        "epoch": epoch,
        "train_loss": losses,
        "dev": dev,
        "dev_macro_accuracy": avg["accuracy"],
        "dev_macro_f1": avg["macro_f1"],
        "seconds": round(seconds, 3),
    }


def flat_metrics(entry: dict[str, Any], state: LoopState) -> dict[str, Any]:
    """What ray.train.report receives: flat scalars, per task by name."""
    metrics: dict[str, Any] = {
        "stage": entry["stage"],
        "epoch": entry["epoch"],
        "dev_macro_accuracy": entry["dev_macro_accuracy"],
        "dev_macro_f1": entry["dev_macro_f1"],
        "resumed_from": state.resumed_from or "",
    }
    for task, m in entry["dev"].items():
        metrics[f"dev_accuracy_{task}"] = m["accuracy"]
    for task, loss in entry["train_loss"].items():
        metrics[f"train_loss_{task}"] = loss
    return metrics


def report_epoch(
    module: TrainModule,
    ctx: Context,
    state: LoopState,
    best: dict[str, torch.Tensor] | None,
    optim: dict[str, Any] | None,
    entry: dict[str, Any],
) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    metrics = flat_metrics(entry, state)
    if ctx.rank != 0:
        ctx.report(metrics, None)
        return
    tmp = Path(tempfile.mkdtemp(prefix="polytask-ckpt-"))
    save_checkpoint(tmp, module.state_dict(), best, optim, state.to_json())
    ctx.report(metrics, tmp)
    if ctx.cfg.local_mode:
        # Ray Train's local mode keeps a reference to this directory instead of copying it:
        # keep the newest one, drop the one before.
        if ctx.last_local_checkpoint is not None:
            shutil.rmtree(ctx.last_local_checkpoint, ignore_errors=True)
        ctx.last_local_checkpoint = tmp
    else:
        shutil.rmtree(tmp, ignore_errors=True)  # Ray has copied it to storage


def log_epoch(ctx: Context, entry: dict[str, Any]) -> None:
    if ctx.rank != 0:
        return
    per_task = " ".join(f"{t} {m['accuracy']:.1f}" for t, m in entry["dev"].items())
    loss = np.mean(list(entry["train_loss"].values())) if entry["train_loss"] else float("nan")
    logger.info(
        "%s epoch %d: train loss %.4f | dev macro acc %.2f | %s | %.1fs",
        entry["stage"],
        entry["epoch"],
        loss,
        entry["dev_macro_accuracy"],
        per_task,
        entry["seconds"],
    )


class Progress:
    """Rank-0 progress lines with rate and ETA, at most every 30 s (long fine-tuning epochs)."""

    def __init__(self, ctx: Context, desc: str, total: int, every: float = 30.0):
        self.enabled = ctx.rank == 0
        self.desc, self.total, self.every = desc, total, every
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < self.every or done == self.total:
            return
        rate = done / (now - self.start)
        logger.info(
            "%s: step %d/%d, %.1f steps/s, ETA %.0fs",
            self.desc,
            done,
            self.total,
            rate,
            (self.total - done) / rate,
        )
        self.last = now


def param_groups(module: TrainModule, ocfg: OptimConfig) -> list[dict[str, Any]]:
    """Heads at `lr`; the trainable encoder layers at `encoder_lr`, decayed by `layer_decay` per
    layer below the top one (the embeddings, when they train, one step below the bottom layer).
    Each group records which warm-up it follows ("heads" or "encoder")."""
    heads = [p for p in module.heads.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": heads, "lr": ocfg.lr, "kind": "heads"}]
    encoder = module.encoder
    if encoder is None:
        return groups
    seen: set[int] = set()
    blocks = [*reversed(transformer_layers(encoder.transformer))]  # top first
    embeddings = getattr(encoder.transformer, "embeddings", None)
    depth = 0
    for block in [*blocks, *([embeddings] if embeddings is not None else [])]:
        params = [p for p in block.parameters() if p.requires_grad]
        seen.update(id(p) for p in block.parameters())
        if params:
            lr = ocfg.encoder_lr * ocfg.layer_decay**depth
            groups.append({"params": params, "lr": lr, "kind": "encoder"})
            depth += 1
    rest = [p for p in encoder.parameters() if p.requires_grad and id(p) not in seen]
    if rest:  # anything else a model trains (none for BERT-like encoders): at encoder_lr
        groups.append({"params": rest, "lr": ocfg.encoder_lr, "kind": "encoder"})
    return groups


def make_optimizer(module: TrainModule, ocfg: OptimConfig) -> torch.optim.Optimizer:
    """The stage-1 optimizer over `param_groups`."""
    groups = param_groups(module, ocfg)
    if ocfg.name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=ocfg.weight_decay)
    if ocfg.name == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=ocfg.weight_decay)


def lr_factor(kind: str, warmup: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then constant, linear or cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, ocfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule per parameter group: the heads warm up over `warmup_ratio` of the steps,
    the encoder layers over `encoder_warmup_ratio` (default: the same)."""
    enc_ratio = (
        ocfg.warmup_ratio if ocfg.encoder_warmup_ratio is None else ocfg.encoder_warmup_ratio
    )
    warmups = {
        "heads": int(ocfg.warmup_ratio * total_steps),
        "encoder": int(enc_ratio * total_steps),
    }
    factors = [
        lr_factor(ocfg.schedule, warmups[g.get("kind", "heads")], total_steps)
        for g in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


# --------------------------------------------------------------------------- fault injection
def maybe_inject_fault(ctx: Context, stage: str, epoch: int) -> None:
    """Kill the last rank once, after the given epoch's checkpoint: the resume test's fault.

    Set by the driver from POLYTASK_FAULT_INJECTION="<stage>:<epoch>:<marker file>"; the marker
    makes it fire only once across restarts.
    """
    fault = ctx.cfg.fault
    if fault is None or fault.stage != stage or fault.epoch != epoch:
        return
    marker = Path(fault.marker)
    if ctx.rank == ctx.world_size - 1 and not marker.exists():
        import ray.train

        # Reports are registered asynchronously: wait until this epoch's checkpoint is, so the
        # fault hits after a known checkpoint (as a real crash between epochs would).
        ray.train.get_all_reported_checkpoints()
        marker.write_text(f"killed rank {ctx.rank} after {stage} epoch {epoch}\n")
        logger.warning("fault injection: killing rank %d (pid %d)", ctx.rank, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
