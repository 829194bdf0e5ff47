"""Calibrated probabilities (issue 13, item 2): temperature scaling per task and expected
calibration error (pipeline/calibration.py), the artifact's metadata fields, the runtime
applying T, and the promotion gate refusing a clearly worse calibrated challenger."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.calibration import (
    bin_index,
    dev_reference,
    ece_difference,
    ece_of_logits,
    expected_calibration_error,
    fit_task,
    fit_temperature,
    fold_ids,
    nll,
)
from pipeline.jobs.gate import compare_calibration, decide, format_decision, with_calibration


def synthetic_logits(n: int, classes: int, temperature: float, seed: int = 0):
    """Logits whose labels are drawn from softmax(z), scaled by `temperature`: the model is
    perfectly calibrated at T = `temperature`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, classes))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return z * temperature, labels


# --------------------------------------------------------------------------- the math
def test_ece_by_hand():
    # Two bins used: 0.9 in (14/15 - 1/15, ...] has accuracy 0.5, 0.6 has accuracy 1.
    conf = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([True, False, True, True])
    # (2/4) |0.5 - 0.9| + (2/4) |1.0 - 0.6| = 0.2 + 0.2 = 40 %
    assert expected_calibration_error(conf, correct) == pytest.approx(40.0)
    # a bin's over- and under-confidence do not cancel across bins, only within one
    assert expected_calibration_error(np.array([0.7, 0.7]), np.array([True, True])) == (
        pytest.approx(30.0)
    )
    assert expected_calibration_error(np.array([0.5, 0.5]), np.array([True, False])) == 0.0
    assert expected_calibration_error(np.zeros(0), np.zeros(0, dtype=bool)) == 0.0


def test_bins_are_15_equal_width_right_closed():
    edges = np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 0.5, 14 / 15, 14 / 15 + 1e-9, 1.0])
    assert bin_index(edges).tolist() == [0, 0, 1, 7, 13, 14, 14]


def test_temperature_fit_recovers_a_known_temperature():
    for true_t in (0.5, 1.0, 2.5):
        logits, labels = synthetic_logits(4000, 3, true_t, seed=int(true_t * 10))
        t = fit_temperature(logits, labels)
        assert t == pytest.approx(true_t, rel=0.08), (true_t, t)
        # the NLL is lowest there: a bit hotter or colder is worse
        assert nll(logits, labels, t) < min(
            nll(logits, labels, t * 1.3), nll(logits, labels, t / 1.3)
        )


def test_fit_task_lowers_ece_and_nll_of_an_overconfident_model_cross_fitted():
    logits, labels = synthetic_logits(3000, 2, 3.0, seed=1)  # 3x overconfident at T = 1
    fit = fit_task(logits, labels)
    assert fit.temperature == pytest.approx(3.0, rel=0.1)
    assert fit.ece_before > 8.0
    assert fit.ece_after < fit.ece_before / 2
    assert fit.nll_after < fit.nll_before
    assert fit.folds == 2 and len(fit.fold_temperatures) == 2 and fit.n == 3000
    assert all(t == pytest.approx(3.0, rel=0.15) for t in fit.fold_temperatures)
    # scaling never changes the answered label
    assert (np.argmax(logits / fit.temperature, 1) == np.argmax(logits, 1)).all()


def test_cross_fitting_scores_every_text_with_a_temperature_fitted_elsewhere():
    ids = fold_ids(11, 2, seed=3)
    assert sorted(np.bincount(ids).tolist()) == [5, 6]
    # Cross-fitted "after" scores each half with the T fitted on the other half, so it is not
    # the in-sample figure (the T fitted on all texts, measured on them).
    logits, labels = synthetic_logits(400, 2, 1.0, seed=5)
    fit = fit_task(logits, labels)
    assert fit.ece_after != fit.ece_after_in_sample
    assert fit.ece_after_in_sample == pytest.approx(ece_of_logits(logits, labels, fit.temperature))


def test_dev_reference_is_the_predicted_mix_and_confidence():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    ref = dev_reference(probs, ["neg", "pos"], np.array([True, False, False, False]))
    assert ref.label_share == {"neg": 0.75, "pos": 0.25}
    assert ref.confidence_mean == pytest.approx((0.9 + 0.8 + 0.6 + 0.7) / 4)
    assert ref.confidence_quantiles["0.5"] == pytest.approx(0.75)
    assert set(ref.confidence_quantiles) == {"0.1", "0.25", "0.5", "0.75", "0.9"}
    assert ref.truncated_share == 0.25 and ref.n == 4


# --------------------------------------------------------------------------- the gate
def answers(n: int, confidence: float, accuracy: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    return np.full(n, confidence), rng.random(n) < accuracy


def test_ece_difference_margin_shrinks_with_more_texts():
    small = ece_difference(answers(100, 0.8, 0.8, 1), answers(100, 0.8, 0.8, 2))
    large = ece_difference(answers(5000, 0.8, 0.8, 1), answers(5000, 0.8, 0.8, 2))
    assert 0 < large.margin < small.margin
    with pytest.raises(ValueError, match="not the same set"):
        ece_difference(answers(10, 0.8, 0.8), answers(11, 0.8, 0.8))


def test_gate_refuses_a_clearly_worse_calibrated_challenger():
    champion = {"a": answers(2000, 0.85, 0.85, 1), "b": answers(2000, 0.9, 0.9, 2)}
    # Same accuracy, but "a" now claims 0.99 while right 85% of the time: ECE +14 points.
    challenger = {"a": answers(2000, 0.99, 0.85, 1), "b": answers(2000, 0.9, 0.9, 2)}
    rows = compare_calibration(challenger, champion)
    by_task = {r.task: r for r in rows}
    assert not by_task["a"].ok and by_task["b"].ok
    assert by_task["a"].delta > 10 and by_task["a"].allowed >= 1.0
    accuracy = {"a": 85.0, "b": 90.0}
    d = with_calibration(decide(accuracy, accuracy), rows)
    assert not d.promote
    assert "calibration clearly worse: a (ECE" in d.reason
    text = format_decision(d)
    assert "ECE (%)" in text and text.splitlines()[-1].startswith("REFUSE")
    assert json.loads(json.dumps(d.to_dict()))["calibration"][0]["task"] == "a"


def test_gate_lets_through_equal_or_better_calibration_and_noise():
    champion = {"a": answers(2000, 0.99, 0.85, 1)}
    better = {"a": answers(2000, 0.85, 0.85, 1)}
    accuracy = {"a": 85.0}
    d = with_calibration(decide(accuracy, accuracy), compare_calibration(better, champion))
    assert d.promote and "no task's calibration (ECE) is clearly worse" in d.reason
    # A small rise within max(1 point, bootstrap margin) is noise, not a refusal.
    noisy = {"a": answers(2000, 0.99, 0.845, 7)}
    rows = compare_calibration(noisy, champion)
    assert rows[0].delta < rows[0].allowed and rows[0].ok
    assert with_calibration(decide(accuracy, accuracy), rows).promote
    # an accuracy refusal stays one, whatever the calibration says
    d = with_calibration(decide({"a": 80.0}, accuracy), compare_calibration(better, champion))
    assert not d.promote and "falls by" in d.reason


# --------------------------------------------------------------------------- artifact, runtime
@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_data_dir, tiny_encoder_dir):
    from conftest import train_tiny_run

    from pipeline.export import export_run

    tmp = tmp_path_factory.mktemp("calibrated")
    run_dir = train_tiny_run(tmp, tiny_data_dir, tiny_encoder_dir)
    return export_run(run_dir, register=False, output_dir=tmp / "artifact")


def test_export_writes_calibration_and_dev_reference_per_task(exported, tiny_data_dir):
    from serving.artifact import ArtifactMetadata

    meta = ArtifactMetadata.read(exported.artifact_dir)
    raw = json.loads((exported.artifact_dir / "metadata.json").read_text())
    for task in meta.tasks:
        c, ref = task.calibration, task.dev_reference
        assert c is not None and ref is not None, task.name
        assert c.temperature > 0 and c.bins == 15 and c.folds == 2
        assert c.n == ref.n == 24  # the tiny dev set
        assert 0 <= c.ece_after <= 100 and 0 <= c.ece_before <= 100
        assert set(ref.label_share) == set(task.labels)
        assert sum(ref.label_share.values()) == pytest.approx(1.0)
        assert 1 / len(task.labels) <= ref.confidence_mean <= 1
        entry = next(t for t in raw["tasks"] if t["name"] == task.name)
        assert entry["calibration"]["temperature"] == c.temperature


def test_runtime_divides_logits_by_the_temperature(exported, tmp_path):
    from conftest import ort_logits

    from pipeline.calibration import probabilities
    from serving.artifact import ArtifactMetadata
    from serving.runtime import Runtime

    # A copy with planted temperatures: 4 (flatter) for one task, 0.25 (sharper) for the other.
    artifact = tmp_path / "planted"
    shutil.copytree(exported.artifact_dir, artifact)
    meta = ArtifactMetadata.read(artifact)
    planted = {"sentiment": 4.0, "topic": 0.25}
    tasks = [
        t.model_copy(
            update={
                "calibration": t.calibration.model_copy(update={"temperature": planted[t.name]})
            }
        )
        for t in meta.tasks
    ]
    meta.model_copy(update={"tasks": tasks}).write(artifact)
    texts = ["good great film", "the soup and bread", "a robot with a chip"]
    runtime = Runtime(artifact, threads=1)
    out = runtime.run(texts)
    reference = ort_logits(artifact, texts, list(planted))
    for task, t in planted.items():
        np.testing.assert_allclose(out.logits[task], reference[task], atol=1e-4)
        np.testing.assert_allclose(
            out.probabilities[task], probabilities(reference[task], t), atol=1e-4
        )
        # not the unscaled softmax
        assert not np.allclose(out.probabilities[task], probabilities(reference[task], 1.0))
    described = runtime.describe()["tasks"]["sentiment"]["calibration"]
    assert described["temperature"] == 4.0
    assert {"ece_before", "ece_after"} <= described.keys()


def test_an_artifact_without_calibration_runs_at_temperature_one(exported, tmp_path):
    from serving.artifact import ArtifactMetadata
    from serving.runtime import Runtime

    artifact = tmp_path / "old"
    shutil.copytree(exported.artifact_dir, artifact)
    meta = ArtifactMetadata.read(artifact)
    tasks = [t.model_copy(update={"calibration": None, "dev_reference": None}) for t in meta.tasks]
    meta.model_copy(update={"tasks": tasks}).write(artifact)
    runtime = Runtime(artifact, threads=1)
    assert runtime.temperatures == {"sentiment": 1.0, "topic": 1.0}
    out = runtime.run(["good great film"])
    from pipeline.calibration import probabilities

    np.testing.assert_allclose(
        out.probabilities["sentiment"], probabilities(out.logits["sentiment"]), atol=1e-6
    )
    assert runtime.describe()["tasks"]["sentiment"]["calibration"] is None
