"""A run's model selection without its selection bias: cross-fitted over halves of dev.

Every run picks its model on dev: the stage-1 epoch with the best dev macro-average, then
(alignment with `keep_only_if_better`) per task the stage-2 epoch that beats it. On a small
dev set that pick is optimistic: the best of five epochs on CR's 377 texts is partly the
epoch that happened to suit those texts. The transfer suite compares models that pick this
way with routed models whose routing is cross-fitted (pipeline/routing.py), so the single-task
baseline needs the same treatment to be compared without bias on either side.

`selection_crossfit` replays the run's own rule on the recorded per-text correctness of every
epoch: for each random halving of every task's dev (the same halvings as routing's), the rule
picks on one half and the picked epoch is scored on the other; the mean over both halves of
every halving is what the run's selected model scores without the bias. Candidates are the
epochs the run trained: the stage-2 epochs were trained from the stage-1 epoch picked on all
of dev, so when a half picks another stage-1 epoch it still compares against those stage-2
epochs (the run has no others); with alignment off, as in the transfer suite's single-task
runs, the estimate is exact.

Correctness is stored packed (one bit per dev text, hex) in the training loop's state, so a
checkpointed run resumes with it. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.routing import CROSSFIT_REPEATS, halvings


def pack(correct: np.ndarray) -> str:
    """bool [n] -> hex string of its bits (what the loop stores per task and epoch)."""
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def unpack(packed: str, n: int) -> np.ndarray:
    """The bool [n] that `pack` stored."""
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))
    if len(bits) < n or len(bits) - n >= 8:
        raise ValueError(f"packed correctness holds {len(bits)} bits, not {n} texts")
    return bits[:n].astype(bool)


def selection_crossfit(
    joint: Sequence[Mapping[str, np.ndarray]],
    align: Sequence[Mapping[str, np.ndarray]],
    keep_only_if_better: bool = True,
    seed: int = 0,
    repeats: int = CROSSFIT_REPEATS,
) -> dict[str, float | None]:
    """Per task, dev accuracy (percent) of the run's selected model with the selection made on
    one half of dev and scored on the other (mean over both halves of `repeats` halvings).

    Args:
        joint: Per stage-1 epoch (in order), task -> bool [n_task] correctness on dev.
        align: Per stage-2 epoch (in order), the same; empty without alignment.
        keep_only_if_better: The alignment rule: a task takes a stage-2 epoch only when it
            beats the best so far (else every stage-2 epoch replaces it: the last one).
        seed: Of the halvings: the run's seed, as routing's cross-fit uses, so a task's halvings
            here are the ones its routing decision was cross-fitted on.
        repeats: Random halvings.

    A task with fewer than 4 dev texts gets None (no halves to pick on and score on), and so
    does every task of a run without stage-1 epochs.
    """
    if not joint:
        return {}
    tasks = list(joint[0])
    for epoch in [*joint, *align]:
        if list(epoch) != tasks:
            raise ValueError(f"every epoch needs the tasks {tasks}, got {list(epoch)}")
    j = {t: np.stack([np.asarray(e[t], dtype=bool) for e in joint]) for t in tasks}  # [E1, n]
    a = {
        t: np.stack([np.asarray(e[t], dtype=bool) for e in align]) if align else None for t in tasks
    }  # [E2, n]
    usable = [t for t in tasks if j[t].shape[1] >= 4]
    out: dict[str, float | None] = dict.fromkeys(tasks)
    if not usable:
        return out
    splits = {t: list(halvings(j[t].shape[1], seed, repeats)) for t in tasks}
    scores: dict[str, list[float]] = {t: [] for t in usable}
    for k in range(2 * repeats):
        # Stage 1: the epoch with the best macro-average on the picking halves (first best,
        # as the loop's strict ">" keeps the first).
        macro = np.mean([j[t][:, splits[t][k][0]].mean(axis=1) for t in usable], axis=0)
        e1 = int(np.argmax(macro))
        for t in usable:
            pick, score = splits[t][k]
            chosen = j[t][e1]
            best = chosen[pick].mean()
            if a[t] is not None:
                for cand in a[t]:
                    acc = cand[pick].mean()
                    if acc > best or not keep_only_if_better:
                        best, chosen = acc, cand
            scores[t].append(float(chosen[score].mean()))
    for t in usable:
        out[t] = 100.0 * float(np.mean(scores[t]))
    return out
