"""Per-task loss weights α_i, fixed before stage 1 (DESIGN section 1.1, Algorithm 2).

Algorithm 2 of Wu, Zhang & Ré (ICLR 2020) assumes every task shares one input matrix X:
θ_i = X^T y_i, U_r = top-r left singular vectors of [θ_1 … θ_k], α_i = ||θ_i^T U_r||. A task
whose θ_i lies off the principal directions (for example because many of its labels are
noise) gets less weight. Our tasks have different inputs and some have more than two classes,
so `svd_task_weights` adapts it as follows; this is the project's decision on how a task's
label columns combine into one α_i:

1. Center. Every task's pooled encoder features are centered by the mean of all tasks' rows
   pooled together (one shared mean, so the tasks stay comparable). Uncentered, the common
   mean direction of the features dominates every X_i^T y_i and the SVD mostly measures label
   balance rather than how the labels depend on the features.
2. Label matrix. Y_i is the ±1 one-vs-rest matrix [m_i, C_i]. A binary task keeps a single
   column (+1 for class 1): its two ±1 columns are exact negatives, so keeping both would count
   the task twice. c_i is the number of columns kept (1 for binary, C_i otherwise).
3. θ_i = X_i^T Y_i / m_i, a d × c_i matrix; dividing by m_i keeps a large data set from
   outweighing a small one merely by its size (that is what the "size" method is for).
4. Θ = [θ_1 / sqrt(c_1) … θ_k / sqrt(c_k)]: each task's columns are scaled by 1/sqrt(c_i) so that
   a many-class task contributes one task's worth of energy to the subspace, not c_i tasks'.
5. U_r = top-r left singular vectors of Θ, with 1 <= r < k (r = k is plain norm weighting).
6. α_i = ||θ_i^T U_r||_F / sqrt(c_i): the paper's ||θ_i^T U_r|| with a multiclass task's columns
   combined as a root-mean-square; for a binary task (c_i = 1) it is the paper's formula as is.
7. The α_i are rescaled to mean 1, which keeps the effective learning rate of the unweighted
   loss.

Caveat: a one-vs-rest column of a rare class is mostly -1, so its θ column is small (about
2·p_c times the class's mean feature); a clean many-class task therefore gets a lower α_i than
an equally clean binary task (on synthetic data, six balanced classes cut along the same
direction as two binary tasks got about 0.4 times their weight). The weights compare linear label
signal, not task difficulty.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

WeightingMethod = Literal["none", "svd", "size"]


def _check_tasks(
    features: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: Sequence[int]
) -> None:
    """Raise ValueError, naming the task index, if the per-task inputs disagree."""
    if not (len(features) == len(labels) == len(num_classes)):
        raise ValueError(
            f"features, labels and num_classes must have one entry per task; got "
            f"{len(features)}, {len(labels)} and {len(num_classes)}"
        )
    if not features:
        raise ValueError("no tasks given")
    dim = None
    for i, (x, y, c) in enumerate(zip(features, labels, num_classes, strict=True)):
        if x.ndim != 2:
            raise ValueError(f"task {i}: features must be 2-D [m, d], got shape {x.shape}")
        if dim is None:
            dim = x.shape[1]
        elif x.shape[1] != dim:
            raise ValueError(
                f"task {i}: features have dimension {x.shape[1]}, task 0 has {dim}; all tasks "
                "must come from the same encoder"
            )
        if x.shape[0] == 0:
            raise ValueError(f"task {i}: no examples")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"task {i}: features contain NaN or inf")
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"task {i}: labels must have shape ({x.shape[0]},) to match its features, "
                f"got {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"task {i}: labels must be integers, got dtype {y.dtype}")
        if c < 2:
            raise ValueError(f"task {i}: num_classes must be at least 2, got {c}")
        if y.min() < 0 or y.max() >= c:
            raise ValueError(
                f"task {i}: labels must lie in 0..{c - 1}, got range {y.min()}..{y.max()}"
            )


def _label_matrix(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """±1 one-vs-rest label matrix [m, c]; one column (+1 = class 1) for a binary task."""
    if num_classes == 2:
        return (2.0 * labels - 1.0)[:, None]
    y = -np.ones((labels.shape[0], num_classes))
    y[np.arange(labels.shape[0]), labels] = 1.0
    return y


def svd_task_weights(
    features: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    num_classes: Sequence[int],
    rank: int,
) -> np.ndarray:
    """SVD-based task weights (Algorithm 2), adapted to tasks with different inputs.

    See the module docstring for every step and why it is there.

    Args:
        features: Per task, its pooled encoder features, float [m_i, d].
        labels: Per task, its integer labels in 0..num_classes[i]-1, shape [m_i].
        num_classes: Per task, its number of classes (at least 2).
        rank: r, the number of principal directions kept; 1 <= r < number of tasks.

    Returns:
        float64 [k], the weights α_i, rescaled to mean 1.

    Raises:
        ValueError: If rank is out of range, the inputs disagree in shape (the message names
            the task index), or no task's labels carry any linear signal.
    """
    _check_tasks(features, labels, num_classes)
    k = len(features)
    if not 1 <= rank < k:
        raise ValueError(
            f"rank must satisfy 1 <= rank < number of tasks ({k}), got {rank}; "
            "rank = k would be plain norm weighting"
        )
    dim = features[0].shape[1]
    if rank >= dim:
        logger.warning(
            "SVD weighting rank %d >= feature dimension %d: U_r spans every direction, so the "
            "weights reduce to plain norm weighting",
            rank,
            dim,
        )

    xs = [np.asarray(x, dtype=np.float64) for x in features]
    # One shared mean over all tasks' rows: without centering, the common mean direction of the
    # encoder features dominates X^T y and the weights track label balance instead of signal.
    mean = np.concatenate(xs).mean(axis=0)
    thetas = []
    for x, y, c in zip(xs, labels, num_classes, strict=True):
        ys = _label_matrix(np.asarray(y), int(c))
        thetas.append((x - mean).T @ ys / x.shape[0])  # d x c_i

    # 1/sqrt(c_i) per task so a many-class task brings one task's worth of columns, not c_i.
    stacked = np.concatenate([t / np.sqrt(t.shape[1]) for t in thetas], axis=1)
    u, _, _ = np.linalg.svd(stacked, full_matrices=False)
    u_r = u[:, :rank]
    alphas = np.array([np.linalg.norm(t.T @ u_r) / np.sqrt(t.shape[1]) for t in thetas])
    if not alphas.sum() > 0:
        raise ValueError(
            "every SVD task weight is zero: no task's labels correlate with its features"
        )
    return alphas / alphas.mean()


def size_task_weights(sizes: Sequence[int]) -> np.ndarray:
    """Weights proportional to each task's number of training examples.

    Args:
        sizes: Per task, its number of training examples (positive).

    Returns:
        float64 [k], proportional to sizes, with mean 1.

    Raises:
        ValueError: If sizes is empty or holds a non-positive value.
    """
    if len(sizes) == 0:
        raise ValueError("no tasks given")
    arr = np.asarray(sizes, dtype=np.float64)
    bad = [i for i, s in enumerate(sizes) if s <= 0]
    if bad:
        raise ValueError(f"task sizes must be positive; tasks {bad} have {[sizes[i] for i in bad]}")
    return arr / arr.mean()


def compute_task_weights(
    method: WeightingMethod,
    features: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    num_classes: Sequence[int],
    rank: int | None,
) -> np.ndarray:
    """Task loss weights for the configured method (`weighting` in the run config).

    Args:
        method: none: all 1; svd: `svd_task_weights`; size: `size_task_weights` of the number
            of labels per task.
        features: Per task, its pooled encoder features [m_i, d] (read by svd only).
        labels: Per task, its integer labels [m_i].
        num_classes: Per task, its number of classes.
        rank: r for svd; None means k - 1.

    Returns:
        float64 [k] weights with mean 1. With a single task every method returns [1.0]:
        there is nothing to weigh it against.

    Raises:
        ValueError: On an unknown method or invalid inputs (see the per-method functions).
    """
    if method not in ("none", "svd", "size"):
        raise ValueError(f"unknown weighting method {method!r}; expected none, svd or size")
    k = len(labels)
    if k == 0:
        raise ValueError("no tasks given")
    if k == 1 or method == "none":
        return np.ones(k)
    if method == "size":
        return size_task_weights([len(y) for y in labels])
    return svd_task_weights(features, labels, num_classes, k - 1 if rank is None else rank)
