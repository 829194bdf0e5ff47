"""Per-task routing (issue 13): answer each task through the shared path or its private one.

Every task has two paths on the same pooled encoder features x:

    shared:   logits = A_i(B(standardize(x) R_i))     what multi-task training fitted
    private:  logits = P_i(standardize(x))            a small head of the task's own

P_i is fitted after stage 2 (so on the final encoder's features when the encoder is
fine-tuned), on the task's train split only; its epoch is picked on a slice held out of the
train split, so dev is untouched until the decision.

**The rule.** On the task's dev items, let d_j = [private right on j] - [shared right on j]
(paired: both paths answer the same items). The mean of d is the accuracy difference; its
standard error is sd(d) / sqrt(n). The private path is chosen only when

    mean(d) > margin_se * SE(d)   and   mean(d) > 0,

otherwise the shared path stays. With margin_se = 1 a private path that is truly no better is
chosen in about 16% of tasks (one-sided normal tail), and one that is better by 2 standard
errors in about 84%; margin_se = 2 halves the first and costs more of the second. Only the
discordant items (one path right, the other wrong) move d, so this is the normal form of
McNemar's test on the discordant counts. The p-value recorded is its one-sided tail.

Because the decision is made on dev, dev accuracy of the routed model is optimistic. The
record therefore also carries a cross-fitted estimate: dev split in halves many times, the rule
applied on one half and the chosen path scored on the other.

Pure numpy here except `fit_private_head` (torch imported when it runs).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from pipeline.config import PrivateHeadConfig

Route = Literal["shared", "private"]
CROSSFIT_REPEATS = 50


class RouteDecision(BaseModel):
    """One task's path and the dev evidence behind it (accuracies and differences in points)."""

    model_config = ConfigDict(extra="ignore")

    path: Route
    shared_accuracy: float = Field(description="Dev accuracy of the shared path, percent.")
    private_accuracy: float = Field(description="Dev accuracy of the private path, percent.")
    difference: float = Field(description="private - shared, points.")
    standard_error: float = Field(description="Of the paired difference, points.")
    z: float | None = Field(description="difference / standard_error; None when SE is 0.")
    p_value: float = Field(description="One-sided: P(difference this large | paths equal).")
    margin_se: float = Field(description="Standard errors the difference had to exceed.")
    n: int = Field(description="Dev items.")
    private_only_right: int = Field(description="Items only the private path got right.")
    shared_only_right: int = Field(description="Items only the shared path got right.")
    crossfit_accuracy: float | None = Field(
        default=None,
        description="Routed accuracy with the rule chosen on one half of dev and scored on the "
        "other (mean over random halvings): the routed model's dev score without selection "
        "bias, at half the evidence.",
    )
    private_fit: dict[str, float] | None = Field(
        default=None, description="The private head's fit: best epoch, holdout loss, accuracy."
    )

    @property
    def chosen_accuracy(self) -> float:
        return self.private_accuracy if self.path == "private" else self.shared_accuracy


def choose(difference: float, standard_error: float, margin_se: float) -> Route:
    """The rule: private only if it wins by more than `margin_se` standard errors."""
    if difference <= 0.0:
        return "shared"
    return "private" if difference > margin_se * standard_error else "shared"


def decide(
    shared_correct: np.ndarray,
    private_correct: np.ndarray,
    margin_se: float,
    seed: int = 0,
    crossfit_repeats: int = CROSSFIT_REPEATS,
) -> RouteDecision:
    """The route of one task from both paths' per-item correctness on its dev items.

    Args:
        shared_correct: bool [n], the shared path's answer is right.
        private_correct: bool [n], the private path's answer is right, same items.
        margin_se: Standard errors the private path must win by.
        seed: Of the cross-fitting halvings.
        crossfit_repeats: Random halvings of the cross-fitted estimate; 0: none.
    """
    s = np.asarray(shared_correct, dtype=bool)
    p = np.asarray(private_correct, dtype=bool)
    if s.shape != p.shape or s.ndim != 1 or len(s) < 2:
        raise ValueError(
            f"need two equal 1-d correctness vectors of >= 2 items: {s.shape} {p.shape}"
        )
    diff, se = paired_difference(s, p)
    z = diff / se if se > 0 else None
    # SE 0: the paths agree on every item (no evidence) or differ on all in one direction.
    no_evidence = 1.0 if diff <= 0 else 0.0
    p_value = 0.5 * math.erfc(z / math.sqrt(2.0)) if z is not None else no_evidence
    return RouteDecision(
        path=choose(diff, se, margin_se),
        shared_accuracy=100.0 * float(s.mean()),
        private_accuracy=100.0 * float(p.mean()),
        difference=diff,
        standard_error=se,
        z=z,
        p_value=p_value,
        margin_se=margin_se,
        n=len(s),
        private_only_right=int((p & ~s).sum()),
        shared_only_right=int((s & ~p).sum()),
        crossfit_accuracy=(
            crossfit_accuracy(s, p, margin_se, seed, crossfit_repeats) if crossfit_repeats else None
        ),
    )


def paired_difference(shared: np.ndarray, private: np.ndarray) -> tuple[float, float]:
    """Mean of private - shared correctness and its standard error, both in points."""
    d = private.astype(np.float64) - shared.astype(np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    return 100.0 * float(d.mean()), 100.0 * se


def crossfit_accuracy(
    shared: np.ndarray,
    private: np.ndarray,
    margin_se: float,
    seed: int = 0,
    repeats: int = CROSSFIT_REPEATS,
) -> float | None:
    """Accuracy (percent) of the route the rule picks on one half of the items, scored on the
    other half; averaged over both halves of `repeats` random halvings. None under 4 items."""
    n = len(shared)
    if n < 4:
        return None
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(repeats):
        order = rng.permutation(n)
        halves = order[: n // 2], order[n // 2 :]
        for pick, score in (halves, halves[::-1]):
            diff, se = paired_difference(shared[pick], private[pick])
            chosen = private if choose(diff, se, margin_se) == "private" else shared
            scores.append(float(chosen[score].mean()))
    return 100.0 * float(np.mean(scores))


def fit_private_head(
    head: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: PrivateHeadConfig,
    seed: int,
) -> dict[str, float]:
    """Fit one private head in place on standardized features; returns what it did.

    The last `holdout_fraction` of a seeded permutation of the rows picks the epoch (lowest
    holdout loss); the head keeps that epoch's weights. Deterministic for a seed on CPU, so
    every rank of a distributed run fits the same head.

    Args:
        head: P_i, [B, d] -> [B, C].
        x: float [n, d] standardized features (the final encoder's).
        y: int64 [n] labels.
        cfg: The private head's settings.
        seed: Of the holdout split, the batches and dropout.
    """
    import torch
    import torch.nn.functional as F

    head.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    order = torch.randperm(n, generator=gen).to(x.device)
    n_hold = min(max(1, int(round(cfg.holdout_fraction * n))), n - 1)
    fit_idx, hold_idx = order[n_hold:], order[:n_hold]
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_loss, best_epoch, bad = math.inf, 0, 0
    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    torch.manual_seed(seed)  # dropout
    for epoch in range(cfg.epochs):
        head.train()
        perm = fit_idx[torch.randperm(len(fit_idx), generator=gen).to(x.device)]
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(x[idx]), y[idx]).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            loss = float(F.cross_entropy(head(x[hold_idx]), y[hold_idx]))
        if loss < best_loss:
            best_loss, best_epoch, bad = loss, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        hold_acc = float((head(x[hold_idx]).argmax(-1) == y[hold_idx]).float().mean())
    return {"best_epoch": best_epoch, "holdout_loss": best_loss, "holdout_accuracy": 100 * hold_acc}


def format_route(d: RouteDecision) -> str:
    """'private: 85.40 vs 84.10, +1.30 ± 0.60 (p 0.02)' (private vs shared dev accuracy, their
    difference ± its standard error) for the stage table and the log."""
    return (
        f"{d.path + ':':<8} {d.private_accuracy:6.2f} vs {d.shared_accuracy:6.2f}, "
        f"{d.difference:+.2f} ± {d.standard_error:.2f} (p {d.p_value:.2f})"
    )
