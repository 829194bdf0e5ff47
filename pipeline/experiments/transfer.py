"""Transfer suite: does sharing one model help or hurt each task, and what does each method add?

Runs per seed: one single-task model per task, then on all tasks together plain hard parameter
sharing ("mtl") and each method of the papers switched on alone (covariance alignment, SVD task
weights, self-auxiliary towers) and all three together, and the config as given with per-task
routing (issue 13: each task answered by the shared path or its private head, whichever dev
evidence supports). Every run keeps the config's encoder, shared module, towers and training
settings, so the runs differ only in what is compared.

The routed run answers the routing question alone: its record holds, per task, both paths'
dev accuracy (shared: the model every task shares; private: the task's own head) and the
chosen one's, so single-task vs shared vs routed compares one run's paths with the same
seed's single-task model. The routed accuracy is measured on the dev set that chose the route
(optimistic when the private path is chosen); the cross-fitted accuracy is not.
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
        {
            "alignment.enabled": True,
            "weighting.method": "svd",
            "aux.enabled": True,
            "routing.enabled": False,
        },
    ),
    "routed": ("routed (config as given)", {"routing.enabled": True}),
    # The routed run again, each task's stage-1 target annealed from its single-task model's
    # probabilities (same seed) to the gold label (distill.teachers); starts after them.
    "distil": ("routed + distilled", {"routing.enabled": True}),
    # The routed run again, each task also trained an own copy of the fine-tuned top blocks
    # (routing.own; the config's own settings when it has them). Fine-tuned configs only.
    "own": ("routed + own paths", {"routing.enabled": True, "routing.own": {}}),
}
# Without --variants: every variant but "distil" and "own", which only some suites need
# ("distil" doubles the routed run's cost and waits for the single-task runs; "own" needs a
# fine-tuned encoder and trains six more models per run).
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in ("distil", "own")]
SINGLE_LABEL = "single-task"
# The issue-13 targets, in points: routed at most this far below the better of single-task and
# shared on average over tasks, and no task more than this far below its single-task model.
ROUTED_AVG_TOLERANCE = 0.2
ROUTED_TASK_TOLERANCE = 0.5


def chosen_variants(opts: ExperimentOptions) -> list[str]:
    """The multi-task variants to train (`--variants`), in VARIANTS order."""
    if opts.variants is None:
        return list(DEFAULT_VARIANTS)
    unknown = sorted(set(opts.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    return [v for v in VARIANTS if v in opts.variants]


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
        for variant in chosen_variants(opts):
            overrides = VARIANTS[variant][1]
            spec = RunSpec(f"{variant}-s{seed}", variant, seed, base.task_names, overrides)
            if variant == "distil":
                spec.teachers = {t: f"single-{t}-s{seed}" for t in base.task_names}
            if variant == "own" and base.routing.own is not None:
                spec.overrides = {**overrides, "routing.own": base.routing.own.model_dump()}
            specs.append(spec)
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
    # The single-task model's own epoch pick made on half of dev (pipeline/selection.py): the
    # baseline without its selection bias; None for runs written before it was recorded.
    single_crossfit = {
        (s.tasks[0], s.seed): selection_crossfit(results.get(s.name), s.tasks[0])
        for s in specs
        if s.variant == "single"
    }
    multi = {(s.variant, s.seed): results.get(s.name) for s in specs if s.variant != "single"}
    variants = [v for v in VARIANTS if any(s.variant == v for s in specs)]

    def macro(values: Sequence[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]

    acc: dict[str, dict[str, Stat]] = {"single": {}}
    for t in tasks:
        acc["single"][t] = stat(single[(t, s)] for s in seeds)
    acc["single"]["macro"] = stat(macro([single[(t, s)] for t in tasks]) for s in seeds)
    delta: dict[str, dict[str, Stat]] = {}
    verdicts: dict[str, dict[str, str]] = {}
    for variant in variants:
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
        for v in variants
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
        "variants": {"single": SINGLE_LABEL} | {v: VARIANTS[v][0] for v in variants},
        "accuracy": {v: {t: x.to_json() for t, x in row.items()} for v, row in acc.items()},
        "delta_vs_single": {
            v: {t: x.to_json() for t, x in row.items()} for v, row in delta.items()
        },
        "verdicts": verdicts,
        "negative_transfer": negative,
        "best_variant": best,
        "routing": (
            routing_analysis(
                tasks, seeds, single, [multi.get(("routed", s)) for s in seeds], single_crossfit
            )
            if "routed" in variants
            else None
        ),
        "routing_distil": (
            routing_analysis(
                tasks, seeds, single, [multi.get(("distil", s)) for s in seeds], single_crossfit
            )
            if "distil" in variants
            else None
        ),
        "routing_own": (
            routing_analysis(
                tasks, seeds, single, [multi.get(("own", s)) for s in seeds], single_crossfit
            )
            if "own" in variants
            else None
        ),
    }


def selection_crossfit(result: Mapping[str, Any] | None, task: str) -> float | None:
    """A run's `selection_crossfit` of `task` (pipeline/selection.py); None for a failed run or
    one whose record has none."""
    if accuracy(result, task) is None:
        return None
    assert result is not None
    return (result.get("stages") or {}).get(task, {}).get("selection_crossfit")


def routing_analysis(
    tasks: Sequence[str],
    seeds: Sequence[int],
    single: Mapping[tuple[str, int], float | None],
    routed: Sequence[Mapping[str, Any] | None],
    single_crossfit: Mapping[tuple[str, int], float | None] | None = None,
) -> dict[str, Any]:
    """Per task, over seeds: single-task, shared path, private path, routed and cross-fitted
    routed accuracy, how often the private path was chosen, and the issue-13 targets: routed
    against the better of (single-task, shared) and against single-task, on seed means. With
    `single_crossfit` (each single-task model's epoch picked on half of dev), also cross-fitted
    routed against it: both sides without their selection bias."""
    rows: dict[str, dict[str, Any]] = {}
    # Paired: only the seeds whose routed run finished, so that a partial suite (or a failed
    # run) never sets a routed mean over some seeds against a single-task mean over others.
    done = [
        (seed, run)
        for seed, run in zip(seeds, routed, strict=True)
        if run and run.get("status") == "ok"
    ]
    for t in tasks:
        cols: dict[str, list[float | None]] = {
            k: []
            for k in (
                "single",
                "shared",
                "private",
                "own",
                "routed",
                "crossfit",
                "private_crossfit",
                "single_crossfit",
            )
        }
        private_chosen = own_chosen = 0
        for seed, run in done:
            route = run["stages"][t].get("route")
            cols["single"].append(single[(t, seed)])
            cols["single_crossfit"].append((single_crossfit or {}).get((t, seed)))
            cols["shared"].append(route["shared_accuracy"] if route else None)
            cols["private"].append(route["private_accuracy"] if route else None)
            cols["routed"].append(accuracy(run, t) if route else None)
            own = (route or {}).get("own") or {}
            cols["own"].append(own.get("accuracy"))
            # With an own path, the rule's last choice is own-or-route: its cross-fitted score.
            cols["crossfit"].append(
                own.get("routed_crossfit_accuracy") or route.get("crossfit_accuracy")
                if route
                else None
            )
            cols["private_crossfit"].append(
                route.get("private_crossfit_accuracy") if route else None
            )
            private_chosen += bool(route and route["path"] == "private")
            own_chosen += bool(route and route["path"] == "own")
        stats = {k: stat(v) for k, v in cols.items()}
        row: dict[str, Any] = {k: x.to_json() for k, x in stats.items()}
        row["private_chosen"] = private_chosen
        if stats["own"].n:  # own paths trained (routing.own); else no column (a NaN mean)
            row["own_chosen"] = own_chosen
        else:
            del row["own"]
        # Not every seed's record has it, or no routed run finished (nothing to pair): no column.
        if not done or stats["single_crossfit"].n != len(done):
            del row["single_crossfit"]
        row["seeds"] = len(done)
        if all(stats[k].n for k in ("single", "shared", "routed", "crossfit")):
            best = max(stats["single"].mean, stats["shared"].mean)
            row["routed_minus_best"] = stats["routed"].mean - best
            row["crossfit_minus_best"] = stats["crossfit"].mean - best
            row["routed_minus_single"] = stats["routed"].mean - stats["single"].mean
            row["crossfit_minus_single"] = stats["crossfit"].mean - stats["single"].mean
        if stats["crossfit"].n and stats["private_crossfit"].n:
            # Both without selection: does routing cost the task against its own model?
            row["crossfit_minus_private_crossfit"] = (
                stats["crossfit"].mean - stats["private_crossfit"].mean
            )
        for kind in ("routed", "crossfit"):
            # Per seed, paired: how far the seed mean can move from seed to seed (its standard
            # error), which says whether a per-task gap is one these seeds can resolve.
            pairs = stat(
                None if a is None or b is None else a - b
                for a, b in zip(cols[kind], cols["single"], strict=True)
            )
            if pairs.n:
                row[f"{kind}_minus_single_paired"] = pairs.to_json()
        if "single_crossfit" in row and stats["crossfit"].n == len(done):
            row["crossfit_minus_single_crossfit"] = (
                stats["crossfit"].mean - stats["single_crossfit"].mean
            )
        rows[t] = row
    complete = [r for r in rows.values() if "routed_minus_best" in r]
    targets: dict[str, Any] = {}
    if complete and len(complete) == len(rows):
        for kind in ("routed", "crossfit"):
            avg_gap = sum(r[f"{kind}_minus_best"] for r in complete) / len(complete)
            worst_task = min(rows, key=lambda t: rows[t][f"{kind}_minus_single"])
            worst = rows[worst_task][f"{kind}_minus_single"]
            targets[kind] = {
                "mean_minus_best": avg_gap,
                "worst_minus_single": worst,
                "worst_task": worst_task,
                "met": avg_gap >= -ROUTED_AVG_TOLERANCE and worst >= -ROUTED_TASK_TOLERANCE,
            }
            pairs = rows[worst_task].get(f"{kind}_minus_single_paired")
            if pairs and pairs["n"] > 1:
                targets[kind]["worst_se"] = pairs["std"] / math.sqrt(pairs["n"])
                targets[kind]["worst_pairs"] = pairs["n"]
        own = [
            r["crossfit_minus_private_crossfit"]
            for r in complete
            if "crossfit_minus_private_crossfit" in r
        ]
        if len(own) == len(complete):
            targets["crossfit_vs_own"] = {"mean": sum(own) / len(own), "worst": min(own)}
        alone = [
            r["crossfit_minus_single_crossfit"]
            for r in complete
            if "crossfit_minus_single_crossfit" in r
        ]
        if len(alone) == len(complete):
            worst = min(alone)
            targets["crossfit_vs_single_crossfit"] = {
                "mean": sum(alone) / len(alone),
                "worst": worst,
                "worst_met": worst >= -ROUTED_TASK_TOLERANCE,
            }
    return {"tasks": rows, "targets": targets, "seeds": [seed for seed, _ in done]}


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
    ]
    for v in delta:
        d = Stat.from_json(delta[v]["macro"])
        lines.append(
            f"- {labels[v][0].upper()}{labels[v][1:]} against single-task models, "
            f"macro-average: {d.fmt(signed=True)} "
            f"points ({verdicts[v]['macro']})."
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
    if analysis.get("routing"):
        lines += routing_section(analysis["routing"], tasks, planned=len(analysis["seeds"]))
    if analysis.get("routing_distil"):
        lines += routing_section(
            analysis["routing_distil"], tasks, labels["distil"], planned=len(analysis["seeds"])
        )
    if analysis.get("routing_own"):
        lines += routing_section(
            analysis["routing_own"], tasks, labels["own"], planned=len(analysis["seeds"])
        )
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
        "- routed (config as given): the config's own settings with per-task routing: after "
        "training, each task also gets a private path on the encoder features (by default "
        "trained like its single-task model), and keeps the path `routing.prefer` names unless "
        "dev shows the other better by more than `routing.margin_se` standard errors "
        "(pipeline/routing.py).",
        "- routed + distilled (only with `--variants distil`): the routed run, but in stage 1 "
        "each task learns from its single-task model of the same seed: the target moves from "
        "that model's probabilities to the gold label over training (`distill.teachers`, "
        "teacher annealing as in BAM!, Clark et al. 2019).",
        "- routed + own paths (only with `--variants own`, fine-tuned configs): the routed "
        "run, then each task also trains its own copy of the fine-tuned top blocks with a "
        "private head, on that task alone, and takes it only when it beats the task's route "
        "by more than `routing.own.margin_se` standard errors (`routing.own`, "
        "pipeline/own_path.py). Its cross-fitted column chooses own-or-route on one half of "
        "dev (the route itself as chosen on all of dev).",
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


def routing_section(
    routing: Mapping[str, Any], tasks: Sequence[str], variant: str = "routed", planned: int = 0
) -> list[str]:
    """The report's single-task vs shared vs routed table and the issue-13 targets, of the
    routed run or another routed variant (`variant`, its label), over the seeds whose run
    finished; `planned` seeds in the suite (more than finished: the report says so)."""
    rows = routing["tasks"]

    def fmt(row: Mapping[str, Any], key: str) -> str:
        # "-": a column the task has no runs for (own paths only for routing.own.tasks)
        return Stat.from_json(row[key]).fmt() if key in row else "-"

    def gap(row: Mapping[str, Any], key: str) -> str:
        return f"{row[key]:+.2f}" if key in row else "-"

    lines = [
        f"## Routing: single-task vs shared vs {variant}\n",
        "Dev accuracy (%) of the routed run's two paths and of the chosen one, beside the "
        "single-task model of the same seed; mean ± std over seeds. *Routed* is scored on the "
        "dev set that chose the route; *cross-fitted* chooses on one half of dev and scores on "
        "the other (averaged over random halvings), so it carries no selection bias. The "
        "single-task column carries one (each model's best of its epochs on dev): *private, "
        "cross-fitted* is the private path (trained like the single-task model) with its epoch "
        "picked on one half and scored on the other, the same model without that bias; "
        "*single-task, cross-fitted* (where the runs recorded it) is the single-task model "
        "itself with its epoch picked on one half and scored on the other. The last columns "
        "compare seed means: routed minus the better of single-task and shared, routed minus "
        "single-task, and the cross-fitted numbers.\n",
    ]
    header = [
        "task",
        "single-task",
        "shared",
        "private",
        "routed",
        "cross-fitted",
        "private, cross-fitted",
        "private chosen",
        "routed − best",
        "routed − single",
        "cross-fitted − best",
        "cross-fitted − private cross-fitted",
    ]
    body = [
        [
            t,
            fmt(rows[t], "single"),
            fmt(rows[t], "shared"),
            fmt(rows[t], "private"),
            fmt(rows[t], "routed"),
            fmt(rows[t], "crossfit"),
            fmt(rows[t], "private_crossfit") if "private_crossfit" in rows[t] else "-",
            f"{rows[t]['private_chosen']}/{rows[t]['seeds']}",
            gap(rows[t], "routed_minus_best"),
            gap(rows[t], "routed_minus_single"),
            gap(rows[t], "crossfit_minus_best"),
            gap(rows[t], "crossfit_minus_private_crossfit"),
        ]
        for t in tasks
    ]
    # Own paths (routing.own): their accuracy and how often they were taken, after "private".
    if any(row.get("own") and Stat.from_json(row["own"]).n for row in rows.values()):
        header[4:4] = ["own path"]
        header[9:9] = ["own chosen"]
        for t, line in zip(tasks, body, strict=True):
            line[4:4] = [fmt(rows[t], "own")]
            chosen = rows[t].get("own_chosen")
            line[9:9] = ["-" if chosen is None else f"{chosen}/{rows[t]['seeds']}"]
    # The single-task model with its epoch picked on half of dev (runs that recorded it).
    if any("single_crossfit" in row for row in rows.values()):
        header[2:2] = ["single-task, cross-fitted"]
        header.append("cross-fitted − single-task cross-fitted")
        for t, line in zip(tasks, body, strict=True):
            line[2:2] = [fmt(rows[t], "single_crossfit")]
            line.append(gap(rows[t], "crossfit_minus_single_crossfit"))
    lines += [md_table(header, body), ""]
    seeds = routing.get("seeds")
    if seeds is not None and len(seeds) < planned:
        lines.append(
            f"- **Over {len(seeds)} of {planned} seeds** (the seeds whose {variant} run "
            f"finished: {', '.join(map(str, seeds)) or 'none'}; every column pairs them): the "
            "targets below say where those seeds stand, not the suite's verdict."
        )
    for kind, label in (("routed", "Routed"), ("crossfit", "Cross-fitted routed")):
        target = routing["targets"].get(kind)
        if target is None:
            continue
        se = target.get("worst_se")  # none over one seed
        error = (
            f", standard error {se:.2f} over {target['worst_pairs']} seeds paired by seed"
            if se is not None
            else ""
        )
        lines.append(
            f"- {label}: {target['mean_minus_best']:+.2f} points on average against the better "
            f"of single-task and shared (target ≥ −{ROUTED_AVG_TOLERANCE:g}); worst task "
            f"{target['worst_task']} {target['worst_minus_single']:+.2f} against its "
            f"single-task model{error} "
            f"(target ≥ −{ROUTED_TASK_TOLERANCE:g}): "
            f"**{'met' if target['met'] else 'not met'}**."
        )
    own = routing["targets"].get("crossfit_vs_own")
    if own is not None:
        lines.append(
            f"- Both without selection bias, cross-fitted routed against the cross-fitted "
            f"private path (the task's own model): {own['mean']:+.2f} points on average, worst "
            f"task {own['worst']:+.2f}."
        )
    alone = routing["targets"].get("crossfit_vs_single_crossfit")
    if alone is not None:
        lines.append(
            f"- Selection bias removed from both sides of the per-task target, cross-fitted "
            f"routed against the cross-fitted single-task model (its epoch picked on one half "
            f"of dev, scored on the other): {alone['mean']:+.2f} points on average, worst task "
            f"{alone['worst']:+.2f} (≥ −{ROUTED_TASK_TOLERANCE:g}: "
            f"{'yes' if alone['worst_met'] else 'no'}). The routed cross-fit still leaves "
            "selections made on all of dev: the shared path's epoch (chosen on the "
            "macro-average of every task) and, with own paths, the route the own path is "
            "compared with, private epoch included."
        )
    lines.append("")
    return lines


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
    # Two lines and at most three legend columns: on a narrow figure (few tasks) a one-line
    # title or legend wider than the figure collapses the constrained layout's axes.
    ax.set_title("Multi-task variants against single-task models\n(mean ± std over seeds)")
    ax.legend(fontsize=8, ncols=min(3, len(variants)))
    return save_figure(fig, path)
