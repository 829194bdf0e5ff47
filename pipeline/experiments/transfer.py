"""Transfer suite: does sharing one model help or hurt each task, and what does each method add?

Runs per seed: one single-task model per task, then on all tasks together plain hard parameter
sharing ("mtl") and each method of the papers switched on alone (covariance alignment, SVD task
weights, self-auxiliary towers) and all three together. Every run keeps the config's encoder,
shared module, towers and training settings, so the runs differ only in what is compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    stat,
    transfer_verdict,
)
from pipeline.experiments.options import ExperimentOptions

# variant -> (label in the report, overrides on top of the config)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mtl": ("plain MTL", PLAIN),
    "align": ("+ alignment", PLAIN | {"alignment.enabled": True}),
    "svd": ("+ SVD weights", PLAIN | {"weighting.method": "svd"}),
    "aux": ("+ aux towers", PLAIN | {"aux.enabled": True}),
    "all": (
        "all three",
        {"alignment.enabled": True, "weighting.method": "svd", "aux.enabled": True},
    ),
}
SINGLE_LABEL = "single-task"


def plan(base: RunConfig, seeds: Sequence[int], opts: ExperimentOptions) -> list[RunSpec]:
    """Single-task runs for every task, then the five multi-task variants, for every seed."""
    if len(base.tasks) < 2:
        raise ValueError(
            "the transfer suite compares multi-task with single-task models: the "
            f"config has only one task ({base.task_names[0]})"
        )
    specs = []
    for seed in seeds:
        for task in base.task_names:
            specs.append(RunSpec(f"single-{task}-s{seed}", "single", seed, [task], dict(PLAIN)))
        for variant, (_, overrides) in VARIANTS.items():
            specs.append(RunSpec(f"{variant}-s{seed}", variant, seed, base.task_names, overrides))
    return specs


def analyze(
    specs: Sequence[RunSpec], results: Mapping[str, Mapping[str, Any]], opts: ExperimentOptions
) -> dict[str, Any]:
    """Accuracy per variant and task, paired deltas against the single-task models (same seed),
    and a verdict per task: gain, neutral or loss (negative transfer)."""
    tasks = next(s.tasks for s in specs if s.variant != "single")
    seeds = sorted({s.seed for s in specs})
    single = {
        (s.tasks[0], s.seed): accuracy(results.get(s.name), s.tasks[0])
        for s in specs
        if s.variant == "single"
    }
    multi = {(s.variant, s.seed): results.get(s.name) for s in specs if s.variant != "single"}

    def macro(values: Sequence[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]

    acc: dict[str, dict[str, Stat]] = {"single": {}}
    for t in tasks:
        acc["single"][t] = stat(single[(t, s)] for s in seeds)
    acc["single"]["macro"] = stat(macro([single[(t, s)] for t in tasks]) for s in seeds)
    delta: dict[str, dict[str, Stat]] = {}
    verdicts: dict[str, dict[str, str]] = {}
    for variant in VARIANTS:
        acc[variant], delta[variant], verdicts[variant] = {}, {}, {}
        for t in tasks + ["macro"]:
            per_seed = []
            diffs = []
            for s in seeds:
                run = multi.get((variant, s))
                if t == "macro":
                    a = macro([accuracy(run, x) for x in tasks])
                    b = macro([single[(x, s)] for x in tasks])
                else:
                    a, b = accuracy(run, t), single[(t, s)]
                per_seed.append(a)
                if a is not None and b is not None:
                    diffs.append(a - b)
            acc[variant][t] = stat(per_seed)
            delta[variant][t] = stat(diffs)
            verdicts[variant][t] = transfer_verdict(delta[variant][t], opts.margin)
    negative = [
        {"variant": v, "task": t, "delta": delta[v][t].to_json()}
        for v in VARIANTS
        for t in tasks
        if verdicts[v][t] == "loss"
    ]
    best = {}
    for t in tasks:
        candidates = {v: acc[v][t].mean for v in acc if acc[v][t].n}
        best[t] = max(candidates, key=lambda v: candidates[v]) if candidates else None
    return {
        "tasks": tasks,
        "seeds": seeds,
        "margin": opts.margin,
        "variants": {"single": SINGLE_LABEL} | {v: label for v, (label, _) in VARIANTS.items()},
        "accuracy": {v: {t: x.to_json() for t, x in row.items()} for v, row in acc.items()},
        "delta_vs_single": {
            v: {t: x.to_json() for t, x in row.items()} for v, row in delta.items()
        },
        "verdicts": verdicts,
        "negative_transfer": negative,
        "best_variant": best,
    }


def write_report(
    out_dir: Path,
    analysis: Mapping[str, Any],
    meta: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
) -> list[Path]:
    """report.md and transfer_delta.png; returns the files written."""
    tasks, labels = analysis["tasks"], analysis["variants"]
    acc, delta, verdicts = (
        analysis["accuracy"],
        analysis["delta_vs_single"],
        analysis["verdicts"],
    )
    plot = plot_deltas(out_dir / "transfer_delta.png", analysis)
    marks = {"gain": " ▲", "loss": " ▼ **negative transfer**", "neutral": "", "n/a": ""}
    mtl_macro = Stat.from_json(delta["mtl"]["macro"])
    lines = [
        header_section(
            "Transfer: multi-task vs single-task models",
            meta,
            "Does training the tasks together in one model (hard parameter sharing) help or "
            "hurt each task compared with a model trained on that task alone, and what does "
            "each method add: covariance alignment (Wu, Zhang & Ré, Algorithm 1), SVD task "
            "weights (Algorithm 2) and self-auxiliary towers (Wang et al.)?",
        ),
        overlap_note(results, meta.get("decontaminate", False)),
        "## Summary\n",
        f"- Plain MTL against single-task models, macro-average: {mtl_macro.fmt(signed=True)} "
        f"points ({verdicts['mtl']['macro']}).",
    ]
    for v in ("align", "svd", "aux", "all"):
        d = Stat.from_json(delta[v]["macro"])
        lines.append(
            f"- {labels[v]}: {d.fmt(signed=True)} points against single-task models "
            f"({verdicts[v]['macro']})."
        )
    negative = analysis["negative_transfer"]
    if negative:
        lines.append("- **Negative transfer** (clearly below the single-task model):")
        for t in tasks:
            hits = [n for n in negative if n["task"] == t]
            if hits:
                listed = ", ".join(
                    f"{labels[n['variant']]} {Stat.from_json(n['delta']).fmt(signed=True)}"
                    for n in hits
                )
                lines.append(f"  - {t}: {listed}")
    else:
        lines.append("- No task is clearly below its single-task model under any variant.")
    best = ", ".join(f"{t}: {labels[v] if v else '-'}" for t, v in analysis["best_variant"].items())
    lines.append(f"- Best variant per task (mean dev accuracy): {best}.\n")

    lines += ["## Dev accuracy (%)\n"]
    header = ["task"] + [labels[v] for v in acc]
    rows = [[t] + [Stat.from_json(acc[v][t]).fmt() for v in acc] for t in tasks]
    rows.append(
        ["**macro-average**"] + [f"**{Stat.from_json(acc[v]['macro']).fmt()}**" for v in acc]
    )
    lines += [md_table(header, rows), ""]
    lines += [
        "## Change against the single-task model (points)\n",
        "Per seed, a variant's accuracy minus the single-task model's accuracy with the same "
        "seed, then mean ± standard deviation over seeds. ▲ marks a clear gain, ▼ a clear loss "
        f"(negative transfer): a change counts as clear when it is larger than "
        f"{analysis['margin']:g} points and than its own standard deviation over seeds.\n",
    ]
    header = ["task"] + [labels[v] for v in delta]
    rows = [
        [t] + [Stat.from_json(delta[v][t]).fmt(signed=True) + marks[verdicts[v][t]] for v in delta]
        for t in tasks
    ]
    short = {"gain": " ▲", "loss": " ▼", "neutral": "", "n/a": ""}
    rows.append(
        ["**macro-average**"]
        + [
            Stat.from_json(delta[v]["macro"]).fmt(signed=True) + short[verdicts[v]["macro"]]
            for v in delta
        ]
    )
    lines += [md_table(header, rows), "", f"![change against single-task]({plot.name})", ""]
    lines += [
        "## How the runs differ\n",
        "- single-task: one model per task, trained on that task alone.",
        "- plain MTL: all tasks in one model with one shared module and a tower per task; "
        "equal task weights; no alignment, no auxiliary towers.",
        "- + alignment: plain MTL, then stage 2 trains a per-task alignment matrix R_i before "
        "the fixed shared module (kept per task only where dev accuracy improves, as the "
        "config says).",
        "- + SVD weights: plain MTL with each task's loss weighted by Algorithm 2.",
        "- + aux towers: plain MTL with a small self-auxiliary tower per task during training.",
        "- all three: the three methods together.",
        "",
        f"Every run: encoder, shared module, towers, optimizer and epochs as in the config; "
        f"seeds {', '.join(map(str, analysis['seeds']))}; one Ray Train local-mode worker per "
        "run. Each run's directory and log are under `runs/` and `logs/`; every number is in "
        "`results.json`.",
        "",
        failed_section(results),
    ]
    (out_dir / "report.md").write_text("\n".join(lines))
    return [out_dir / "report.md", plot]


def plot_deltas(path: Path, analysis: Mapping[str, Any]) -> Path:
    """Grouped bars: per task, each variant's change against the single-task model."""
    from matplotlib.figure import Figure

    tasks = analysis["tasks"] + ["macro"]
    variants = list(analysis["delta_vs_single"])
    fig = Figure(figsize=(1.6 + 1.3 * len(tasks), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        stats = [Stat.from_json(analysis["delta_vs_single"][v][t]) for t in tasks]
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(
            xs,
            [s.mean for s in stats],
            width,
            yerr=[s.std if s.n > 1 else 0 for s in stats],
            capsize=2,
            label=analysis["variants"][v],
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(tasks)), labels=tasks)
    ax.set_ylabel("dev accuracy change vs single-task (points)")
    ax.set_title("Multi-task variants against single-task models (mean ± std over seeds)")
    ax.legend(fontsize=8, ncols=len(variants))
    return save_figure(fig, path)
