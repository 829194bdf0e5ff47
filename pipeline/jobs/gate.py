"""The promotion gate: does a newly trained model (the challenger) replace the promoted one
(the champion)? A pure function of per-task accuracies (percent), so it is tested without
training anything.

With a champion, the challenger is promoted only if
    1. it answers every task the champion answers (a missing task would break clients),
    2. its macro-average accuracy over the tasks both answer is not below the champion's, and
    3. no task both answer falls by more than `tolerance` points.
A task only the challenger answers (a new task) takes no part in the comparison; it must clear
its minimum when one is configured.

Incremental models (issue 14): tasks listed as `unchanged` (the challenger's export proved their
logits equal to its parent's, and the champion is that parent: see
`pipeline.incremental.unchanged_tasks`) are not judged: they are shown, pass, and are left out
of the macro-average comparison, so only the changed tasks decide and noise in an untouched
task cannot refuse a new one.

Without a champion (the first model of a name), the challenger is promoted only if it clears
the configured minimums: every per-task minimum and the macro-average minimum. With no
minimums configured, the first model is promoted.

Calibration (`with_calibration`, applied after `decide`): with both models' answers on the
same evaluation texts, a challenger is also refused if any task's expected calibration error
(ECE, percent, 15 bins; pipeline/calibration.py) is clearly worse than the champion's: higher
by more than max(`ece_tolerance` points, the bootstrap margin), the margin being 1.645 x the
standard deviation of the ECE difference over paired bootstrap resamples of the evaluation
texts (a one-sided 95% noise band). ECE on a few hundred texts moves by a point or more from
sampling alone, hence both floors. When the evaluation set is the dev set the calibration
maps were fitted on, the answers compared are out of fold (`pipeline.jobs.retrain.
evaluate_artifact(cross_fit=True)`), so a flexible map is not credited for fitting those texts.

Comparisons allow EPSILON for float noise, so "exactly at the tolerance" and "equal macro
average" both pass.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline.calibration import Answers, ece_difference

EPSILON = 1e-9
DEFAULT_TOLERANCE = 1.0
# Smallest ECE rise (points) that refuses a challenger, whatever the bootstrap margin says.
DEFAULT_ECE_TOLERANCE = 1.0
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class TaskComparison:
    """One row of the gate's table (accuracies in percent).

    Attributes:
        task: Task name.
        champion: The champion's accuracy; None when the champion lacks the task (or there is
            no champion).
        challenger: The challenger's accuracy; None when the challenger lacks the task.
        delta: challenger - champion, when both have the task.
        minimum: The configured minimum checked on this row, if any.
        ok: Whether this row lets the challenger through.
        note: Why the row is (not) ok, in a few words.
    """

    task: str
    champion: float | None
    challenger: float | None
    delta: float | None
    minimum: float | None
    ok: bool
    note: str


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and the table behind it.

    Attributes:
        promote: Whether the challenger replaces the champion.
        reason: One sentence for the log and the run record.
        tasks: One row per task of either model, champion's tasks first.
        champion_macro: The champion's macro average over the compared tasks (None: no champion).
        challenger_macro: The challenger's macro average over the same tasks (all its tasks
            when there is no champion).
        tolerance: Largest per-task fall allowed, points.
        calibration: Per task, both models' ECE on the evaluation set (`with_calibration`;
            empty when not compared).
    """

    promote: bool
    reason: str
    tasks: list[TaskComparison]
    champion_macro: float | None
    challenger_macro: float | None
    tolerance: float
    calibration: tuple[CalibrationComparison, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def decide(
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    tolerance: float = DEFAULT_TOLERANCE,
    minimums: Mapping[str, float] | None = None,
    min_macro: float | None = None,
    unchanged: Collection[str] = (),
) -> GateDecision:
    """Decide champion vs challenger from per-task accuracies (see the module docstring).

    Args:
        challenger: Task -> accuracy (percent) of the new model on the evaluation set.
        champion: The same for the promoted model on the same set; None when nothing is
            promoted yet.
        tolerance: Largest fall of any task, in points, that still lets the challenger through.
        minimums: Task -> accuracy floor for the first model, and for new tasks.
        min_macro: Macro-average floor for the first model.
        unchanged: Tasks proven identical to the champion's (an incremental model whose parent
            is the champion); not judged. Ignored without a champion.

    Returns:
        The decision, its reason and the per-task table.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance: {tolerance} must be >= 0")
    minimums = dict(minimums or {})
    rows: list[TaskComparison] = []

    def floor_row(task: str, note_ok: str) -> TaskComparison:
        value = challenger.get(task)
        floor = minimums.get(task)
        if value is None:
            return TaskComparison(task, None, None, None, floor, False, "missing in challenger")
        if floor is not None and value + EPSILON < floor:
            return TaskComparison(task, None, value, None, floor, False, f"below minimum {floor:g}")
        return TaskComparison(task, None, value, None, floor, True, note_ok)

    if champion is None:
        tasks = list(challenger) + [t for t in minimums if t not in challenger]
        rows = [floor_row(t, "clears minimum" if t in minimums else "no minimum") for t in tasks]
        macro = _mean(list(challenger.values()))
        failed = [r.task for r in rows if not r.ok]
        macro_ok = min_macro is None or (macro is not None and macro + EPSILON >= min_macro)
        if failed:
            reason = f"first model refused: {', '.join(failed)} below minimum or missing"
        elif not macro_ok:
            reason = f"first model refused: macro average {macro:.2f} below minimum {min_macro:g}"
        elif minimums or min_macro is not None:
            reason = "first model promoted: it clears the configured minimums"
        else:
            reason = "first model promoted: no champion and no minimums configured"
        return GateDecision(
            promote=not failed and macro_ok,
            reason=reason,
            tasks=rows,
            champion_macro=None,
            challenger_macro=macro,
            tolerance=tolerance,
        )

    shared = [t for t in champion if t in challenger]
    judged = [t for t in shared if t not in unchanged]
    for task, old in champion.items():
        new = challenger.get(task)
        if new is None:
            rows.append(TaskComparison(task, old, None, None, None, False, "missing in challenger"))
            continue
        if task in unchanged:
            note = "unchanged: logits equal the parent's, not judged"
            rows.append(TaskComparison(task, old, new, new - old, None, True, note))
            continue
        delta = new - old
        ok = delta + tolerance + EPSILON >= 0
        note = "ok" if ok else f"falls by {-delta:.2f} > {tolerance:g}"
        rows.append(TaskComparison(task, old, new, delta, None, ok, note))
    rows += [floor_row(t, "new task") for t in challenger if t not in champion]

    old_macro = _mean([champion[t] for t in judged])
    new_macro = _mean([challenger[t] for t in judged])
    macro_ok = old_macro is not None and new_macro is not None and new_macro + EPSILON >= old_macro
    if shared and not judged:  # every shared task unchanged: only the new tasks decide
        macro_ok = True
    failed = [r for r in rows if not r.ok]
    if failed:
        worst = ", ".join(f"{r.task} ({r.note})" for r in failed)
        reason = f"challenger refused: {worst}"
    elif not shared:
        reason = "challenger refused: it shares no task with the champion"
    elif not judged:
        new = [r.task for r in rows if r.champion is None]
        reason = (
            f"challenger promoted: the {len(shared)} task(s) it shares with the champion are "
            f"unchanged (logits equal the parent's); judged: {', '.join(new) or 'nothing'}"
        )
    elif not macro_ok:
        reason = (
            f"challenger refused: macro average {new_macro:.2f} below the champion's "
            f"{old_macro:.2f}"
        )
    else:
        reason = (
            f"challenger promoted: macro average {new_macro:.2f} >= {old_macro:.2f} and no task "
            f"falls by more than the tolerance ({tolerance:g})"
        )
    return GateDecision(
        promote=not failed and macro_ok,
        reason=reason,
        tasks=rows,
        champion_macro=old_macro,
        challenger_macro=new_macro,
        tolerance=tolerance,
    )


@dataclass(frozen=True)
class CalibrationComparison:
    """One task's ECE (percent) for both models on the same evaluation texts.

    Attributes:
        task: Task name.
        champion: The champion's ECE.
        challenger: The challenger's ECE.
        delta: challenger - champion.
        margin: Bootstrap noise band of delta (1.645 standard deviations).
        allowed: Largest rise that passes: max(ece_tolerance, margin).
        n: Evaluation texts.
        ok: delta <= allowed.
        note: Why, in a few words.
    """

    task: str
    champion: float
    challenger: float
    delta: float
    margin: float
    allowed: float
    n: int
    ok: bool
    note: str


def compare_calibration(
    challenger: Mapping[str, Answers],
    champion: Mapping[str, Answers],
    ece_tolerance: float = DEFAULT_ECE_TOLERANCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> list[CalibrationComparison]:
    """Per task both models answered on the same texts: is the challenger's ECE clearly worse?

    Args:
        challenger: Task -> (top-class confidence [n], correct [n]) of the new model on the
            evaluation set, texts in the same order as the champion's.
        champion: The same for the promoted model.
        ece_tolerance: The smallest rise (points) that can refuse.
        resamples: Paired bootstrap resamples for the margin.
    """
    if ece_tolerance < 0:
        raise ValueError(f"ece_tolerance: {ece_tolerance} must be >= 0")
    rows = []
    for task, old in champion.items():
        new = challenger.get(task)
        if new is None:
            continue
        d = ece_difference(new, old, resamples=resamples, seed=seed)
        allowed = max(ece_tolerance, d.margin)
        ok = d.delta <= allowed + EPSILON
        note = "ok" if ok else f"ECE +{d.delta:.2f} points > {allowed:.2f} allowed"
        rows.append(
            CalibrationComparison(
                task, d.champion, d.challenger, d.delta, d.margin, allowed, d.n, ok, note
            )
        )
    return rows


def with_calibration(
    decision: GateDecision, calibration: list[CalibrationComparison]
) -> GateDecision:
    """`decision` with the calibration rows added: a challenger that `decide` promoted is
    refused when any task's ECE is clearly worse than the champion's (module docstring)."""
    if not calibration:
        return decision
    worse = [c for c in calibration if not c.ok]
    reason = decision.reason
    if decision.promote and worse:
        worst = ", ".join(
            f"{c.task} (ECE {c.challenger:.2f}% vs the champion's {c.champion:.2f}%: "
            f"+{c.delta:.2f} > {c.allowed:.2f})"
            for c in worse
        )
        reason = f"challenger refused, calibration clearly worse: {worst}"
    elif decision.promote:
        reason += "; no task's calibration (ECE) is clearly worse"
    return replace(
        decision,
        promote=decision.promote and not worse,
        reason=reason,
        calibration=tuple(calibration),
    )


def format_decision(decision: GateDecision) -> str:
    """The per-task table and the verdict, for the log and the CLI."""

    def f(x: float | None, sign: bool = False) -> str:
        if x is None:
            return "-"
        return f"{x:+.2f}" if sign else f"{x:.2f}"

    lines = [f"{'task':<12} {'champion':>9} {'challenger':>10} {'delta':>7} {'ok':>3}  note"]
    for r in decision.tasks:
        lines.append(
            f"{r.task:<12} {f(r.champion):>9} {f(r.challenger):>10} {f(r.delta, True):>7} "
            f"{'yes' if r.ok else 'no':>3}  {r.note}"
        )
    lines.append(
        f"{'MACRO AVG':<12} {f(decision.champion_macro):>9} {f(decision.challenger_macro):>10}"
    )
    if decision.calibration:
        lines.append(f"{'ECE (%)':<12} {'champion':>9} {'challenger':>10} {'delta':>7} {'ok':>3}")
        for c in decision.calibration:
            lines.append(
                f"{c.task:<12} {c.champion:>9.2f} {c.challenger:>10.2f} {c.delta:>+7.2f} "
                f"{'yes' if c.ok else 'no':>3}  {c.note} (allowed +{c.allowed:.2f}, n={c.n})"
            )
    lines.append(("PROMOTE: " if decision.promote else "REFUSE: ") + decision.reason)
    return "\n".join(lines)
