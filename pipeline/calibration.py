"""Calibrated probabilities: temperature scaling per task, expected calibration error, and the
dev reference the service's drift metrics are compared with. numpy only.

    dev logits z [n, C], labels y [n]
      -> T = argmin_T NLL(softmax(z / T), y)       one scalar per task head (Guo et al. 2017),
                                                   a bounded 1-D search on log T
      -> ECE before (T = 1) and after; "after" is cross-fitted: dev is split in `folds` parts,
         each part scored with the T fitted on the others, so no text is scored by a
         temperature fitted on it; the artifact keeps the T fitted on all of dev.

ECE (percent): texts are put into 15 equal-width bins over the top-class confidence,
(0, 1/15], (1/15, 2/15], ..., (14/15, 1]; ECE = sum over bins of (bin size / n) x |accuracy of
the bin - mean confidence of the bin|.

Dividing logits by T > 0 never changes a text's most probable label, so accuracy is unchanged;
only the probabilities move. Serving applies T (`serving.runtime`, from metadata.json); this
module fits it and measures it, and the promotion gate compares two models' ECE with
`ece_difference`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from serving.artifact import ArtifactMetadata

logger = logging.getLogger(__name__)

ECE_BINS = 15
FOLDS = 2
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
@dataclass(frozen=True)
class TemperatureFit:
    """One task's temperature and its calibration on dev (ECE and NLL; ECE in percent).

    Attributes:
        temperature: Fitted on all of dev: what the artifact carries.
        ece_before: ECE with T = 1.
        ece_after: Cross-fitted ECE: each fold scored with the T fitted on the other folds.
        ece_after_in_sample: ECE with `temperature` on all of dev (optimistic: fitted there).
        nll_before: Mean NLL with T = 1.
        nll_after: Cross-fitted mean NLL.
        fold_temperatures: The T fitted for each fold (on the other folds).
        n: Dev texts.
        bins: ECE bins.
        folds: Cross-fitting folds.
    """

    temperature: float
    ece_before: float
    ece_after: float
    ece_after_in_sample: float
    nll_before: float
    nll_after: float
    fold_temperatures: list[float] = field(default_factory=list)
    n: int = 0
    bins: int = ECE_BINS
    folds: int = FOLDS


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
) -> TemperatureFit:
    """Fit one task's temperature on dev and measure ECE before and (cross-fitted) after.

    With fewer than 2 texts per fold there is nothing to cross-fit: "after" is then in-sample.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    temperature = fit_temperature(logits, labels)
    out_of_fold = np.zeros_like(logits)
    fold_t: list[float] = []
    if n >= 2 * folds:
        ids = fold_ids(n, folds, seed)
        for k in range(folds):
            held = ids == k
            t = fit_temperature(logits[~held], labels[~held])
            fold_t.append(t)
            out_of_fold[held] = logits[held] / t
    else:
        out_of_fold = logits / temperature
    return TemperatureFit(
        temperature=temperature,
        ece_before=ece_of_logits(logits, labels, 1.0, bins),
        ece_after=ece_of_logits(out_of_fold, labels, 1.0, bins),
        ece_after_in_sample=ece_of_logits(logits, labels, temperature, bins),
        nll_before=nll(logits, labels),
        nll_after=nll(out_of_fold, labels),
        fold_temperatures=fold_t,
        n=n,
        bins=bins,
        folds=folds if fold_t else 1,
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
    """Fit every task's temperature on its dev texts, run through the artifact as served
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
            probabilities(out.logits[info.name], fit.temperature), info.labels, out.truncated
        )
        logger.info(
            "calibration %s: T=%.3f, dev ECE %.2f%% -> %.2f%% (cross-fitted, %d folds; "
            "in-sample %.2f%%), NLL %.4f -> %.4f",
            info.name,
            fit.temperature,
            fit.ece_before,
            fit.ece_after,
            fit.folds,
            fit.ece_after_in_sample,
            fit.nll_before,
            fit.nll_after,
        )
        calibration = Calibration(
            temperature=fit.temperature,
            ece_before=fit.ece_before,
            ece_after=fit.ece_after,
            ece_after_in_sample=fit.ece_after_in_sample,
            nll_before=fit.nll_before,
            nll_after=fit.nll_after,
            bins=fit.bins,
            folds=fit.folds,
            n=fit.n,
        )
        reference = DevReferenceInfo(**vars(ref))
        tasks.append(
            info.model_copy(update={"calibration": calibration, "dev_reference": reference})
        )
    return metadata.model_copy(update={"tasks": tasks})


def format_calibration(metadata: ArtifactMetadata) -> str:
    """Per task: temperature, dev ECE before and after (cross-fitted), in a table."""
    lines = [f"{'task':<12} {'T':>7} {'ECE before':>11} {'ECE after':>10}  (dev, %, 15 bins)"]
    for t in metadata.tasks:
        c = t.calibration
        if c is None:
            lines.append(f"{t.name:<12} {'-':>7} {'-':>11} {'-':>10}")
            continue
        lines.append(
            f"{t.name:<12} {c.temperature:>7.3f} {c.ece_before:>11.2f} {c.ece_after:>10.2f}"
        )
    return "\n".join(lines)
