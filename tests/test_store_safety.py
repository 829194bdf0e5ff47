"""The model store stays usable and honest when its contents are not what they should be
(serving/model_store.py, the service's Encoder, `polytask models` / `predict`, registration), on
a tiny exported model in isolated BentoML stores. Claims checked:

- a version directory BentoML cannot read (no model.yaml) hides no other version: resolution,
  the fallback, promotion, rollback and `models list` see the rest, and list it `incomplete`
  (as a half-copied one without metadata.json), logged once;
- the service retries a version that failed to load once its files change (it was seen
  half-copied) or after a while (a transient failure), and otherwise loads nothing again;
- when the promoted model does not load during hot reload, the service serves the last good
  promoted version, as a restarted one does;
- the retraining job's challenger is a `stage=candidate` version, never served as the latest
  or as a fallback while its gate runs;
- `polytask predict` falls back like the service, and says why when nothing loads;
- a promotion whose history cannot be written changes no label;
- registration refuses symbolic links and special files in an artifact directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config_dict, use_bentoml_home
from test_promotion import truncated_copy
from test_serving import register_copy

NAME = "polytask-tiny"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("POLYTASK_MODEL", raising=False)
    monkeypatch.setenv("POLYTASK_MODEL_NAME", NAME)
    with use_bentoml_home(tmp_path / "bentoml") as home:
        yield home


def _stage(tag: str) -> str | None:
    import bentoml

    return bentoml.models.get(tag).info.labels.get("stage")


def _path(tag: str) -> Path:
    import bentoml

    return Path(bentoml.models.get(tag).path)


def _load_failures() -> float:
    from prometheus_client import REGISTRY

    from serving.metrics import get_metrics

    get_metrics()  # the metrics exist once created
    return REGISTRY.get_sample_value("polytask_model_load_failures_total") or 0.0


def _mark_promoted(tag: str) -> None:
    """Label `tag` promoted and record it, without promotion's check: a promoted version whose
    files went bad since."""
    from serving.model_store import _label_promoted, _record, store_lock

    with store_lock():
        _label_promoted(tag)
        _record(tag, "promote", "test")


@pytest.fixture
def encoder(store, monkeypatch):
    """A factory of the service's Encoder without its watcher thread (the tests call
    `_load_first` and `check_for_new_model` themselves) and without `gc.freeze`."""
    import serving.service as service

    monkeypatch.setattr(service.Encoder.inner, "_load_and_watch", lambda self: None)
    monkeypatch.setattr(service, "freeze_startup_objects", lambda: None)
    return service.Encoder.inner


# --------------------------------------------------------------------------- H3: listing
def test_an_unreadable_version_directory_hides_no_other_version(tiny_artifact, store, caplog):
    from pipeline.cli import main
    from pipeline.jobs.models import list_versions
    from serving.model_store import (
        fallback_candidates,
        promote,
        promoted_tag,
        resolve_model,
        rollback,
    )

    a, b = register_copy(tiny_artifact, NAME), register_copy(tiny_artifact, NAME)
    promote(a)
    promote(b)
    # What a crash between BentoML's mkdir and its copy of model.yaml leaves (or a stray dir).
    stray = store / "models" / NAME / "zzzzzzzzzzzzzzzz"
    stray.mkdir()
    # A version whose copy was interrupted after model.yaml: no metadata.json.
    half = register_copy(tiny_artifact, NAME)
    (_path(half) / "metadata.json").unlink()

    with caplog.at_level(logging.WARNING, logger="serving.model_store"):
        assert resolve_model(name=NAME).tag == b
        assert promoted_tag(NAME) == b
        assert [c.tag for c in fallback_candidates(NAME, exclude={b})] == [a]
        assert rollback(NAME) == a  # sees the earlier promotion
        assert resolve_model(name=NAME).tag == a
        # promoting unlabels the others although a directory cannot be read
        promote(b)
        assert _stage(a) is None and _stage(b) == "production"
        versions = {v.tag: v for v in list_versions(NAME)}
        assert main(["models", "list", "--name", NAME]) == 0
    assert versions[f"{NAME}:zzzzzzzzzzzzzzzz"].stage == "incomplete"
    assert versions[half].stage == "incomplete"
    assert versions[a].stage is None and versions[b].stage == "production"
    skipped = [r for r in caplog.records if str(stray) in r.getMessage()]
    assert len(skipped) == 1, [r.getMessage() for r in skipped]  # logged once per process
    assert "not a readable version" in skipped[0].getMessage()


def test_models_list_of_every_name_shows_incomplete_versions(tiny_artifact, store, capsys):
    from pipeline.cli import main

    good = register_copy(tiny_artifact, NAME)
    (store / "models" / "other-name" / "abcdefabcdefabcd").mkdir(parents=True)
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == {good, "other-name:abcdefabcdefabcd"}
    assert lines["other-name:abcdefabcdefabcd"].split()[3] == "incomplete"


def test_latest_policy_skips_a_half_copied_version(tiny_artifact, store):
    from serving.model_store import ModelNotFoundError, resolve_model

    good = register_copy(tiny_artifact, NAME)
    half = register_copy(tiny_artifact, NAME)  # newest, still being copied
    (_path(half) / "metadata.json").unlink()
    assert resolve_model(name=NAME).tag == good
    shutil.rmtree(_path(good))
    with pytest.raises(ModelNotFoundError, match=r"1 incomplete version\(s\)"):
        resolve_model(name=NAME)


# --------------------------------------------------------------------------- H4: retries
def test_a_version_seen_half_copied_is_served_once_complete(tiny_artifact, store, encoder):
    first = register_copy(tiny_artifact, NAME)
    enc = encoder()
    assert enc._load_first() and enc._runtime.version == first

    # A newer version caught mid-copy: metadata.json there, model.onnx cut short.
    newer = register_copy(truncated_copy(tiny_artifact, store.parent / "partial"), NAME)
    failures = _load_failures()
    assert not enc.check_for_new_model()
    assert enc._runtime.version == first and newer in enc._fallback
    assert _load_failures() == failures + 1
    assert not enc.check_for_new_model()  # unchanged files: not loaded (nor counted) again
    assert _load_failures() == failures + 1

    shutil.copyfile(tiny_artifact / "model.onnx", _path(newer) / "model.onnx")  # copy done
    assert enc.check_for_new_model()
    assert enc._runtime.version == newer and enc._fallback is None
    assert newer not in enc._failed
    assert _load_failures() == failures + 1


def test_a_failed_version_is_retried_after_a_while(tiny_artifact, store, encoder):
    from serving.model_store import promote

    good = register_copy(tiny_artifact, NAME)
    promote(good)
    enc = encoder()
    assert enc._load_first()
    broken = register_copy(truncated_copy(tiny_artifact, store.parent / "broken"), NAME)
    _mark_promoted(broken)

    failures = _load_failures()
    enc.check_for_new_model()
    enc.check_for_new_model()
    assert _load_failures() == failures + 1  # tried once...
    enc.RETRY_FAILED_S = 0.0  # ...until the retry delay has passed (a transient failure?)
    enc.check_for_new_model()
    assert _load_failures() == failures + 2  # tried, and counted, again
    assert enc._runtime.version == good and broken in enc._fallback


# --------------------------------------------------------------------------- M3: hot fallback
def test_hot_reload_falls_back_to_the_last_good_promoted_version(
    tiny_artifact, store, encoder, monkeypatch
):
    import serving.service as service
    from serving.model_store import promote, rollback

    a, b = register_copy(tiny_artifact, NAME), register_copy(tiny_artifact, NAME)
    promote(a)
    promote(b)
    running = encoder()
    assert running._load_first() and running._runtime.version == b
    assert rollback(NAME) == a
    # Within the same reload interval, a version whose files went bad is promoted.
    c = register_copy(truncated_copy(tiny_artifact, store.parent / "broken"), NAME)
    _mark_promoted(c)

    assert running.check_for_new_model()
    assert running._runtime.version == a  # the last good promotion, not the one rolled from
    assert running._fallback.startswith(f"serving {a} because the promoted model {c} is broken")
    restarted = encoder()
    assert restarted._load_first() and restarted._runtime.version == a  # replicas agree

    loads = []
    real = service.load_checked
    monkeypatch.setattr(
        service, "load_checked", lambda *args, **kw: loads.append(args) or real(*args, **kw)
    )
    for _ in range(3):  # steady state: nothing is loaded again
        assert not running.check_for_new_model()
    assert loads == [] and running._runtime.version == a and running._fallback is not None


# --------------------------------------------------------------------------- M4: candidates
def test_a_candidate_is_never_served_as_latest_or_as_a_fallback(tiny_artifact, store):
    from pipeline.export import register_artifact
    from pipeline.jobs.models import list_versions
    from serving.model_store import (
        ModelNotFoundError,
        fallback_candidates,
        promote,
        resolve_model,
    )

    challenger = register_artifact(tiny_artifact, NAME, candidate=True)
    with pytest.raises(ModelNotFoundError, match=r"1 candidate\(s\) awaiting the promotion gate"):
        resolve_model(name=NAME)
    exported = register_artifact(tiny_artifact, NAME)  # `polytask export`: unlabelled
    newer = register_artifact(tiny_artifact, NAME, candidate=True)
    assert resolve_model(name=NAME).tag == exported
    assert resolve_model(name=NAME).source == "latest"
    assert [c.tag for c in fallback_candidates(NAME)] == [exported]
    stages = {v.tag: v.stage for v in list_versions(NAME)}
    assert stages == {challenger: "candidate", exported: None, newer: "candidate"}

    promote(newer)  # the gate let it through: the label is replaced
    assert _stage(newer) == "production"
    assert resolve_model(name=NAME).tag == newer
    assert _stage(challenger) == "candidate" and _stage(exported) is None


def test_retrain_registers_its_challenger_as_a_candidate(
    tiny_artifact, store, tmp_path, tiny_data_dir, tiny_encoder_dir, monkeypatch
):
    import pipeline.jobs.retrain as retrain_job
    from pipeline.config import parse_config
    from pipeline.export import register_artifact
    from pipeline.jobs.models import list_versions
    from serving.model_store import resolve_model

    exported = register_artifact(tiny_artifact, NAME)  # what `make train` leaves
    during_gate = []
    real = retrain_job.evaluate_artifact

    def evaluate(*args, **kwargs):
        stages = {v.tag: v.stage for v in list_versions(NAME)}
        during_gate.append((resolve_model(name=NAME).tag, stages))
        return real(*args, **kwargs)

    monkeypatch.setattr(retrain_job, "evaluate_artifact", evaluate)
    raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "c")
    raw["train"]["epochs"] = 1
    record = retrain_job.retrain(parse_config(raw), "challenger", model_name=NAME)
    # While the gate ran, the service's choice stayed the exported model, not the challenger.
    assert during_gate == [(exported, {exported: None, record.tag: "candidate"})]
    stages = {v.tag: v.stage for v in list_versions(NAME)}
    if record.promoted:  # the gate let it through: promotion replaced the label
        assert stages == {exported: None, record.tag: "production"}
    else:
        assert record.removed_from_store and stages == {exported: None}


# --------------------------------------------------------------------------- M6: predict
def test_predict_falls_back_like_the_service_and_says_why(tiny_artifact, store, caplog, capsys):
    from pipeline.cli import main
    from serving.commands import predict_local
    from serving.model_store import promote

    good = register_copy(tiny_artifact, NAME)
    promote(good)
    broken = register_copy(truncated_copy(tiny_artifact, store.parent / "broken"), NAME)
    _mark_promoted(broken)

    with caplog.at_level(logging.WARNING, logger="serving.commands"):
        prediction = predict_local(["good film"])
    assert prediction.model_version == good
    warned = [r.getMessage() for r in caplog.records if r.name == "serving.commands"]
    assert any(broken in m and good in m for m in warned), warned

    (_path(good) / "model.onnx").write_bytes(b"not a model")  # now nothing loads
    capsys.readouterr()
    assert main(["predict", "good film"]) == 2
    err = capsys.readouterr().err
    assert f"error: {broken}: cannot be loaded" in err, err
    assert f"no other version of {NAME} loads" in err and "Traceback" not in err
    # a pinned model is not replaced
    assert main(["predict", "--model", broken, "good film"]) == 2
    assert f"error: {broken}: cannot be loaded" in capsys.readouterr().err


# --------------------------------------------------------------------------- L1: history
@pytest.mark.parametrize("operation", ["promote", "rollback"])
def test_a_history_that_cannot_be_written_changes_no_label(
    tiny_artifact, store, monkeypatch, operation
):
    import errno

    import serving.model_store as model_store
    from serving.model_store import PromotionError, history_path, promote, read_history, rollback

    a, b = register_copy(tiny_artifact, NAME), register_copy(tiny_artifact, NAME)
    promote(a)
    promote(b)
    real = model_store.atomic_write

    def disk_full(path: Path, data: bytes) -> None:
        if path == history_path():
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(model_store, "atomic_write", disk_full)
    with pytest.raises(PromotionError, match=f"{history_path()}: cannot write the promotion"):
        promote(a) if operation == "promote" else rollback(NAME)
    assert _stage(b) == "production" and _stage(a) is None  # as before
    assert [e.tag for e in read_history(NAME)] == [a, b]


def test_promote_with_a_history_path_that_is_a_directory_exits_2(tiny_artifact, store, capsys):
    from pipeline.cli import main
    from serving.model_store import promote

    a, b = register_copy(tiny_artifact, NAME), register_copy(tiny_artifact, NAME)
    promote(a)
    history = store / "polytask" / "promotions.jsonl"
    history.unlink()
    history.mkdir()  # the review's stand-in for an unwritable history
    capsys.readouterr()
    assert main(["models", "promote", b]) == 2
    err = capsys.readouterr().err
    assert f"error: {history}: cannot write the promotion history" in err, err
    assert "nothing was changed" in err and "Traceback" not in err
    assert _stage(a) == "production" and _stage(b) is None


# --------------------------------------------------------------------------- M5: register
def test_registration_refuses_links_and_special_files(tiny_artifact, store, tmp_path):
    from pipeline.export import ExportError, register_artifact

    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET=hunter2")
    linked = tmp_path / "linked"
    shutil.copytree(tiny_artifact, linked)
    (linked / "notes.txt").symlink_to(secret)
    with pytest.raises(ExportError, match=f"{linked / 'notes.txt'}: a symbolic link"):
        register_artifact(linked, NAME)

    subdir = tmp_path / "linked-dir"
    shutil.copytree(tiny_artifact, subdir)
    (subdir / "extra").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ExportError, match=f"{subdir / 'extra'}: a symbolic link"):
        register_artifact(subdir, NAME)

    fifo = tmp_path / "fifo"
    shutil.copytree(tiny_artifact, fifo)
    os.mkfifo(fifo / "pipe")
    with pytest.raises(ExportError, match=f"{fifo / 'pipe'}: not a regular file or directory"):
        register_artifact(fifo, NAME)

    assert not list((store / "models").glob(f"{NAME}/*/"))  # nothing was registered
    assert not any("hunter2" in p.read_text() for p in store.rglob("*.txt"))
    assert register_artifact(tiny_artifact, NAME)  # a plain artifact still registers


# --------------------------------------------------------------------------- L2: two labels
def _label_only(tag: str) -> None:
    """What a promotion killed after labelling its target (before unlabelling the others and
    writing its history line) leaves behind."""
    import bentoml

    from serving.model_store import PROMOTION_LABEL, _write_model_yaml

    model = bentoml.models.get(tag)
    model.info.labels[PROMOTION_LABEL[0]] = PROMOTION_LABEL[1]
    _write_model_yaml(model)


def test_an_interrupted_promotion_does_not_take_effect(tiny_artifact, store, caplog):
    # Review L2: with two `production` labels the newest-created version won, so a promotion
    # killed halfway served its target or not depending on which version was older.
    from serving.model_store import promote, promoted_tag, resolve_model, rollback

    a, b = register_copy(tiny_artifact, NAME), register_copy(tiny_artifact, NAME)
    promote(a)
    _label_only(b)  # b is newer: the old rule served it, unrecorded
    assert _stage(a) == _stage(b) == "production"
    with caplog.at_level(logging.WARNING, logger="serving.model_store"):
        assert resolve_model().tag == a
        assert promoted_tag(NAME) == a
        assert resolve_model().tag == a
    warned = [r for r in caplog.records if "labelled stage=production" in r.getMessage()]
    assert len(warned) == 1 and a in warned[0].getMessage()  # logged once, naming the winner

    promote(b)  # the next promotion repairs the labels
    assert (_stage(a), _stage(b)) == (None, "production")
    assert resolve_model().tag == b

    _label_only(a)  # an interrupted rollback to the older version: b stays the one recorded
    assert resolve_model().tag == b
    assert rollback(NAME) == a  # and a rollback still goes back from b
    assert (_stage(a), _stage(b)) == ("production", None)


def test_models_list_marks_the_label_that_does_not_count_as_stale(tiny_artifact, store):
    from pipeline.jobs.models import list_versions
    from serving.model_store import promote

    a, b = register_copy(tiny_artifact, NAME), register_copy(tiny_artifact, NAME)
    promote(a)
    _label_only(b)
    assert {v.tag: v.stage for v in list_versions(NAME)} == {a: "production", b: "stale"}
