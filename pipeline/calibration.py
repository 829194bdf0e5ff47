"""Calibrated probabilities: one calibration map per task head, expected calibration error,
and the dev reference the service's drift metrics are compared with. numpy only.

    dev logits z [n, C], labels y [n]
      -> T = argmin_T NLL(softmax(z / T), y)       one scalar per task head (Guo et al. 2017),
                                                   a bounded 1-D search on log T
      -> optionally a top-label isotonic map after T (Zadrozny and Elkan 2002): the answered
         class's probability -> the accuracy of answers that sure, fitted by pool-adjacent-
         violators; the other classes keep their proportions and the answer never changes
      -> the method is chosen per task on dev by cross-fitted ECE (`choose_method`): the map
         only where it beats the temperature alone on texts it was not fitted on
      -> ECE before (T = 1) and after; "after" is cross-fitted: dev is split in `folds` parts,
         each part scored with the map fitted on the others, method choice included, so no
         text is scored by a map fitted or chosen on it; the mean over `repeats` random splits.
         The artifact keeps the map fitted (and chosen) on all of dev.

Why a second method: on the sentiment tasks whose dev texts sit in another task's training
data (docs/results.md, "Cross-task sentence overlap"), the shared path is right and sure on
those texts and over-sure on the rest; no single scale fits that (docs/results.md, "Richer
calibration maps"), a monotone map of the confidence does.

ECE (percent): texts are put into 15 equal-width bins over the top-class confidence,
(0, 1/15], (1/15, 2/15], ..., (14/15, 1]; ECE = sum over bins of (bin size / n) x |accuracy of
the bin - mean confidence of the bin|.

Neither dividing logits by T > 0 nor the top-label map changes a text's most probable label,
so accuracy is unchanged; only the probabilities move. Serving applies the map
(`serving.runtime`, from metadata.json); this module fits it and measures it, and the
promotion gate compares two models' ECE with `ece_difference`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.artifact import MAX_KNOTS

if TYPE_CHECKING:
    from serving.artifact import ArtifactMetadata

logger = logging.getLogger(__name__)

ECE_BINS = 15
FOLDS = 2
# Random splits averaged in the cross-fitted "after": one split of ~1,000 dev texts moves the
# ECE by about half a point (docs/results.md, Calibration); ten average most of that out.
REPEATS = 10
# Inner splits the method choice averages (on the texts it may use).
CHOICE_REPEATS = 5
# Below this many texts the choice keeps the temperature: a free-form map fitted on half of
# a small set is mostly noise (CR, 377 dev texts, did worse with it).
MIN_ISOTONIC_TEXTS = 200
TEMPERATURE = "temperature"
ISOTONIC = "temperature+isotonic"
# Temperatures searched: a model 20x over- or under-confident is beyond what scaling should fix.
T_BOUNDS = (0.05, 20.0)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
_GOLDEN = (math.sqrt(5) - 1) / 2
# One model's answers on labelled texts: top-class confidence [n], whether it is right [n].
Answers = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- the math
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax [n, C] in float64, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 0.0
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    bounds: tuple[float, float] = T_BOUNDS,
    tol: float = 1e-5,
) -> float:
    """The temperature minimizing the NLL of `labels` (golden-section search on log T).

    The NLL is convex in 1/T (a log-sum-exp of a linear function of 1/T minus a linear term),
    hence unimodal in log T, so a 1-D bounded search finds its minimum. Without texts, 1.0.
    """
    if len(labels) == 0:
        return 1.0
    lo, hi = math.log(bounds[0]), math.log(bounds[1])

    def f(log_t: float) -> float:
        return nll(logits, labels, math.exp(log_t))

    a, b = lo + (1 - _GOLDEN) * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - _GOLDEN) * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = f(b)
    return float(math.exp((lo + hi) / 2))


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature), row-wise, float64."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


def confidences(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-class probability [n] and whether the top class is the label [n] (bool)."""
    probs = np.asarray(probs)
    return probs.max(axis=-1), probs.argmax(axis=-1) == np.asarray(labels)


def bin_index(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bin of each confidence: (k/bins, (k+1)/bins] -> k; 0 goes to bin 0."""
    k = np.ceil(np.asarray(confidence, dtype=np.float64) * bins).astype(np.int64) - 1
    return np.clip(k, 0, bins - 1)


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE in percent over `bins` equal-width bins of the top-class confidence (module doc)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    n = len(confidence)
    if n == 0:
        return 0.0
    k = bin_index(confidence, bins)
    conf_sum = np.bincount(k, weights=confidence, minlength=bins)
    acc_sum = np.bincount(k, weights=np.asarray(correct, dtype=np.float64), minlength=bins)
    return float(100.0 * np.abs(acc_sum - conf_sum).sum() / n)


def ece_of_logits(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = ECE_BINS
) -> float:
    """ECE (percent) of softmax(logits / temperature) against `labels`."""
    return expected_calibration_error(
        *confidences(probabilities(logits, temperature), labels), bins
    )


# --------------------------------------------------------------------------- fitting
def isotonic_knots(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing least-squares fit of y on x (pool adjacent violators), as knots for
    linear interpolation: each pooled block of equal fitted value gives its first and last x.
    Each block's value is shrunk towards 1/2 by half a count each way (below).

    Args:
        x: [n] confidences; y: [n] targets in [0, 1] (1.0 where the answer was right).

    Returns:
        (knots_x ascending, knots_y non-decreasing), at most 2 per block.
    """
    order = np.argsort(np.asarray(x, dtype=np.float64), kind="stable")
    xs = np.asarray(x, dtype=np.float64)[order]
    ys = np.asarray(y, dtype=np.float64)[order]
    # Ties in x must share one fitted value: start from one block per distinct x.
    starts = np.flatnonzero(np.r_[True, np.diff(xs) > 0])
    sums = np.add.reduceat(ys, starts).tolist()
    counts = np.diff(np.r_[starts, len(xs)]).astype(np.float64).tolist()
    first, last = xs[starts].tolist(), xs[np.r_[starts[1:], len(xs)] - 1].tolist()
    b_sum: list[float] = []
    b_cnt: list[float] = []
    b_lo: list[float] = []
    b_hi: list[float] = []
    for s_, c_, lo, hi in zip(sums, counts, first, last, strict=True):
        b_sum.append(s_)
        b_cnt.append(c_)
        b_lo.append(lo)
        b_hi.append(hi)
        # pool while the last block's mean is below the one before it
        while len(b_sum) > 1 and b_sum[-1] / b_cnt[-1] < b_sum[-2] / b_cnt[-2]:
            merged_sum, merged_cnt, merged_hi = b_sum.pop(), b_cnt.pop(), b_hi.pop()
            b_lo.pop()
            b_sum[-1] += merged_sum
            b_cnt[-1] += merged_cnt
            b_hi[-1] = merged_hi
    # A block's value is its accuracy with half a right and half a wrong answer added: a block
    # of 40 right answers says "about 99%", not "certainly" (a served probability of exactly 1
    # would make one wrong answer cost an unbounded log-loss). The running maximum keeps the
    # values non-decreasing after that shrinkage.
    values = np.maximum.accumulate((np.asarray(b_sum) + 0.5) / (np.asarray(b_cnt) + 1.0))
    kx: list[float] = []
    ky: list[float] = []
    for value, lo, hi in zip(values.tolist(), b_lo, b_hi, strict=True):
        kx.extend([lo, hi] if hi > lo else [lo])
        ky.extend([value, value] if hi > lo else [value])
    return np.asarray(kx), np.asarray(ky)


def _nll_of_probs(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean NLL of `labels` under probabilities [n, C] (floored at 1e-12)."""
    picked = np.asarray(probs)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


@dataclass(frozen=True)
class CalibrationMap:
    """One task's calibration: logits -> probabilities, as the runtime applies it.

    Attributes:
        temperature: Logits are divided by it.
        knots_x, knots_y: A top-label map after the temperature (`serving.runtime.
            top_label_map`), or None for the temperature alone.
    """

    temperature: float
    knots_x: np.ndarray | None = None
    knots_y: np.ndarray | None = None

    @property
    def method(self) -> str:
        return TEMPERATURE if self.knots_x is None else ISOTONIC

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [n, C], float64."""
        if self.knots_x is None or self.knots_y is None:
            return probabilities(logits, self.temperature)
        from serving.runtime import top_label_map

        z = np.asarray(logits, dtype=np.float64) / self.temperature
        return top_label_map(z, self.knots_x, self.knots_y)


def fit_map(logits: np.ndarray, labels: np.ndarray, method: str = TEMPERATURE) -> CalibrationMap:
    """Fit `method` ("temperature" or "temperature+isotonic") on these texts."""
    if method not in (TEMPERATURE, ISOTONIC):
        raise ValueError(f"unknown calibration method {method!r}")
    temperature = fit_temperature(logits, labels)
    if method == TEMPERATURE or len(labels) == 0:
        return CalibrationMap(temperature)
    confidence, correct = confidences(probabilities(logits, temperature), labels)
    kx, ky = isotonic_knots(confidence, correct.astype(np.float64))
    if len(kx) > MAX_KNOTS:  # a very large dev set: keep evenly spaced knots (still monotone)
        keep = np.unique(np.linspace(0, len(kx) - 1, MAX_KNOTS).round().astype(np.int64))
        kx, ky = kx[keep], ky[keep]
    return CalibrationMap(temperature, kx, ky)


def cross_fitted(
    logits: np.ndarray,
    labels: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray], CalibrationMap],
    folds: int = FOLDS,
    seed: int = 0,
) -> np.ndarray:
    """Probabilities [n, C] of every text from the map `fit` made on the other folds."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    ids = fold_ids(len(labels), folds, seed)
    out = np.zeros_like(logits)
    for k in range(folds):
        held = ids == k
        out[held] = fit(logits[~held], labels[~held]).probabilities(logits[held])
    return out


def choose_method(
    logits: np.ndarray, labels: np.ndarray, repeats: int = CHOICE_REPEATS, seed: int = 0
) -> str:
    """The calibration method for these texts: the top-label map only when, cross-fitted on
    them (means over `repeats` random halvings), it has both a lower ECE and a lower NLL than
    the temperature alone; always the temperature below `MIN_ISOTONIC_TEXTS` texts. ECE alone
    would pick a map that fits its bins by chance (on a model a temperature already calibrates
    it did in one synthetic draw of four); the NLL, a proper score, does not reward that."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) < MIN_ISOTONIC_TEXTS:
        return TEMPERATURE
    ece: dict[str, float] = {}
    loss: dict[str, float] = {}
    for method in (TEMPERATURE, ISOTONIC):
        fit = partial(fit_map, method=method)
        held_out = [cross_fitted(logits, labels, fit, seed=r) for r in range(seed, seed + repeats)]
        ece[method] = float(
            np.mean([expected_calibration_error(*confidences(p, labels)) for p in held_out])
        )
        loss[method] = float(np.mean([_nll_of_probs(p, labels) for p in held_out]))
    better = ece[ISOTONIC] < ece[TEMPERATURE] and loss[ISOTONIC] < loss[TEMPERATURE]
    return ISOTONIC if better else TEMPERATURE


def fit_calibration(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> CalibrationMap:
    """Choose the method on these texts (`choose_method`) and fit it on all of them."""
    return fit_map(logits, labels, choose_method(logits, labels, seed=seed))


@dataclass(frozen=True)
class CalibrationFit:
    """One task's calibration and how well it calibrates on dev (ECE and NLL; ECE in percent).

    Attributes:
        map: Chosen and fitted on all of dev: what the artifact carries.
        ece_before: ECE with T = 1.
        ece_after: Cross-fitted ECE of the whole procedure (choice and fit on the other folds),
            mean over `repeats` random splits.
        ece_after_in_sample: ECE of `map` on all of dev (optimistic: fitted there).
        ece_after_temperature: Cross-fitted ECE of the temperature alone, same splits.
        nll_before: Mean NLL with T = 1.
        nll_after: Cross-fitted mean NLL, mean over the splits.
        fold_temperatures: The T fitted for each fold of the first split (on the other folds).
        n: Dev texts.
        bins: ECE bins.
        folds: Cross-fitting folds (1: too few texts, "after" is in-sample).
        repeats: Random splits averaged.
    """

    map: CalibrationMap
    ece_before: float
    ece_after: float
    ece_after_in_sample: float
    ece_after_temperature: float
    nll_before: float
    nll_after: float
    fold_temperatures: list[float] = field(default_factory=list)
    n: int = 0
    bins: int = ECE_BINS
    folds: int = FOLDS
    repeats: int = REPEATS

    @property
    def temperature(self) -> float:
        return self.map.temperature

    @property
    def method(self) -> str:
        return self.map.method


def fold_ids(n: int, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """A fold number in [0, folds) for each of n texts: a seeded shuffle cut into equal parts."""
    ids = np.empty(n, dtype=np.int64)
    ids[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return ids


def fit_task(
    logits: np.ndarray,
    labels: np.ndarray,
    folds: int = FOLDS,
    bins: int = ECE_BINS,
    seed: int = 0,
    repeats: int = REPEATS,
) -> CalibrationFit:
    """Choose and fit one task's calibration on dev, and measure ECE before and (cross-fitted,
    the choice inside each fold) after.

    With fewer than 2 texts per fold there is nothing to cross-fit: "after" is then in-sample.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    final = fit_calibration(logits, labels, seed=seed)
    in_sample = final.probabilities(logits)
    after, after_t, nll_after, fold_t = [], [], [], []
    if n >= 2 * folds:
        for r in range(seed, seed + repeats):
            # inner choices on other splits than the outer one (seeded apart)
            chosen = cross_fitted(logits, labels, partial(fit_calibration, seed=1000 + r), folds, r)
            plain = cross_fitted(logits, labels, fit_map, folds, r)
            after.append(expected_calibration_error(*confidences(chosen, labels), bins))
            after_t.append(expected_calibration_error(*confidences(plain, labels), bins))
            nll_after.append(_nll_of_probs(chosen, labels))
        ids = fold_ids(n, folds, seed)
        fold_t = [fit_temperature(logits[ids != k], labels[ids != k]) for k in range(folds)]
    else:
        after = after_t = [expected_calibration_error(*confidences(in_sample, labels), bins)]
        nll_after = [_nll_of_probs(in_sample, labels)]
    return CalibrationFit(
        map=final,
        ece_before=ece_of_logits(logits, labels, 1.0, bins),
        ece_after=float(np.mean(after)),
        ece_after_in_sample=expected_calibration_error(*confidences(in_sample, labels), bins),
        ece_after_temperature=float(np.mean(after_t)),
        nll_before=nll(logits, labels),
        nll_after=float(np.mean(nll_after)),
        fold_temperatures=fold_t,
        n=n,
        bins=bins,
        folds=folds if fold_t else 1,
        repeats=repeats if fold_t else 1,
    )


# --------------------------------------------------------------------------- dev reference
@dataclass(frozen=True)
class DevReference:
    """What the served model answers on dev (with its temperature): the reference the service's
    drift metrics are compared with.

    Attributes:
        label_share: Label -> share of dev texts answered with it (predicted, not true labels:
            live traffic has no labels, so its predicted mix is compared with dev's).
        confidence_mean: Mean top-class probability.
        confidence_quantiles: Quantile ("0.1", ...) -> top-class probability.
        truncated_share: Share of dev texts cut to the model's max length.
        n: Dev texts.
    """

    label_share: dict[str, float]
    confidence_mean: float
    confidence_quantiles: dict[str, float]
    truncated_share: float
    n: int


def dev_reference(
    probs: np.ndarray, labels: list[str], truncated: np.ndarray | None = None
) -> DevReference:
    """The dev reference of one task from its served probabilities [n, C] on dev."""
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    top = probs.max(axis=-1) if n else np.zeros(0)
    counts = np.bincount(probs.argmax(axis=-1), minlength=len(labels)) if n else np.zeros(0)
    return DevReference(
        label_share={lab: float(counts[i] / n) if n else 0.0 for i, lab in enumerate(labels)},
        confidence_mean=float(top.mean()) if n else 0.0,
        confidence_quantiles={
            f"{q:g}": float(np.quantile(top, q)) if n else 0.0 for q in QUANTILES
        },
        truncated_share=float(np.mean(truncated)) if truncated is not None and n else 0.0,
        n=n,
    )


# --------------------------------------------------------------------------- two models
@dataclass(frozen=True)
class EceDifference:
    """Challenger minus champion ECE (points) on the same texts, and its bootstrap spread.

    Attributes:
        champion: Champion's ECE, percent.
        challenger: Challenger's ECE, percent.
        delta: challenger - champion.
        margin: 1.645 x the standard deviation of delta over paired bootstrap resamples of the
            texts: a one-sided 95% noise band.
        n: Texts.
    """

    champion: float
    challenger: float
    delta: float
    margin: float
    n: int


def _bootstrap_ece(
    confidence: np.ndarray, correct: np.ndarray, weights: np.ndarray, bins: int
) -> np.ndarray:
    """ECE (percent) of each resample; `weights` [B, n] counts each text's draws."""
    k = bin_index(confidence, bins)
    onehot = np.zeros((len(k), bins))
    onehot[np.arange(len(k)), k] = 1.0
    conf = weights @ (onehot * confidence[:, None])
    acc = weights @ (onehot * np.asarray(correct, dtype=np.float64)[:, None])
    return 100.0 * np.abs(acc - conf).sum(axis=1) / weights.sum(axis=1)


def ece_difference(
    challenger: Answers,
    champion: Answers,
    bins: int = ECE_BINS,
    resamples: int = 1000,
    seed: int = 0,
) -> EceDifference:
    """Compare two models' ECE on the same texts (paired: each resample draws the same texts
    for both models).

    Args:
        challenger: (top-class confidence [n], correct [n]) of the new model.
        champion: The same for the promoted model, on the same n texts in the same order.
    """
    c_conf, c_ok = (np.asarray(a) for a in challenger)
    p_conf, p_ok = (np.asarray(a) for a in champion)
    n = len(c_conf)
    if len(p_conf) != n:
        raise ValueError(f"challenger has {n} texts, champion {len(p_conf)}: not the same set")
    new = expected_calibration_error(c_conf, c_ok, bins)
    old = expected_calibration_error(p_conf, p_ok, bins)
    margin = 0.0
    if n > 1 and resamples > 1:
        rng = np.random.default_rng(seed)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
        deltas = _bootstrap_ece(c_conf.astype(np.float64), c_ok, weights, bins) - _bootstrap_ece(
            p_conf.astype(np.float64), p_ok, weights, bins
        )
        margin = float(1.645 * deltas.std(ddof=1))
    return EceDifference(champion=old, challenger=new, delta=new - old, margin=margin, n=n)


# --------------------------------------------------------------------------- the artifact
def calibrate_artifact(
    artifact_dir: str | Path,
    metadata: ArtifactMetadata,
    dev: dict[str, tuple[list[str], np.ndarray]],
    seed: int = 0,
) -> ArtifactMetadata:
    """Fit every task's calibration (`fit_task`) on its dev texts, run through the artifact as served
    (`serving.runtime.Runtime`, on CPU), and return `metadata` with each task's calibration and
    dev reference (label mix, confidence, truncation; with the temperature applied).

    Args:
        artifact_dir: A complete artifact directory (its final model.onnx, int8 or not).
        metadata: Its `serving.artifact.ArtifactMetadata`.
        dev: Per task, dev texts and label indices. Tasks without dev texts keep T = 1.

    Returns:
        The updated ArtifactMetadata (not written).
    """
    from serving.artifact import Calibration
    from serving.artifact import DevReference as DevReferenceInfo
    from serving.runtime import Runtime

    runtime = Runtime(artifact_dir, device="cpu")
    tasks = []
    for info in metadata.tasks:
        texts, labels = dev.get(info.name, ([], np.zeros(0, dtype=np.int64)))
        if not len(texts):
            tasks.append(info)
            continue
        out = runtime.run(list(texts), [info.name])
        fit = fit_task(out.logits[info.name], np.asarray(labels), seed=seed)
        ref = dev_reference(
            fit.map.probabilities(out.logits[info.name]), info.labels, out.truncated
        )
        logger.info(
            "calibration %s: %s, T=%.3f, dev ECE %.2f%% -> %.2f%% (cross-fitted, %d folds x %d "
            "splits; temperature alone %.2f%%; in-sample %.2f%%), NLL %.4f -> %.4f",
            info.name,
            fit.method,
            fit.temperature,
            fit.ece_before,
            fit.ece_after,
            fit.folds,
            fit.repeats,
            fit.ece_after_temperature,
            fit.ece_after_in_sample,
            fit.nll_before,
            fit.nll_after,
        )
        knots = fit.map.knots_x, fit.map.knots_y
        calibration = Calibration(
            method=fit.method,
            temperature=fit.temperature,
            knots_x=None if knots[0] is None else [float(v) for v in knots[0]],
            knots_y=None if knots[1] is None else [float(v) for v in knots[1]],
            ece_before=fit.ece_before,
            ece_after=fit.ece_after,
            ece_after_in_sample=fit.ece_after_in_sample,
            ece_after_temperature=fit.ece_after_temperature,
            nll_before=fit.nll_before,
            nll_after=fit.nll_after,
            bins=fit.bins,
            folds=fit.folds,
            repeats=fit.repeats,
            n=fit.n,
        )
        reference = DevReferenceInfo(**vars(ref))
        tasks.append(
            info.model_copy(update={"calibration": calibration, "dev_reference": reference})
        )
    return metadata.model_copy(update={"tasks": tasks})


def format_calibration(metadata: ArtifactMetadata) -> str:
    """Per task: method, temperature, dev ECE before and after (cross-fitted), in a table."""
    lines = [
        f"{'task':<12} {'method':<21} {'T':>7} {'ECE before':>11} {'ECE after':>10}"
        "  (dev, %, 15 bins)"
    ]
    for t in metadata.tasks:
        c = t.calibration
        if c is None:
            lines.append(f"{t.name:<12} {'-':<21} {'-':>7} {'-':>11} {'-':>10}")
            continue
        lines.append(
            f"{t.name:<12} {c.method:<21} {c.temperature:>7.3f} {c.ece_before:>11.2f} "
            f"{c.ece_after:>10.2f}"
        )
    return "\n".join(lines)
