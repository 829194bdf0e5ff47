"""Task loss weights: the SVD weighting down-weights noisy or off-subspace tasks (Algorithm 2)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.weighting import (
    WeightingMethod,
    compute_task_weights,
    size_task_weights,
    svd_task_weights,
)

DIM = 16
ROWS = 400


def _direction(rng: np.random.Generator) -> np.ndarray:
    w = rng.normal(size=DIM)
    return w / np.linalg.norm(w)


def _binary_task(
    rng: np.random.Generator, w: np.ndarray, flip: float = 0.0, rows: int = ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features with labels sign(x·w), a `flip` fraction of them flipped at random."""
    x = rng.normal(size=(rows, DIM))
    y = (x @ w > 0).astype(np.int64)
    flipped = rng.random(rows) < flip
    return x, np.where(flipped, 1 - y, y)


@pytest.mark.parametrize("seed", range(5))
def test_planted_noisy_task_gets_lower_svd_weight(seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = _direction(rng)
    tasks = [_binary_task(rng, w), _binary_task(rng, w), _binary_task(rng, w, flip=0.4)]
    weights = svd_task_weights([t[0] for t in tasks], [t[1] for t in tasks], [2, 2, 2], rank=1)
    assert weights[2] < weights[0]
    assert weights[2] < weights[1]
    # 40% flips leave 1 - 2·0.4 = 0.2 of the signal: the gap is large, not a coin toss.
    assert weights[2] < 0.5 * min(weights[0], weights[1])


def test_task_off_the_principal_direction_gets_lower_weight() -> None:
    # Same label noise (none) and the same θ norm: only the direction differs, which plain norm
    # weighting could not see.
    rng = np.random.default_rng(0)
    w = np.eye(DIM)[0]
    other = np.eye(DIM)[1]
    tasks = [_binary_task(rng, w), _binary_task(rng, w), _binary_task(rng, other)]
    weights = svd_task_weights([t[0] for t in tasks], [t[1] for t in tasks], [2, 2, 2], rank=1)
    assert weights[2] < 0.3 * min(weights[0], weights[1])


def test_weights_have_mean_one_and_ignore_feature_offset_and_scale() -> None:
    rng = np.random.default_rng(1)
    w = _direction(rng)
    tasks = [_binary_task(rng, w), _binary_task(rng, w, flip=0.2), _binary_task(rng, w, 0.3)]
    xs, ys = [t[0] for t in tasks], [t[1] for t in tasks]
    weights = svd_task_weights(xs, ys, [2, 2, 2], rank=2)
    assert weights.mean() == pytest.approx(1.0)
    assert np.all(weights > 0)
    # A shared offset is what pooled centering removes; a shared scale is what mean 1 removes.
    offset = 5.0 * rng.normal(size=DIM)
    moved = svd_task_weights([3.0 * x + offset for x in xs], ys, [2, 2, 2], rank=2)
    np.testing.assert_allclose(moved, weights, rtol=1e-9)


def test_renaming_classes_does_not_change_weights() -> None:
    rng = np.random.default_rng(2)
    w = _direction(rng)
    x0, y0 = _binary_task(rng, w)
    x1, y1 = _binary_task(rng, w, flip=0.1)
    x2 = rng.normal(size=(ROWS, DIM))
    z = x2 @ w
    y2 = np.digitize(z, np.quantile(z, [0.25, 0.5, 0.75]))  # 4 classes along w
    base = svd_task_weights([x0, x1, x2], [y0, y1, y2], [2, 2, 4], rank=1)
    # Swapping a binary task's labels flips its single ±1 column; permuting a multiclass task's
    # classes permutes its columns. Neither changes what the task says about the features.
    perm = np.array([2, 0, 3, 1])
    renamed = svd_task_weights([x0, x1, x2], [1 - y0, y1, perm[y2]], [2, 2, 4], rank=1)
    np.testing.assert_allclose(renamed, base, rtol=1e-9)


def test_multiclass_noise_task_gets_lower_weight_than_clean_binary_tasks() -> None:
    rng = np.random.default_rng(3)
    w = _direction(rng)
    x0, y0 = _binary_task(rng, w)
    x1, y1 = _binary_task(rng, w)
    x2 = rng.normal(size=(ROWS, DIM))
    y2 = rng.integers(0, 6, size=ROWS)  # labels unrelated to the features
    weights = svd_task_weights([x0, x1, x2], [y0, y1, y2], [2, 2, 6], rank=1)
    assert weights.shape == (3,)
    assert weights[2] < 0.3 * min(weights[0], weights[1])


@pytest.mark.parametrize("rank", [0, 3, 4])
def test_rank_out_of_range_is_rejected(rank: int) -> None:
    rng = np.random.default_rng(0)
    w = _direction(rng)
    tasks = [_binary_task(rng, w, rows=20) for _ in range(3)]
    with pytest.raises(ValueError, match="1 <= rank < number of tasks"):
        svd_task_weights([t[0] for t in tasks], [t[1] for t in tasks], [2, 2, 2], rank=rank)


def test_shape_errors_name_the_task() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, DIM))
    y = rng.integers(0, 2, size=10)
    with pytest.raises(ValueError, match="task 1: labels must have shape"):
        svd_task_weights([x, x], [y, y[:5]], [2, 2], rank=1)
    with pytest.raises(ValueError, match="task 1: features have dimension 8"):
        svd_task_weights([x, x[:, :8]], [y, y], [2, 2], rank=1)
    with pytest.raises(ValueError, match="task 0: labels must lie in 0..1"):
        svd_task_weights([x, x], [y + 1, y], [2, 2], rank=1)
    with pytest.raises(ValueError, match="one entry per task"):
        svd_task_weights([x, x], [y], [2, 2], rank=1)


def test_size_weights_are_proportional_with_mean_one() -> None:
    weights = size_task_weights([100, 300, 200])
    np.testing.assert_allclose(weights, [0.5, 1.5, 1.0])
    with pytest.raises(ValueError, match="positive"):
        size_task_weights([10, 0])


def test_compute_task_weights_dispatches() -> None:
    rng = np.random.default_rng(4)
    w = _direction(rng)
    tasks = [_binary_task(rng, w, rows=n) for n in (100, 200, 300)]
    xs, ys = [t[0] for t in tasks], [t[1] for t in tasks]
    np.testing.assert_array_equal(compute_task_weights("none", xs, ys, [2, 2, 2], None), 1.0)
    np.testing.assert_allclose(compute_task_weights("size", xs, ys, [2, 2, 2], None), [0.5, 1, 1.5])
    np.testing.assert_allclose(
        compute_task_weights("svd", xs, ys, [2, 2, 2], None),
        svd_task_weights(xs, ys, [2, 2, 2], rank=2),
    )
    with pytest.raises(ValueError, match="unknown weighting method"):
        compute_task_weights("uniform", xs, ys, [2, 2, 2], None)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["none", "svd", "size"])
def test_single_task_weight_is_one(method: WeightingMethod) -> None:
    x, y = _binary_task(np.random.default_rng(0), np.eye(DIM)[0], rows=30)
    np.testing.assert_array_equal(compute_task_weights(method, [x], [y], [2], None), [1.0])
