"""A top-label isotonic map after the temperature (issue 13, item 2), chosen per task only where
it calibrates better on texts it was not fitted on: the fit (pipeline/calibration.py), the
metadata fields, the runtime applying it, and the gate comparing such models out of fold."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.calibration import (
    ISOTONIC,
    MIN_ISOTONIC_TEXTS,
    TEMPERATURE,
    CalibrationMap,
    choose_method,
    confidences,
    cross_fitted,
    expected_calibration_error,
    fit_map,
    fit_task,
    isotonic_knots,
    probabilities,
)
from serving.runtime import top_label_map


def calibrated(n: int, classes: int, temperature: float, seed: int):
    """Logits whose labels are drawn from softmax(z), scaled by `temperature`: calibrated at
    that temperature."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, classes))
    p = probabilities(z)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return z * temperature, labels


def two_populations(n: int, seed: int):
    """Binary logits of a model that is right and sure on half the texts (texts it has seen)
    and 3x over-confident on the other half: one temperature cannot fit both, as on MR."""
    rng = np.random.default_rng(seed)
    half = n // 2
    seen_labels = rng.integers(0, 2, half)
    seen = np.zeros((half, 2))
    seen[np.arange(half), seen_labels] = rng.uniform(4.0, 7.0, half)
    rest, rest_labels = calibrated(n - half, 2, 3.0, seed + 1)
    return np.vstack([seen, rest]), np.r_[seen_labels, rest_labels]


# --------------------------------------------------------------------------- the fit
def test_isotonic_knots_by_hand():
    # PAV pools (0.1: right, 0.2: wrong) into one block of 2 at 1/2; the two right answers at
    # 0.3 and 0.4 stay blocks of their own. Each block is shrunk by half a count each way:
    # (1 + 0.5) / (2 + 1) = 0.5, (1 + 0.5) / (1 + 1) = 0.75.
    kx, ky = isotonic_knots(np.array([0.2, 0.1, 0.4, 0.3]), np.array([0.0, 1.0, 1.0, 1.0]))
    assert kx.tolist() == [0.1, 0.2, 0.3, 0.4]
    assert ky.tolist() == [0.5, 0.5, 0.75, 0.75]
    # tied confidences share one value; a block of 40 right answers is "about 99%", not certain
    kx, ky = isotonic_knots(np.r_[np.full(4, 0.6), np.full(40, 0.9)], np.r_[1, 0, 0, 0, [1] * 40])
    assert kx.tolist() == [0.6, 0.9]
    assert ky.tolist() == pytest.approx([1.5 / 5, 40.5 / 41])


def test_isotonic_knots_are_monotone_and_match_a_plain_pav_without_shrinkage():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    x = np.round(rng.random(2000), 2)  # many ties
    y = (rng.random(2000) < x**2).astype(float)
    kx, ky = isotonic_knots(x, y)
    assert (np.diff(kx) >= 0).all() and (np.diff(ky) >= -1e-12).all()
    assert ky.min() > 0 and ky.max() < 1
    # With many texts per block the shrinkage is small: close to scikit-learn's fit.
    reference = IsotonicRegression(out_of_bounds="clip").fit(x, y).predict(np.unique(x))
    assert np.abs(np.interp(np.unique(x), kx, ky) - reference).max() < 0.1


def test_top_label_map_moves_the_top_probability_and_never_the_answer():
    z = np.array([[2.0, 0.0, -1.0], [0.0, 0.1, 0.0], [-3.0, 5.0, 4.9]])
    p = probabilities(z)
    # a map that lowers every confidence by 10%: each row's top must still stay the top
    out = top_label_map(z, np.array([0.0, 1.0]), np.array([0.0, 0.9]))
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    assert (out.argmax(axis=1) == p.argmax(axis=1)).all()
    # row 0: the top takes 0.9 x its probability, the others keep their proportions
    assert out[0, 0] == pytest.approx(0.9 * p[0, 0])
    assert out[0, 1] / out[0, 2] == pytest.approx(p[0, 1] / p[0, 2])
    # row 2: the runner-up (4.9) would pass the lowered top; the top steps just over it
    assert out[2, 1] > out[2, 2] and out[2, 1] - out[2, 2] < 1e-5
    # the identity map gives the softmax back
    np.testing.assert_allclose(top_label_map(z, np.array([0.0, 1.0]), np.array([0.0, 1.0])), p)


def test_the_map_is_chosen_where_one_temperature_cannot_fit_and_not_elsewhere():
    z, y = two_populations(2000, seed=0)
    assert choose_method(z, y) == ISOTONIC
    fit = fit_task(z, y)
    assert fit.method == ISOTONIC and fit.map.knots_x is not None
    # honest: the procedure, choice included, is scored on texts it never saw
    assert fit.ece_after < fit.ece_after_temperature / 1.5
    assert fit.repeats == 10 and fit.folds == 2
    assert fit.ece_after_in_sample == pytest.approx(
        expected_calibration_error(*confidences(fit.map.probabilities(z), y))
    )
    # a model a temperature calibrates keeps the temperature, over several draws
    for seed in range(4):
        assert choose_method(*calibrated(1000, 2, 2.0, seed)) == TEMPERATURE, seed
    # too few texts for a free-form map
    z_small, y_small = two_populations(MIN_ISOTONIC_TEXTS - 2, seed=1)
    assert choose_method(z_small, y_small) == TEMPERATURE


def test_a_map_never_has_more_knots_than_the_metadata_takes(monkeypatch):
    import pipeline.calibration as calibration

    z, y = two_populations(2000, seed=4)
    full = fit_map(z, y, ISOTONIC)
    assert len(full.knots_x) > 8
    monkeypatch.setattr(calibration, "MAX_KNOTS", 8)
    thinned = calibration.fit_map(z, y, ISOTONIC)
    assert len(thinned.knots_x) == 8
    assert thinned.knots_x[0] == full.knots_x[0] and thinned.knots_x[-1] == full.knots_x[-1]
    assert (np.diff(thinned.knots_x) >= 0).all() and (np.diff(thinned.knots_y) >= 0).all()


def test_fit_map_and_cross_fitting():
    z, y = two_populations(600, seed=2)
    plain = fit_map(z, y)
    assert plain.method == TEMPERATURE and plain.knots_x is None
    np.testing.assert_allclose(plain.probabilities(z), probabilities(z, plain.temperature))
    mapped = fit_map(z, y, ISOTONIC)
    assert mapped.method == ISOTONIC and mapped.temperature == plain.temperature
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_map(z, y, "platt")
    # every text is scored by a map fitted on the other half: not the in-sample map's output
    held_out = cross_fitted(z, y, lambda a, b: fit_map(a, b, ISOTONIC))
    assert not np.allclose(held_out, mapped.probabilities(z))
    assert (held_out.argmax(axis=1) == z.argmax(axis=1)).all()


# --------------------------------------------------------------------------- metadata
def test_calibration_metadata_validates_the_knots():
    from pydantic import ValidationError

    from serving.artifact import Calibration

    base = dict(
        temperature=1.5,
        ece_before=5.0,
        ece_after=2.0,
        ece_after_in_sample=1.0,
        nll_before=0.5,
        nll_after=0.4,
        bins=15,
        folds=2,
        n=100,
    )
    old = Calibration(**base)  # an artifact from before: temperature, one split
    assert old.method == TEMPERATURE and old.repeats == 1 and old.knots_x is None
    ok = Calibration(**base, method=ISOTONIC, knots_x=[0.5, 0.9], knots_y=[0.6, 0.8])
    assert ok.knots_y == [0.6, 0.8]
    bad = [
        ({"knots_x": [0.5], "knots_y": [0.6]}, "only for method temperature\\+isotonic"),
        ({"method": ISOTONIC}, "needs both"),
        ({"method": ISOTONIC, "knots_x": [0.5, 0.9], "knots_y": [0.6]}, "needs both"),
        ({"method": ISOTONIC, "knots_x": [0.5, 0.4], "knots_y": [0.6, 0.7]}, r"knots_x\[1\]"),
        ({"method": ISOTONIC, "knots_x": [0.5, 0.9], "knots_y": [0.8, 0.7]}, r"knots_y\[1\]"),
        ({"method": ISOTONIC, "knots_x": [0.5, 1.2], "knots_y": [0.6, 0.7]}, "outside"),
    ]
    for extra, message in bad:
        with pytest.raises(ValidationError, match=message):
            Calibration(**base, **extra)


# --------------------------------------------------------------------------- runtime, gate
@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_data_dir, tiny_encoder_dir):
    from conftest import train_tiny_run

    from pipeline.export import export_run

    tmp = tmp_path_factory.mktemp("isotonic")
    run_dir = train_tiny_run(tmp, tiny_data_dir, tiny_encoder_dir)
    return export_run(run_dir, register=False, output_dir=tmp / "artifact")


def planted(exported, path, knots=([0.0, 1.0], [0.0, 0.6])):
    """A copy of the artifact whose "sentiment" head carries a top-label map."""
    from serving.artifact import ArtifactMetadata

    shutil.copytree(exported.artifact_dir, path)
    meta = ArtifactMetadata.read(path)
    tasks = [
        t.model_copy(
            update={
                "calibration": t.calibration.model_copy(
                    update={"method": ISOTONIC, "knots_x": knots[0], "knots_y": knots[1]}
                )
            }
        )
        if t.name == "sentiment"
        else t
        for t in meta.tasks
    ]
    meta.model_copy(update={"tasks": tasks}).write(path)
    return path


def test_runtime_applies_the_map_after_the_temperature(exported, tmp_path):
    from serving.runtime import Runtime

    artifact = planted(exported, tmp_path / "mapped")
    runtime = Runtime(artifact, threads=1)
    texts = ["good great film", "the soup and bread", "bad awful dull plot", "a fine day"]
    out = runtime.run(texts)
    t = runtime.temperatures["sentiment"]
    expected = CalibrationMap(t, np.array([0.0, 1.0]), np.array([0.0, 0.6]))
    np.testing.assert_allclose(
        out.probabilities["sentiment"], expected.probabilities(out.logits["sentiment"]), atol=1e-6
    )
    # not the temperature's softmax; the same answers; the other task untouched
    assert not np.allclose(
        out.probabilities["sentiment"], probabilities(out.logits["sentiment"], t), atol=1e-3
    )
    assert (out.probabilities["sentiment"].argmax(1) == out.logits["sentiment"].argmax(1)).all()
    np.testing.assert_allclose(
        out.probabilities["topic"],
        probabilities(out.logits["topic"], runtime.temperatures["topic"]),
        atol=1e-6,
    )
    assert runtime.describe()["tasks"]["sentiment"]["calibration"]["method"] == ISOTONIC
    assert runtime.describe()["tasks"]["topic"]["calibration"]["method"] == TEMPERATURE


def test_export_records_method_repeats_and_the_temperature_only_figure(exported):
    from serving.artifact import ArtifactMetadata

    for task in ArtifactMetadata.read(exported.artifact_dir).tasks:
        c = task.calibration
        # 24 dev texts: below MIN_ISOTONIC_TEXTS, so the temperature
        assert c.method == TEMPERATURE and c.knots_x is None
        assert c.repeats == 10 and c.ece_after_temperature is not None


def test_gate_answers_on_dev_are_out_of_fold(exported, tmp_path, tiny_data_dir, tiny_encoder_dir):
    from conftest import tiny_config_dict

    from pipeline.config import parse_config
    from pipeline.jobs.retrain import evaluate_artifact
    from serving.runtime import Runtime

    # A map fitted on the very evaluation texts, nearly perfect on them in-sample.
    artifact = planted(exported, tmp_path / "in-sample")
    config = parse_config(
        tiny_config_dict(tiny_data_dir, tiny_encoder_dir, tmp_path / "runs", tmp_path / "c")
    )
    served: dict = {}
    held_out: dict = {}
    evaluate_artifact(artifact, config, served)
    result = evaluate_artifact(artifact, config, held_out, cross_fit=True)
    from pipeline.data import load_tasks

    runtime = Runtime(artifact, threads=1)
    dev = {t.name: t.splits["dev"] for t in load_tasks(config, ["dev"], runtime.labels)}
    for task, method in (("sentiment", ISOTONIC), ("topic", TEMPERATURE)):
        texts, labels = dev[task].texts, np.asarray(dev[task].labels)
        logits = runtime.run(texts, [task]).logits[task]
        expected = confidences(
            cross_fitted(logits, labels, lambda a, b, m=method: fit_map(a, b, m)), labels
        )
        np.testing.assert_allclose(held_out[task][0], expected[0], atol=1e-6)
        assert (held_out[task][1] == expected[1]).all()
    # the served answers are what the artifact carries; the gate's differ on the mapped task
    assert not np.allclose(served["sentiment"][0], held_out["sentiment"][0])
    assert set(result["tasks"]) == {"sentiment", "topic"}
