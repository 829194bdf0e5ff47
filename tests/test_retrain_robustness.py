"""Retraining runs that go wrong midway (session 24 review, docs/review-s24.md): the gate's
evaluation set missing, the champion deleted while the challenger trains or at the gate, the
gate failing after the challenger was registered. Tiny local-mode runs in isolated stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import use_bentoml_home
from test_jobs import NAME, tiny_config

from pipeline.data import DataError


def _stages() -> dict[str, str | None]:
    from pipeline.jobs.models import list_versions

    return {v.tag: v.stage for v in list_versions(NAME)}


def test_a_missing_evaluation_set_is_refused_before_training(
    tmp_path, tiny_data_dir, tiny_encoder_dir, monkeypatch
):
    import pipeline.train.driver as driver
    from pipeline.jobs.retrain import retrain

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the evaluation set")

    monkeypatch.setattr(driver, "train", no_training)
    config = tiny_config(
        tmp_path, tiny_data_dir, tiny_encoder_dir, 1, eval_data_dir=str(tmp_path / "no-such")
    )
    with use_bentoml_home(tmp_path / "bentoml"):
        with pytest.raises(DataError, match=r"no-such/sentiment/dev\.jsonl: file not found"):
            retrain(config, "r")
        assert _stages() == {}


def test_validate_checks_the_evaluation_set(tmp_path, tiny_data_dir, tiny_encoder_dir, capsys):
    import yaml
    from conftest import tiny_config_dict

    from pipeline.cli import main

    raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "c")
    raw["promotion"] = {"eval_data_dir": str(tmp_path / "no-such")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    assert "no-such/sentiment/dev.jsonl: file not found" in capsys.readouterr().err
    raw["promotion"] = {"eval_data_dir": str(tiny_data_dir)}
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 0


@pytest.fixture
def champion_store(tmp_path, tiny_data_dir, tiny_encoder_dir):
    """A store whose first retrain was promoted; yields (config for the next retrain, tag)."""
    from pipeline.jobs.retrain import retrain

    gate = {"eval_data_dir": str(tiny_data_dir)}
    with use_bentoml_home(tmp_path / "bentoml"):
        first = retrain(tiny_config(tmp_path, tiny_data_dir, tiny_encoder_dir, 1, **gate), "one")
        assert first.promoted
        yield tiny_config(tmp_path, tiny_data_dir, tiny_encoder_dir, 2, **gate), first.tag


def test_a_champion_deleted_while_the_challenger_trains_does_not_bypass_the_gate(
    champion_store, monkeypatch
):
    # Before, the gate saw no champion and promoted the challenger by the first model's rules.
    import bentoml

    import pipeline.train.driver as driver
    from pipeline.jobs.models import PromotionError
    from pipeline.jobs.retrain import retrain

    config, champion = champion_store
    real_train = driver.train

    def train_then_delete(*args, **kwargs):
        result = real_train(*args, **kwargs)
        bentoml.models.delete(champion)
        return result

    monkeypatch.setattr(driver, "train", train_then_delete)
    with pytest.raises(PromotionError, match=rf"champion {champion} was promoted when"):
        retrain(config, "two")
    assert _stages() == {}  # the challenger is not left behind as a candidate


def test_a_champion_deleted_at_the_gate_is_a_clear_error(champion_store, monkeypatch):
    # Before: bentoml's NotFound escaped as a traceback, and the candidate stayed.
    import bentoml

    import pipeline.jobs.retrain as retrain_module
    from pipeline.jobs.models import PromotionError

    config, champion = champion_store
    real = retrain_module.promoted_tag
    calls = []

    def promoted_then_deleted(name):
        tag = real(name)
        calls.append(tag)
        if len(calls) == 2:  # the gate's lookup (the first is at the start)
            bentoml.models.delete(tag)
        return tag

    monkeypatch.setattr(retrain_module, "promoted_tag", promoted_then_deleted)
    with pytest.raises(PromotionError, match=rf"champion {champion} was removed from the store"):
        retrain_module.retrain(config, "two")
    assert _stages() == {}


def test_a_gate_that_fails_leaves_no_candidate(champion_store, monkeypatch):
    import pipeline.jobs.retrain as retrain_module

    config, champion = champion_store

    def broken(*args, **kwargs):
        raise DataError(["eval.jsonl:3: something changed under the gate"])

    seen = []

    def evaluate(artifact_dir, *args, **kwargs):
        # What a job killed here would leave: a record saying the gate was running.
        seen.append(json.loads((artifact_dir.parent / "retrain.json").read_text()))
        broken()

    monkeypatch.setattr(retrain_module, "evaluate_artifact", evaluate)
    with pytest.raises(DataError):
        retrain_module.retrain(config, "two")
    assert _stages() == {champion: "production"}
    assert [r["status"] for r in seen] == ["gating"] and seen[0]["champion"] == champion
    record = json.loads((Path(seen[0]["run_dir"]) / "retrain.json").read_text())
    assert record["status"] == "failed" and "something changed under the gate" in record["error"]
    assert record["tag"] == seen[0]["tag"]


def test_sigterm_during_the_gate_pushes_the_failure_and_leaves_no_candidate(
    champion_store, monkeypatch
):
    # `ray job stop` sends SIGTERM: before, the process just ended, leaving the challenger as
    # a candidate forever and no failure for the alerts.
    import os
    import signal
    import time

    import pipeline.jobs.monitoring as monitoring
    import pipeline.jobs.retrain as retrain_module

    config, champion = champion_store
    failures = []
    monkeypatch.setattr(
        monitoring, "push_retrain_failure", lambda *args, **kwargs: failures.append(args)
    )

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the retrain")

    monkeypatch.setattr(retrain_module, "evaluate_artifact", stopped)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(retrain_module.RetrainStopped, match="stopped by SIGTERM"):
        retrain_module.retrain(config, "two")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert len(failures) == 1
    assert _stages() == {champion: "production"}
