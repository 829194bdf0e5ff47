"""End to end in Ray Train local mode (no cluster): train -> run directory -> evaluate ->
affinity, through the CLI the user runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data_dir, tiny_encoder_dir):
    """One tiny local-mode run shared by the tests below: (run_dir, stdout, config path)."""
    from conftest import tiny_config_dict

    tmp = tmp_path_factory.mktemp("local-run")
    cfg = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp / "runs", tmp / "cache")
    cfg["train"]["epochs"] = 8
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(path)]) == 0
    stdout = out.getvalue()
    run_dir = Path(stdout.split("run directory: ")[-1].strip())
    return run_dir, stdout, path


def test_train_prints_run_directory_and_stage_table(trained_run):
    run_dir, stdout, _ = trained_run
    assert run_dir.is_dir()
    assert (run_dir / "run.json").is_file()
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert "What each stage did" in stdout
    for task in ("sentiment", "topic"):
        assert task in stdout
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()


def test_run_record_has_history_weights_and_fingerprints(trained_run):
    run_dir, _, _ = trained_run
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["tasks"]["topic"]["labels"] == ["food", "sport", "tech"]
    assert set(rec["task_weights"]) == {"sentiment", "topic"}
    assert len(rec["encoder"]["fingerprint"]) == 64
    stages = [h["stage"] for h in rec["history"]]
    assert stages == ["joint"] * 8 + ["align"] * 2 + ["final"]
    # Loss falls on the tiny set.
    joint = [h for h in rec["history"] if h["stage"] == "joint"]
    first = sum(joint[0]["train_loss"].values())
    last = sum(joint[-1]["train_loss"].values())
    assert last < 0.8 * first, (first, last)
    # The selected model is never worse on dev than the best stage-1 epoch.
    best_joint = max(h["dev_macro_accuracy"] for h in joint)
    assert rec["dev_macro_accuracy"] >= best_joint - 1e-9
    # Every epoch's per-text correctness was recorded, so each task's model selection is
    # also scored cross-fitted (pipeline/selection.py).
    for task in ("sentiment", "topic"):
        crossfit = rec["stages"][task]["selection_crossfit"]
        assert isinstance(crossfit, float) and 0.0 <= crossfit <= 100.0


def test_evaluate_matches_training_dev_metrics_and_writes_json(trained_run, tmp_path, capsys):
    run_dir, _, _ = trained_run
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run_dir), "--split", "dev", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    rec = json.loads((run_dir / "run.json").read_text())
    assert set(res) >= {"tasks", "macro_average"}
    for task, m in res["tasks"].items():
        assert set(m) == {"accuracy", "macro_f1", "n"}
        assert m["accuracy"] == pytest.approx(rec["dev"][task]["accuracy"], abs=1e-6)
    assert res["macro_average"]["accuracy"] == pytest.approx(rec["dev_macro_accuracy"], abs=1e-6)
    assert "MACRO AVG" in capsys.readouterr().out


def test_evaluate_on_another_directory_and_split(trained_run, tiny_data_dir, tmp_path):
    run_dir, _, _ = trained_run
    other = tmp_path / "other"
    for task in ("sentiment", "topic"):
        (other / task).mkdir(parents=True)
        shutil.copy(tiny_data_dir / task / "dev.jsonl", other / task / "test.jsonl")
    out = tmp_path / "test.json"
    argv = ["evaluate", str(run_dir), "--data-dir", str(other), "--split", "test"]
    assert main([*argv, "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["split"] == "test"
    assert res["tasks"]["topic"]["n"] == 24


def test_evaluate_rejects_unseen_label_with_file_and_line(
    trained_run, tiny_data_dir, tmp_path, capsys
):
    run_dir, _, _ = trained_run
    other = tmp_path / "bad"
    for task in ("sentiment", "topic"):
        (other / task).mkdir(parents=True)
        shutil.copy(tiny_data_dir / task / "dev.jsonl", other / task / "dev.jsonl")
    with (other / "topic" / "dev.jsonl").open("a") as f:
        f.write(json.dumps({"text": "the ball", "label": "music"}) + "\n")
    assert main(["evaluate", str(run_dir), "--data-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"{other / 'topic' / 'dev.jsonl'}:25: label 'music'" in err


def test_evaluate_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_affinity_before_and_after_alignment(trained_run, tmp_path):
    run_dir, _, config = trained_run
    out = tmp_path / "aff"
    assert main(["affinity", str(config), "--run", str(run_dir), "--output", str(out)]) == 0
    report = json.loads((out / "affinity.json").read_text())
    assert report["tasks"] == ["sentiment", "topic"]
    assert len(report["before"]) == 2 and len(report["after"]) == 2
    for name in ("affinity_before.png", "affinity_after.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_a_single_task_subset(tmp_path, tiny_data_dir, tiny_encoder_dir, capsys):
    from conftest import tiny_config_dict

    cfg = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "c")
    cfg["alignment"]["enabled"] = False
    cfg["train"]["epochs"] = 1
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--tasks", "topic"]) == 0
    run_dir = Path(capsys.readouterr().out.split("run directory: ")[-1].strip())
    rec = json.loads((run_dir / "run.json").read_text())
    assert list(rec["tasks"]) == ["topic"]
    # One epoch, nothing to pick: the cross-fitted score of the selection is the recorded
    # correctness's accuracy on the 24 dev texts, which must be that epoch's dev accuracy (the
    # shared path's; `final` may be the private route's).
    stage = rec["stages"]["topic"]
    assert stage["selection_crossfit"] == pytest.approx(stage["joint"])


def test_decontaminated_run_reuses_the_whole_files_cached_features(
    tmp_path, tiny_data_dir, tiny_encoder_dir
):
    """Dropping rows must not re-encode a split: its features are the cached full file's rows."""
    from conftest import tiny_config_dict, write_jsonl

    from pipeline.config import parse_config, resolve_paths
    from pipeline.data import decontaminate, load_tasks
    from pipeline.features import FeatureCache
    from pipeline.train.driver import prepare_inputs

    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    # Plant two of topic's dev sentences in sentiment's training file.
    dev = [json.loads(x) for x in (data / "topic" / "dev.jsonl").open()]
    train = [json.loads(x) for x in (data / "sentiment" / "train.jsonl").open()]
    write_jsonl(
        data / "sentiment" / "train.jsonl",
        train[:5] + [{"text": dev[0]["text"], "label": "positive"}] + train[5:]
        + [{"text": dev[1]["text"], "label": "negative"}],
    )  # fmt: skip
    raw = tiny_config_dict(data, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    config = resolve_paths(parse_config(raw), base=tmp_path)
    encoder = str(tiny_encoder_dir)
    tasks = load_tasks(config)
    full = {(t.name, n): s for t in tasks for n, s in t.splits.items()}
    full_features = prepare_inputs(config, tasks, encoder, full).train_features
    cached = set((tmp_path / "cache").rglob("*.npy"))

    assert decontaminate(tasks) == {"sentiment": 2, "topic": 0}
    prepared = prepare_inputs(config, tasks, encoder, full)
    features = prepared.train_features
    assert set((tmp_path / "cache").rglob("*.npy")) == cached  # nothing new was encoded
    kept = tasks[0].splits["train"]
    assert features["sentiment"].shape[0] == len(kept) == 48
    np_rows = full_features["sentiment"][kept.rows]
    assert (features["sentiment"] == np_rows).all()
    assert (prepared.train["sentiment"].features == np_rows).all()
    # ...and they are what encoding the kept texts directly gives.
    cache = FeatureCache(tmp_path / "cache2", encoder, 16, "mean")
    direct = cache.get(kept.texts, batch_size=32)
    assert abs(direct - features["sentiment"]).max() < 1e-5
