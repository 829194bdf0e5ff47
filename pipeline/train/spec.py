"""What the driver hands each worker: one frozen, typed loop config and the prepared data.

Both cross the Ray boundary by pickling (pydantic sections and dataclasses pickle), so workers
read typed fields, never nested dicts by string key. Nothing here imports torch: the driver
builds these before any worker starts.

The data of one split of one task is one of three kinds:
- `FeatureSplit`: pooled features of the frozen encoder, [n, d] (the fast CPU path);
- `CachedStateSplit`: a token-state cache entry on disk (partial fine-tuning), memory-mapped
  by each worker, plus which of its rows this split uses;
- `TokenSplit`: token ids (whole-encoder fine-tuning).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline.config import (
    AlignmentConfig,
    AuxConfig,
    DistillConfig,
    OptimConfig,
    RoutingConfig,
    SamplerConfig,
    SharedConfig,
    TowerConfig,
    TrainConfig,
)

FAULT_ENV = "POLYTASK_FAULT_INJECTION"


@dataclass(frozen=True)
class FaultSpec:
    """The resume test's fault: kill the last rank once after `stage` epoch `epoch`."""

    stage: str
    epoch: int
    marker: str

    @classmethod
    def from_env(cls) -> FaultSpec | None:
        """From POLYTASK_FAULT_INJECTION='<stage>:<epoch>:<marker file>', if set."""
        raw = os.environ.get(FAULT_ENV)
        if not raw:
            return None
        stage, epoch, marker = raw.split(":", 2)
        return cls(stage, int(epoch), marker)


@dataclass(frozen=True)
class EncoderSpec:
    """The encoder the workers fine-tune (absent when it is frozen)."""

    path: str
    pooling: str
    trainable_layers: int | Literal["all"]
    cached_layers: int  # bottom blocks whose output the data holds; 0: the data is token ids
    pooled_layers: tuple[int, ...] = ()  # routing.private.layers (Encoder.pooled_layers)


@dataclass(frozen=True)
class LoopConfig:
    """Every setting of the per-worker loop."""

    in_dim: int
    shared: SharedConfig
    towers: TowerConfig
    aux: AuxConfig
    encoder: EncoderSpec | None
    train: TrainConfig
    optim: OptimConfig
    sampler: SamplerConfig
    alignment: AlignmentConfig
    routing: RoutingConfig | None = None  # None: no private paths (runs before issue 13)
    distill: DistillConfig | None = None  # None or no teachers: gold labels only
    cpus_per_worker: float = 1.0
    local_mode: bool = False
    fault: FaultSpec | None = None


@dataclass(frozen=True)
class FeatureSplit:
    features: np.ndarray  # float32 [n, d]
    labels: np.ndarray  # int64 [n]


@dataclass(frozen=True)
class TokenSplit:
    input_ids: np.ndarray  # int64 [n, L]
    attention_mask: np.ndarray  # int64 [n, L]
    labels: np.ndarray  # int64 [n]


@dataclass(frozen=True)
class CachedStateSplit:
    path: str  # a token_cache entry directory
    rows: np.ndarray | None  # which rows of the entry, in order; None: all
    labels: np.ndarray  # int64 [n]


SplitData = FeatureSplit | TokenSplit | CachedStateSplit


@dataclass(frozen=True)
class WorkerData:
    """The prepared data of a run (through the object store when there are workers)."""

    tasks: list[str]
    num_classes: dict[str, int]
    weights: dict[str, float]
    feature_mean: np.ndarray  # float32 [d * (1 + len(pooled_layers))]
    feature_std: np.ndarray  # float32 [d * (1 + len(pooled_layers))]
    train: dict[str, SplitData]
    dev: dict[str, SplitData]
    # distill.teachers: a teacher's probabilities for each training row of its task,
    # float32 [n_train, num_classes], rows in the order of `train[task]`
    teacher: dict[str, np.ndarray] = field(default_factory=dict)
