"""Integration tier: real local Ray clusters, 2 DDP workers, persisted checkpoints, a worker
killed mid-run. Run with `pytest -m integration` (CI does)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config_dict

from pipeline.config import parse_config, resolve_paths
from pipeline.train.driver import FAULT_ENV, TrainingError, train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for the module (starting one takes ~10-30 s)."""
    import ray

    ray.init(num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()


def two_worker_config(tmp: Path, data: Path, encoder: Path, trainable_layers: int = 0, **scaling):
    raw = tiny_config_dict(data, encoder, tmp / "runs", tmp / "cache")
    raw["train"]["epochs"] = 5
    raw["encoder"]["trainable_layers"] = trainable_layers
    raw["optim"]["encoder_lr"] = 1e-3
    raw["scaling"] = {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1, **scaling}
    return resolve_paths(parse_config(raw), base=tmp)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory, tiny_data_dir, tiny_encoder_dir):
    tmp = tmp_path_factory.mktemp("ray-run")
    return train(two_worker_config(tmp, tiny_data_dir, tiny_encoder_dir), run_name="clean")


def test_two_worker_run_persists_ranked_checkpoints(uninterrupted):
    run_dir = uninterrupted.run_dir
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(checkpoints) <= 3  # num_to_keep=2 by score, plus the latest
    for ckpt in checkpoints:
        assert (ckpt / "model.safetensors").is_file()
        state = json.loads((ckpt / "state.json").read_text())
        assert state["history"]
    rec = uninterrupted.record
    joint = [h for h in rec.history if h["stage"] == "joint"]
    assert [h["epoch"] for h in joint] == [1, 2, 3, 4, 5]
    first, last = (sum(h["train_loss"].values()) for h in (joint[0], joint[-1]))
    assert last < first  # loss falls under DDP too
    assert rec.resumed_from is None
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_killed_worker_resumes_from_its_checkpoint(
    uninterrupted, tmp_path, tiny_data_dir, tiny_encoder_dir, monkeypatch
):
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv(FAULT_ENV, f"joint:2:{marker}")
    config = two_worker_config(tmp_path, tiny_data_dir, tiny_encoder_dir)
    result = train(config, run_name="killed")

    assert marker.is_file(), "the fault was not injected"
    rec = result.record
    assert rec.resumed_from == "joint:2"
    joint = [h["epoch"] for h in rec.history if h["stage"] == "joint"]
    assert joint == [1, 2, 3, 4, 5]  # each epoch once: epochs 1-2 came from the checkpoint
    # Seeding by (seed, epoch, rank) makes the resumed run replay the lost epochs exactly.
    clean = uninterrupted.record
    assert rec.dev_macro_accuracy == pytest.approx(clean.dev_macro_accuracy, abs=1e-6)
    for a, b in zip(rec.history, clean.history, strict=True):
        for task, loss in a["train_loss"].items():
            assert loss == pytest.approx(b["train_loss"][task], rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def finetuned(ray_cluster, tmp_path_factory, tiny_data_dir, tiny_encoder_dir):
    """Two DDP workers fine-tuning the top layer on cached bottom-layer states."""
    tmp = tmp_path_factory.mktemp("ray-finetune")
    config = two_worker_config(tmp, tiny_data_dir, tiny_encoder_dir, trainable_layers=1)
    return train(config, run_name="finetune-clean"), tmp


def test_finetuned_worker_killed_once_resumes_exactly(
    finetuned, tiny_data_dir, tiny_encoder_dir, monkeypatch
):
    from safetensors.torch import load_file

    clean, tmp = finetuned
    rec = clean.record
    assert rec.encoder.cached_layers == 1 and rec.resumed_from is None
    joint = [h for h in rec.history if h["stage"] == "joint"]
    assert sum(joint[-1]["train_loss"].values()) < sum(joint[0]["train_loss"].values())

    # Same storage and cache: the rerun reads every token state from the cache.
    marker = tmp / "killed.txt"
    monkeypatch.setenv(FAULT_ENV, f"joint:3:{marker}")
    config = two_worker_config(tmp, tiny_data_dir, tiny_encoder_dir, trainable_layers=1)
    killed = train(config, run_name="finetune-killed")
    assert marker.is_file(), "the fault was not injected"
    krec = killed.record
    assert krec.resumed_from == "joint:3"
    assert [h["epoch"] for h in krec.history if h["stage"] == "joint"] == [1, 2, 3, 4, 5]
    for a, b in zip(krec.history, rec.history, strict=True):
        assert a["dev"] == b["dev"]
        for task, loss in a["train_loss"].items():
            assert loss == pytest.approx(b["train_loss"][task], rel=1e-4, abs=1e-6)
    # The selected models are the same, fine-tuned encoder layer included.
    a = load_file(str(killed.run_dir / "model" / "model.safetensors"))
    b = load_file(str(clean.run_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("encoder.") for k in a)
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5, key


def test_a_cluster_too_small_fails_before_training(
    ray_cluster, tmp_path, tiny_data_dir, tiny_encoder_dir
):
    config = two_worker_config(tmp_path, tiny_data_dir, tiny_encoder_dir, num_workers=3)
    with pytest.raises(
        TrainingError, match="3 workers x 1 CPUs = 3 CPUs, but the Ray cluster has 2"
    ):
        train(config)
