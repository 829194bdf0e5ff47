"""Incremental suite: a task added to a trained model (add-task) against the same task trained
jointly from scratch and trained alone.

Runs per seed: the config's tasks without the new task ("parent"), all tasks together ("joint")
and the new task alone ("alone"), each an ordinary training run. After the runs, `finish` adds
the new task to each seed's parent with `pipeline.incremental.add_tasks` (in this process,
seconds: only the new task's heads train), which also checks that the parent's tasks keep
bit-identical logits. The report compares the new task's dev accuracy across the three, and
what joint training from scratch did to the other tasks (incremental addition leaves them
exactly as they were).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.experiments.common import (
    RunSpec,
    Stat,
    accuracy,
    failed_section,
    header_section,
    md_table,
    overlap_note,
    stat,
)
from pipeline.experiments.options import ExperimentOptions


def new_task(base: RunConfig, opts: ExperimentOptions) -> str:
    """The task added incrementally: --new-task, else the config's last task."""
    name = opts.new_task or base.task_names[-1]
    if name not in base.task_names:
        raise ValueError(f"--new-task {name}: not a task of the config ({base.task_names})")
    return name


def plan(base: RunConfig, seeds: Sequence[int], opts: ExperimentOptions) -> list[RunSpec]:
    """Per seed: the parent (all tasks but the new one), all tasks jointly, the new one alone."""
    if len(base.tasks) < 2:
        raise ValueError(
            "the incremental suite adds one task to a model of the others: the config has "
            f"only one task ({base.task_names[0]})"
        )
    task = new_task(base, opts)
    others = [t for t in base.task_names if t != task]
    specs = []
    for seed in seeds:
        params = {"new_task": task}
        specs.append(RunSpec(f"parent-s{seed}", "parent", seed, others, params=params))
        specs.append(RunSpec(f"joint-s{seed}", "joint", seed, base.task_names, params=params))
        specs.append(RunSpec(f"alone-s{seed}", "alone", seed, [task], params=params))
    return specs


def finish(
    base: RunConfig,
    specs: Sequence[RunSpec],
    results: Mapping[str, Mapping[str, Any]],
    suite_dir: Path,
) -> dict[str, Any]:
    """Add the new task to each seed's parent run (kept on --resume: an existing child run is
    read, not trained again). Returns {"added": {seed: result}} for `analyze`."""
    from pipeline.incremental import absolute_entries, add_tasks
    from pipeline.runs import read_record

    added: dict[int, dict[str, Any]] = {}
    for spec in specs:
        if spec.variant != "parent":
            continue
        parent = results.get(spec.name)
        task = spec.params["new_task"]
        if parent is None or parent.get("status") != "ok":
            added[spec.seed] = {"status": "failed", "error": "its parent run failed"}
            continue
        parent_dir = Path(parent["run_dir"])
        child_dir = parent_dir.parent / f"added-s{spec.seed}"
        entry = absolute_entries([t for t in base.tasks if t.name == task], base.data_root)
        try:
            if (child_dir / "run.json").is_file():
                rec, seconds = read_record(child_dir), None
            else:
                out = add_tasks(parent_dir, entry, run_name=child_dir.name, seed=spec.seed)
                rec, seconds = out.record, out.seconds
        except Exception as err:  # reported like a failed run; the others stand
            added[spec.seed] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            continue
        added[spec.seed] = {
            "status": "ok",
            "dev": {t: v["accuracy"] for t, v in rec.dev.items()},
            "seconds": seconds if seconds is not None else rec.duration_seconds,
            "run_dir": str(child_dir),
            # add_tasks checks this (bit-identical logits) and fails otherwise; recorded here
            # as the dev accuracies the report compares.
            "others_equal_parent": all(
                rec.dev[t]["accuracy"] == parent["dev"][t] for t in parent["dev"]
            ),
        }
    return {"added": added}


def analyze(
    specs: Sequence[RunSpec],
    results: Mapping[str, Mapping[str, Any]],
    opts: ExperimentOptions,
    added: Mapping[int, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The new task's accuracy per way of training it (mean ± std over seeds), paired
    differences against joint training, and the other tasks under joint training vs the
    parent (unchanged by incremental addition)."""
    added = {int(k): v for k, v in (added or {}).items()}
    task = specs[0].params["new_task"]
    seeds = sorted({s.seed for s in specs})
    by = {(s.variant, s.seed): results.get(s.name) for s in specs}
    others = next(s.tasks for s in specs if s.variant == "parent")

    def inc(seed: int, t: str) -> float | None:
        a = added.get(seed)
        return a["dev"][t] if a is not None and a.get("status") == "ok" else None

    new = {
        "incremental": stat(inc(s, task) for s in seeds),
        "joint": stat(accuracy(by[("joint", s)], task) for s in seeds),
        "alone": stat(accuracy(by[("alone", s)], task) for s in seeds),
    }

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    delta = {
        "incremental - joint": stat(
            diff(inc(s, task), accuracy(by[("joint", s)], task)) for s in seeds
        ),
        "incremental - alone": stat(
            diff(inc(s, task), accuracy(by[("alone", s)], task)) for s in seeds
        ),
    }
    other = {
        t: {
            "parent": stat(accuracy(by[("parent", s)], t) for s in seeds),
            "joint": stat(accuracy(by[("joint", s)], t) for s in seeds),
            "joint - parent": stat(
                diff(accuracy(by[("joint", s)], t), accuracy(by[("parent", s)], t)) for s in seeds
            ),
        }
        for t in others
    }
    seconds = stat(a.get("seconds") for a in added.values() if a.get("status") == "ok")
    return {
        "new_task": task,
        "other_tasks": others,
        "seeds": seeds,
        "new_task_accuracy": {k: v.to_json() for k, v in new.items()},
        "new_task_delta": {k: v.to_json() for k, v in delta.items()},
        "other_tasks_accuracy": {
            t: {k: v.to_json() for k, v in d.items()} for t, d in other.items()
        },
        "add_task_seconds": seconds.to_json(),
        "others_unchanged": all(
            a.get("others_equal_parent", False) for a in added.values() if a.get("status") == "ok"
        ),
        "added": added,
    }


def write_report(
    out_dir: Path,
    analysis: Mapping[str, Any],
    meta: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Any]],
) -> list[Path]:
    """report.md: summary, the new task's table, the other tasks' table."""
    task = analysis["new_task"]
    new = {k: Stat.from_json(v) for k, v in analysis["new_task_accuracy"].items()}
    delta = {k: Stat.from_json(v) for k, v in analysis["new_task_delta"].items()}
    secs = Stat.from_json(analysis["add_task_seconds"])
    explain = (
        f"Is adding **{task}** to a model trained without it (only its heads train, against "
        "the fixed encoder and shared module) as good as training all tasks together from "
        "scratch, or the task alone? Incremental addition leaves every other task's answers "
        "exactly as they were; joint training changes them."
    )
    lines = [header_section("Incremental task addition", meta, explain), ""]
    lines += [
        "## Summary\n",
        f"- {task} added incrementally: {new['incremental'].fmt()} dev accuracy; trained "
        f"jointly from scratch: {new['joint'].fmt()}; alone: {new['alone'].fmt()}.",
        f"- Incremental minus joint: {delta['incremental - joint'].fmt(signed=True)} points; "
        f"minus alone: {delta['incremental - alone'].fmt(signed=True)} points.",
        f"- add-task took {secs.fmt(1)} s per seed; the other tasks' logits stayed "
        + ("bit-identical (checked by add-task)." if analysis["others_unchanged"] else "CHANGED."),
        "",
        overlap_note(results, bool(meta.get("decontaminate"))),
        f"## {task}: dev accuracy (%)\n",
        md_table(
            ["way of training", "dev accuracy"],
            [
                ["added to the trained model (add-task)", new["incremental"].fmt()],
                ["all tasks jointly from scratch", new["joint"].fmt()],
                ["alone (single-task model)", new["alone"].fmt()],
            ],
        ),
        "",
        "## The other tasks (dev accuracy, %)\n",
        f"Incremental addition keeps the parent's numbers exactly; joint training with {task} "
        "from scratch changes them by the last column.\n",
        md_table(
            ["task", "parent (without the new task)", "joint", "joint - parent"],
            [
                [
                    t,
                    Stat.from_json(d["parent"]).fmt(),
                    Stat.from_json(d["joint"]).fmt(),
                    Stat.from_json(d["joint - parent"]).fmt(signed=True),
                ]
                for t, d in analysis["other_tasks_accuracy"].items()
            ],
        ),
        "",
        failed_section(results),
    ]
    (out_dir / "report.md").write_text("\n".join(lines))
    return [out_dir / "report.md"]
