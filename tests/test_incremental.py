"""add-task / remove-task (pipeline/incremental.py): the parent's tasks keep bit-identical
logits, the new task learns, lineage is recorded, export checks parity with the parent, and
the promotion gate judges only the changed tasks when that check holds."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TOPICS, tiny_config_dict

from pipeline.cli import main
from pipeline.incremental import (
    add_tasks,
    new_task_config,
    remove_tasks,
    unchanged_tasks,
)
from pipeline.jobs.gate import decide
from pipeline.runs import load_run, read_record

TEXTS = [
    "the good great film",
    "a bad awful dull plot",
    "pizza bread soup",
    "computer phone chip robot screen code laptop",
    "the ball goal team match player",
    "it is",
]


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_data_dir, tiny_encoder_dir):
    """A parent trained on `sentiment` alone, its child with `topic` added (through the CLI),
    and the grandchild with `topic` removed again."""
    tmp = tmp_path_factory.mktemp("incremental")
    cfg = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp / "runs", tmp / "cache")
    cfg["tasks"] = [{"name": "sentiment"}]
    path = tmp / "parent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, _ = _run_cli(["train", str(path), "--run-name", "parent"])
    assert code == 0
    parent = tmp / "runs" / "parent"
    argv = ["add-task", str(parent), "--task", "topic", "--epochs", "20", "--run-name", "child"]
    code, out, err = _run_cli(argv)
    assert code == 0, err
    child = Path(out.split("run directory: ")[-1].strip())
    grandchild = remove_tasks(child, ["topic"], run_name="grandchild").run_dir
    return {"tmp": tmp, "parent": parent, "child": child, "grandchild": grandchild}


def _logits(run_dir: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """Every task's logits of a run's PyTorch model, from token ids (encoder included)."""
    from pipeline.features import load_tokenizer, tokenize

    run = load_run(run_dir)
    tokenizer = load_tokenizer(run.record.encoder.path)
    ids, mask = tokenize(tokenizer, texts, run.record.encoder.max_length)
    with torch.inference_mode():
        out = run.model(torch.from_numpy(ids), torch.from_numpy(mask))
    return {t: o.numpy() for t, o in zip(run.model.heads.tasks, out, strict=True)}


def test_parent_task_logits_are_bit_identical(family):
    parent, child = _logits(family["parent"], TEXTS), _logits(family["child"], TEXTS)
    assert list(child) == ["sentiment", "topic"]
    assert np.array_equal(child["sentiment"], parent["sentiment"])  # exact, not approximate
    from pipeline.train.checkpoint import load_tensors

    p = load_tensors(family["parent"] / "model" / "model.safetensors")
    c = load_tensors(family["child"] / "model" / "model.safetensors")
    assert all(torch.equal(c[k], v) for k, v in p.items())
    assert sorted(set(c) - set(p)) and all(".topic" in k for k in set(c) - set(p))


def test_new_task_learns(family):
    rec = read_record(family["child"])
    # Three balanced topics: chance is 33% (8 of 24 dev rows); the synthetic topics are
    # separable by keyword, but B was trained on sentiment alone: well above chance is the claim.
    assert rec.dev["topic"]["accuracy"] > 55.0
    stage = rec.stages["topic"]
    route = getattr(stage, "route", None)  # routing (issue 13): the served path's accuracy
    served = stage.final if route is None or route.path == "shared" else route.private_accuracy
    assert rec.dev["topic"]["accuracy"] == pytest.approx(served)
    topic = _logits(family["child"], [" ".join(TOPICS["food"][:3]), " ".join(TOPICS["tech"][:3])])
    labels = rec.tasks["topic"].labels
    assert [labels[i] for i in topic["topic"].argmax(-1)] == ["food", "tech"]


def test_new_task_is_routed_when_the_parent_routes(family):
    parent, child = read_record(family["parent"]), read_record(family["child"])
    if getattr(parent, "routing", None) is None:
        pytest.skip("this checkout trains without routing (issue 13)")
    decision = child.routing["topic"]
    assert child.routing["sentiment"] == parent.routing["sentiment"]
    assert decision.n == 24 and decision.path in ("shared", "private")
    run = load_run(family["child"])
    assert run.model.heads.routes["topic"] == decision.path


def test_run_record_lineage(family):
    parent, child, grand = (read_record(family[k]) for k in ("parent", "child", "grandchild"))
    assert parent.lineage is None
    assert child.lineage.parent == "parent" and child.lineage.added == ["topic"]
    assert child.lineage.removed == [] and Path(child.lineage.parent_dir) == family["parent"]
    assert grand.lineage.parent == "child" and grand.lineage.removed == ["topic"]
    assert list(child.tasks) == ["sentiment", "topic"] and list(grand.tasks) == ["sentiment"]
    assert child.dev["sentiment"] == parent.dev["sentiment"]
    assert [t["name"] for t in child.config["tasks"]] == ["sentiment", "topic"]
    assert child.task_weights == {"sentiment": parent.task_weights["sentiment"], "topic": 1.0}


def test_remove_task_drops_only_that_output(family):
    grand, child = _logits(family["grandchild"], TEXTS), _logits(family["child"], TEXTS)
    assert list(grand) == ["sentiment"]
    assert np.array_equal(grand["sentiment"], child["sentiment"])
    rec = read_record(family["grandchild"])
    assert set(rec.dev) == set(rec.stages) == set(rec.task_weights) == {"sentiment"}


def test_export_records_parity_with_parent(family, tmp_path):
    from pipeline.export import export_run

    result = export_run(family["child"], register=False, output_dir=tmp_path / "artifact")
    lineage = result.metadata.lineage
    assert lineage is not None and lineage.parent_run == "parent"
    assert lineage.added == ["topic"] and lineage.parity is not None
    assert lineage.parity.tasks == ["sentiment"] and lineage.parity.passed
    assert lineage.parity.exact and lineage.parity.eager_max_abs_diff == 0.0
    assert lineage.parity.onnx_max_abs_diff <= lineage.parity.tolerance
    written = json.loads((tmp_path / "artifact" / "metadata.json").read_text())
    assert written["lineage"]["parity"]["passed"] is True


def test_export_flags_a_child_whose_kept_task_changed(family, tmp_path):
    """A planted divergence: the child's copy of the parent's task is altered after add-task;
    export's lineage check fails, so the gate would judge every task."""
    import shutil

    from pipeline.export import export_run
    from pipeline.train.checkpoint import load_tensors, save_tensors

    run = tmp_path / "runs" / "tampered"
    shutil.copytree(family["child"], run, ignore=shutil.ignore_patterns("artifact"))
    weights = run / "model" / "model.safetensors"
    state = load_tensors(weights)
    # Alter the layer that answers the task: its tower, or its private head when routed there.
    routes = json.loads((run / "run.json").read_text()).get("routing") or {}
    part = "private" if routes.get("sentiment", {}).get("path") == "private" else "towers"
    key = next(k for k in state if k.startswith(f"heads.{part}.sentiment.") and "weight" in k)
    state[key] = state[key] + 0.1
    save_tensors(weights, state)
    meta = export_run(run, register=False, output_dir=tmp_path / "artifact").metadata
    parity = meta.lineage.parity
    assert not parity.passed and not parity.exact and parity.eager_max_abs_diff > 1e-3
    assert unchanged_tasks(meta, _metadata("parent", None)) == []


def _metadata(run_id: str, lineage: dict | None):
    from serving.artifact import ArtifactMetadata

    raw = {
        "model_name": "m",
        "run_id": run_id,
        "created": "2026-11-30T00:00:00+00:00",
        "polytask_version": "0",
        "precision": "fp32",
        "encoder": {"name": "e", "fingerprint": "f", "max_length": 8, "pooling": "mean", "dim": 4},
        "tasks": [{"name": "a", "labels": ["x", "y"], "output": "logits_a"}],
        "config_fingerprint": "c",
        "data_fingerprints": {},
        "parity": {"tolerance": 1e-4, "max_abs_diff": 0.0, "passed": True, "cases": []},
        "lineage": lineage,
    }
    return ArtifactMetadata.model_validate(raw)


def _lineage(passed: bool) -> dict:
    parity = {
        "tasks": ["a", "b"],
        "cases": 6,
        "exact": passed,
        "eager_max_abs_diff": 0.0 if passed else 0.5,
        "onnx_max_abs_diff": 1e-6 if passed else 0.5,
        "tolerance": 1e-4,
        "passed": passed,
    }
    return {"parent_run": "p", "added": ["new"], "removed": [], "parity": parity}


def test_unchanged_tasks_need_parity_and_the_parent_as_champion():
    assert unchanged_tasks(_metadata("c", _lineage(True)), _metadata("p", None)) == ["a", "b"]
    assert unchanged_tasks(_metadata("c", _lineage(False)), _metadata("p", None)) == []
    assert unchanged_tasks(_metadata("c", _lineage(True)), _metadata("other", None)) == []
    assert unchanged_tasks(_metadata("c", _lineage(True)), None) == []
    assert unchanged_tasks(_metadata("c", None), _metadata("p", None)) == []


def test_gate_judges_only_changed_tasks_when_parity_holds():
    champion = {"a": 90.0, "b": 80.0}
    # Evaluation noise made `b` look 3 points worse, although its logits are identical.
    challenger = {"a": 90.0, "b": 77.0, "new": 70.0}
    judged_all = decide(challenger, champion, tolerance=1.0)
    assert not judged_all.promote and "b" in judged_all.reason
    only_new = decide(challenger, champion, tolerance=1.0, unchanged=["a", "b"])
    assert only_new.promote, only_new.reason
    assert "judged: new" in only_new.reason
    rows = {r.task: r for r in only_new.tasks}
    assert rows["b"].ok and "not judged" in rows["b"].note
    # The new task still has to clear its minimum.
    refused = decide(challenger, champion, minimums={"new": 75.0}, unchanged=["a", "b"])
    assert not refused.promote and "new (below minimum 75)" in refused.reason
    # A task not proven unchanged is judged as before.
    partly = decide(challenger, champion, tolerance=1.0, unchanged=["a"])
    assert not partly.promote and "b (falls by 3.00" in partly.reason


def test_cli_errors_are_clear(family, tmp_path):
    code, _, err = _run_cli(["add-task", str(tmp_path / "nope"), "--task", "topic"])
    assert code == 2 and "not a finished run" in err
    code, _, err = _run_cli(["add-task", str(family["child"]), "--task", "topic"])
    assert code == 2 and "already in run child" in err
    code, _, err = _run_cli(["remove-task", str(family["child"]), "nope"])
    assert code == 2 and "unknown task(s) ['nope']" in err and "sentiment, topic" in err
    code, _, err = _run_cli(["remove-task", str(family["grandchild"]), "sentiment"])
    assert code == 2 and "at least one task" in err
    code, _, err = _run_cli(["remove-task", str(tmp_path / "nope"), "topic"])
    assert code == 2 and "not a finished run" in err


def test_add_task_reads_a_config_and_reports_missing_data(family, tiny_data_dir, tmp_path):
    cfg = tiny_config_dict(tiny_data_dir, Path("unused"), tmp_path, tmp_path)
    cfg["tasks"] = [{"name": "sentiment"}, {"name": "topic2", "data_dir": "topic"}]
    path = tmp_path / "new.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = _run_cli(["add-task", str(family["parent"]), "--config", str(path)])
    assert code == 0, err
    assert read_record(Path(out.split("run directory: ")[-1].strip())).lineage.added == ["topic2"]
    task = new_task_config("ghost", data_dir=tmp_path)
    with pytest.raises(Exception, match="ghost"):
        add_tasks(family["parent"], [task])


def test_retrain_add_tasks_gate_judges_the_new_task_alone(
    tmp_path, tiny_data_dir, tiny_encoder_dir
):
    """retrain --add-tasks on top of a promoted one-task model: refused when the new task
    misses its minimum (the champion stays), promoted judging it alone otherwise."""
    from conftest import use_bentoml_home

    from pipeline.config import parse_config
    from pipeline.incremental import IncrementalError
    from pipeline.jobs.models import list_versions, promoted_tag
    from pipeline.jobs.retrain import retrain

    def config(tasks: list[str], **promotion: object):
        raw = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "c")
        raw["tasks"] = [{"name": t} for t in tasks]
        raw["train"]["epochs"] = 20
        raw["promotion"] = promotion
        return parse_config(raw)

    with use_bentoml_home(tmp_path / "bentoml"):
        with pytest.raises(IncrementalError, match="no promoted version"):
            retrain(config(["sentiment", "topic"]), "too-early", incremental=True)
        first = retrain(config(["sentiment"]), "first")
        assert first.promoted
        refused = retrain(
            config(["sentiment", "topic"], minimums={"topic": 99.0}), "high-bar", incremental=True
        )
        assert not refused.promoted and promoted_tag("polytask-tiny") == first.tag
        assert "topic (below minimum 99)" in refused.decision.reason
        added = retrain(
            config(["sentiment", "topic"], minimums={"topic": 40.0}), "added", incremental=True
        )
        assert added.promoted, added.decision.reason
        rows = {r.task: r for r in added.decision.tasks}
        assert "not judged" in rows["sentiment"].note and rows["topic"].note == "new task"
        assert "judged: topic" in added.decision.reason
        lineage = {v.tag: v.lineage for v in list_versions("polytask-tiny")}
        assert lineage[added.tag] == "first +topic" and lineage[first.tag] in (None, "")
        with pytest.raises(IncrementalError, match="nothing to add"):
            retrain(config(["sentiment", "topic"]), "again", incremental=True)


def test_schedule_add_tasks_submits_retrain_add_tasks(tmp_path):
    from pipeline.jobs.schedule import ScheduleError, load_schedules

    (tmp_path / "run.yaml").write_text("tasks: [{name: a}]\n")
    path = tmp_path / "s.yaml"
    path.write_text(
        "schedules:\n  - {name: inc, cron: '0 2 * * *', config: run.yaml, add_tasks: true}\n"
        "  - {name: full, cron: '0 3 * * *', config: run.yaml}\n"
    )
    inc, full = load_schedules(path)
    assert inc.entrypoint_for("r1").endswith("--run-name r1 --add-tasks")
    assert "--add-tasks" not in full.entrypoint_for("r2")
    path.write_text(
        "schedules:\n  - {name: x, cron: '0 2 * * *', entrypoint: 'true', add_tasks: true}\n"
    )
    with pytest.raises(ScheduleError, match="add_tasks: applies to config"):
        load_schedules(path)


def test_incremental_suite_reports_the_runs_numbers(tiny_config_file, tmp_path):
    out = tmp_path / "suite"
    argv = ["experiment", str(tiny_config_file), "--suite", "incremental", "--in-process"]
    code, stdout, err = _run_cli(
        [*argv, "--seeds", "1", "--new-task", "topic", "--output", str(out)]
    )
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    a, runs = res["analysis"], res["runs"]
    assert a["new_task"] == "topic" and a["other_tasks"] == ["sentiment"]
    child = read_record(Path(a["added"]["0"]["run_dir"]))
    assert child.lineage.parent == "parent-s0" and child.lineage.added == ["topic"]
    inc = a["new_task_accuracy"]
    assert inc["incremental"]["mean"] == child.dev["topic"]["accuracy"]
    assert inc["joint"]["mean"] == runs["joint-s0"]["dev"]["topic"]
    assert inc["alone"]["mean"] == runs["alone-s0"]["dev"]["topic"]
    delta = a["new_task_delta"]["incremental - joint"]["mean"]
    assert delta == pytest.approx(inc["incremental"]["mean"] - inc["joint"]["mean"])
    assert (
        a["others_unchanged"]
        and child.dev["sentiment"]["accuracy"] == (runs["parent-s0"]["dev"]["sentiment"])
    )
    report = (out / "report.md").read_text()
    assert "topic added incrementally" in report and "joint - parent" in report
    # --resume reads the child run instead of training it again.
    code, _, err = _run_cli([*argv, "--seeds", "1", "--new-task", "topic", "--resume", str(out)])
    assert code == 0, err
    again = json.loads((out / "results.json").read_text())["analysis"]["added"]["0"]
    assert again["run_dir"] == a["added"]["0"]["run_dir"] and again["status"] == "ok"


def test_add_task_to_a_fine_tuned_run_uses_its_own_encoder(
    tmp_path, tiny_data_dir, tiny_encoder_dir
):
    """A fine-tuned parent: the new task trains on the parent's own (trained) encoder's
    features; the encoder and the parent's task are unchanged."""
    cfg = tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "cache")
    cfg["tasks"] = [{"name": "sentiment"}]
    cfg["encoder"]["trainable_layers"] = "all"
    cfg["alignment"]["enabled"] = False
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert _run_cli(["train", str(path), "--run-name", "ft"])[0] == 0
    parent = tmp_path / "runs" / "ft"
    child = add_tasks(parent, [new_task_config("topic", data_dir=tiny_data_dir)], epochs=20)
    assert child.record.encoder.fine_tuned
    before, after = _logits(parent, TEXTS), _logits(child.run_dir, TEXTS)
    assert np.array_equal(after["sentiment"], before["sentiment"])
    from pipeline.train.checkpoint import load_tensors

    p = load_tensors(parent / "model" / "model.safetensors")
    c = load_tensors(child.run_dir / "model" / "model.safetensors")
    assert any(k.startswith("encoder.") for k in p)  # the fine-tuned encoder travels along
    assert all(torch.equal(c[k], v) for k, v in p.items())
    assert child.record.dev["topic"]["accuracy"] > 40.0  # above chance (33%) on 24 dev rows
