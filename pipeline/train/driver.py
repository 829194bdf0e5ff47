"""The training driver: everything that happens before, around and after `TorchTrainer.fit()`.

    load + check data -> pooled features (frozen encoder), cached bottom-layer token states
    (partial fine-tuning) or token ids (whole encoder) -> task weights (Algorithm 2)
    -> Ray cluster -> TorchTrainer(train_loop_per_worker) -> run record + selected model

The run directory is Ray's experiment directory (`<storage_path>/<run name>`): Ray keeps its
checkpoints there, and the driver adds `run.json`, `config.yaml` and `model/`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config import (
    RunConfig,
    check_encoder_max_length,
    check_writable_outputs,
    config_to_dict,
)
from pipeline.data import (
    Split,
    TaskData,
    cross_task_overlap,
    decontaminate,
    fingerprint_files,
    format_stats,
    load_tasks,
    warn_large_batch,
)
from pipeline.features import (
    FeatureCache,
    encoder_fingerprint,
    load_tokenizer,
    resolve_encoder_path,
    tokenize,
)
from pipeline.routing import RouteDecision, format_route
from pipeline.runs import (
    MODEL_DIR,
    MODEL_FILE,
    EncoderRecord,
    RunRecord,
    StageRecord,
    TaskRecord,
    check_new_run,
    point_latest,
    read_record,
    write_run,
)
from pipeline.selection import selection_crossfit, unpack
from pipeline.train.spec import (
    FAULT_ENV,
    CachedStateSplit,
    EncoderSpec,
    FaultSpec,
    FeatureSplit,
    LoopConfig,
    SplitData,
    TokenSplit,
    WorkerData,
)
from pipeline.weighting import compute_task_weights

logger = logging.getLogger(__name__)

__all__ = ["FAULT_ENV", "TrainingError", "TrainResult", "train"]
SPLITS = ("train", "dev")
STATS_SAMPLE = 4096  # texts whose pooled features give the standardization when fine-tuning


class TrainingError(Exception):
    """Training could not start or did not finish; the message says why."""


@dataclass
class TrainResult:
    run_dir: Path
    record: RunRecord


def new_run_name(config_name: str) -> str:
    """`<name>-<UTC timestamp>-<6 hex>`: unique, so Ray never resumes an unrelated run."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{config_name}-{stamp}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------- data preparation
@dataclass
class PreparedInputs:
    """What workers train on, and the pooled features the driver computed (if any)."""

    train: dict[str, SplitData]
    dev: dict[str, SplitData]
    dim: int
    train_features: dict[str, np.ndarray]  # pooled train features of the frozen encoder
    encoder: EncoderSpec | None  # None: the encoder is frozen
    feature_mean: np.ndarray | None = None  # standardization from a sample, when fine-tuning
    feature_std: np.ndarray | None = None


def prepare_inputs(
    config: RunConfig,
    tasks: list[TaskData],
    encoder_path: str,
    full_splits: dict[tuple[str, str], Split] | None = None,
) -> PreparedInputs:
    """The data workers train on.

    Frozen encoder: cached pooled features [n, d]. Partial fine-tuning: cached token states of
    the bottom layers (token_cache.py). Whole encoder: token ids [n, L]. Pooled features are
    also computed (and cached) for SVD weighting. A split that keeps only some rows of its file
    (`Split.rows`, after decontamination) takes them from the cache entry of the whole file,
    given in `full_splits` by (task, split): a decontaminated run computes nothing that an
    ordinary run has already computed.
    """
    enc = config.encoder
    full_splits = full_splits or {}

    def source(t: TaskData, split: str) -> tuple[Split, np.ndarray | None]:
        """The split whose texts are cached, and which of its rows this split takes."""
        s = t.splits[split]
        full = full_splits.get((t.name, split))
        if s.rows is not None and full is not None and full is not s:
            return full, np.asarray(s.rows)
        return s, None

    features: dict[str, dict[str, np.ndarray]] = {}
    if not enc.fine_tuned or config.weighting.method == "svd":
        cache = FeatureCache(config.resolved_cache_dir(), encoder_path, enc.max_length, enc.pooling)
        wanted = [
            (t, split, *source(t, split))
            for t in tasks
            for split in (t.splits if not enc.fine_tuned else ["train"])
        ]
        # One pass over every split's texts: the splits share sentences (FeatureCache.get_many).
        computed = cache.get_many(
            [(src.texts, f"features {t.name}/{split}") for t, split, src, _ in wanted],
            batch_size=enc.batch_size,
        )
        for (t, split, _, rows), feats in zip(wanted, computed, strict=True):
            features.setdefault(t.name, {})[split] = feats if rows is None else feats[rows]
    train_features = {t: f["train"] for t, f in features.items()}
    out: dict[str, dict[str, SplitData]] = {"train": {}, "dev": {}}
    if not enc.fine_tuned:
        for t in tasks:
            for split in ("train", "dev"):
                labels = t.splits[split].labels
                out[split][t.name] = FeatureSplit(features[t.name][split], labels)
        dim = next(iter(features.values()))["train"].shape[1]
        return PreparedInputs(out["train"], out["dev"], dim, train_features, None)

    from pipeline.model import cached_layers, load_encoder

    try:
        encoder = load_encoder(encoder_path, enc.pooling, enc.trainable_layers).eval()
    except ValueError as err:
        raise TrainingError(str(err)) from None
    n_cached = cached_layers(enc.trainable_layers, encoder.n_layers)
    try:
        encoder.set_pooled_layers(config.pooled_layers)
    except ValueError as err:
        raise TrainingError(str(err)) from None
    if encoder.pooled_layers and encoder.pooled_layers[0] < n_cached:
        raise TrainingError(
            f"routing.private.layers: block {encoder.pooled_layers[0]} lies inside the cached "
            f"bottom blocks (1 to {n_cached}), whose states are stored only after block "
            f"{n_cached}; choose blocks from {n_cached} up"
        )
    spec = EncoderSpec(
        encoder_path, enc.pooling, enc.trainable_layers, n_cached, encoder.pooled_layers
    )
    tokenizer = load_tokenizer(encoder_path)
    sample = stats_sample(tasks, config.train.seed)
    if n_cached:
        from pipeline.token_cache import TokenStateCache

        states = TokenStateCache(
            config.resolved_cache_dir(),
            encoder_path,
            n_cached,
            enc.max_length,
            enc.batch_size,
            encoder=encoder,  # exported to onnxruntime, the default: why in token_cache.py
        )
        texts = {(t.name, split): source(t, split)[0].texts for t in tasks for split in SPLITS}
        if not all(states.has(x) for x in texts.values()):
            # Before computing states: the halves must compose to the whole forward pass.
            import torch

            probe = tokenize(tokenizer, tasks[0].splits["train"].texts[:4], enc.max_length)
            try:
                encoder.check_layerwise(torch.from_numpy(probe[0]), torch.from_numpy(probe[1]))
            except ValueError as err:
                raise TrainingError(f"encoder.trainable_layers: {err}") from None
        # One pass over every split's distinct texts, as the feature cache does.
        keys = list(texts)
        got = states.get_many([(texts[k], f"token states {k[0]}/{k[1]}") for k in keys])
        by_name = {t.name: t for t in tasks}
        entries = {}
        for (name, split), entry in zip(keys, got, strict=True):
            t = by_name[name]
            rows = source(t, split)[1]
            entries[name, split] = (entry, rows)
            out[split][name] = CachedStateSplit(str(entry.path), rows, t.splits[split].labels)
        if states.computed == 0:
            logger.info(
                "token states: every split read from the cache %s; the lower %d layers were "
                "not run",
                states.dir,
                n_cached,
            )
        sampled = {
            name: sampled_cached_features(encoder, entries[name, "train"], rows, n_cached)
            for name, rows in sample.items()
        }
    else:
        for t in tasks:
            for split in ("train", "dev"):
                s = t.splits[split]
                ids, mask = tokenize(tokenizer, s.texts, enc.max_length)
                out[split][t.name] = TokenSplit(ids, mask, s.labels)
        sampled = {
            t.name: sampled_token_features(
                encoder, tokenizer, [t.splits["train"].texts[i] for i in sample[t.name]], enc
            )
            for t in tasks
        }
    x = np.concatenate(list(sampled.values()))
    return PreparedInputs(
        out["train"],
        out["dev"],
        encoder.dim,
        train_features,
        spec,
        feature_mean=x.mean(0).astype(np.float32),
        feature_std=x.std(0).astype(np.float32),
    )


def stats_sample(tasks: list[TaskData], seed: int) -> dict[str, np.ndarray]:
    """Up to STATS_SAMPLE training rows drawn uniformly from all tasks together, by task."""
    sizes = [len(t.splits["train"]) for t in tasks]
    total = sum(sizes)
    rng = np.random.default_rng([seed, 2718])
    chosen = np.sort(rng.choice(total, size=min(STATS_SAMPLE, total), replace=False))
    bounds = np.cumsum([0, *sizes])
    return {
        t.name: chosen[(chosen >= lo) & (chosen < hi)] - lo
        for t, lo, hi in zip(tasks, bounds[:-1], bounds[1:], strict=True)
    }


def sampled_cached_features(
    encoder: Any, entry_rows: tuple[Any, np.ndarray | None], rows: np.ndarray, start: int
) -> np.ndarray:
    """Pooled features of the initial encoder for `rows` of a split, from its cached states."""
    import torch

    entry, subset = entry_rows
    rows = rows if subset is None else subset[rows]
    rows = rows[np.argsort(entry.lengths[rows], kind="stable")]
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), 256):
            states, mask = entry.batch(rows[i : i + 256])
            pooled = encoder.forward_from(torch.from_numpy(states), torch.from_numpy(mask), start)
            out.append(pooled.numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.out_dim), np.float32)


def sampled_token_features(encoder: Any, tokenizer: Any, texts: list[str], enc: Any) -> np.ndarray:
    """Pooled features of the initial encoder for `texts`, computed from token ids."""
    from pipeline.features import encode_texts

    return encode_texts(encoder, tokenizer, texts, enc.max_length, enc.batch_size, "stats sample")


def check_overlap(
    config: RunConfig, tasks: list[TaskData]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Measure (and with `decontaminate`, remove) dev sentences leaking across tasks."""
    overlap = cross_task_overlap(tasks)
    for o in overlap:
        if o["share"] >= 0.01:
            logger.warning(
                "%d of %d %s dev texts (%.0f%%) are in %s's training data%s",
                o["n"],
                o["n_dev"],
                o["dev_task"],
                100 * o["share"],
                o["train_task"],
                ""
                if config.decontaminate
                else " (joint training sees them; set decontaminate: true to drop them)",
            )
    removed = decontaminate(tasks) if config.decontaminate else {}
    if removed:
        logger.info("decontaminate: removed training rows %s", removed)
    return overlap, removed


def task_weights(
    config: RunConfig, tasks: list[TaskData], train_features: dict[str, np.ndarray]
) -> dict[str, float]:
    """α_i for each task (Algorithm 2 for 'svd'), logged and saved with the run."""
    method = config.weighting.method
    feats = (
        [train_features[t.name] for t in tasks]
        if method == "svd"
        else [np.zeros((len(t.splits["train"]), 1), dtype=np.float32) for t in tasks]
    )
    weights = compute_task_weights(
        method,
        feats,
        [t.splits["train"].labels for t in tasks],
        [t.num_classes for t in tasks],
        config.weighting.rank,
    )
    out = {t.name: float(w) for t, w in zip(tasks, weights, strict=True)}
    logger.info("task weights (%s): %s", method, ", ".join(f"{t} {w:.3f}" for t, w in out.items()))
    return out


def teacher_probabilities(config: RunConfig, tasks: list[TaskData]) -> dict[str, np.ndarray]:
    """`distill.teachers`: each teacher run's class probabilities for its task's training rows
    (after decontamination, in the rows' order), float32 [n_train, num_classes].

    The teacher answers as it would serve (its routed path, softmax of its logits), computed
    here once, before any worker starts.

    Raises:
        TrainingError: a teacher that is not a finished run, lacks the task, or orders the
            task's labels differently (names `distill.teachers.<task>`).
    """
    if not config.distill.teachers:
        return {}
    import torch

    from pipeline.evaluate import run_features
    from pipeline.runs import RunNotFoundError, load_run

    by_name = {t.name: t for t in tasks}
    out = {}
    for task, path in config.distill.teachers.items():
        where = f"distill.teachers.{task}"
        try:
            teacher = load_run(path)
        except RunNotFoundError as err:
            raise TrainingError(f"{where}: {err}") from None
        if task not in teacher.record.tasks:
            raise TrainingError(
                f"{where}: run {path} has no task {task!r} (its tasks: "
                f"{list(teacher.record.tasks)})"
            )
        data = by_name[task]
        theirs = teacher.record.tasks[task].labels
        if theirs != data.labels:
            raise TrainingError(
                f"{where}: the teacher's labels {theirs} are not the task's {data.labels} (in "
                "output order); its probabilities would name other classes"
            )
        split = data.splits["train"]
        feats = run_features(teacher, list(split.texts), desc=f"teacher {task}/train")
        with torch.inference_mode():
            logits, _ = teacher.model.heads(torch.from_numpy(feats), task)
        probs = torch.softmax(logits.float(), dim=-1).numpy().astype(np.float32)
        agree = 100.0 * float((probs.argmax(1) == np.asarray(split.labels)).mean())
        logger.info(
            "distill %s: teacher %s on %d training texts (agrees with the gold label on %.1f%%)",
            task,
            path,
            len(probs),
            agree,
        )
        out[task] = probs
    return out


def feature_stats(config: RunConfig, inputs: PreparedInputs) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the pooled training features of all tasks together: of every row with
    a frozen encoder, of a sample of rows under the initial encoder when fine-tuning (identity
    when standardization is off)."""
    dim = inputs.dim * (1 + len(config.pooled_layers))  # the private heads' extra columns
    if not config.encoder.standardize:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    if inputs.feature_mean is not None and inputs.feature_std is not None:
        return inputs.feature_mean, inputs.feature_std
    x = np.concatenate(list(inputs.train_features.values()))
    return x.mean(0).astype(np.float32), x.std(0).astype(np.float32)


# ------------------------------------------------------------------------------- Ray plumbing
def connect_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS), else start a local cluster sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        logger.info("starting a local Ray cluster (%d CPUs)", os.cpu_count() or 1)
        ray.init(logging_level=logging.WARNING)


def check_cluster_fits(config: RunConfig) -> None:
    """Fail now, not after a silent wait, when the cluster cannot host the workers."""
    import ray

    from pipeline.train.device import check_gpu_request

    res = ray.cluster_resources()
    sc = config.scaling
    import torch

    check_gpu_request(sc.use_gpu, torch.cuda.is_available(), res.get("GPU", 0.0))
    need = sc.num_workers * sc.cpus_per_worker
    if need > res.get("CPU", 0.0) + 1e-9:
        raise TrainingError(
            f"scaling: {sc.num_workers} workers x {sc.cpus_per_worker:g} CPUs = {need:g} CPUs, but "
            f"the Ray cluster has {res.get('CPU', 0):g}; lower scaling.num_workers or "
            "scaling.cpus_per_worker"
        )


def loop_config(config: RunConfig, dim: int, encoder: EncoderSpec | None) -> LoopConfig:
    """The typed config every worker receives."""
    return LoopConfig(
        in_dim=dim,
        shared=config.shared,
        towers=config.towers,
        aux=config.aux,
        encoder=encoder,
        train=config.train,
        optim=config.optim,
        sampler=config.sampler,
        alignment=config.alignment,
        routing=config.routing,
        distill=config.distill,
        cpus_per_worker=config.scaling.cpus_per_worker,
        local_mode=config.scaling.num_workers == 0,
        fault=FaultSpec.from_env(),
    )


# ---------------------------------------------------------------------------------- the driver
def train(
    config: RunConfig, run_name: str | None = None, callbacks: Sequence[Any] = ()
) -> TrainResult:
    """Train, select and record one run. Returns the run directory and its record.

    `callbacks` are `ray.train.UserCallback`s run by Ray's Train controller after every report
    (the retraining job passes its Pushgateway epoch callback; local mode runs none).

    Raises:
        RunNameError: `run_name` is not a plain directory name, is `latest`, or names an
            existing run (nothing stored is ever overwritten); checked first.
        ConfigError, DataError, EncoderNotFoundError: bad outputs, data or encoder, before Ray
            starts.
        TrainingError: the cluster cannot host the run, or training failed.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.loop import train_loop_per_worker

    start = time.monotonic()
    given = run_name is not None
    run_name = run_name if given else new_run_name(config.name)
    check_new_run(config.storage_path, run_name, "--run-name" if given else "run name")
    run_dir = config.storage_path / run_name
    check_writable_outputs(config, source=f"run {run_name}")
    encoder_path = resolve_encoder_path(config.encoder.path, config.encoder.allow_download)
    check_encoder_max_length(config, encoder_path, source=f"run {run_name}")

    tasks = load_tasks(config)
    full_splits = {(t.name, name): split for t in tasks for name, split in t.splits.items()}
    overlap, removed = check_overlap(config, tasks)
    logger.info("data:\n%s", format_stats(tasks))
    warn_large_batch(tasks, config.train.batch_size)
    inputs = prepare_inputs(config, tasks, encoder_path, full_splits)
    dim = inputs.dim
    weights = task_weights(config, tasks, inputs.train_features)
    mean, std = feature_stats(config, inputs)
    data = WorkerData(
        tasks=[t.name for t in tasks],
        num_classes={t.name: t.num_classes for t in tasks},
        weights=weights,
        feature_mean=mean,
        feature_std=std,
        train=inputs.train,
        dev=inputs.dev,
        teacher=teacher_probabilities(config, tasks),
    )

    sc = config.scaling
    if sc.num_workers > 0:
        connect_ray(sc.address)
        check_cluster_fits(config)
        import ray

        data_ref: Any = ray.put(data)  # via the object store: workers on any node can read it
    else:
        data_ref = data
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop_config(config, dim, inputs.encoder), "data": data_ref},
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker={"CPU": sc.cpus_per_worker} if sc.num_workers else None,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(config.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute="dev_macro_accuracy",
                checkpoint_score_order="max",
            ),
            # Our workers log one line per epoch; Ray Train's per-report INFO lines are noise.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks) or None,
        ),
    )
    logger.info(
        "run %s: training with %d worker(s); run directory %s", run_name, sc.num_workers, run_dir
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; say what failed in one line
        raise TrainingError(f"run {run_name} failed: {type(err).__name__}: {err}") from err
    if result.checkpoint is None:
        raise TrainingError(f"run {run_name} finished without a checkpoint")

    (run_dir / MODEL_DIR).mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / "state.json").read_text())
        # The final checkpoint's model is the selected one (best stage 1 + per-task alignment).
        shutil.copyfile(Path(ckpt) / "model.safetensors", run_dir / MODEL_DIR / MODEL_FILE)
    if config.scaling.num_workers == 0:
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)

    record = build_record(
        config, run_name, tasks, weights, encoder_path, inputs.encoder, dim, state
    )
    record.data_overlap = {"pairs": overlap, "removed_from_train": removed}
    record.duration_seconds = round(time.monotonic() - start, 1)
    write_run(run_dir, record, config)
    if config.own_path is not None:
        record = own_paths(run_dir, run_name, start)
    point_latest(config.storage_path, run_dir)
    return TrainResult(run_dir=run_dir, record=record)


def own_paths(run_dir: Path, run_name: str, start: float) -> RunRecord:
    """routing.own's stage (pipeline/own_path.py) on the written run, before it is published;
    returns the run's record as it now stands."""
    from pipeline.own_path import OwnPathError, train_own_paths

    logger.info("run %s: training the own paths (routing.own)", run_name)
    try:
        train_own_paths(run_dir)
    except OwnPathError as err:
        raise TrainingError(f"run {run_name}: {err}") from err
    record = read_record(run_dir)
    record.duration_seconds = round(time.monotonic() - start, 1)
    write_run(run_dir, record, record.run_config())
    return record


def stage_summary(
    history: list[dict[str, Any]],
    tasks: list[str],
    routing: dict[str, RouteDecision] | None = None,
    crossfit: Mapping[str, float | None] | None = None,
) -> dict[str, StageRecord]:
    """Per task: dev accuracy after stage 1 (best epoch), best during stage 2, its route (the
    path and the evidence), final, and the selection's cross-fitted accuracy (`crossfit`,
    from `selection_crossfit_of`)."""
    joint = [h for h in history if h["stage"] == "joint"]
    align = [h for h in history if h["stage"] == "align"]
    final = [h for h in history if h["stage"] == "final"]
    best_joint = max(joint, key=lambda h: h["dev_macro_accuracy"]) if joint else None
    out: dict[str, StageRecord] = {}
    for t in tasks:
        stage1 = best_joint["dev"][t]["accuracy"] if best_joint else None
        last = final[-1]["dev"][t]["accuracy"] if final else None
        route = (routing or {}).get(t)
        shared = route.shared_accuracy if route is not None else last
        out[t] = StageRecord(
            joint=stage1,
            joint_best_epoch=best_joint["epoch"] if best_joint else None,
            align_best=max(h["dev"][t]["accuracy"] for h in align) if align else None,
            final=last,
            # The shared path's final accuracy (a private route changes `final`).
            alignment_kept=shared is not None and stage1 is not None and shared > stage1,
            route=route,
            selection_crossfit=(crossfit or {}).get(t),
        )
    return out


def selection_crossfit_of(
    state: Mapping[str, Any], tasks: list[str], config: RunConfig
) -> dict[str, float | None]:
    """The run's model selection replayed on halves of dev (pipeline/selection.py), from the
    per-text correctness the loop recorded for every epoch in its history; {} when some epoch
    has none (a run resumed from a checkpoint written before the loop recorded it)."""
    recorded = state.get("dev_correct") or {}
    epochs: dict[str, list[dict[str, np.ndarray]]] = {"joint": [], "align": []}
    for h in state["history"]:
        if h["stage"] not in epochs:
            continue
        packed = recorded.get(f"{h['stage']}:{h['epoch']}")
        if packed is None or set(packed) != set(tasks):
            return {}
        epochs[h["stage"]].append({t: unpack(packed[t], int(h["dev"][t]["n"])) for t in tasks})
    return selection_crossfit(
        epochs["joint"],
        epochs["align"],
        keep_only_if_better=config.alignment.keep_only_if_better,
        seed=config.train.seed,
    )


def format_stage_table(summary: dict[str, StageRecord]) -> str:
    """What each stage did for each task (dev accuracy, %); with routing, each task's path and
    its evidence: private vs shared dev accuracy, their paired difference ± its standard error
    and the one-sided p-value."""

    def f(x: float | None) -> str:
        return f"{x:.2f}" if x is not None else "-"

    routed = any(r.route is not None for r in summary.values())
    header = f"{'task':<12} {'stage 1':>8} {'stage 2':>8} {'final':>8}  R_i kept"
    lines = [header + ("  route: private vs shared, diff ± SE (p)" if routed else "")]
    for t, r in summary.items():
        lines.append(
            f"{t:<12} {f(r.joint):>8} {f(r.align_best):>8} {f(r.final):>8}  "
            f"{'yes' if r.alignment_kept else 'no':<8}"
            + (f"  {format_route(r.route)}" if r.route is not None else "")
        )
    columns = [
        [getattr(r, k) for r in summary.values() if getattr(r, k) is not None]
        for k in ("joint", "align_best", "final")
    ]
    lines.append(
        f"{'MACRO AVG':<12} "
        + " ".join(f"{(np.mean(v) if v else float('nan')):>8.2f}" for v in columns)
    )
    return "\n".join(lines)


def build_record(
    config: RunConfig,
    run_name: str,
    tasks: list[TaskData],
    weights: dict[str, float],
    encoder_path: str,
    encoder: EncoderSpec | None,
    dim: int,
    state: dict[str, Any],
) -> RunRecord:
    """The run record (runs.py) of a finished run, from its final checkpoint's state."""
    history = state["history"]
    final = history[-1]
    names = [t.name for t in tasks]
    raw_routing = state.get("routing") or {}
    routing = (
        {t: RouteDecision.model_validate(raw_routing[t]) for t in names} if raw_routing else None
    )
    return RunRecord(
        polytask_version=__version__,
        run_name=run_name,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        tasks={
            t.name: TaskRecord(
                labels=t.labels,
                n_train=len(t.splits["train"]),
                n_dev=len(t.splits["dev"]),
                data_fingerprint=fingerprint_files(
                    [s.path for s in t.splits.values()],
                    extra=json.dumps(config.tasks[i].model_dump(mode="json"), sort_keys=True),
                ),
            )
            for i, t in enumerate(tasks)
        },
        task_weights=weights,
        encoder=EncoderRecord(
            path=encoder_path,
            fingerprint=encoder_fingerprint(encoder_path),
            dim=dim,
            max_length=config.encoder.max_length,
            pooling=config.encoder.pooling,
            trainable_layers=config.encoder.trainable_layers,
            cached_layers=encoder.cached_layers if encoder is not None else 0,
        ),
        config=config_to_dict(config),
        dev=final["dev"],
        dev_macro_accuracy=final["dev_macro_accuracy"],
        dev_macro_f1=final["dev_macro_f1"],
        stages=stage_summary(history, names, routing, selection_crossfit_of(state, names, config)),
        routing=routing,
        resumed_from=state.get("resumed_from"),
        history=history,
    )
