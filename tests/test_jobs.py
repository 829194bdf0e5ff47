"""Retraining with the promotion gate (pipeline/jobs/retrain.py) on tiny local-mode runs, in an
isolated BentoML store. Claims checked: the first model is promoted only if it clears the
minimums; a better challenger is promoted and served; one whose `topic` training labels are
half corrupted is refused and the served model stays; rollback restores the previous model;
`polytask models list` shows the stage. Training is deterministic (seed 0, local mode), so
the outcomes are too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config_dict, use_bentoml_home, write_jsonl

from pipeline.config import parse_config

NAME = "polytask-tiny"


def tiny_config(tmp: Path, data: Path, encoder: Path, epochs: int, **promotion: object):
    raw = tiny_config_dict(data, encoder, tmp / "runs", tmp / "cache")
    raw["train"]["epochs"] = epochs
    # Shared paths only: a private head (routing) is fitted to convergence whatever the epochs,
    # so with it the 1-epoch model can tie the 4-epoch one on 24 dev texts.
    raw["routing"] = {"enabled": False}
    raw["promotion"] = promotion
    return parse_config(raw)


def corrupted_copy(data: Path, out: Path, task: str) -> Path:
    """`data` with every other training label of `task` replaced by the next label."""
    for split in ("train", "dev"):
        for t in ("sentiment", "topic"):
            rows = [
                json.loads(line) for line in (data / t / f"{split}.jsonl").read_text().splitlines()
            ]
            if t == task and split == "train":
                labels = sorted({r["label"] for r in rows})
                for r in rows[::2]:
                    r["label"] = labels[(labels.index(r["label"]) + 1) % len(labels)]
            write_jsonl(out / t / f"{split}.jsonl", rows)
    return out


@pytest.fixture(scope="module")
def history(tmp_path_factory, tiny_data_dir, tiny_encoder_dir):
    """Three retraining jobs in one store: a weak first model (1 epoch), a better one
    (4 epochs), then a worse one (4 epochs, `topic` labels half corrupted). All are evaluated
    on the clean dev files (promotion.eval_data_dir)."""
    from pipeline.jobs.retrain import retrain

    tmp = tmp_path_factory.mktemp("jobs")
    bad_data = corrupted_copy(tiny_data_dir, tmp / "bad-data", "topic")
    gate = {"minimums": {"sentiment": 60.0}, "eval_data_dir": str(tiny_data_dir)}
    with use_bentoml_home(tmp / "bentoml") as home:
        records = {
            "first": retrain(tiny_config(tmp, tiny_data_dir, tiny_encoder_dir, 1, **gate), "first"),
            "better": retrain(
                tiny_config(tmp, tiny_data_dir, tiny_encoder_dir, 4, **gate), "better"
            ),
            "worse": retrain(tiny_config(tmp, bad_data, tiny_encoder_dir, 4, **gate), "worse"),
        }
        yield home, records


def _served(monkeypatch) -> str:
    from serving.model_store import resolve_model

    monkeypatch.delenv("POLYTASK_MODEL", raising=False)
    got = resolve_model(name=NAME)
    assert got.source == "promoted"
    return got.tag


def test_first_model_clearing_minimums_is_promoted(history):
    _, records = history
    first = records["first"]
    assert first.champion is None and first.promoted and not first.removed_from_store
    assert first.decision.tasks[0].minimum == 60.0
    record = json.loads((first.run_dir / "retrain.json").read_text())
    assert record["status"] == "decided"
    assert record["promoted"] and record["tag"] == first.tag and record["run_name"] == "first"
    assert set(record["durations"]) == {"train", "export", "evaluate", "total"}
    assert record["decision"]["reason"].startswith("first model promoted")


def test_better_challenger_is_promoted(history):
    _, records = history
    better, first = records["better"], records["first"]
    assert better.champion == first.tag and better.promoted
    assert better.decision.challenger_macro > better.decision.champion_macro
    # champion numbers are the champion's own, re-evaluated on the same files
    champ = better.evaluation["champion"]["tasks"]
    assert champ == records["first"].evaluation["challenger"]["tasks"]
    # calibration: both models' ECE on the same 24 dev texts per task, in the decision and the
    # record, next to the challenger's temperatures fitted at export
    rows = {c.task: c for c in better.decision.calibration}
    assert set(rows) == {"sentiment", "topic"} and all(c.ok and c.n == 24 for c in rows.values())
    for task, c in rows.items():
        assert c.champion == pytest.approx(champ[task]["ece"])
        assert c.challenger == pytest.approx(better.evaluation["challenger"]["tasks"][task]["ece"])
    record = json.loads((better.run_dir / "retrain.json").read_text())
    assert record["evaluation"]["calibration"]["topic"]["temperature"] > 0
    assert "calibration (ECE) is clearly worse" in record["decision"]["reason"]


def test_worse_challenger_is_refused_and_the_champion_stays(history, monkeypatch):
    _, records = history
    worse, better = records["worse"], records["better"]
    assert worse.champion == better.tag and not worse.promoted
    topic = next(r for r in worse.decision.tasks if r.task == "topic")
    assert not topic.ok and topic.delta < -worse.decision.tolerance
    assert worse.decision.reason.startswith("challenger refused: topic (falls by")
    assert _served(monkeypatch) == better.tag
    # refused challengers stay in the store (an operator may still promote them by hand)
    from pipeline.jobs.models import list_versions

    assert worse.tag in {v.tag for v in list_versions(NAME)}
    assert json.loads((worse.run_dir / "retrain.json").read_text())["promoted"] is False


def test_rollback_restores_the_previous_model_and_list_shows_the_stage(
    history, monkeypatch, capsys
):
    from pipeline.cli import main

    _, records = history
    first, better = records["first"].tag, records["better"].tag
    assert main(["models", "rollback", "--name", NAME]) == 0
    assert _served(monkeypatch) == first
    capsys.readouterr()
    assert main(["models", "list", "--name", NAME]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == {first, better, records["worse"].tag}
    assert "production" in lines[first] and "production" not in lines[better]
    # a second rollback swaps back (as `kubectl rollout undo` does); promote TAG works too
    assert main(["models", "rollback", "--name", NAME]) == 0
    assert _served(monkeypatch) == better
    assert main(["models", "promote", records["worse"].tag]) == 0
    assert _served(monkeypatch) == records["worse"].tag
    assert main(["models", "promote", better]) == 0
    assert main(["models", "promote", f"{NAME}:nosuchversion"]) == 2
    assert "not in the model store" in capsys.readouterr().err


def test_cli_retrain_refuses_a_first_model_below_minimums(
    tmp_path, tiny_data_dir, tiny_encoder_dir, capsys
):
    import yaml

    from pipeline.cli import main
    from pipeline.jobs.models import list_versions

    raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    raw["train"]["epochs"] = 1
    raw["routing"] = {"enabled": False}  # the shared path's 58.33, as tiny_config
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    with use_bentoml_home(tmp_path / "bentoml"):
        argv = ["retrain", str(path), "--set", "promotion.min_macro=99", "--run-name", "too-weak"]
        assert main(argv) == 0  # a refusal is an outcome, not an error
        # not left in the store, where the service would fall back to it as the latest version
        assert list_versions(NAME) == []
    out = capsys.readouterr().out
    assert "REFUSE: first model refused: macro average 58.33 below minimum 99" in out
    record = json.loads((tmp_path / "runs" / "too-weak" / "retrain.json").read_text())
    assert not record["promoted"] and record["removed_from_store"] and record["champion"] is None
    assert (tmp_path / "runs" / "too-weak" / "artifact" / "model.onnx").is_file()
