"""Stage 2 (Algorithm 1) on synthetic features, in-process: no Ray, no encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline.train.loop as loop
from pipeline.affinity import covariance_similarity
from pipeline.config import (
    AlignmentConfig,
    AuxConfig,
    OptimConfig,
    SamplerConfig,
    SharedConfig,
    TowerConfig,
    TrainConfig,
)
from pipeline.model import MultiTaskHeads
from pipeline.train.spec import LoopConfig


def make_pair(seed: int, d: int = 8, n: int = 600):
    """Two tasks with the same labelling rule but different covariances: task a's signal and
    variance live in dims 0-3, task b's in dims 4-7."""
    rng = np.random.default_rng(seed)
    high_low = np.array([3.0] * 4 + [0.3] * 4)
    w = np.zeros(d)
    w[:4] = rng.normal(size=4)
    xa = rng.normal(size=(n, d)) * high_low
    xb = rng.normal(size=(n, d)) * high_low[::-1]
    ya = (xa @ w > 0).astype(np.int64)
    yb = (xb @ np.roll(w, 4) > 0).astype(np.int64)
    return xa.astype(np.float32), ya, xb.astype(np.float32), yb


def loop_cfg(seed: int, keep_only_if_better: bool = False, penalty: float = 0.0) -> LoopConfig:
    return LoopConfig(
        in_dim=8,
        shared=SharedConfig(capacity=2, dropout=0.0),
        towers=TowerConfig(dropout=0.0),
        aux=AuxConfig(enabled=False, gamma=0.0),
        encoder=None,
        train=TrainConfig(epochs=10, batch_size=32, seed=seed, precision="fp32"),
        optim=OptimConfig(lr=1e-2, weight_decay=0.0, schedule="constant", grad_clip=None),
        sampler=SamplerConfig(kind="proportional"),
        alignment=AlignmentConfig(
            epochs=5,
            lr=1e-2,
            tower_lr=1e-3,
            identity_penalty=penalty,
            keep_only_if_better=keep_only_if_better,
        ),
    )


def train_pair(seed: int, monkeypatch, **cfg_kwargs):
    """Stage 1 then stage 2 on the pair; returns (heads, features, stage-1 best, state)."""
    monkeypatch.setattr(loop, "report_epoch", lambda *a, **k: None)  # no Ray session here
    xa, ya, xb, yb = make_pair(seed)
    torch.manual_seed(seed)
    heads = MultiTaskHeads(
        8, {"a": 2, "b": 2}, capacity=2, shared_dropout=0.0, tower_dropout=0.0, aux_kind=None
    )
    module = loop.TrainModule(heads)
    half = len(ya) // 2

    def tensors(x, y):
        return loop.TaskTensors({"features": torch.tensor(x)}, torch.tensor(y))

    ctx = loop.Context(
        tasks=["a", "b"],
        weights={"a": 1.0, "b": 1.0},
        train={"a": tensors(xa[:half], ya[:half]), "b": tensors(xb[:half], yb[:half])},
        dev={"a": tensors(xa[half:], ya[half:]), "b": tensors(xb[half:], yb[half:])},
        cfg=loop_cfg(seed, **cfg_kwargs),
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        precision="fp32",
        report=lambda metrics, path: None,
    )
    state = loop.LoopState()
    best = loop.run_joint_stage(module, ctx, state, None, None)
    stage1 = {k: v.clone() for k, v in best.items()}
    state.stage, state.epoch = "align", 0
    best = loop.run_alignment_stage(module, ctx, state, best, None)
    return heads, (xa, xb), stage1, best, state


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alignment_raises_covariance_similarity(seed, monkeypatch):
    heads, (xa, xb), _, _, _ = train_pair(seed, monkeypatch)
    ra = heads.alignment["a"].detach().numpy()
    rb = heads.alignment["b"].detach().numpy()
    before = covariance_similarity(xa, xb)
    after = covariance_similarity(xa @ ra, xb @ rb)
    assert after > before + 0.02, (before, after)


def test_stage1_leaves_alignment_at_identity_and_stage2_keeps_b_fixed(monkeypatch):
    heads, _, stage1, best, _ = train_pair(0, monkeypatch)
    for t in ("a", "b"):
        assert torch.equal(stage1[f"heads.alignment.{t}"], torch.eye(8))
    shared_keys = [k for k in stage1 if k.startswith("heads.shared.")]
    assert shared_keys
    for k in shared_keys:  # B is fixed in stage 2
        assert torch.equal(best[k], stage1[k]), k
    assert not torch.equal(heads.alignment["b"].detach(), torch.eye(8))  # R_i did train


def test_keep_only_if_better_restores_stage1_for_tasks_alignment_did_not_help(monkeypatch):
    heads, _, stage1, best, state = train_pair(3, monkeypatch, keep_only_if_better=True)
    for t in ("a", "b"):
        kept = not torch.equal(best[f"heads.alignment.{t}"], stage1[f"heads.alignment.{t}"])
        stage1_acc = state.stage1_dev[t]["accuracy"]
        assert kept == (state.best_task_acc[t] > stage1_acc), t
