"""Task sampling and per-rank batching: the right probabilities, the same schedule on every rank,
and disjoint rank shares that cover the task."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.train.sampler import (
    rank_batches,
    steps_per_epoch,
    task_probabilities,
    task_schedule,
)

SIZES = [100, 400, 1500]


def test_proportional_probabilities():
    np.testing.assert_allclose(task_probabilities(SIZES, "proportional"), [0.05, 0.2, 0.75])


def test_uniform_probabilities():
    np.testing.assert_allclose(task_probabilities(SIZES, "uniform"), [1 / 3] * 3)


def test_temperature_probabilities():
    p = task_probabilities(SIZES, "temperature", temperature=2.0)
    expected = np.sqrt(SIZES) / np.sqrt(SIZES).sum()
    np.testing.assert_allclose(p, expected)
    # Between proportional and uniform: the small task gains, the large one loses.
    prop = task_probabilities(SIZES, "proportional")
    assert p[0] > prop[0] and p[-1] < prop[-1]


def test_temperature_one_is_proportional_and_large_is_uniform():
    np.testing.assert_allclose(
        task_probabilities(SIZES, "temperature", temperature=1.0),
        task_probabilities(SIZES, "proportional"),
    )
    gaps = [
        np.abs(task_probabilities(SIZES, "temperature", temperature=t) - 1 / 3).max()
        for t in (1.0, 2.0, 10.0, 1e3, 1e6)
    ]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-5


@pytest.mark.parametrize("kind", ["proportional", "uniform", "temperature"])
def test_probabilities_sum_to_one(kind):
    assert task_probabilities(SIZES, kind).sum() == pytest.approx(1.0)


def test_unknown_sampler_kind_raises():
    with pytest.raises(ValueError, match="unknown sampler kind 'random'"):
        task_probabilities(SIZES, "random")  # type: ignore[arg-type]


def test_schedule_is_reproducible_per_seed_and_epoch():
    p = task_probabilities(SIZES, "uniform")
    a = task_schedule(p, steps=200, seed=3, epoch=1)
    assert a.shape == (200,)
    np.testing.assert_array_equal(a, task_schedule(p, steps=200, seed=3, epoch=1))
    assert not np.array_equal(a, task_schedule(p, steps=200, seed=3, epoch=2))
    assert not np.array_equal(a, task_schedule(p, steps=200, seed=4, epoch=1))


def test_schedule_follows_the_probabilities():
    p = task_probabilities(SIZES, "proportional")
    counts = np.bincount(task_schedule(p, steps=20_000, seed=0, epoch=0), minlength=3)
    np.testing.assert_allclose(counts / counts.sum(), p, atol=0.015)


@pytest.mark.parametrize(
    ("sizes", "batch", "world", "steps"),
    [([10, 20], 8, 1, 4), ([10, 20], 8, 2, 2), ([1], 64, 4, 1), ([64], 8, 2, 4)],
)
def test_steps_per_epoch(sizes, batch, world, steps):
    assert steps_per_epoch(sizes, batch, world) == steps


def _one_pass(n: int, batch: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """The indices one rank sees in the first pass over the task."""
    share = len(range(rank, n, world))
    batches = itertools.islice(
        rank_batches(n, batch, seed, epoch, 0, rank, world), -(-share // batch)
    )
    return np.concatenate(list(batches))


@pytest.mark.parametrize(("n", "world"), [(23, 2), (24, 3), (10, 4)])
def test_rank_batches_are_disjoint_and_cover_the_task(n, world):
    shares = [_one_pass(n, batch=4, seed=0, epoch=0, rank=r, world=world) for r in range(world)]
    together = np.concatenate(shares)
    assert len(together) == len(set(together.tolist())) == n
    assert sorted(together.tolist()) == list(range(n))
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


def test_rank_batches_respect_batch_size_and_reshuffle_each_pass():
    gen = rank_batches(10, 4, seed=0, epoch=0, task_index=0, rank=0, world_size=1)
    batches = [next(gen) for _ in range(6)]
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    first, second = np.concatenate(batches[:3]), np.concatenate(batches[3:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not np.array_equal(first, second)


def test_rank_batches_reproducible_per_seed_and_epoch():
    a = _one_pass(50, 8, seed=1, epoch=0, rank=0, world=1)
    np.testing.assert_array_equal(a, _one_pass(50, 8, seed=1, epoch=0, rank=0, world=1))
    assert not np.array_equal(a, _one_pass(50, 8, seed=1, epoch=1, rank=0, world=1))


def test_fewer_examples_than_ranks_every_rank_still_gets_data():
    for rank in range(4):
        batch = next(rank_batches(2, 8, seed=0, epoch=0, task_index=0, rank=rank, world_size=4))
        assert len(batch) > 0
        assert set(batch.tolist()) <= {0, 1}
