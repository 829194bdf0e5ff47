"""Per-task routing (issue 13): answer each task through the shared path or its private one.

Every task has two paths on the same pooled encoder features x:

    shared:   logits = A_i(B(standardize(x) R_i))     what multi-task training fitted
    private:  logits = P_i(standardize(x))            an MLP of the task's own

P_i is fitted after stage 2 (so on the final encoder's features when the encoder is
fine-tuned), on the task's train split only. By default it is trained as the task's own
single-task model would be (config.PrivateHeadConfig), its epoch picked on dev like every
model of a run; `select: holdout` picks it on a slice of the train split instead.

**The rule.** On the task's dev items, let d_j = [private right on j] - [shared right on j]
(paired: both paths answer the same items). The mean of d is the accuracy difference; its
standard error is sd(d) / sqrt(n). A task keeps its preferred path (`routing.prefer`) unless
the other one leads by more than `margin_se` standard errors:

    prefer private:  shared chosen only when  -mean(d) > margin_se * SE(d)  and  mean(d) < 0
    prefer shared:   private chosen only when  mean(d) > margin_se * SE(d)  and  mean(d) > 0

With margin_se = 1 a path that is truly no better wins in about 16% of tasks (one-sided normal
tail), and one that is better by 2 standard errors in about 84%. Only the discordant items
(one path right, the other wrong) move d, so this is the normal form of McNemar's test on the
discordant counts; the p-value recorded is the one-sided tail of the evidence for leaving the
preferred path.

Why private is the default: a task answered privately is as good as its own model, within
noise, so sharing has to earn its place per task; on the data shipped here it does so by
7 points on MR and SST-2 and not on the other tasks (docs/results.md, *Routing*).

Because the decision (and, with `select: dev`, the private epoch) is made on dev, dev accuracy
of the routed model is optimistic. The record therefore also carries a cross-fitted estimate:
dev split in halves many times, the private epoch and the rule applied on one half and the
chosen path scored on the other.

**The own path** (`routing.own`, opt-in, fine-tuned encoders): after the run, a task may also
get its own copy of the encoder's top blocks with a private head (pipeline/own_path.py), and
takes it only when it beats the route chosen above by more than `routing.own.margin_se`
standard errors (`decide_own`): it costs serving time, so it has to earn its place.

Pure numpy here except `fit_private_head` and `route_task` (torch imported when they run).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

    from pipeline.config import PrivateHeadConfig, RoutingConfig

Route = Literal["shared", "private", "own"]
BaseRoute = Literal["shared", "private"]
CROSSFIT_REPEATS = 50


class OwnEvidence(BaseModel):
    """A task's own path (its own copy of the top encoder blocks and a private head, trained on
    the task alone) against the route the shared/private rule chose: the own path is taken
    only when it leads by more than `margin_se` standard errors (it costs serving time)."""

    model_config = ConfigDict(extra="ignore")

    against: BaseRoute = Field(description="The shared-or-private route it was compared with.")
    accuracy: float = Field(description="Dev accuracy of the own path, percent.")
    difference: float = Field(description="own - that route, points.")
    standard_error: float = Field(description="Of the paired difference, points.")
    p_value: float = Field(description="One-sided: P(own leading by this much | paths equal).")
    margin_se: float = Field(description="Standard errors the own path had to lead by.")
    epoch: int | None = Field(default=None, description="Its epoch, picked on dev (1-based).")
    layers: int = Field(description="Top encoder blocks it copies.")
    crossfit_accuracy: float | None = Field(
        default=None,
        description="The own path alone, its epoch picked on one half of dev and scored on the "
        "other (mean over random halvings).",
    )
    routed_crossfit_accuracy: float | None = Field(
        default=None,
        description="Own-or-route, the own epoch and the choice made on one half of dev and "
        "the chosen path scored on the other (the route itself as chosen on all of dev).",
    )
    seconds: float | None = Field(default=None, description="Its training time.")


class RouteDecision(BaseModel):
    """One task's path and the dev evidence behind it (accuracies and differences in points)."""

    model_config = ConfigDict(extra="ignore")

    path: Route
    shared_accuracy: float = Field(description="Dev accuracy of the shared path, percent.")
    private_accuracy: float = Field(description="Dev accuracy of the private path, percent.")
    difference: float = Field(description="private - shared, points.")
    standard_error: float = Field(description="Of the paired difference, points.")
    z: float | None = Field(description="difference / standard_error; None when SE is 0.")
    p_value: float = Field(
        description="One-sided: P(the other path leading by this much | paths equal), where "
        "'other' is the path that is not preferred."
    )
    margin_se: float = Field(description="Standard errors the other path had to lead by.")
    prefer: Route = Field(default="shared", description="The path kept without evidence.")
    private_epoch: int | None = Field(
        default=None, description="The private head's epoch, when picked on dev (1-based)."
    )
    n: int = Field(description="Dev items.")
    private_only_right: int = Field(description="Items only the private path got right.")
    shared_only_right: int = Field(description="Items only the shared path got right.")
    crossfit_accuracy: float | None = Field(
        default=None,
        description="Routed accuracy with the rule chosen on one half of dev and scored on the "
        "other (mean over random halvings): the routed model's dev score without selection "
        "bias, at half the evidence.",
    )
    private_crossfit_accuracy: float | None = Field(
        default=None,
        description="The private path alone, its epoch picked on one half of dev and scored on "
        "the other (same halvings): what the task's own model scores without the selection "
        "bias its dev number carries.",
    )
    private_fit: dict[str, float] | None = Field(
        default=None, description="The private head's fit: best epoch, holdout loss, accuracy."
    )
    own: OwnEvidence | None = Field(
        default=None,
        description="The own path's evidence (routing.own), when one was trained for the task.",
    )

    @property
    def base_path(self) -> BaseRoute:
        """The shared-or-private choice (what `path` is unless the own path won)."""
        if self.path != "own":
            return self.path
        return "shared" if self.own is not None and self.own.against == "shared" else "private"

    @property
    def chosen_accuracy(self) -> float:
        if self.path == "own" and self.own is not None:
            return self.own.accuracy
        return self.private_accuracy if self.base_path == "private" else self.shared_accuracy


def choose(
    difference: float, standard_error: float, margin_se: float, prefer: Route = "private"
) -> Route:
    """The rule: the preferred path stays unless the other one leads by more than `margin_se`
    standard errors. `difference` is private - shared, in points."""
    other: Route = "shared" if prefer == "private" else "private"
    lead = difference if other == "private" else -difference
    if lead <= 0.0:
        return prefer
    return other if lead > margin_se * standard_error else prefer


def pick_epoch(per_epoch: np.ndarray) -> int:
    """Index of the epoch with the most items right (the first such) in a bool [E, n]."""
    return int(np.argmax(per_epoch.sum(axis=1)))


def _paired_correctness(
    base: np.ndarray, other: np.ndarray, base_name: str, other_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """bool [n] and bool [E, n] (an [n] `other` becomes one epoch), or ValueError naming both."""
    b = np.asarray(base, dtype=bool)
    per_epoch = np.asarray(other, dtype=bool)
    if per_epoch.ndim == 1:
        per_epoch = per_epoch[None]
    if b.ndim != 1 or per_epoch.ndim != 2 or per_epoch.shape[1] != len(b) or len(b) < 2:
        raise ValueError(
            f"need the {base_name}'s 1-d correctness of >= 2 items and the {other_name}'s on the "
            f"same items ([n] or [epochs, n]): {b.shape} {np.shape(other)}"
        )
    return b, per_epoch


def decide(
    shared_correct: np.ndarray,
    private_correct: np.ndarray,
    margin_se: float,
    seed: int = 0,
    crossfit_repeats: int = CROSSFIT_REPEATS,
    prefer: Route = "private",
) -> RouteDecision:
    """The route of one task from both paths' per-item correctness on its dev items.

    Args:
        shared_correct: bool [n], the shared path's answer is right.
        private_correct: bool [n], the private path's answer is right, same items; or bool
            [E, n], per epoch of the private head, whose epoch is then picked here (the most
            items right) and again, on the half that chooses, in the cross-fitted estimate.
        margin_se: Standard errors the other path must lead by.
        seed: Of the cross-fitting halvings.
        crossfit_repeats: Random halvings of the cross-fitted estimate; 0: none.
        prefer: The path kept without evidence.
    """
    s, per_epoch = _paired_correctness(shared_correct, private_correct, "shared", "private")
    epoch = pick_epoch(per_epoch)
    p = per_epoch[epoch]
    diff, se = paired_difference(s, p)
    z = diff / se if se > 0 else None
    lead = diff if prefer == "shared" else -diff  # how far the other path leads
    # SE 0: the paths agree on every item (no evidence) or differ all one way.
    no_evidence = 0.0 if lead > 0 else 1.0
    p_value = 0.5 * math.erfc(lead / se / math.sqrt(2.0)) if se > 0 else no_evidence
    return RouteDecision(
        path=choose(diff, se, margin_se, prefer),
        shared_accuracy=100.0 * float(s.mean()),
        private_accuracy=100.0 * float(p.mean()),
        difference=diff,
        standard_error=se,
        z=z,
        p_value=p_value,
        margin_se=margin_se,
        prefer=prefer,
        private_epoch=epoch + 1 if len(per_epoch) > 1 else None,
        n=len(s),
        private_only_right=int((p & ~s).sum()),
        shared_only_right=int((s & ~p).sum()),
        crossfit_accuracy=(
            crossfit_accuracy(s, per_epoch, margin_se, seed, crossfit_repeats, prefer)
            if crossfit_repeats
            else None
        ),
        private_crossfit_accuracy=(
            crossfit_private_accuracy(per_epoch, seed, crossfit_repeats)
            if crossfit_repeats
            else None
        ),
    )


def decide_own(
    decision: RouteDecision,
    route_correct: np.ndarray,
    own_correct: np.ndarray,
    margin_se: float,
    layers: int,
    seed: int = 0,
    crossfit_repeats: int = CROSSFIT_REPEATS,
    seconds: float | None = None,
) -> RouteDecision:
    """`decision` with the own path weighed against the route it chose: the own path is taken
    only when it leads that route by more than `margin_se` standard errors of the paired
    per-item difference (and by more than 0). The shared/private evidence is kept as it was.

    Args:
        decision: The task's shared/private decision (`decide`).
        route_correct: bool [n], that route's answers right on the task's dev items.
        own_correct: bool [E, n] per epoch of the own path (its epoch is picked here, the
            most items right), or [n].
        margin_se: routing.own.margin_se.
        layers: Top blocks the own path copies (recorded).
        seed: Of the cross-fitting halvings.
    """
    r, per_epoch = _paired_correctness(route_correct, own_correct, "route", "own path")
    epoch = pick_epoch(per_epoch)
    own = per_epoch[epoch]
    diff, se = paired_difference(r, own)
    no_evidence = 0.0 if diff > 0 else 1.0  # SE 0: all items agree, or differ one way
    p_value = 0.5 * math.erfc(diff / se / math.sqrt(2.0)) if se > 0 else no_evidence
    # `choose` with the own path as the challenger ("private") of a preferred route ("shared").
    take = choose(diff, se, margin_se, prefer="shared") == "private"
    routed_crossfit = None
    if crossfit_repeats and len(r) >= 4:
        scores = []
        for pick, score in halvings(len(r), seed, crossfit_repeats):
            o = per_epoch[pick_epoch(per_epoch[:, pick])]
            d, e = paired_difference(r[pick], o[pick])
            chosen = o if choose(d, e, margin_se, prefer="shared") == "private" else r
            scores.append(float(chosen[score].mean()))
        routed_crossfit = 100.0 * float(np.mean(scores))
    evidence = OwnEvidence(
        against=decision.base_path,
        accuracy=100.0 * float(own.mean()),
        difference=diff,
        standard_error=se,
        p_value=p_value,
        margin_se=margin_se,
        epoch=epoch + 1 if len(per_epoch) > 1 else None,
        layers=layers,
        crossfit_accuracy=(
            crossfit_private_accuracy(per_epoch, seed, crossfit_repeats)
            if crossfit_repeats
            else None
        ),
        routed_crossfit_accuracy=routed_crossfit,
        seconds=seconds,
    )
    path: Route = "own" if take else decision.base_path
    return decision.model_copy(update={"path": path, "own": evidence})


def paired_difference(shared: np.ndarray, private: np.ndarray) -> tuple[float, float]:
    """Mean of private - shared correctness and its standard error, both in points."""
    d = private.astype(np.float64) - shared.astype(np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    return 100.0 * float(d.mean()), 100.0 * se


def halvings(n: int, seed: int, repeats: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(choosing half, scored half) index pairs: both ways round of `repeats` random halvings
    of n items, seeded, so every cross-fitted estimate of a decision uses the same splits."""
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        order = rng.permutation(n)
        halves = order[: n // 2], order[n // 2 :]
        yield halves
        yield halves[::-1]


def crossfit_accuracy(
    shared: np.ndarray,
    private: np.ndarray,
    margin_se: float,
    seed: int = 0,
    repeats: int = CROSSFIT_REPEATS,
    prefer: Route = "private",
) -> float | None:
    """Accuracy (percent) of the route the rule picks on one half of the items, scored on the
    other half; averaged over both halves of `repeats` random halvings. `private` is bool [n]
    or [E, n] per epoch; per epoch, the half that chooses also picks the epoch. None under 4
    items."""
    n = len(shared)
    if n < 4:
        return None
    per_epoch = private if private.ndim == 2 else private[None]
    scores = []
    for pick, score in halvings(n, seed, repeats):
        p = per_epoch[pick_epoch(per_epoch[:, pick])]
        diff, se = paired_difference(shared[pick], p[pick])
        chosen = p if choose(diff, se, margin_se, prefer) == "private" else shared
        scores.append(float(chosen[score].mean()))
    return 100.0 * float(np.mean(scores))


def crossfit_private_accuracy(
    private: np.ndarray, seed: int = 0, repeats: int = CROSSFIT_REPEATS
) -> float | None:
    """Accuracy (percent) of the private path alone with its epoch picked on one half of the
    items and scored on the other, over the same halvings as `crossfit_accuracy` (same seed).
    `private` is bool [n] (no pick: its mean) or [E, n]. None under 4 items."""
    n = private.shape[-1]
    if n < 4:
        return None
    per_epoch = private if private.ndim == 2 else private[None]
    scores = [
        float(per_epoch[pick_epoch(per_epoch[:, pick])][score].mean())
        for pick, score in halvings(n, seed, repeats)
    ]
    return 100.0 * float(np.mean(scores))


def fit_private_head(
    head: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: PrivateHeadConfig,
    seed: int,
    dev: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Fit one private head in place on standardized features; returns what it did and, when
    `dev` is given, its dev logits after each epoch.

    AdamW with a cosine schedule over `cfg.epochs`, cross-entropy with `cfg.label_smoothing`.
    select=dev: trained on every row, the head keeps the epoch with the most dev items right.
    select=holdout: the last `holdout_fraction` of a seeded permutation of the rows picks the
    epoch (lowest holdout loss, early stopping after `patience`); the head keeps that epoch's
    weights. Deterministic for a seed on CPU, so every rank of a distributed run fits the same
    head. A PrivateEnsemble's members train together, each on its own batch order; what is
    scored (dev accuracy, holdout loss) is their mean logits, so one epoch is kept for all.

    Args:
        head: P_i, [B, d] -> [B, C].
        x: float [n, d] standardized features (the final encoder's).
        y: int64 [n] labels.
        cfg: The private head's settings.
        seed: Of the holdout split, the batches and dropout.
        dev: float [m, d] standardized dev features and int64 [m] labels; required for
            select=dev.

    Returns:
        ({"best_epoch", and "dev_accuracy" or "holdout_loss" and "holdout_accuracy"},
        float32 dev logits: [epochs, m, C] per epoch for select=dev (the epochs run), [1, m, C]
        of the kept epoch for select=holdout; None without `dev`). `correct(logits, labels)`
        turns them into what `decide` reads.
    """
    import torch
    import torch.nn.functional as F

    if cfg.select == "dev" and dev is None:
        raise ValueError("select=dev needs the dev features")
    head.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if cfg.select == "holdout":
        order = torch.randperm(n, generator=gen).to(x.device)
        n_hold = min(max(1, int(round(cfg.holdout_fraction * n))), n - 1)
        fit_idx, hold_idx = order[n_hold:], order[:n_hold]
    else:
        fit_idx, hold_idx = torch.arange(n, device=x.device), None
    # fused: one kernel for every parameter's update, twice as fast here as the default on
    # a five-member ensemble (the update of its 1.6M parameters was half of each step).
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    steps_per_epoch = -(-len(fit_idx) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    best_score, best_epoch, bad = -math.inf, 0, 0
    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    per_epoch: list[np.ndarray] = []  # dev logits [m, C] after each epoch
    hold_loss = math.nan
    # An ensemble (model.PrivateEnsemble) trains its members side by side, each on its own
    # batch order: [K, B] row indices, [K, B, C] logits, each member's cross-entropy averaged.
    members = getattr(head, "members", 1)
    torch.manual_seed(seed)  # dropout (and nothing else: the initialization is the caller's)
    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.stack(
            [
                fit_idx[torch.randperm(len(fit_idx), generator=gen).to(x.device)]
                for _ in range(members)
            ]
        )  # [K, n]
        for i in range(0, perm.shape[1], cfg.batch_size):
            idx = perm[:, i : i + cfg.batch_size]  # [K, B]
            opt.zero_grad(set_to_none=True)
            if members > 1:
                logits = head.member_logits(x[idx])  # [K, B, C]
                loss = F.cross_entropy(
                    logits.flatten(0, 1), y[idx].flatten(), label_smoothing=cfg.label_smoothing
                )
            else:
                loss = F.cross_entropy(
                    head(x[idx[0]]), y[idx[0]], label_smoothing=cfg.label_smoothing
                )
            loss.backward()
            opt.step()
            schedule.step()
        head.eval()
        with torch.no_grad():
            if dev is not None:
                logits = head(dev[0]).float().cpu().numpy()
                per_epoch.append(logits)
            if hold_idx is not None:
                loss = float(F.cross_entropy(head(x[hold_idx]), y[hold_idx]))
                score = -loss
            else:
                score = float(correct(logits, dev[1].cpu().numpy()).sum())
        if score > best_score:
            best_score, best_epoch, bad = score, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            hold_loss = -score if hold_idx is not None else hold_loss
        else:
            bad += 1
            if hold_idx is not None and bad >= cfg.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    fit: dict[str, float] = {"best_epoch": best_epoch}
    if hold_idx is not None:
        with torch.no_grad():
            hold_acc = float((head(x[hold_idx]).argmax(-1) == y[hold_idx]).float().mean())
        fit |= {"holdout_loss": hold_loss, "holdout_accuracy": 100 * hold_acc}
    else:
        assert dev is not None
        right = correct(per_epoch[best_epoch - 1], dev[1].cpu().numpy())
        fit["dev_accuracy"] = 100 * float(right.mean())
    if not per_epoch:
        return fit, None
    # What the routing decision may pick from: every epoch when dev picks (decide() picks the
    # same one), else only the epoch the holdout kept.
    return fit, np.stack(per_epoch if hold_idx is None else [per_epoch[best_epoch - 1]])


def route_task(
    heads: torch.nn.Module,
    task: str,
    train: tuple[torch.Tensor, torch.Tensor],
    dev: tuple[torch.Tensor, torch.Tensor],
    rcfg: RoutingConfig,
    seed: int,
    index: int,
) -> tuple[RouteDecision, dict[str, float]]:
    """One task's routing step, as training, `add-task` and scripts/reroute.py all run it:
    fit `heads.private[task]` (`fit_private_head`) on the standardized features, then choose
    the task's path on dev (`decide`) and set `heads.routes[task]`.

    Args:
        heads: The run's MultiTaskHeads (its standardization and shared path are read).
        train, dev: Raw pooled features [n, d] and int64 labels [n] of the task's splits.
        seed: The run's seed: of the decision's halvings, and with `index` (the task's
            position in the run) of the private fit, `seed * 1000 + index`.

    Returns:
        (the decision, the private fit's record).
    """
    import torch

    (x, y), (xd, yd) = train, dev
    fit, logits = fit_private_head(
        heads.private[task],
        heads.standardize(x),
        y,
        rcfg.private,
        seed * 1000 + index,
        dev=(heads.standardize(xd), yd),
    )
    assert logits is not None  # dev was given
    heads.private[task].requires_grad_(False)
    with torch.no_grad():
        heads.eval()
        shared = heads(xd, task, path="shared")[0].argmax(-1) == yd
    labels = yd.cpu().numpy()
    decision = decide(
        shared.cpu().numpy(), correct(logits, labels), rcfg.margin_se, seed, prefer=rcfg.prefer
    )
    heads.routes[task] = decision.path
    return decision, fit


def correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """bool [...] whether each answer is right: logits [..., m, C] (e.g. [E, m, C] per epoch)
    against int labels [m]."""
    return np.asarray(logits).argmax(-1) == np.asarray(labels)


def format_route(d: RouteDecision) -> str:
    """'private: 85.40 vs 84.10, +1.30 ± 0.60 (p 0.02)' (private vs shared dev accuracy, their
    difference ± its standard error) for the stage table and the log; with an own path,
    '; own 86.00 vs private, +0.60 ± 0.30 (p 0.02)' after it."""
    text = (
        f"{d.path + ':':<8} {d.private_accuracy:6.2f} vs {d.shared_accuracy:6.2f}, "
        f"{d.difference:+.2f} ± {d.standard_error:.2f} (p {d.p_value:.2f})"
    )
    if d.own is not None:
        o = d.own
        text += (
            f"; own {o.accuracy:6.2f} vs {o.against}, {o.difference:+.2f} ± "
            f"{o.standard_error:.2f} (p {o.p_value:.2f})"
        )
    return text
