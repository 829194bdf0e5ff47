"""Teacher distillation in stage 1 (`distill.teachers`): targets, row alignment, errors, and a
teacher that really steers training."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_task_rows, tiny_config_dict, write_jsonl

from pipeline.cli import main
from pipeline.config import ConfigError, DistillConfig, load_config, parse_config
from pipeline.train.driver import TrainingError, loop_config, teacher_probabilities
from pipeline.train.loop import build_context, sampled_batches, soft_targets, teacher_share
from pipeline.train.spec import FeatureSplit, WorkerData


def test_teacher_share_anneals_from_teacher_to_gold_or_stays_fixed():
    anneal = DistillConfig()
    assert teacher_share(anneal, 0, 100) == 1.0
    assert teacher_share(anneal, 50, 100) == 0.5
    assert teacher_share(anneal, 99, 100) == pytest.approx(0.01)
    fixed = DistillConfig(anneal=False, teacher_weight=0.3)
    assert teacher_share(fixed, 0, 100) == teacher_share(fixed, 99, 100) == 0.3


def test_soft_targets_mix_teacher_and_one_hot_gold():
    labels = torch.tensor([0, 2])
    teacher = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]])
    out = soft_targets(labels, teacher, 0.25)
    expected = torch.tensor([[0.8, 0.075, 0.125], [0.15, 0.1, 0.75]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(1), torch.ones(2))


def _loop_context(tiny_data_dir, tiny_encoder_dir, tmp_path, teacher: dict[str, np.ndarray]):
    """A worker Context on synthetic features whose first column is the row's index."""
    cfg = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "c")
    cfg["distill"] = {"teachers": {"a": str(tmp_path)}}
    cfg["tasks"] = [{"name": "a"}, {"name": "b"}]
    config = parse_config(cfg, "test")
    rng = np.random.default_rng(0)
    data = {}
    for task, n in (("a", 37), ("b", 23)):
        feats = rng.normal(size=(n, 8)).astype(np.float32)
        feats[:, 0] = np.arange(n)
        data[task] = FeatureSplit(feats, rng.integers(0, 2, n).astype(np.int64))
    worker = WorkerData(
        tasks=["a", "b"],
        num_classes={"a": 2, "b": 2},
        weights={"a": 1.0, "b": 1.0},
        feature_mean=np.zeros(8, np.float32),
        feature_std=np.ones(8, np.float32),
        train=data,
        dev=data,
        teacher=teacher,
    )
    ctx = build_context(worker, loop_config(config, 8, None), torch.device("cpu"), "fp32", None)
    return ctx, data


def test_stage_one_targets_take_each_batch_rows_teacher_row(
    tiny_data_dir, tiny_encoder_dir, tmp_path
):
    # Every row gets its own teacher distribution, so a batch paired with other rows' teacher
    # probabilities (a misaligned index) cannot match.
    n = 37
    p = (np.arange(n, dtype=np.float32) + 0.5) / n
    teacher = np.stack([p, 1 - p], 1).astype(np.float32)
    ctx, data = _loop_context(tiny_data_dir, tiny_encoder_dir, tmp_path, {"a": teacher})
    steps, epochs = 9, ctx.cfg.train.epochs
    seen = {"a": 0, "b": 0}
    for epoch in (0, epochs - 1):
        for step, (task, inputs, labels) in enumerate(
            sampled_batches(ctx, ctx_probs(), steps, epoch, 0)
        ):
            rows = inputs["features"][:, 0].long().numpy()
            gold = data[task].labels[rows]
            seen[task] += len(rows)
            if task == "b":  # no teacher: the gold labels, as integers
                assert labels.dtype == torch.int64
                np.testing.assert_array_equal(labels.numpy(), gold)
                continue
            share = 1.0 - (epoch * steps + step) / (epochs * steps)
            expected = share * teacher[rows] + (1 - share) * np.eye(2, dtype=np.float32)[gold]
            np.testing.assert_allclose(labels.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert seen["a"] and seen["b"]
    # Stage 2 (alignment) trains on the gold labels alone.
    for task, _, labels in sampled_batches(ctx, ctx_probs(), steps, 0, 1):
        assert labels.dtype == torch.int64, task


def ctx_probs() -> np.ndarray:
    return np.array([0.5, 0.5])


def test_a_teacher_for_an_unknown_task_is_a_config_error(tiny_config_file):
    with pytest.raises(ConfigError, match=r"distill.teachers: \['nope'\] not among"):
        load_config(tiny_config_file, overrides={"distill.teachers.nope": "runs/x"})


def _train(tmp: Path, cfg: dict, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(path), "--run-name", name]) == 0
    return Path(out.getvalue().split("run directory: ")[-1].strip())


@pytest.fixture(scope="module")
def flipped_teacher(tmp_path_factory, tiny_encoder_dir):
    """A sentiment-only run trained on swapped labels (positive texts called negative): a
    teacher whose answers are the opposite of the gold labels of the tiny data."""
    tmp = tmp_path_factory.mktemp("teacher")
    data = tmp / "flipped"
    swap = {"positive": "negative", "negative": "positive"}
    for split, n, seed in (("train", 48, 1), ("dev", 24, 101)):
        rows = [r | {"label": swap[r["label"]]} for r in make_task_rows("sentiment", n, seed)]
        write_jsonl(data / "sentiment" / f"{split}.jsonl", rows)
    cfg = tiny_config_dict(data, tiny_encoder_dir, tmp / "runs", tmp / "cache")
    cfg["tasks"] = [{"name": "sentiment"}]
    cfg["train"]["epochs"] = 8
    return _train(tmp, cfg, "teacher")


def test_teacher_probabilities_name_the_field_on_a_bad_teacher(
    tmp_path, tiny_data_dir, tiny_encoder_dir, flipped_teacher
):
    from pipeline.data import load_tasks

    def config(teachers: dict, labels: list[str] | None = None):
        cfg = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "r", tmp_path / "c")
        cfg["distill"] = {"teachers": teachers}
        if labels:
            cfg["tasks"][0]["labels"] = labels
        return parse_config(cfg, "test")

    c = config({"sentiment": str(tmp_path / "missing")})
    with pytest.raises(TrainingError, match=r"distill.teachers.sentiment: .*not a finished run"):
        teacher_probabilities(c, load_tasks(c))
    c = config({"topic": str(flipped_teacher)})
    with pytest.raises(TrainingError, match=r"distill.teachers.topic: .*has no task 'topic'"):
        teacher_probabilities(c, load_tasks(c))
    c = config({"sentiment": str(flipped_teacher)}, labels=["positive", "negative"])
    with pytest.raises(TrainingError, match=r"distill.teachers.sentiment: the teacher's labels"):
        teacher_probabilities(c, load_tasks(c))
    c = config({"sentiment": str(flipped_teacher)})
    probs = teacher_probabilities(c, load_tasks(c))
    assert set(probs) == {"sentiment"}
    assert probs["sentiment"].shape == (48, 2) and probs["sentiment"].dtype == np.float32
    np.testing.assert_allclose(probs["sentiment"].sum(1), 1.0, rtol=1e-5)


def test_a_teacher_steers_stage_one(tmp_path, tiny_data_dir, tiny_encoder_dir, flipped_teacher):
    """On the true data, a student taught only by the flipped teacher answers the opposite of
    the gold labels, where the same run without a teacher gets them right: the teacher's
    probabilities, row by row, are what stage 1 learned from."""
    cfg = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    # The shared path alone, stage 1 alone: routing and alignment train on gold labels.
    cfg["routing"] = {"enabled": False}
    cfg["alignment"] = {"enabled": False}
    cfg["train"]["epochs"] = 8
    plain = _train(tmp_path, cfg, "plain")
    cfg["distill"] = {"teachers": {"sentiment": str(flipped_teacher)}, "anneal": False}
    cfg["distill"]["teacher_weight"] = 1.0
    taught = _train(tmp_path, cfg, "taught")

    def dev(run: Path) -> dict[str, float]:
        final = json.loads((run / "run.json").read_text())["history"][-1]
        return final["dev"]

    assert dev(plain)["sentiment"]["accuracy"] > 80
    assert dev(taught)["sentiment"]["accuracy"] < 40  # 2 classes: chance is 50
    # The task without a teacher still learns its gold labels (3 classes: chance is 33).
    assert dev(taught)["topic"]["accuracy"] > 60
    record = json.loads((taught / "run.json").read_text())
    assert record["config"]["distill"]["teachers"] == {"sentiment": str(flipped_teacher)}
    # Removing the taught task removes its teacher: the child's config stays valid.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["remove-task", str(taught), "sentiment", "--run-name", "child"]) == 0
    child = json.loads((taught.parent / "child" / "run.json").read_text())
    assert child["config"]["distill"]["teachers"] == {}
    assert [t["name"] for t in child["config"]["tasks"]] == ["topic"]


def test_selecting_tasks_keeps_only_their_teachers(tiny_config_file):
    from pipeline.config import select_tasks

    config = load_config(
        tiny_config_file,
        overrides={"distill.teachers.sentiment": "/r/a", "distill.teachers.topic": "/r/b"},
    )
    assert select_tasks(config, ["topic"]).distill.teachers == {"topic": Path("/r/b")}
