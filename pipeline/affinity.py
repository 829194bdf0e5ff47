"""Task affinity: the covariance similarity score (eq. 5 of Wu, Zhang & Ré, ICLR 2020).

For task features X_j (m_j × d), U_j D_j U_j^T is the best rank-r_j approximation of X_j^T X_j,
with r_j the smallest rank that keeps `energy` (0.99 in the paper) of the sum of its singular
values. The score of two tasks is

    ||(U_1 D_1^½)^T (U_2 D_2^½)||_F / (||U_1 D_1^½||_F · ||U_2 D_2^½||_F),

which lies in [0, 1] and is unchanged when both tasks' features are rotated by the same
orthogonal Q (X_j -> X_j Q). The pipeline computes it before and after covariance alignment
(Algorithm 1): the paper reports that alignment raises it for every task pair.

Notes:
- Features are not centered: the paper scores the raw second-moment matrices X^T X.
- We take the SVD of X_j itself (X_j = P S V^T, so X_j^T X_j = V S² V^T): U_j = V, D_j = S².
  Forming X_j^T X_j would square the condition number for nothing.
- The score of a task with itself is sqrt(Σ λ²) / Σ λ over the kept eigenvalues λ of X^T X:
  exactly 1 only when one direction holds the kept energy, and 1/sqrt(r) for r equal ones. So
  the diagonal of `similarity_matrix` is not all ones; read a pair's score against the two
  tasks' self-scores, and compare scores of the same pair (before vs. after alignment).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _scaled_basis(x: np.ndarray, energy: float) -> np.ndarray:
    """U D^½ (d × r) of the best rank-r approximation of X^T X keeping `energy` of its spectrum."""
    _, s, vt = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
    eig = s**2  # singular values of X^T X
    total = eig.sum()
    if not total > 0:
        raise ValueError("features are all zero: their covariance has no direction to compare")
    # The small slack keeps energy=1.0 from asking for more than the float sum can deliver.
    rank = int(np.searchsorted(np.cumsum(eig) / total, energy - 1e-12)) + 1
    rank = min(rank, len(s))
    return vt[:rank].T * s[:rank]


def _score(b1: np.ndarray, b2: np.ndarray) -> float:
    num = np.linalg.norm(b1.T @ b2)
    den = np.linalg.norm(b1) * np.linalg.norm(b2)
    # Cauchy-Schwarz bounds it by 1; the clip only removes float round-off.
    return float(np.clip(num / den, 0.0, 1.0))


def _check_features(x: np.ndarray, name: str) -> None:
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: features must be a non-empty 2-D [m, d] array, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: features contain NaN or inf")


def _check_energy(energy: float) -> None:
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")


def covariance_similarity(x1: np.ndarray, x2: np.ndarray, energy: float = 0.99) -> float:
    """Covariance similarity score of two tasks' features (eq. 5).

    Args:
        x1: Features of task 1, [m_1, d].
        x2: Features of task 2, [m_2, d] (same d; m_2 may differ).
        energy: Fraction of the sum of X^T X's singular values each low-rank approximation
            keeps.

    Returns:
        The score in [0, 1].

    Raises:
        ValueError: On bad shapes, non-finite or all-zero features, or energy outside (0, 1].
    """
    _check_energy(energy)
    _check_features(x1, "x1")
    _check_features(x2, "x2")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"feature dimensions differ: x1 has {x1.shape[1]}, x2 has {x2.shape[1]}")
    return _score(_scaled_basis(x1, energy), _scaled_basis(x2, energy))


def similarity_matrix(features: Mapping[str, np.ndarray], energy: float = 0.99) -> np.ndarray:
    """Covariance similarity score of every pair of tasks.

    Args:
        features: Task name -> its features [m_i, d]; the matrix follows the mapping's order.
        energy: As in `covariance_similarity`.

    Returns:
        float64 [k, k], symmetric; the diagonal holds each task's self-score (see the module
        docstring: 1 only for a rank-one spectrum).

    Raises:
        ValueError: As `covariance_similarity`, naming the task.
    """
    _check_energy(energy)
    names = list(features)
    if not names:
        raise ValueError("no tasks given")
    dim = None
    for name in names:
        _check_features(features[name], name)
        if dim is None:
            dim = features[name].shape[1]
        elif features[name].shape[1] != dim:
            raise ValueError(
                f"{name}: features have dimension {features[name].shape[1]}, {names[0]} has {dim}"
            )
    # One SVD per task, reused by every pair.
    bases = [_scaled_basis(features[name], energy) for name in names]
    k = len(names)
    out = np.empty((k, k))
    for i in range(k):
        for j in range(i, k):
            out[i, j] = out[j, i] = _score(bases[i], bases[j])
    return out


def plot_heatmap(
    matrix: np.ndarray,
    names: Sequence[str],
    path: Path,
    title: str,
    *,
    cols: Sequence[str] | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "viridis",
    label: str = "covariance similarity",
) -> None:
    """Save a score matrix as an annotated heatmap (PNG, or any format matplotlib infers).

    Args:
        matrix: Scores, [k, k] (or [k, len(cols)]); NaN cells are drawn blank with "-".
        names: Row names (and column names unless `cols` is given), in the matrix's order.
        path: Output file; its parent directory is created if missing.
        title: Figure title.
        cols: Column names when they differ from the row names.
        vmin, vmax, cmap, label: Colour scale, colour map and colour bar label.
    """
    # The Figure API renders without pyplot's global state or a GUI backend, and the deferred
    # import keeps matplotlib off the CLI's startup path.
    from matplotlib.figure import Figure

    cols = list(names) if cols is None else list(cols)
    k = len(names)
    if matrix.shape != (k, len(cols)):
        raise ValueError(
            f"matrix has shape {matrix.shape}, expected ({k}, {len(cols)}) for the names given"
        )
    size = 1.8 + 0.9 * max(k, len(cols))
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(names))
    for i in range(k):
        for j in range(len(cols)):
            value = matrix[i, j]
            if np.isnan(value):
                ax.text(j, i, "-", ha="center", va="center", color="gray", fontsize=9)
                continue
            # Dark text on bright cells, light text on dark ones.
            r, g, b, _ = image.cmap(image.norm(value))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def affinity_report(
    before: np.ndarray, after: np.ndarray | None, names: Sequence[str]
) -> dict[str, Any]:
    """JSON-ready summary of task similarity before (and after) alignment.

    Args:
        before: Scores before alignment, [k, k].
        after: Scores after alignment, [k, k], or None if alignment did not run.
        names: Task names, in the matrices' order.

    Returns:
        {"tasks": names, "before": k × k list, "after": k × k list or None, "pairs": one entry
        per unordered pair a < b with keys a, b, before, after and change (after - before;
        after and change are None without `after`)}.
    """
    k = len(names)
    for label, m in (("before", before), ("after", after)):
        if m is not None and m.shape != (k, k):
            raise ValueError(f"{label} has shape {m.shape}, expected ({k}, {k}) for {k} names")
    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            b = float(before[i, j])
            a = None if after is None else float(after[i, j])
            pairs.append(
                {
                    "a": names[i],
                    "b": names[j],
                    "before": b,
                    "after": a,
                    "change": None if a is None else a - b,
                }
            )
    return {
        "tasks": list(names),
        "before": before.astype(float).tolist(),
        "after": None if after is None else after.astype(float).tolist(),
        "pairs": pairs,
    }


def model_inputs(
    features: Mapping[str, np.ndarray],
    mean: np.ndarray,
    std: np.ndarray,
    alignment: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """What the shared module B sees: standardized features, times R_i when given.

    Before and after alignment are compared on the same standardized features, so the change
    in the score is the alignment's alone.
    """
    out = {}
    for t, x in features.items():
        z = (np.asarray(x, dtype=np.float64) - mean) / std
        out[t] = z @ alignment[t] if alignment is not None else z
    return out


def similarity_before_after(
    config: Any, run_dir: Path | None = None, split: str = "train"
) -> tuple[list[str], np.ndarray, np.ndarray | None, str]:
    """The similarity matrix of the config's tasks on their encoder features; for a trained
    frozen-encoder run, on the run's standardized features before (R_i = I) and after its
    alignment R_i.

    Returns:
        Task names, the matrix before, the matrix after (None without a run), and a title
        saying which features `before` was computed on.
    """
    from pipeline.data import load_tasks
    from pipeline.features import FeatureCache, resolve_encoder_path

    labels = None
    alignment = None
    stats: tuple[np.ndarray, np.ndarray] | None = None
    if run_dir is not None:
        from pipeline.runs import load_run

        run = load_run(run_dir)
        labels = run.labels
        if run.record.encoder.fine_tuned:
            raise ValueError(
                f"{run_dir}: affinity after alignment needs a frozen-encoder run (the features "
                "of a fine-tuned encoder differ from the ones the matrix is computed on)"
            )
        heads = run.model.heads
        alignment = {t: p.detach().double().numpy() for t, p in heads.alignment.items()}
        stats = (heads.feature_mean.double().numpy(), heads.feature_std.double().numpy())
        unknown = sorted(set(config.task_names) - set(alignment))
        if unknown:
            raise ValueError(f"{run_dir}: the run has no tasks {unknown}")
    enc = config.encoder
    encoder_path = resolve_encoder_path(enc.path, enc.allow_download)
    tasks = load_tasks(
        config, splits=["train", split] if split != "train" else ["train"], labels=labels
    )
    cache = FeatureCache(config.resolved_cache_dir(), encoder_path, enc.max_length, enc.pooling)
    computed = cache.get_many(
        [(t.splits[split].texts, f"features {t.name}/{split}") for t in tasks]
    )
    features = {t.name: f for t, f in zip(tasks, computed, strict=True)}
    names = list(features)
    if alignment is None or stats is None:  # no run: the encoder's features as they are
        return names, similarity_matrix(features), None, "encoder features"
    before = similarity_matrix(model_inputs(features, *stats))
    after = similarity_matrix(model_inputs(features, *stats, alignment))
    return names, before, after, "standardized features, R_i = I"


def run_affinity(
    config: Any, output_dir: Path, run_dir: Path | None = None, split: str = "train"
) -> dict[str, Any]:
    """`polytask affinity`: `similarity_before_after` written out as `affinity.json`,
    `affinity_before.png` and (with a run) `affinity_after.png`."""
    import json

    names, before, after, title = similarity_before_after(config, run_dir, split)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = affinity_report(before, after, names)
    report["split"] = split
    report["run"] = str(run_dir) if run_dir else None
    plots = [output_dir / "affinity_before.png"]
    plot_heatmap(before, names, plots[0], f"Covariance similarity ({title})")
    if after is not None:
        plots.append(output_dir / "affinity_after.png")
        plot_heatmap(after, names, plots[1], "Covariance similarity after alignment (Z_i R_i)")
    json_path = output_dir / "affinity.json"
    json_path.write_text(json.dumps(report, indent=1))
    return {"json": json_path, "plots": plots, "report": report}
