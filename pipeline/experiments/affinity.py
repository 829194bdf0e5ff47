"""Affinity suite: does the covariance similarity of two tasks predict whether training them
together helps, and does covariance alignment make tasks more similar?

For every pair of tasks a two-task model is trained: stage 1 is plain hard parameter sharing
(its dev accuracy gives the pair's transfer against the single-task models), stage 2 trains the
alignment matrices R_i (Algorithm 1; kept whatever dev says, so "after" is always the aligned
model; the aligned accuracy is each task's best stage-2 epoch, selected on dev as stage 1's
epoch is). The similarity score (Wu, Zhang & Ré, eq. 5) of the pair is computed on the features
the shared module sees, before (R_i = I) and after alignment, and once for all tasks on the
encoder's raw features (the paper's choice: the inputs of the shared module, unnormalized).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.experiments.common import (
    PLAIN,
    RunSpec,
    Stat,
    accuracy,
    failed_section,
    header_section,
    md_table,
    overlap_note,
    save_figure,
    spearman,
    stat,
)
from pipeline.experiments.options import ExperimentOptions

PAIR = PLAIN | {"alignment.enabled": True, "alignment.keep_only_if_better": False}
# Two-sided 5% critical value of Spearman's rho for 15 pairs (six tasks); quoted in the report
# only when there are exactly 15 pairs.
RHO_CRITICAL_15 = 0.521


def plan(base: RunConfig, seeds: Sequence[int], opts: ExperimentOptions) -> list[RunSpec]:
    """For every seed: a single-task model per task and a two-task model per pair."""
    if len(base.tasks) < 2:
        raise ValueError("the affinity suite needs at least two tasks")
    specs = []
    for seed in seeds:
        for t in base.task_names:
            specs.append(RunSpec(f"single-{t}-s{seed}", "single", seed, [t], dict(PLAIN)))
        for a, b in itertools.combinations(base.task_names, 2):
            specs.append(
                RunSpec(
                    f"pair-{a}-{b}-s{seed}",
                    "pair",
                    seed,
                    [a, b],
                    dict(PAIR),
                    params={"pair": [a, b]},
                    measure_alignment=True,
                )
            )
    return specs


def prepare(base: RunConfig, specs: Sequence[RunSpec], suite_dir: Path) -> dict[str, Any]:
    """The similarity matrix of all tasks on the encoder's raw training features."""
    from pipeline.affinity import similarity_before_after

    names, matrix, _, _ = similarity_before_after(base)
    return {"encoder_similarity": {"tasks": names, "matrix": matrix.tolist()}}


def analyze(
    specs: Sequence[RunSpec],
    results: Mapping[str, Mapping[str, Any]],
    opts: ExperimentOptions,
    encoder_similarity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Per pair: similarity before/after alignment, transfer of plain sharing and of the aligned
    model (mean change of the two tasks against their single-task models); correlations."""
    tasks = list(dict.fromkeys(t for s in specs for t in s.tasks))
    seeds = sorted({s.seed for s in specs})
    single = {
        (s.tasks[0], s.seed): accuracy(results.get(s.name), s.tasks[0])
        for s in specs
        if s.variant == "single"
    }
    pairs = []
    gain = np.full((len(tasks), len(tasks)), np.nan)
    before_m = np.full_like(gain, np.nan)
    after_m = np.full_like(gain, np.nan)
    for a, b in itertools.combinations(tasks, 2):
        rs = {s.seed: results.get(s.name) for s in specs if s.params.get("pair") == [a, b]}
        vals: dict[str, list[float | None]] = {
            k: [] for k in ("before", "after", "transfer", "aligned_transfer", "gain_a", "gain_b")
        }
        for seed in seeds:
            r = rs.get(seed)
            ok = r is not None and r.get("status") == "ok"
            sim = r.get("similarity") if ok else None
            vals["before"].append(sim["before"][0][1] if sim else None)
            vals["after"].append(sim["after"][0][1] if sim and sim["after"] else None)
            gains = {}
            for key, stage in (("plain", "joint"), ("aligned", "align_best")):
                ga, gb = (_diff(accuracy(r, t, stage), single.get((t, seed))) for t in (a, b))
                gains[key] = (ga, gb)
            vals["gain_a"].append(gains["plain"][0])
            vals["gain_b"].append(gains["plain"][1])
            vals["transfer"].append(_mean2(*gains["plain"]))
            vals["aligned_transfer"].append(_mean2(*gains["aligned"]))
        entry = {"a": a, "b": b} | {k: stat(v).to_json() for k, v in vals.items()}
        if encoder_similarity is not None:
            names = encoder_similarity["tasks"]
            raw = encoder_similarity["matrix"][names.index(a)][names.index(b)]
            entry["encoder"] = {"mean": raw, "std": 0.0, "n": 1}
        pairs.append(entry)
        i, j = tasks.index(a), tasks.index(b)
        gain[i, j] = entry["gain_a"]["mean"]
        gain[j, i] = entry["gain_b"]["mean"]
        before_m[i, j] = before_m[j, i] = entry["before"]["mean"]
        after_m[i, j] = after_m[j, i] = entry["after"]["mean"]

    def usable(x: str, y: str) -> tuple[list[float], list[float]]:
        pts = [(p[x]["mean"], p[y]["mean"]) for p in pairs if p[x]["n"] and p[y]["n"]]
        return [u for u, _ in pts], [v for _, v in pts]

    rose = [p for p in pairs if p["before"]["n"] and p["after"]["n"]]
    return {
        "tasks": tasks,
        "seeds": seeds,
        "pairs": pairs,
        "similarity_before": before_m.tolist(),
        "similarity_after": after_m.tolist(),
        "gain_matrix": gain.tolist(),
        "encoder_similarity": encoder_similarity,
        "spearman_encoder_vs_transfer": (
            spearman(*usable("encoder", "transfer")) if encoder_similarity else float("nan")
        ),
        "spearman_before_vs_transfer": spearman(*usable("before", "transfer")),
        "spearman_after_vs_aligned_transfer": spearman(*usable("after", "aligned_transfer")),
        "pairs_similarity_rose": sum(p["after"]["mean"] > p["before"]["mean"] for p in rose),
        "pairs_alignment_helped": sum(
            p["aligned_transfer"]["mean"] > p["transfer"]["mean"]
            for p in pairs
            if p["transfer"]["n"] and p["aligned_transfer"]["n"]
        ),
        "n_pairs": len(pairs),
    }


def _diff(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def _mean2(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else (x + y) / 2


def _rho(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.2f}"


def write_report(
    out_dir: Path,
    analysis: Mapping[str, Any],
    meta: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
) -> list[Path]:
    """report.md, similarity heatmaps, the pairwise gain matrix and a scatter plot."""
    from pipeline.affinity import plot_heatmap

    tasks, pairs, n = analysis["tasks"], analysis["pairs"], analysis["n_pairs"]
    before = np.array(analysis["similarity_before"], dtype=float)
    after = np.array(analysis["similarity_after"], dtype=float)
    gain = np.array(analysis["gain_matrix"], dtype=float)
    plots = [out_dir / "similarity_before.png", out_dir / "similarity_after.png"]
    plot_heatmap(before, tasks, plots[0], "Pair similarity before alignment (R_i = I)")
    plot_heatmap(after, tasks, plots[1], "Pair similarity after alignment")
    lim = float(np.nanmax(np.abs(gain))) if np.isfinite(gain).any() else 1.0
    plots.append(out_dir / "pair_gain.png")
    plot_heatmap(
        gain,
        tasks,
        plots[2],
        "Row task's accuracy change when trained with column task",
        vmin=-lim,
        vmax=lim,
        cmap="RdBu",
        label="points vs single-task model",
    )
    enc = analysis.get("encoder_similarity")
    if enc is not None:
        plots.insert(0, out_dir / "similarity_encoder.png")
        plot_heatmap(
            np.array(enc["matrix"], dtype=float),
            enc["tasks"],
            plots[0],
            "Covariance similarity of the encoder's raw features",
        )
    plots.append(plot_scatter(out_dir / "similarity_vs_transfer.png", analysis))
    rho_e = analysis.get("spearman_encoder_vs_transfer", float("nan"))
    rho_b = analysis["spearman_before_vs_transfer"]
    rho_a = analysis["spearman_after_vs_aligned_transfer"]
    significance = (
        f" With {n} pairs, |ρ| above {RHO_CRITICAL_15} is significant at the 5% level."
        if n == 15
        else ""
    )
    lines = [
        header_section(
            "Task affinity: does similarity predict transfer?",
            meta,
            "The covariance similarity score (Wu, Zhang & Ré, eq. 5) compares the directions in "
            "which two tasks' features vary: 1 means the same directions, 0 unrelated ones. "
            "For every pair of tasks a two-task model is trained; the pair's *transfer* is the "
            "mean change of its two tasks' dev accuracy against their single-task models. If "
            "the score is useful, similar pairs should gain more. Covariance alignment "
            "(Algorithm 1) then learns a matrix R_i per task that rotates its features to "
            "match the shared module; the paper reports it raises the similarity of every "
            "pair.",
        ),
        overlap_note(results, meta.get("decontaminate", False)),
        "## Summary\n",
        f"- Similarity of the encoder's raw features against plain-sharing transfer: Spearman "
        f"ρ = {_rho(rho_e)} over {n} pairs.{significance}",
        f"- Similarity of the standardized features the shared module sees, against the same "
        f"transfer: ρ = {_rho(rho_b)}.",
        f"- Similarity after alignment against the aligned models' transfer: ρ = {_rho(rho_a)}.",
        f"- Alignment raised the similarity of {analysis['pairs_similarity_rose']} of {n} pairs "
        "(paper: all 15 sentiment pairs).",
        f"- Alignment raised the pair's mean accuracy over plain sharing for "
        f"{analysis['pairs_alignment_helped']} of {n} pairs (paper: 13 of 15).",
        "",
        "## Pairs, by plain-sharing transfer\n",
    ]
    header = [
        "pair",
        "similarity, encoder",
        "standardized, before",
        "after alignment",
        "transfer, plain (points)",
        "transfer, aligned",
    ]
    rows = [
        [
            f"{p['a']} + {p['b']}",
            f"{p['encoder']['mean']:.3f}" if "encoder" in p else "-",
            Stat.from_json(p["before"]).fmt(3),
            Stat.from_json(p["after"]).fmt(3),
            Stat.from_json(p["transfer"]).fmt(signed=True),
            Stat.from_json(p["aligned_transfer"]).fmt(signed=True),
        ]
        for p in sorted(pairs, key=lambda p: -np.nan_to_num(p["transfer"]["mean"], nan=-1e9))
    ]
    lines += [md_table(header, rows), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += [
        "",
        "Similarities are computed on each pair's training features as the shared module sees "
        'them (standardized; then multiplied by R_i for "after"). In `pair_gain.png`, row i, '
        "column j is task i's change when trained with task j (plain sharing).",
        "",
        failed_section(results),
    ]
    (out_dir / "report.md").write_text("\n".join(lines))
    return [out_dir / "report.md", *plots]


def plot_scatter(path: Path, analysis: Mapping[str, Any]) -> Path:
    from matplotlib.figure import Figure

    panels = [
        ("before", "transfer", "standardized features / plain sharing"),
        ("after", "aligned_transfer", "after alignment / aligned model"),
    ]
    if analysis.get("encoder_similarity") is not None:
        panels.insert(0, ("encoder", "transfer", "encoder features / plain sharing"))
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for i, (x, y, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        pts = [p for p in analysis["pairs"] if x in p and p[x]["n"] and p[y]["n"]]
        ax.scatter([p[x]["mean"] for p in pts], [p[y]["mean"] for p in pts])
        for p in pts:
            ax.annotate(f"{p['a']}+{p['b']}", (p[x]["mean"], p[y]["mean"]), fontsize=7)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xlabel("pair covariance similarity")
        ax.set_ylabel("transfer (points vs single-task)")
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
