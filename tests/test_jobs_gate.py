"""The promotion gate (pipeline/jobs/gate.py) on hand-made accuracies, and its config section:
promote iff the macro average does not fall and no task falls by more than the tolerance; the
first model iff it clears the minimums."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, parse_config
from pipeline.jobs.gate import decide, format_decision


def rows(decision) -> dict[str, tuple]:
    return {r.task: (r.champion, r.challenger, r.delta, r.ok) for r in decision.tasks}


# --------------------------------------------------------------------------- with a champion
def test_equal_scores_are_promoted():
    d = decide({"a": 80.0, "b": 70.0}, {"a": 80.0, "b": 70.0})
    assert d.promote and d.champion_macro == d.challenger_macro == 75.0
    assert rows(d) == {"a": (80.0, 80.0, 0.0, True), "b": (70.0, 70.0, 0.0, True)}


def test_a_fall_of_exactly_the_tolerance_passes_and_a_hair_more_fails():
    # a falls by exactly 1 point, b makes up for it: the macro average is unchanged
    assert decide({"a": 79.0, "b": 71.0}, {"a": 80.0, "b": 70.0}).promote
    # float noise: 1.14 - 2.14 is not exactly -1.0 in binary floating point
    assert 1.14 - 2.14 < -1.0
    assert decide({"a": 1.14, "b": 72.0}, {"a": 2.14, "b": 70.0}).promote
    d = decide({"a": 78.99, "b": 75.0}, {"a": 80.0, "b": 70.0})
    assert not d.promote and rows(d)["a"][3] is False and rows(d)["b"][3] is True
    assert "a (falls by 1.01 > 1)" in d.reason
    # a larger tolerance lets the same challenger through; zero tolerance forbids any fall
    assert decide({"a": 78.99, "b": 75.0}, {"a": 80.0, "b": 70.0}, tolerance=2.0).promote
    assert not decide({"a": 79.99, "b": 75.0}, {"a": 80.0, "b": 70.0}, tolerance=0.0).promote


def test_a_lower_macro_average_is_refused_even_within_tolerance():
    d = decide({"a": 79.5, "b": 70.0}, {"a": 80.0, "b": 70.0})
    assert not d.promote and all(r.ok for r in d.tasks)
    assert "macro average 74.75 below the champion's 75.00" in d.reason


def test_a_better_challenger_is_promoted():
    d = decide({"a": 85.0, "b": 72.0}, {"a": 80.0, "b": 70.0})
    assert d.promote and rows(d)["a"] == (80.0, 85.0, 5.0, True)


def test_a_new_task_is_not_compared_but_must_clear_its_minimum():
    champion = {"a": 80.0}
    # the new task's low score does not drag the compared macro average down
    d = decide({"a": 80.0, "new": 40.0}, champion)
    assert d.promote and d.challenger_macro == d.champion_macro == 80.0
    assert rows(d)["new"] == (None, 40.0, None, True)
    assert next(r for r in d.tasks if r.task == "new").note == "new task"
    d = decide({"a": 80.0, "new": 40.0}, champion, minimums={"new": 50.0})
    assert not d.promote and "new (below minimum 50)" in d.reason


def test_a_task_missing_in_the_challenger_is_refused():
    d = decide({"a": 90.0}, {"a": 80.0, "b": 70.0})
    assert not d.promote
    assert rows(d)["b"] == (70.0, None, None, False)
    assert "b (missing in challenger)" in d.reason


def test_no_shared_task_is_refused():
    d = decide({"new": 90.0}, {"old": 80.0})
    assert not d.promote


# --------------------------------------------------------------------------- first model
def test_first_model_without_minimums_is_promoted():
    d = decide({"a": 10.0}, None)
    assert d.promote and d.champion_macro is None and "no minimums" in d.reason


def test_first_model_must_clear_per_task_and_macro_minimums():
    acc = {"a": 80.0, "b": 60.0}
    assert decide(acc, None, minimums={"a": 80.0, "b": 60.0}, min_macro=70.0).promote  # exactly
    d = decide(acc, None, minimums={"b": 60.01})
    assert not d.promote and rows(d)["b"] == (None, 60.0, None, False)
    d = decide(acc, None, min_macro=70.5)
    assert not d.promote and "macro average 70.00 below minimum 70.5" in d.reason
    # a minimum on a task the model does not answer cannot be cleared
    d = decide(acc, None, minimums={"c": 1.0})
    assert not d.promote and rows(d)["c"] == (None, None, None, False)


def test_negative_tolerance_is_an_error():
    with pytest.raises(ValueError, match="tolerance"):
        decide({"a": 1.0}, {"a": 1.0}, tolerance=-1.0)


def test_format_and_record_show_every_row():
    d = decide({"a": 78.0, "b": 75.0}, {"a": 80.0, "b": 70.0})
    text = format_decision(d)
    assert "a" in text and "-2.00" in text and "+5.00" in text
    assert text.splitlines()[-1].startswith("REFUSE: challenger refused: a (falls by 2.00")
    assert json.loads(json.dumps(d.to_dict()))["tasks"][0]["delta"] == -2.0


# --------------------------------------------------------------------------- config section
def test_promotion_section_is_optional_documented_and_strict():
    base = {"tasks": [{"name": "a"}]}
    p = parse_config(base).promotion
    assert (p.tolerance, p.minimums, p.min_macro, p.eval_data_dir) == (1.0, {}, None, None)
    for field in type(p).model_fields.values():
        assert field.description
    p = parse_config(base | {"promotion": {"tolerance": 0.5, "minimums": {"a": 60}}}).promotion
    assert p.tolerance == 0.5 and p.minimums == {"a": 60.0}
    with pytest.raises(ConfigError, match="promotion.tolrance: unknown key"):
        parse_config(base | {"promotion": {"tolrance": 1}})
    with pytest.raises(ConfigError, match="promotion.tolerance"):
        parse_config(base | {"promotion": {"tolerance": -1}})
    with pytest.raises(ConfigError, match=r"promotion.minimums.a: .*less than or equal to 100"):
        parse_config(base | {"promotion": {"minimums": {"a": 101}}})


def test_minimums_must_name_tasks_of_the_config():
    from pipeline.jobs.retrain import check_promotion_config

    config = parse_config({"tasks": [{"name": "a"}], "promotion": {"minimums": {"b": 50}}})
    with pytest.raises(ConfigError, match=r"promotion.minimums: unknown task\(s\) \['b'\]"):
        check_promotion_config(config)
