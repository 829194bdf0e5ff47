"""Covariance similarity score (eq. 5), its matrix, heatmap and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.affinity import (
    affinity_report,
    covariance_similarity,
    plot_heatmap,
    similarity_matrix,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_identical_rank_one_features_score_one() -> None:
    rng = np.random.default_rng(0)
    x = np.outer(rng.normal(size=50), rng.normal(size=8))
    assert covariance_similarity(x, x) == pytest.approx(1.0)


def test_self_score_is_one_only_for_a_rank_one_spectrum() -> None:
    # eq. 5 of a task with itself is sqrt(sum λ²) / sum λ over the kept eigenvalues of X^T X:
    # 1/sqrt(r) for r equal eigenvalues. A task is not "1.0 similar" to itself.
    x = np.eye(4) * 3.0
    assert covariance_similarity(x, x) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    y = rng.normal(size=(200, 6)) * np.array([10.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    s = np.linalg.svd(y, compute_uv=False)
    lam = s**2
    keep = int(np.searchsorted(np.cumsum(lam) / lam.sum(), 0.99)) + 1
    expected = np.sqrt(np.sum(lam[:keep] ** 2)) / np.sum(lam[:keep])
    assert covariance_similarity(y, y) == pytest.approx(expected)


def test_score_is_invariant_to_a_shared_rotation() -> None:
    rng = np.random.default_rng(2)
    d = 12
    x1 = rng.normal(size=(80, d)) @ np.diag(np.linspace(3.0, 0.1, d))
    x2 = rng.normal(size=(60, d)) @ rng.normal(size=(d, d))
    q = _orthogonal(rng, d)
    assert covariance_similarity(x1 @ q, x2 @ q) == pytest.approx(
        covariance_similarity(x1, x2), rel=1e-9
    )


def test_features_in_orthogonal_subspaces_score_zero() -> None:
    rng = np.random.default_rng(3)
    q = _orthogonal(rng, 10)
    x1 = rng.normal(size=(40, 4)) @ q[:, :4].T
    x2 = rng.normal(size=(30, 4)) @ q[:, 4:8].T
    assert covariance_similarity(x1, x2) == pytest.approx(0.0, abs=1e-10)


def test_shared_dominant_direction_scores_higher_than_disjoint_one() -> None:
    rng = np.random.default_rng(4)
    d = 10
    base = rng.normal(size=(100, d))
    shared = np.zeros(d)
    shared[0] = 8.0
    x1 = base + rng.normal(size=(100, 1)) * shared
    x2 = rng.normal(size=(100, d)) + rng.normal(size=(100, 1)) * shared
    x3 = rng.normal(size=(100, d)) + rng.normal(size=(100, 1)) * np.roll(shared, 1)
    assert covariance_similarity(x1, x2) > covariance_similarity(x1, x3) + 0.2


@pytest.mark.parametrize("seed", range(5))
def test_score_lies_in_unit_interval(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(rng.integers(5, 60), 9)) * rng.gamma(1.0, size=9)
    x2 = rng.normal(size=(rng.integers(5, 60), 9)) + rng.normal(size=9)
    assert 0.0 <= covariance_similarity(x1, x2) <= 1.0


def test_invalid_inputs_are_rejected() -> None:
    x = np.ones((5, 3))
    with pytest.raises(ValueError, match="dimensions differ"):
        covariance_similarity(x, np.ones((5, 4)))
    with pytest.raises(ValueError, match="energy"):
        covariance_similarity(x, x, energy=0.0)
    with pytest.raises(ValueError, match="all zero"):
        covariance_similarity(x, np.zeros((5, 3)))


def test_similarity_matrix_is_symmetric_with_self_scores_on_the_diagonal() -> None:
    rng = np.random.default_rng(5)
    feats = {name: rng.normal(size=(30, 6)) * rng.gamma(2.0, size=6) for name in "abcd"}
    m = similarity_matrix(feats)
    assert m.shape == (4, 4)
    np.testing.assert_array_equal(m, m.T)
    assert np.all((m >= 0.0) & (m <= 1.0))
    assert m[0, 2] == pytest.approx(covariance_similarity(feats["a"], feats["c"]))
    np.testing.assert_allclose(np.diag(m), [covariance_similarity(v, v) for v in feats.values()])


def test_heatmap_writes_a_png(tmp_path: Path) -> None:
    m = np.array([[1.0, 0.3, 0.7], [0.3, 1.0, 0.5], [0.7, 0.5, 1.0]])
    path = tmp_path / "plots" / "affinity.png"
    plot_heatmap(m, ["mr", "cr", "trec"], path, "before alignment")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000


def test_report_lists_every_pair_and_is_json_ready() -> None:
    before = np.array([[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]])
    after = before + 0.1 * (1 - np.eye(3))
    report = affinity_report(before, after, ["mr", "cr", "trec"])
    assert json.loads(json.dumps(report)) == report
    assert report["tasks"] == ["mr", "cr", "trec"]
    assert report["before"] == before.tolist()
    assert [(p["a"], p["b"]) for p in report["pairs"]] == [
        ("mr", "cr"),
        ("mr", "trec"),
        ("cr", "trec"),
    ]
    assert report["pairs"][2]["before"] == pytest.approx(0.6)
    assert report["pairs"][2]["after"] == pytest.approx(0.7)
    assert all(p["change"] == pytest.approx(0.1) for p in report["pairs"])

    alone = affinity_report(before, None, ["mr", "cr", "trec"])
    assert alone["after"] is None
    assert all(p["after"] is None and p["change"] is None for p in alone["pairs"])
