"""The own path (issue 13, `routing.own`): a task's own copy of the fine-tuned top blocks.

With a fine-tuned encoder, a task's private path (pipeline/routing.py) reads the jointly
fine-tuned encoder's features: it protects the task from the shared module B, not from what
the other tasks did to the encoder. On senteval6-finetune, SUBJ stayed 0.6-0.9 points below
its own fine-tuned model on every seed with either path (docs/results.md, *Routing*). The own
path is the task's own model inside the multi-task one:

    states entering block n-k (the run's pass)  ->  T_i: a copy of the top k blocks, started
    from the pretrained weights  ->  mean pooling  ->  standardize  ->  O_i: a private head of
    `routing.private`'s layout

trained together on the task alone, after the run, on the token states the run cached below
its fine-tuned blocks (plus the run's own blocks up to the copy, when the copy is shorter). As
every model of a run, its epoch is the one with the most dev items right. The task takes it
only when it beats the task's route (shared or private, as `pipeline.routing.decide` chose) by
more than `routing.own.margin_se` standard errors (`pipeline.routing.decide_own`), because it
costs serving time: its k blocks run once per call, in the same graph (the blocks below still
run once for every task). A task that does not take it keeps nothing of it.

Training uses the copy's optimizer settings from the run's config: AdamW, the blocks at
`optim.encoder_lr`, the head at `routing.private.lr`, weight decay and label smoothing of
`routing.private`, the encoder's warm-up and schedule, `train.batch_size` rows bucketed by
length, `routing.own.epochs` (default `train.epochs`) epochs: the recipe of the run's own
fine-tuning, on one task. Deterministic for a seed on CPU.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from pipeline.config import RunConfig
    from pipeline.routing import RouteDecision
    from pipeline.runs import LoadedRun

logger = logging.getLogger(__name__)


class OwnPathError(Exception):
    """A run whose own paths cannot be trained (its encoder or its record does not fit)."""


@dataclass
class OwnFit:
    """One task's trained own path: the copy's blocks and head at the epoch dev picked, and
    its dev logits after every epoch (float32 [E, m, C])."""

    blocks: torch.nn.ModuleList
    head: torch.nn.Module
    dev_logits: np.ndarray
    seconds: float


def _batches_in_length_order(lengths: np.ndarray, size: int) -> Iterator[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), size):
        yield order[i : i + size]


def pad_states(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states of different lengths [L_j, d] -> padded [B, L, d] and mask int64 [B, L]."""
    import torch

    width = max(r.shape[0] for r in rows)
    x = torch.zeros(len(rows), width, rows[0].shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for j, r in enumerate(rows):
        x[j, : r.shape[0]] = r
        mask[j, : r.shape[0]] = 1
    return x, mask


def fit_own_path(
    encoder: torch.nn.Module,
    blocks: torch.nn.ModuleList,
    head: torch.nn.Module,
    stats: tuple[torch.Tensor, torch.Tensor],
    train: tuple[list[torch.Tensor], torch.Tensor],
    dev: tuple[list[torch.Tensor], torch.Tensor],
    config: RunConfig,
    seed: int,
    task_index: int,
    desc: str = "own path",
    device: str = "cpu",
) -> OwnFit:
    """Train `blocks` and `head` together in place on one task; keep the epoch with the most
    dev items right (the first such).

    Args:
        encoder: The run's Encoder (its `run_blocks` and `pool` run the copy).
        blocks: The copy, k transformer blocks.
        head: [B, d] -> [B, C]; a PrivateEnsemble trains its members on the same rows.
        stats: (mean, std) [d] that standardize the pooled features (the run's final-feature
            statistics).
        train, dev: Per row the token states entering the copy (float [L_j, d], real tokens
            only) and int64 labels [n].
        config: The run's config (optimizer, schedule, batch size, epochs).
        seed, task_index: The run's seed and the task's position: the batches' and dropout's.
        device: Where to train ("cpu" or "cuda"); the modules come back on the CPU.
    """
    import torch
    import torch.nn.functional as F

    from pipeline.train.loop import lr_factor
    from pipeline.train.sampler import bucketed_batches

    began = time.monotonic()
    blocks.to(device)
    head.to(device)
    mean, std = (s.to(device) for s in stats)

    def standardize(pooled: torch.Tensor) -> torch.Tensor:
        return (pooled - mean) / std

    own = config.routing.own
    pcfg = config.routing.private
    epochs = (own.epochs if own is not None else None) or config.train.epochs
    blocks.requires_grad_(True)
    head.requires_grad_(True)
    opt = torch.optim.AdamW(
        [
            {"params": list(blocks.parameters()), "lr": config.optim.encoder_lr},
            {"params": list(head.parameters()), "lr": pcfg.lr},
        ],
        weight_decay=pcfg.weight_decay,
    )
    x_train, y_train = train
    x_dev, y_dev = dev
    lengths = np.array([r.shape[0] for r in x_train])
    dev_lengths = np.array([r.shape[0] for r in x_dev])
    batch_size = config.train.batch_size
    steps_per_epoch = -(-len(x_train) // batch_size)
    total = epochs * steps_per_epoch
    ocfg = config.optim
    ratio = ocfg.warmup_ratio if ocfg.encoder_warmup_ratio is None else ocfg.encoder_warmup_ratio
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_factor(ocfg.schedule, int(ratio * total), total)
    )
    batches = bucketed_batches(lengths, batch_size, seed, 0, task_index, 0, 1)
    members = getattr(head, "members", 1)
    torch.manual_seed(seed * 1000 + task_index)  # dropout
    per_epoch: list[np.ndarray] = []
    best, best_state = -1, None
    for epoch in range(epochs):
        blocks.train()
        head.train()
        for _ in range(steps_per_epoch):
            idx = next(batches)
            x, mask = (t.to(device) for t in pad_states([x_train[i] for i in idx]))
            pooled = encoder.pool(encoder.run_blocks(x, mask, blocks), mask)
            z = standardize(pooled)
            y = y_train[idx].to(device)
            if members > 1:  # every member on the same rows: one pass through the copy
                logits = head.member_logits(z)  # [K, B, C]
                loss = F.cross_entropy(
                    logits.flatten(0, 1), y.repeat(members), label_smoothing=pcfg.label_smoothing
                )
            else:
                loss = F.cross_entropy(head(z), y, label_smoothing=pcfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        blocks.eval()
        head.eval()
        logits = None
        with torch.inference_mode():
            for rows in _batches_in_length_order(dev_lengths, 256):
                x, mask = (t.to(device) for t in pad_states([x_dev[i] for i in rows]))
                out = head(standardize(encoder.pool(encoder.run_blocks(x, mask, blocks), mask)))
                if logits is None:
                    logits = np.zeros((len(x_dev), out.shape[-1]), np.float32)
                logits[rows] = out.float().cpu().numpy()
        assert logits is not None
        per_epoch.append(logits)
        right = int((logits.argmax(-1) == y_dev.numpy()).sum())
        if right > best:
            best = right
            best_state = (copy.deepcopy(blocks.state_dict()), copy.deepcopy(head.state_dict()))
        logger.info(
            "%s: epoch %d/%d, dev %.2f (%.0fs)",
            desc,
            epoch + 1,
            epochs,
            100.0 * right / len(x_dev),
            time.monotonic() - began,
        )
    assert best_state is not None
    blocks.load_state_dict(best_state[0])
    head.load_state_dict(best_state[1])
    blocks.cpu()
    head.cpu()
    blocks.requires_grad_(False).eval()
    head.requires_grad_(False).eval()
    return OwnFit(blocks, head, np.stack(per_epoch), time.monotonic() - began)


def train_own_paths(run_dir: str | Path) -> dict[str, RouteDecision]:
    """Train the own paths `routing.own` asks for on the stored run in `run_dir`, route each
    task on the evidence (`decide_own`), and write the run back: its weights with the chosen
    copies and heads, run.json with every task's decision. Returns the new decisions.

    Training calls this before the run is published (`latest` points at it only after), so
    no reader sees the weights and the record between their two writes; the record is written
    last, so a run cut off in between keeps its old record and fails to load (unexpected own
    weights) rather than answering with half of them.

    Raises:
        OwnPathError: the run has no routing record, or no cached token states (its encoder is
            not partially fine-tuned), or the copy would reach below them.
    """
    import torch

    from pipeline.data import load_tasks
    from pipeline.metrics import classification_metrics, macro_average
    from pipeline.model import load_encoder, private_head
    from pipeline.routing import correct, decide_own, format_route
    from pipeline.runs import load_run, model_path, write_run
    from pipeline.token_cache import TokenStateCache
    from pipeline.train.checkpoint import save_tensors
    from pipeline.train.device import driver_device
    from pipeline.train.driver import check_overlap

    run: LoadedRun = load_run(run_dir)
    config, record = run.config, run.record
    own = config.own_path
    if own is None:
        raise OwnPathError(f"{run_dir}: routing.own is not set in the run's config")
    if record.routing is None:
        raise OwnPathError(f"{run_dir}: the run has no routing record to weigh own paths against")
    if any(d.path == "own" or d.own is not None for d in record.routing.values()):
        raise OwnPathError(f"{run_dir}: the run's own paths were trained already")
    enc = record.encoder
    encoder, heads = run.model.encoder.eval(), run.model.heads.eval()
    n_layers, k, cached = encoder.n_layers, own.layers, enc.cached_layers
    if not cached:
        raise OwnPathError(
            f"{run_dir}: routing.own needs the cached token states of a partially fine-tuned "
            f"encoder; this run's encoder caches none (encoder.trainable_layers "
            f"{config.encoder.trainable_layers!r} of {n_layers} blocks)"
        )
    start = n_layers - k
    if start < cached:
        raise OwnPathError(
            f"routing.own.layers: {k} blocks reach below the run's {n_layers - cached} "
            "fine-tuned ones"
        )
    pretrained = load_encoder(enc.path, enc.pooling)
    tasks = load_tasks(config, labels=run.labels)
    check_overlap(config, tasks)  # decontaminates as the run did
    cache = TokenStateCache(
        config.resolved_cache_dir(), enc.path, cached, enc.max_length, encoder=encoder
    )
    d = encoder.dim
    device = driver_device(config.scaling.use_gpu, torch.cuda.is_available())

    seed, pcfg = config.train.seed, config.routing.private
    allowed = set(own.tasks) if own.tasks is not None else None
    decisions = dict(record.routing)
    chosen: list[tuple[str, OwnFit]] = []
    for index, t in enumerate(tasks):
        if allowed is not None and t.name not in allowed:
            continue
        # Per row: the states entering the copy (fp32, real tokens only); on dev also the
        # run's own features, for the task's route's answers.
        states: dict[str, list[torch.Tensor]] = {}
        labels: dict[str, torch.Tensor] = {}
        dev_features = None
        for split in ("train", "dev"):
            entry = cache.get(t.splits[split].texts, desc=f"token states {t.name}/{split}")
            rows_out: list[torch.Tensor | None] = [None] * len(entry)
            feats = None
            with torch.inference_mode():
                for rows in _batches_in_length_order(entry.lengths, 256):
                    s, mask = (torch.from_numpy(a) for a in entry.batch(rows))
                    h = encoder.run_layers(s.float(), mask, cached, start)
                    if split == "dev":
                        f = encoder.forward_from(s.float(), mask, cached)
                        if feats is None:
                            feats = torch.zeros(len(entry), f.shape[-1])
                        feats[rows] = f
                    for j, row in enumerate(rows):
                        rows_out[row] = h[j, : int(entry.lengths[row])].clone()
            states[split] = rows_out  # type: ignore[assignment]
            labels[split] = torch.as_tensor(np.asarray(t.splits[split].labels))
            dev_features = feats if split == "dev" else dev_features
        assert dev_features is not None
        decision = decisions[t.name]
        with torch.no_grad():
            route_right = (
                heads(dev_features, t.name, path=decision.base_path)[0].argmax(-1) == labels["dev"]
            ).numpy()
        torch.manual_seed(seed * 1000 + index)  # the head's initialization
        fit = fit_own_path(
            encoder,
            pretrained.pretrained_top_blocks(k),
            private_head(d, len(run.labels[t.name]), pcfg.hidden_sizes, pcfg.dropout, pcfg.members),
            (heads.feature_mean[:d], heads.feature_std[:d]),
            (states["train"], labels["train"]),
            (states["dev"], labels["dev"]),
            config,
            seed,
            index,
            desc=f"own path {t.name}",
            device=device,
        )
        del states
        decision = decide_own(
            decision,
            route_right,
            correct(fit.dev_logits, labels["dev"].numpy()),
            own.margin_se,
            k,
            seed,
            seconds=round(fit.seconds, 1),
        )
        decisions[t.name] = decision
        logger.info("route %s: %s", t.name, format_route(decision))
        stage = record.stages.get(t.name)
        if decision.path == "own":
            chosen.append((t.name, fit))
            picked = fit.dev_logits[(decision.own.epoch or 1) - 1]  # type: ignore[union-attr]
            record.dev[t.name] = classification_metrics(
                labels["dev"].numpy(), picked.argmax(-1), len(run.labels[t.name])
            )
            if stage is not None:
                record.stages[t.name] = stage.model_copy(
                    update={"final": record.dev[t.name]["accuracy"], "route": decision}
                )
        elif stage is not None:
            record.stages[t.name] = stage.model_copy(update={"route": decision})
    for name, fit in chosen:  # task order: the features' column order
        encoder.add_own_blocks(name, fit.blocks)
        heads.add_own_head(name, fit.head)
        heads.routes[name] = "own"
    record.routing = decisions
    macro = macro_average(record.dev)
    record.dev_macro_accuracy, record.dev_macro_f1 = macro["accuracy"], macro["macro_f1"]
    if chosen:
        save_tensors(model_path(run.run_dir), run.model.state_dict())
    write_run(run.run_dir, record, config)
    logger.info(
        "own paths: %d task(s) took theirs (%s); serving runs %d transformer blocks per call "
        "(the encoder's %d + %d of own copies)",
        len(chosen),
        ", ".join(n for n, _ in chosen) or "none",
        n_layers + k * len(chosen),
        n_layers,
        k * len(chosen),
    )
    return decisions
