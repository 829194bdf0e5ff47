"""Noise suite: what one task with wrong training labels does to the others, and whether SVD
task weighting (Wu, Zhang & Ré, Algorithm 2) contains it.

A fraction f of one task's training labels is replaced by a different label drawn uniformly
(so exactly f of them are wrong); its dev labels stay clean, so accuracy is measured against
the truth. Plain MTL is trained with equal task weights and with SVD weights, on clean data and
at each fraction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import RunConfig, select_tasks
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

WEIGHTINGS = {"none": "equal weights", "svd": "SVD weights"}


def noise_task(base: RunConfig, opts: ExperimentOptions) -> str:
    task = opts.noise_task or base.task_names[0]
    if task not in base.task_names:
        raise ValueError(f"--noise-task {task!r} is not a task of the config {base.task_names}")
    return task


def data_dir_name(task: str, fraction: float, seed: int) -> str:
    return f"data/{task}-noise{round(100 * fraction)}-s{seed}"


def plan(base: RunConfig, seeds: Sequence[int], opts: ExperimentOptions) -> list[RunSpec]:
    """For every seed: plain MTL with equal and with SVD weights, on clean labels and with each
    noise fraction on the noisy task (its corrupted copy lives in the suite's `data/`)."""
    if len(base.tasks) < 2:
        raise ValueError("the noise suite needs at least two tasks (one noisy, one clean)")
    task = noise_task(base, opts)
    specs = []
    for seed in seeds:
        for fraction in (0.0, *opts.noise_fractions):
            dirs = {task: data_dir_name(task, fraction, seed)} if fraction else {}
            for w in WEIGHTINGS:
                tag = f"noise{round(100 * fraction)}" if fraction else "clean"
                params = {"fraction": fraction, "weighting": w, "noisy_task": task}
                over = PLAIN | {"weighting.method": w}
                specs.append(
                    RunSpec(f"{tag}-{w}-s{seed}", w, seed, base.task_names, over, dirs, params)
                )
    return specs


def corrupt_labels(
    labels: np.ndarray, num_classes: int, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Replace round(fraction · n) labels, chosen at random, by a different random label.

    Returns:
        The new labels [n] and the sorted indices that were changed.
    """
    if num_classes < 2:
        raise ValueError("a task needs at least 2 classes to corrupt its labels")
    rng = np.random.default_rng(seed)
    n = len(labels)
    idx = np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False))
    out = np.array(labels, copy=True)
    # A shift in 1..C-1 modulo C never lands on the true label.
    out[idx] = (out[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    return out, idx


def prepare(base: RunConfig, specs: Sequence[RunSpec], suite_dir: Path) -> None:
    """Write the corrupted copies the specs train on: `<suite>/data/<task>-noise<pct>-s<seed>/`
    with train.jsonl (corrupted) and dev.jsonl (as given), plus corruption.json saying which
    rows changed. Deterministic in (seed, fraction), so a resumed suite writes the same files."""
    from pipeline.data import load_tasks

    done = set()
    for spec in specs:
        for task, rel in spec.data_dirs.items():
            if rel in done:
                continue
            done.add(rel)
            data = load_tasks(select_tasks(base, [task]))[0]
            fraction = spec.params["fraction"]
            train = data.splits["train"]
            noisy, idx = corrupt_labels(
                train.labels,
                data.num_classes,
                fraction,
                seed=spec.seed * 1000 + round(100 * fraction),
            )
            out = suite_dir / rel
            out.mkdir(parents=True, exist_ok=True)
            for split, labels in (("train", noisy), ("dev", data.splits["dev"].labels)):
                texts = data.splits[split].texts
                (out / f"{split}.jsonl").write_text(
                    "".join(
                        json.dumps({"text": x, "label": data.labels[int(y)]}) + "\n"
                        for x, y in zip(texts, labels, strict=True)
                    )
                )
            (out / "corruption.json").write_text(
                json.dumps(
                    {
                        "task": task,
                        "source": str(train.path),
                        "fraction": fraction,
                        "seed": spec.seed,
                        "n_train": len(train),
                        "n_changed": int(len(idx)),
                        "changed_rows": idx.tolist(),
                    }
                )
            )


def analyze(
    specs: Sequence[RunSpec], results: Mapping[str, Mapping[str, Any]], opts: ExperimentOptions
) -> dict[str, Any]:
    """Per noise fraction and weighting: the noisy task's accuracy, the clean tasks' average,
    the noisy task's weight relative to the clean tasks'; and SVD minus equal weights."""
    tasks = specs[0].tasks
    noisy = specs[0].params["noisy_task"]
    clean = [t for t in tasks if t != noisy]
    seeds = sorted({s.seed for s in specs})
    fractions = sorted({s.params["fraction"] for s in specs})
    run = {(s.params["fraction"], s.variant, s.seed): results.get(s.name) for s in specs}

    def clean_avg(r: Mapping[str, Any] | None) -> float | None:
        vals = [accuracy(r, t) for t in clean]
        return None if any(v is None for v in vals) else float(np.mean(vals))  # type: ignore[arg-type]

    def weight_ratio(r: Mapping[str, Any] | None) -> float | None:
        if r is None or r.get("status") != "ok":
            return None
        w = r["task_weights"]
        return w[noisy] / float(np.mean([w[t] for t in clean]))

    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for f in fractions:
        rows[str(f)] = {}
        for w in WEIGHTINGS:
            rs = [run.get((f, w, s)) for s in seeds]
            rows[str(f)][w] = {
                "noisy_task": stat(accuracy(r, noisy) for r in rs).to_json(),
                "clean_tasks": stat(clean_avg(r) for r in rs).to_json(),
                "macro": stat(
                    r["dev_macro"] if r and r.get("status") == "ok" else None for r in rs
                ).to_json(),
                "weight_ratio": stat(weight_ratio(r) for r in rs).to_json(),
                "per_task": {t: stat(accuracy(r, t) for r in rs).to_json() for t in tasks},
            }
        diffs: dict[str, list[float]] = {"noisy_task": [], "clean_tasks": []}
        for s in seeds:
            a, b = run.get((f, "svd", s)), run.get((f, "none", s))
            for key, fn in (
                ("noisy_task", lambda r: accuracy(r, noisy)),
                ("clean_tasks", clean_avg),
            ):
                x, y = fn(a), fn(b)
                if x is not None and y is not None:
                    diffs[key].append(x - y)
        rows[str(f)]["svd_minus_equal"] = {k: stat(v).to_json() for k, v in diffs.items()}
    return {
        "tasks": tasks,
        "noisy_task": noisy,
        "clean_tasks": clean,
        "seeds": seeds,
        "fractions": fractions,
        "rows": rows,
    }


def write_report(
    out_dir: Path,
    analysis: Mapping[str, Any],
    meta: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
) -> list[Path]:
    """report.md and noise.png."""
    noisy, rows, fractions = analysis["noisy_task"], analysis["rows"], analysis["fractions"]
    plot = plot_noise(out_dir / "noise.png", analysis)
    lines = [
        header_section(
            f"Label noise: one noisy task ({noisy}), equal vs SVD task weights",
            meta,
            f"A share of {noisy}'s training labels is replaced by a wrong label; its dev labels "
            "stay correct. With equal weights every task's loss counts the same, so the noisy "
            "task pulls the shared module towards fitting noise. SVD weighting (Wu, Zhang & Ré, "
            "Algorithm 2) weights each task by how well the direction linking its features to "
            "its labels agrees with the other tasks' directions: a task whose labels are noise "
            "should get a smaller weight and disturb the others less. All runs are plain MTL "
            "(no alignment, no auxiliary towers).",
        ),
        overlap_note(results, meta.get("decontaminate", False)),
        "## Summary\n",
    ]
    worst = max(fractions)
    if worst > 0 and 0.0 in fractions:
        clean0, noisy0 = rows["0.0"]["none"]["clean_tasks"], rows["0.0"]["none"]["noisy_task"]
        cleanw, noisyw = (
            rows[str(worst)]["none"]["clean_tasks"],
            rows[str(worst)]["none"]["noisy_task"],
        )
        lines.append(
            f"- With equal weights, {100 * worst:.0f}% wrong {noisy} labels took {noisy} from "
            f"{Stat.from_json(noisy0).fmt()} to {Stat.from_json(noisyw).fmt()} and moved the "
            f"clean tasks' average from {Stat.from_json(clean0).fmt()} to "
            f"{Stat.from_json(cleanw).fmt()}: this is how much one noisy task disturbs the "
            "others through the shared module."
        )
    for f in fractions:
        d = rows[str(f)]["svd_minus_equal"]
        ratio = Stat.from_json(rows[str(f)]["svd"]["weight_ratio"])
        what = "clean labels" if f == 0 else f"{100 * f:.0f}% wrong {noisy} labels"
        lines.append(
            f"- {what}: SVD minus equal weights: {noisy} {Stat.from_json(d['noisy_task']).fmt(signed=True)}, "
            f"clean tasks {Stat.from_json(d['clean_tasks']).fmt(signed=True)} points; SVD gave {noisy} "
            f"{ratio.fmt()} times the clean tasks' average weight."
        )
    lines += ["", "## Dev accuracy (%)\n"]
    header = [
        "wrong labels",
        f"{noisy}, equal",
        f"{noisy}, SVD",
        "clean tasks, equal",
        "clean tasks, SVD",
        f"{noisy} weight / clean (SVD)",
    ]
    table = []
    for f in fractions:
        r = rows[str(f)]
        table.append(
            [
                f"{100 * f:.0f}%",
                Stat.from_json(r["none"]["noisy_task"]).fmt(),
                Stat.from_json(r["svd"]["noisy_task"]).fmt(),
                Stat.from_json(r["none"]["clean_tasks"]).fmt(),
                Stat.from_json(r["svd"]["clean_tasks"]).fmt(),
                Stat.from_json(r["svd"]["weight_ratio"]).fmt(3),
            ]
        )
    lines += [md_table(header, table), "", f"![accuracy against label noise]({plot.name})", ""]
    lines += ["## Per task (%)\n"]
    tasks = analysis["tasks"]
    header = ["wrong labels", "weights"] + tasks
    table = [
        [f"{100 * f:.0f}%", WEIGHTINGS[w]]
        + [Stat.from_json(rows[str(f)][w]["per_task"][t]).fmt() for t in tasks]
        for f in fractions
        for w in WEIGHTINGS
    ]
    lines += [
        md_table(header, table),
        "",
        f"The corrupted copies of {noisy}'s data, with the list of changed rows, are under "
        "`data/` in this directory.",
        "",
        failed_section(results),
    ]
    (out_dir / "report.md").write_text("\n".join(lines))
    return [out_dir / "report.md", plot]


def plot_noise(path: Path, analysis: Mapping[str, Any]) -> Path:
    from matplotlib.figure import Figure

    fractions, rows, noisy = analysis["fractions"], analysis["rows"], analysis["noisy_task"]
    xs = [100 * f for f in fractions]
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    panels = (
        ("noisy_task", f"{noisy} (noisy task) dev accuracy (%)"),
        ("clean_tasks", "clean tasks: average dev accuracy (%)"),
        ("weight_ratio", f"{noisy} weight / clean tasks' weight"),
    )
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for w, label in WEIGHTINGS.items():
            st = [Stat.from_json(rows[str(f)][w][key]) for f in fractions]
            ax.errorbar(
                xs,
                [s.mean for s in st],
                yerr=[s.std for s in st],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xlabel(f"wrong {noisy} training labels (%)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
