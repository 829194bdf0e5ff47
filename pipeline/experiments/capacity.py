"""Capacity suite: how wide must the shared module be?

The shared module B maps every task's features to r numbers (its capacity, `shared.capacity`);
each task's tower reads only those r numbers. The suite trains plain MTL and every single-task
model at each r of a log grid and compares the best multi-task capacity with the sum of the
best single-task capacities: Wu, Zhang & Ré's rule of thumb says sharing should need less than
the sum, because related tasks reuse the same features.
"""

from __future__ import annotations

import math
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
)
from pipeline.experiments.options import ExperimentOptions


def plan(base: RunConfig, seeds: Sequence[int], opts: ExperimentOptions) -> list[RunSpec]:
    """For every seed and capacity r: plain MTL on all tasks and a single-task model per task."""
    specs = []
    for seed in seeds:
        for r in opts.capacities:
            over = PLAIN | {"shared.capacity": r}
            params = {"capacity": r}
            if len(base.tasks) > 1:
                specs.append(
                    RunSpec(f"mtl-r{r}-s{seed}", "mtl", seed, base.task_names, over, {}, params)
                )
            for t in base.task_names:
                specs.append(
                    RunSpec(f"single-{t}-r{r}-s{seed}", "single", seed, [t], over, {}, params)
                )
    return specs


def _argmax(values: Mapping[int, Stat]) -> int | None:
    usable = {k: v.mean for k, v in values.items() if v.n}
    return max(usable, key=lambda k: usable[k]) if usable else None


def analyze(
    specs: Sequence[RunSpec], results: Mapping[str, Mapping[str, Any]], opts: ExperimentOptions
) -> dict[str, Any]:
    """Accuracy against capacity for MTL and each single-task model; the best capacities."""
    tasks = list(dict.fromkeys(t for s in specs for t in s.tasks))
    caps = sorted({s.params["capacity"] for s in specs})
    seeds = sorted({s.seed for s in specs})
    runs = {
        (s.variant, tuple(s.tasks), s.params["capacity"], s.seed): results.get(s.name)
        for s in specs
    }
    has_mtl = any(s.variant == "mtl" for s in specs)

    def single(t: str, r: int, seed: int) -> float | None:
        return accuracy(runs.get(("single", (t,), r, seed)), t)

    mtl_macro, mtl_task, single_task, single_avg = {}, {}, {}, {}
    for r in caps:
        if has_mtl:
            mtl_runs = [runs.get(("mtl", tuple(tasks), r, s)) for s in seeds]
            mtl_macro[r] = stat(
                x["dev_macro"] if x and x.get("status") == "ok" else None for x in mtl_runs
            )
            mtl_task[r] = {t: stat(accuracy(x, t) for x in mtl_runs) for t in tasks}
        single_task[r] = {t: stat(single(t, r, s) for s in seeds) for t in tasks}
        per_seed = []
        for s in seeds:
            vals = [single(t, r, s) for t in tasks]
            per_seed.append(None if any(v is None for v in vals) else sum(vals) / len(vals))  # type: ignore[arg-type]
        single_avg[r] = stat(per_seed)
    best_single = {t: _argmax({r: single_task[r][t] for r in caps}) for t in tasks}
    best_single_acc = {
        t: single_task[r][t].mean if r is not None else math.nan for t, r in best_single.items()
    }
    sum_best = sum(r for r in best_single.values() if r is not None)
    best_mtl = _argmax(mtl_macro) if has_mtl else None
    summary = {
        "best_mtl_capacity": best_mtl,
        "best_mtl_macro": mtl_macro[best_mtl].to_json() if best_mtl is not None else None,
        "best_single_capacity": best_single,
        "best_single_accuracy": best_single_acc,
        "sum_best_single_capacities": sum_best,
        "best_single_macro": sum(best_single_acc.values()) / len(tasks),
        "rule_of_thumb_holds": (best_mtl < sum_best) if best_mtl is not None else None,
    }
    return {
        "tasks": tasks,
        "seeds": seeds,
        "capacities": caps,
        "mtl_macro": {r: v.to_json() for r, v in mtl_macro.items()},
        "mtl_task": {r: {t: v.to_json() for t, v in row.items()} for r, row in mtl_task.items()},
        "single_task": {
            r: {t: v.to_json() for t, v in row.items()} for r, row in single_task.items()
        },
        "single_macro_same_capacity": {r: v.to_json() for r, v in single_avg.items()},
        "summary": summary,
    }


def write_report(
    out_dir: Path,
    analysis: Mapping[str, Any],
    meta: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
) -> list[Path]:
    """report.md, capacity_macro.png and capacity_per_task.png."""
    tasks, caps, summ = analysis["tasks"], analysis["capacities"], analysis["summary"]
    plots = [
        plot_macro(out_dir / "capacity_macro.png", analysis),
        plot_per_task(out_dir / "capacity_per_task.png", analysis),
    ]
    lines = [
        header_section(
            "Capacity: how wide must the shared module be?",
            meta,
            "All tasks read their features from one shared layer of width r (the shared "
            "module's capacity). Too narrow, and the tasks fight over too few features; wide "
            "enough, and each task can keep features of its own. Wu, Zhang & Ré's rule of "
            "thumb: the best multi-task width is smaller than the widths the tasks need alone, "
            "added up, because related tasks reuse features. Every run here is plain MTL or a "
            "single-task model (no alignment, no auxiliary towers, equal weights) at one r.",
        ),
        overlap_note(results, meta.get("decontaminate", False)),
        "## Summary\n",
    ]
    best_mtl = summ["best_mtl_capacity"]
    single_caps = ", ".join(f"{t} {r}" for t, r in summ["best_single_capacity"].items())
    if best_mtl is not None:
        holds = "holds" if summ["rule_of_thumb_holds"] else "does not hold"
        lines += [
            f"- Best multi-task capacity: r = {best_mtl}, macro-average "
            f"{Stat.from_json(summ['best_mtl_macro']).fmt()}.",
            f"- Best single-task capacities: {single_caps}; sum {summ['sum_best_single_capacities']}; "
            f"those models average {summ['best_single_macro']:.2f}.",
            f"- Rule of thumb (best MTL capacity < sum of best single-task capacities): {holds} "
            f"({best_mtl} vs {summ['sum_best_single_capacities']}).",
            f"- One multi-task model at r = {best_mtl} against the best single-task models, each "
            f"at its own best r: {Stat.from_json(summ['best_mtl_macro']).mean - summ['best_single_macro']:+.2f} "
            "points macro-average.",
            "",
        ]
    else:
        lines += [f"- Best single-task capacities: {single_caps}.", ""]
    lines += ["## Macro-average dev accuracy (%) against capacity\n"]
    header = ["r", "plain MTL", "single-task models at this r"]
    rows = [
        [
            r,
            Stat.from_json(analysis["mtl_macro"][r]).fmt() if r in analysis["mtl_macro"] else "-",
            Stat.from_json(analysis["single_macro_same_capacity"][r]).fmt(),
        ]
        for r in caps
    ]
    lines += [md_table(header, rows), "", f"![macro-average against capacity]({plots[0].name})", ""]
    lines += ["## Per task: MTL / single-task dev accuracy (%)\n"]
    header = ["r"] + tasks
    rows = []
    for r in caps:
        row = [r]
        for t in tasks:
            m = (
                Stat.from_json(analysis["mtl_task"][r][t]).mean
                if r in analysis["mtl_task"]
                else math.nan
            )
            s = Stat.from_json(analysis["single_task"][r][t]).mean
            row.append(f"{m:.1f} / {s:.1f}")
        rows.append(row)
    lines += [
        md_table(header, rows),
        "",
        f"![per-task accuracy against capacity]({plots[1].name})",
        "",
        "Means over seeds; standard deviations are in `results.json`.",
        "",
        failed_section(results),
    ]
    (out_dir / "report.md").write_text("\n".join(lines))
    return [out_dir / "report.md", *plots]


def plot_macro(path: Path, analysis: Mapping[str, Any]) -> Path:
    from matplotlib.figure import Figure

    caps = analysis["capacities"]
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for key, label in (
        ("mtl_macro", "plain MTL"),
        ("single_macro_same_capacity", "single-task models at r"),
    ):
        if not analysis[key]:
            continue
        st = [Stat.from_json(analysis[key][r]) for r in caps]
        ax.errorbar(
            caps, [s.mean for s in st], yerr=[s.std for s in st], marker="o", capsize=3, label=label
        )
    ax.axhline(
        analysis["summary"]["best_single_macro"],
        color="gray",
        linestyle="--",
        label="best single-task models (each at its best r)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("shared module capacity r (log scale)")
    ax.set_ylabel("macro-average dev accuracy (%)")
    ax.set_title("Accuracy against shared capacity")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_per_task(path: Path, analysis: Mapping[str, Any]) -> Path:
    from matplotlib.figure import Figure

    tasks, caps = analysis["tasks"], analysis["capacities"]
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows), layout="constrained")
    for i, t in enumerate(tasks):
        ax = fig.add_subplot(rows, cols, i + 1)
        if analysis["mtl_task"]:
            ax.plot(
                caps,
                [Stat.from_json(analysis["mtl_task"][r][t]).mean for r in caps],
                marker="o",
                label="MTL",
            )
        ax.plot(
            caps,
            [Stat.from_json(analysis["single_task"][r][t]).mean for r in caps],
            marker="s",
            label="single-task",
        )
        ax.set_xscale("log")
        ax.set_title(t)
        ax.set_xlabel("r")
        ax.set_ylabel("dev acc (%)")
        if i == 0:
            ax.legend(fontsize=7)
    return save_figure(fig, path)
