"""Classification metrics, as percentages (86.0 means 86.0%)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int
) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes present in y_true or y_pred), in percent.

    Returns:
        {"accuracy": float, "macro_f1": float, "n": int}.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    n = int(len(y_true))
    if n == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, "n": 0}
    accuracy = float((y_true == y_pred).mean())
    f1s = []
    for c in range(num_classes):
        tp = int(((y_pred == c) & (y_true == c)).sum())
        fp = int(((y_pred == c) & (y_true != c)).sum())
        fn = int(((y_pred != c) & (y_true == c)).sum())
        if tp + fp + fn == 0:  # class absent from both: it says nothing about this model
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": 100 * accuracy, "macro_f1": 100 * float(np.mean(f1s)), "n": n}


def macro_average(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over tasks of accuracy and macro-F1."""
    if not per_task:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    return {
        key: float(np.mean([m[key] for m in per_task.values()])) for key in ("accuracy", "macro_f1")
    }


def format_table(per_task: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """A per-task table with the macro average as the last row."""
    lines = [title] if title else []
    lines.append(f"{'task':<12} {'accuracy':>9} {'macro_f1':>9} {'n':>7}")
    for name, m in per_task.items():
        lines.append(f"{name:<12} {m['accuracy']:>9.2f} {m['macro_f1']:>9.2f} {int(m['n']):>7}")
    avg = macro_average(per_task)
    lines.append(f"{'MACRO AVG':<12} {avg['accuracy']:>9.2f} {avg['macro_f1']:>9.2f}")
    return "\n".join(lines)
