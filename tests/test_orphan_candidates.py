"""A retraining job killed outright leaves no candidate for good (review-s24, jobs 15).

The job labels its challenger with a token whose lock it holds while it runs
(`serving.model_store.candidate_owner`); `remove_orphaned_candidates`, run when the next
retraining job starts, removes a candidate only when its owner's lock is free. Claims checked,
with the owner in a real child process that is SIGKILLed:

- a candidate whose job still runs is kept; once that job is SIGKILLed it is removed, with its
  lock file;
- a candidate without an owner (registered by hand, or before owners existed) is kept;
- a refused challenger the gate kept for `models promote` (`keep_candidate`) is no orphan;
- the sweep decides under the store lock on the version read again: a candidate promoted
  meanwhile is kept;
- `retrain` sweeps before it trains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config_dict, use_bentoml_home

NAME = "polytask-tiny"

OWNER = """
import sys, time
from serving.model_store import candidate_owner
with candidate_owner() as token:
    print(token, flush=True)
    time.sleep(600)
"""


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("POLYTASK_MODEL", raising=False)
    monkeypatch.setenv("POLYTASK_MODEL_NAME", NAME)
    with use_bentoml_home(tmp_path / "bentoml") as home:
        yield home


@pytest.fixture
def owner(store):
    """A live retraining job stand-in: a child process holding a candidate owner's lock.
    Yields (process, token)."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER],
        cwd=repo,
        env={**os.environ, "BENTOML_HOME": str(store), "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        token = proc.stdout.readline().strip()
        assert len(token) == 32, f"the owner did not start: {token!r}"
        yield proc, token
    finally:
        proc.kill()
        proc.wait()


def _register(artifact: Path, owner: str | None) -> str:
    from pipeline.export import _register_artifact

    return _register_artifact(artifact, NAME, candidate=True, owner=owner)


def _tags() -> set[str]:
    from serving.model_store import scan_versions

    return {str(m.tag) for m in scan_versions(NAME)[0]}


def test_a_candidate_is_removed_once_its_job_is_killed(tiny_artifact, store, owner, caplog):
    from serving.model_store import OWNERS_DIR, remove_orphaned_candidates

    proc, token = owner
    tag = _register(tiny_artifact, token)
    lock_file = store / OWNERS_DIR / f"{token}.lock"
    assert lock_file.is_file()

    assert remove_orphaned_candidates(NAME) == []  # its job still runs
    assert _tags() == {tag}

    proc.send_signal(signal.SIGKILL)  # no clean-up runs
    proc.wait()
    assert lock_file.is_file() and _tags() == {tag}
    assert remove_orphaned_candidates(NAME) == [tag]
    assert _tags() == set()
    assert not lock_file.exists()
    assert "the retraining job that registered it is gone" in caplog.text


def test_candidates_without_a_live_owner_label_are_kept(tiny_artifact, store, owner):
    from serving.model_store import keep_candidate, remove_orphaned_candidates

    proc, token = owner
    by_hand = _register(tiny_artifact, None)  # `register_artifact(candidate=True)`, old code
    kept = _register(tiny_artifact, token)
    keep_candidate(kept)  # the gate refused it and kept it for `models promote`
    proc.kill()
    proc.wait()
    assert remove_orphaned_candidates(NAME) == []
    assert _tags() == {by_hand, kept}


def test_a_candidate_promoted_meanwhile_is_kept(tiny_artifact, store, owner, monkeypatch):
    import serving.model_store as model_store

    proc, token = owner
    tag = _register(tiny_artifact, token)
    proc.kill()
    proc.wait()
    # The gate promotes it between the sweep's listing and its decision under the lock.
    real_lock = model_store.store_lock

    def lock_after_promotion(*args, **kwargs):
        monkeypatch.setattr(model_store, "store_lock", real_lock)
        model_store.promote(tag)
        return real_lock(*args, **kwargs)

    monkeypatch.setattr(model_store, "store_lock", lock_after_promotion)
    assert model_store.remove_orphaned_candidates(NAME) == []
    assert model_store.resolve_model(name=NAME).tag == tag


def test_retrain_sweeps_orphans_before_training(
    tiny_artifact, store, owner, monkeypatch, tmp_path, tiny_data_dir, tiny_encoder_dir
):
    import pipeline.jobs.retrain as retrain_job
    import pipeline.train.driver as driver
    from pipeline.config import parse_config

    proc, token = owner
    orphan = _register(tiny_artifact, token)
    proc.kill()
    proc.wait()
    seen = []

    def train(*args, **kwargs):
        seen.append(_tags())
        raise KeyboardInterrupt  # stop here: only the sweep before training is under test

    monkeypatch.setattr(driver, "train", train)
    raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "c")
    with pytest.raises(KeyboardInterrupt):
        retrain_job._retrain(parse_config(raw), None, NAME)
    assert seen == [set()], f"{orphan} was still there when training started"
