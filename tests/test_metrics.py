"""Accuracy and macro-F1 in percent, checked against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from pipeline.metrics import classification_metrics, format_table, macro_average


@pytest.mark.parametrize(("seed", "num_classes", "n"), [(0, 2, 50), (1, 3, 200), (2, 6, 37)])
def test_matches_sklearn_on_random_labels(seed, num_classes, n):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, num_classes, n))
    m = classification_metrics(y_true, y_pred, num_classes)
    assert m["n"] == n
    assert m["accuracy"] == pytest.approx(100 * accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(100 * f1_score(y_true, y_pred, average="macro"))


def test_classes_absent_from_both_sides_are_ignored_like_sklearn():
    y_true = np.array([0, 0, 1, 1, 3])
    y_pred = np.array([0, 1, 1, 1, 4])  # class 2 never appears; 4 only predicted
    m = classification_metrics(y_true, y_pred, num_classes=5)
    assert m["macro_f1"] == pytest.approx(100 * f1_score(y_true, y_pred, average="macro"))
    assert m["accuracy"] == pytest.approx(60.0)


def test_percent_scale():
    y = np.array([0, 1, 2, 1])
    assert classification_metrics(y, y, 3) == {"accuracy": 100.0, "macro_f1": 100.0, "n": 4}
    wrong = classification_metrics(y, (y + 1) % 3, 3)
    assert wrong["accuracy"] == 0.0 and wrong["macro_f1"] == 0.0


def test_empty_input():
    assert classification_metrics(np.array([]), np.array([]), 2) == {
        "accuracy": 0.0,
        "macro_f1": 0.0,
        "n": 0,
    }


def test_macro_average_is_unweighted_over_tasks():
    per_task = {
        "big": {"accuracy": 90.0, "macro_f1": 80.0, "n": 10_000},
        "small": {"accuracy": 70.0, "macro_f1": 60.0, "n": 10},
    }
    assert macro_average(per_task) == {"accuracy": 80.0, "macro_f1": 70.0}
    assert macro_average({}) == {"accuracy": 0.0, "macro_f1": 0.0}


def test_format_table_lists_tasks_and_average():
    per_task = {
        "mr": {"accuracy": 78.25, "macro_f1": 78.0, "n": 1000},
        "trec": {"accuracy": 85.75, "macro_f1": 80.0, "n": 500},
    }
    lines = format_table(per_task, title="dev").splitlines()
    assert lines[0] == "dev"
    assert lines[2].split() == ["mr", "78.25", "78.00", "1000"]
    assert lines[3].split() == ["trec", "85.75", "80.00", "500"]
    assert lines[4].split() == ["MACRO", "AVG", "82.00", "79.00"]
