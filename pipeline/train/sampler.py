"""Task sampling and per-rank batching.

Every rank draws the same task sequence (seeded by seed and epoch) so that all DDP ranks train
the same task's heads at each step; each rank takes a disjoint share of that task's examples.
Seeding by epoch also makes a run resumed from a checkpoint replay exactly the epochs it missed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

SamplerKind = Literal["proportional", "uniform", "temperature"]


def task_probabilities(
    sizes: Sequence[int], kind: SamplerKind = "proportional", temperature: float = 2.0
) -> np.ndarray:
    """p_i for each task: proportional to n_i, uniform, or proportional to n_i^(1/τ)."""
    n = np.asarray(sizes, dtype=np.float64)
    if kind == "proportional":
        p = n
    elif kind == "uniform":
        p = np.ones_like(n)
    elif kind == "temperature":
        p = n ** (1.0 / temperature)
    else:
        raise ValueError(f"unknown sampler kind {kind!r}")
    return p / p.sum()


def task_schedule(probabilities: np.ndarray, steps: int, seed: int, epoch: int) -> np.ndarray:
    """The task index of each step of one epoch; identical on every rank."""
    rng = np.random.default_rng([seed, epoch, 7919])
    return rng.choice(len(probabilities), size=steps, p=probabilities)


def steps_per_epoch(sizes: Sequence[int], batch_size: int, world_size: int) -> int:
    """One epoch sees about as many examples as all tasks together hold."""
    return max(1, -(-sum(sizes) // (batch_size * world_size)))


def rank_batches(
    n: int, batch_size: int, seed: int, epoch: int, task_index: int, rank: int, world_size: int
) -> Iterator[np.ndarray]:
    """Endless batches of example indices for one task on one rank.

    Each pass is a fresh permutation shared by all ranks, of which a rank takes every
    `world_size`-th element: ranks never see the same example in the same pass.
    """
    rng = np.random.default_rng([seed, epoch, task_index, 104729])
    while True:
        perm = rng.permutation(n)
        share = perm[rank::world_size]
        if len(share) == 0:  # fewer examples than ranks: every rank reuses the whole task
            share = perm
        for i in range(0, len(share), batch_size):
            yield share[i : i + batch_size]


def bucketed_batches(
    lengths: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    task_index: int,
    rank: int,
    world_size: int,
    bucket_batches: int = 50,
) -> Iterator[np.ndarray]:
    """Endless length-bucketed batches of example indices for one task on one rank.

    Each pass takes this rank's share of a permutation shared by all ranks (as `rank_batches`),
    cuts it into buckets of `bucket_batches` batches, sorts each bucket by length and cuts it
    into batches, so a batch pads to a length close to all of its rows'. The batches of a bucket
    come in a random order. Seeded by (seed, epoch, task, rank): a resumed run replays them.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch, task_index, 104729])
    # Batch order is this rank's own: its draws must not shift the shared permutation's stream.
    order_rng = np.random.default_rng([seed, epoch, task_index, rank, 15485863])
    while True:
        perm = rng.permutation(n)
        share = perm[rank::world_size]
        if len(share) == 0:  # fewer examples than ranks: every rank reuses the whole task
            share = perm
        size = batch_size * bucket_batches
        for b in range(0, len(share), size):
            bucket = share[b : b + size]
            bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
            cuts = [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
            for j in order_rng.permutation(len(cuts)):
                yield cuts[j]
