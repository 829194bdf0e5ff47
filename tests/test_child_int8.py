"""An add-task / remove-task child exported to int8 (review s24 item 3): the lineage record
describes the graph that ships, not the fp32 graph int8 replaced, and the retraining gate's
`unchanged_tasks` counts a task unchanged only when both artifacts answer it alike (same
precision, same calibration)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from conftest import train_tiny_run

from pipeline.incremental import PROBE_BATCH, PROBE_LENGTHS, remove_tasks, unchanged_tasks
from serving.artifact import ArtifactMetadata

INT8_KEPT = {"quantize": "int8", "max_int8_drop": 100.0, "min_int8_speedup": 0.0}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_data_dir, tiny_encoder_dir) -> dict[str, Path]:
    """A tiny two-task parent, its child without `topic` (no training: the kept task's weights
    are the parent's), and both exported in fp32 and in int8. The gate is relaxed so that the
    tiny model keeps int8 (a real MiniLM keeps it on speed), and one dynamic variant is tried
    (the others would only cost time)."""
    import pipeline.export as export

    tmp = tmp_path_factory.mktemp("child-int8")
    parent = train_tiny_run(tmp, tiny_data_dir, tiny_encoder_dir)
    child = remove_tasks(parent, ["topic"], run_name="child").run_dir
    variant = next(v for v in export.INT8_VARIANTS if v.name == "dynamic-all")
    out = {"parent": parent, "child": child}
    with pytest.MonkeyPatch.context() as mp:
        quantize = functools.partial(export.quantize_if_accurate, variants=(variant,))
        mp.setattr(export, "quantize_if_accurate", quantize)
        for name, run in (("parent", parent), ("child", child)):
            export.write_artifact(run, tmp / f"{name}-fp32")
            export.write_artifact(run, tmp / f"{name}-int8", **INT8_KEPT)
            out[f"{name}-fp32"], out[f"{name}-int8"] = tmp / f"{name}-fp32", tmp / f"{name}-int8"
    return out


def _shipped_vs_parent(artifact: Path, parent_run: Path, tasks: list[str]) -> float:
    """Max abs difference between the artifact's graph, as served, and the parent's PyTorch
    logits on the lineage check's probe batches."""
    from pipeline.export import eager_logits, parity_inputs
    from pipeline.runs import load_run
    from serving.runtime import Runtime

    parent = load_run(parent_run)
    runtime = Runtime(artifact, device="cpu")
    vocab = int(parent.model.encoder.transformer.config.vocab_size)
    worst = 0.0
    for i, seq_len in enumerate(PROBE_LENGTHS):
        for padded in (False, True):
            ids, mask = parity_inputs(PROBE_BATCH, seq_len, padded, vocab, 0, 1000 + i)
            want = eager_logits(parent.model, tasks, ids, mask)
            got = runtime.session.run(
                [runtime.outputs[t] for t in tasks], {"input_ids": ids, "attention_mask": mask}
            )
            worst = max(
                worst, *(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
            )
    return worst


def test_int8_child_records_parity_of_the_graph_it_ships(exports):
    meta = ArtifactMetadata.read(exports["child-int8"])
    assert meta.precision == "int8" and meta.quantization.kept
    parity = meta.lineage.parity
    assert parity.tasks == ["sentiment"]
    # The weights are the parent's: PyTorch logits bit-identical, which the record still says.
    assert parity.exact and parity.eager_max_abs_diff == 0.0
    # The shipped int8 graph is not the parent's within the tolerance, and the record says so
    # (before the fix: passed, with the fp32 graph's 1e-6 difference recorded).
    shipped = _shipped_vs_parent(exports["child-int8"], exports["parent"], parity.tasks)
    assert shipped > parity.tolerance
    assert parity.onnx_max_abs_diff == pytest.approx(shipped, rel=1e-6)
    assert not parity.passed
    # So the gate judges every task, even against the parent's own fp32 or int8 artifact.
    for champion in ("parent-fp32", "parent-int8"):
        assert unchanged_tasks(meta, ArtifactMetadata.read(exports[champion])) == []


def test_fp32_child_still_proves_its_kept_tasks(exports):
    meta = ArtifactMetadata.read(exports["child-fp32"])
    parity = meta.lineage.parity
    assert meta.precision == "fp32" and parity.passed and parity.exact
    assert parity.onnx_max_abs_diff <= parity.tolerance
    # Its calibration was refitted on the same logits: the same map (the fit's ECE/NLL
    # diagnostics may move by float noise), so the task is unchanged.
    champion = ArtifactMetadata.read(exports["parent-fp32"])
    fields = {"method", "temperature", "knots_x", "knots_y"}
    mine, theirs = meta.tasks[0].calibration, champion.tasks[0].calibration
    assert mine.model_dump(include=fields) == pytest.approx(theirs.model_dump(include=fields))
    assert unchanged_tasks(meta, champion) == ["sentiment"]


def test_unchanged_tasks_needs_the_same_precision(exports):
    """The review's case: the champion is an int8 export of the parent and the child ships in
    fp32; the kept task's answers changed (int8 vs fp32), so it must be judged."""
    child = ArtifactMetadata.read(exports["child-fp32"])
    champion = ArtifactMetadata.read(exports["parent-int8"])
    assert champion.precision == "int8" and child.lineage.parity.passed
    assert unchanged_tasks(child, champion) == []
    # An int8 child whose record claims a pass (as exports before the fix wrote) is not
    # trusted either: its check ran on the fp32 graph that int8 replaced.
    old = ArtifactMetadata.read(exports["child-int8"])
    claimed = old.lineage.model_copy(
        update={"parity": old.lineage.parity.model_copy(update={"passed": True})}
    )
    old = old.model_copy(update={"lineage": claimed})
    for champion_name in ("parent-fp32", "parent-int8"):
        assert unchanged_tasks(old, ArtifactMetadata.read(exports[champion_name])) == []


def _with_calibration(meta: ArtifactMetadata, **update) -> ArtifactMetadata:
    task = meta.tasks[0]
    calibration = task.calibration.model_copy(update=update)
    return meta.model_copy(update={"tasks": [task.model_copy(update={"calibration": calibration})]})


def test_unchanged_tasks_needs_the_same_calibration(exports):
    child = ArtifactMetadata.read(exports["child-fp32"])
    champion = ArtifactMetadata.read(exports["parent-fp32"])
    assert unchanged_tasks(child, champion) == ["sentiment"]
    t = champion.tasks[0].calibration.temperature
    # Another temperature: the same labels, other probabilities (and ECE, which the gate
    # compares).
    assert unchanged_tasks(child, _with_calibration(champion, temperature=t * 1.5)) == []
    assert unchanged_tasks(_with_calibration(child, temperature=t * 1.01), champion) == []
    # Float noise far below the logits' tolerance is the same calibration.
    assert unchanged_tasks(child, _with_calibration(champion, temperature=t * (1 + 1e-9))) == [
        "sentiment"
    ]
    # Another method: the isotonic map changes every probability it is given.
    isotonic = _with_calibration(
        champion, method="temperature+isotonic", knots_x=[0.5, 1.0], knots_y=[0.6, 0.9]
    )
    assert unchanged_tasks(child, isotonic) == []
    # No calibration (an older champion: T = 1) against a fitted one.
    bare = champion.model_copy(
        update={"tasks": [champion.tasks[0].model_copy(update={"calibration": None})]}
    )
    assert unchanged_tasks(child, bare) == []
    # Texts truncated elsewhere give other answers too.
    shorter = champion.model_copy(
        update={"encoder": champion.encoder.model_copy(update={"max_length": 8})}
    )
    assert unchanged_tasks(child, shorter) == []
