"""A run's model selection cross-fitted on halves of dev (pipeline/selection.py), and the record
the training driver builds from the loop's state."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import parse_config
from pipeline.selection import pack, selection_crossfit, unpack
from pipeline.train.driver import selection_crossfit_of


@pytest.mark.parametrize("n", [1, 7, 8, 9, 377])
def test_pack_round_trips_and_refuses_the_wrong_length(n):
    bits = np.random.default_rng(n).random(n) < 0.5
    packed = pack(bits)
    np.testing.assert_array_equal(unpack(packed, n), bits)
    with pytest.raises(ValueError, match="bits, not"):
        unpack(packed, n + 8)
    with pytest.raises(ValueError, match="bits, not"):
        unpack(pack(np.ones(n + 8, dtype=bool)), n)


def test_one_candidate_scores_its_own_accuracy():
    # Nothing to pick: on an even n both halves of every halving add up to all of dev.
    right = np.arange(100) % 4 != 0  # 75%
    out = selection_crossfit([{"a": right}], [])
    assert out == {"a": pytest.approx(75.0)}


def test_the_best_of_many_equal_epochs_is_optimistic_and_the_crossfit_is_not():
    # Ten epochs that are each right on 80% of texts at random. Over 30 draws of such a dev
    # set, the best epoch on all of dev reads about 3 points above 80; picking on one half and
    # scoring on the other reads 80 within the noise of 30 draws (std of one draw about 1.7).
    rng = np.random.default_rng(0)
    picked, crossfit = [], []
    for draw in range(30):
        epochs = [{"a": rng.random(400) < 0.8} for _ in range(10)]
        picked.append(max(100 * e["a"].mean() for e in epochs))
        crossfit.append(selection_crossfit(epochs, [], seed=draw, repeats=10)["a"])
    assert np.mean(picked) > 82.5
    assert abs(np.mean(crossfit) - 80.0) < 1.0
    assert np.mean(crossfit) < np.mean(picked) - 2.0


def test_a_truly_better_epoch_survives_the_crossfit():
    # Epoch 2 is right on 90%, the others on about 70%: every half picks it.
    rng = np.random.default_rng(1)
    n = 300
    weak = [{"a": rng.random(n) < 0.7} for _ in range(3)]
    strong = {"a": rng.random(n) < 0.9}
    out = selection_crossfit([weak[0], strong, weak[1], weak[2]], [])
    assert out["a"] == pytest.approx(100 * strong["a"].mean())


def test_stage_one_picks_on_the_macro_average_of_every_task():
    # Epoch 0 is best for task a, epoch 1 for b by more: the macro-average picks epoch 1 for
    # both tasks, as the loop does, so a scores epoch 1's 50%.
    n = 40
    half = np.arange(n) < n // 2
    full = np.ones(n, dtype=bool)
    out = selection_crossfit(
        [{"a": full, "b": np.zeros(n, dtype=bool)}, {"a": half, "b": full}], [], repeats=5
    )
    assert out["b"] == pytest.approx(100.0)
    assert out["a"] == pytest.approx(50.0, abs=1e-9)


def test_alignment_epochs_are_kept_only_when_better_on_the_picking_half():
    n = 40
    joint = [{"a": np.arange(n) % 2 == 0}]  # 50%
    better = {"a": np.arange(n) % 4 != 3}  # 75%
    worse = {"a": np.arange(n) % 4 == 0}  # 25%
    kept = selection_crossfit(joint, [better, worse], keep_only_if_better=True, repeats=20)
    assert kept["a"] == pytest.approx(75.0, abs=6.0)
    assert kept["a"] > 65.0
    # keep_only_if_better off: the last stage-2 epoch, whatever it scores.
    last = selection_crossfit(joint, [better, worse], keep_only_if_better=False, repeats=20)
    assert last["a"] == pytest.approx(25.0)


def test_too_few_texts_give_none_and_tasks_must_match():
    out = selection_crossfit([{"a": np.ones(3, bool), "b": np.ones(10, bool)}], [])
    assert out == {"a": None, "b": pytest.approx(100.0)}
    assert selection_crossfit([], []) == {}
    with pytest.raises(ValueError, match="every epoch needs the tasks"):
        selection_crossfit([{"a": np.ones(8, bool)}, {"b": np.ones(8, bool)}], [])


def _state(tasks: dict[str, np.ndarray], stages: list[tuple[str, int]], record: bool = True):
    history = [
        {
            "stage": stage,
            "epoch": epoch,
            "dev": {t: {"accuracy": 100 * c.mean(), "n": len(c)} for t, c in tasks.items()},
        }
        for stage, epoch in stages
    ] + [{"stage": "final", "epoch": 0, "dev": {}}]
    correct = {f"{s}:{e}": {t: pack(c) for t, c in tasks.items()} for s, e in stages}
    return {"history": history, "dev_correct": correct if record else {}}


def test_the_driver_replays_the_recorded_epochs_and_skips_runs_without_them(tmp_path):
    from conftest import tiny_config_dict

    config = parse_config(
        tiny_config_dict(tmp_path, tmp_path, tmp_path / "runs", tmp_path / "c"), "tiny.yaml"
    )
    tasks = {"sentiment": np.arange(24) % 3 != 0, "topic": np.arange(24) % 2 == 0}
    stages = [("joint", 1), ("joint", 2), ("align", 1), ("align", 2)]
    out = selection_crossfit_of(_state(tasks, stages), list(tasks), config)
    assert out == {"sentiment": pytest.approx(200 / 3), "topic": pytest.approx(50.0)}
    # A run resumed from a checkpoint written before the record (or missing one task): {}.
    assert selection_crossfit_of(_state(tasks, stages, record=False), list(tasks), config) == {}
    partial = _state(tasks, stages)
    del partial["dev_correct"]["align:2"]["topic"]
    assert selection_crossfit_of(partial, list(tasks), config) == {}
