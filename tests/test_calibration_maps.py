"""scripts/calibration_maps.py: the diagnostic behind docs/results.md's "Richer calibration
maps". Its top-label map must never change an answer, and every map must give probabilities."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "calibration_maps.py"


@pytest.fixture(scope="module")
def maps():
    spec = importlib.util.spec_from_file_location("calibration_maps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keep_argmax_top_keeps_every_answer(maps) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 6)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # Targets far below the runner-up would flip answers if not raised.
    top = rng.uniform(0.0, 1.0, size=500)
    out = maps.keep_argmax_top(probs, top)
    assert np.array_equal(out.argmax(axis=1), probs.argmax(axis=1))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-9)
    assert (out >= 0).all()
    # Where the target already beats the rescaled runner-up, it is taken as given.
    high = top > 0.9
    np.testing.assert_allclose(out[high].max(axis=1), top[high], atol=1e-6)


def test_every_map_cross_fitted_gives_probabilities(maps) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=400)
    logits = rng.normal(size=(400, 3)) + 4.0 * np.eye(3)[y]  # over-confident, mostly right
    for name, fit in maps.MAPS.items():
        p = maps.cross_fitted(fit, logits, y)
        assert p.shape == logits.shape, name
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6, err_msg=name)
    # Over-confident logits: the temperature map lowers the ECE, cross-fitted.
    from pipeline.calibration import confidences, expected_calibration_error, probabilities

    before = expected_calibration_error(*confidences(probabilities(logits * 3), y))
    after = expected_calibration_error(
        *confidences(maps.cross_fitted(maps.MAPS["temperature (shipped)"], logits * 3, y), y)
    )
    assert after < before
