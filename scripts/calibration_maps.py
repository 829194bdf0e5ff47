"""Which calibration map would meet issue 13's target? Cross-fitted dev ECE per task of the
map export fits (one temperature) and of richer ones, on an exported artifact; a diagnostic
behind docs/results.md's "Calibration", nothing here is used by export.

    python scripts/calibration_maps.py ARTIFACT_DIR [--run RUN]

Dev texts are those of the run the artifact came from (--run, default the artifact's run
under runs/). Every map is fitted on one half of dev and scored on the other, both ways
(pipeline.calibration.fold_ids, as export's "after" figure), ECE over 15 equal-width bins:

- temperature: logits / T (what export ships; never changes a prediction);
- temperature + bias: logits / T + b (a bias per class but the first);
- vector scaling: logits * w + b (a scale and a bias per class);
- top-label isotonic: temperature, then an isotonic map from the top label's probability to
  its accuracy, the other labels rescaled to fill the rest (Gupta & Ramdas's top-label
  calibration), clipped so that the argmax never changes.

The first three are fitted by NLL. Prints per task: ECE before, the target (half of before,
or 2%), each map's cross-fitted ECE, and the share of dev answers whose label the map kept.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from sklearn.isotonic import IsotonicRegression

from pipeline.calibration import (
    confidences,
    expected_calibration_error,
    fit_temperature,
    fold_ids,
    log_softmax,
    probabilities,
)
from pipeline.data import load_tasks
from pipeline.runs import read_record
from serving.artifact import ArtifactMetadata
from serving.runtime import Runtime

# fit(train logits, train labels) -> apply(logits) -> probabilities
Fit = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]


def nll_fit(form: Callable[[np.ndarray, np.ndarray], np.ndarray], x0: np.ndarray) -> Fit:
    """A map `form(params, logits) -> logits` fitted by the mean NLL (L-BFGS)."""

    def fit(z: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        def loss(p: np.ndarray) -> float:
            return -float(log_softmax(form(p, z))[np.arange(len(y)), y].mean())

        p = minimize(loss, x0(z.shape[1]), method="L-BFGS-B").x
        return lambda zz: probabilities(form(p, zz))

    return fit


def temperature(z: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    t = fit_temperature(z, y)
    return lambda zz: probabilities(zz, t)


def _temp_bias(p: np.ndarray, z: np.ndarray) -> np.ndarray:
    return z / np.exp(p[0]) + np.r_[0.0, p[1:]]


def _vector(p: np.ndarray, z: np.ndarray) -> np.ndarray:
    c = z.shape[1]
    return z * p[:c] + p[c:]


def keep_argmax_top(probs: np.ndarray, top: np.ndarray) -> np.ndarray:
    """`probs` with each row's top probability replaced by `top` and the others rescaled to sum
    to 1 - top; `top` is first raised where needed so that the runner-up stays below it
    (runner-up p2 * (1 - top) / (1 - c) < top  <=>  top > p2 / (1 - c + p2))."""
    c = probs.max(axis=1)
    k = probs.argmax(axis=1)
    p2 = np.sort(probs, axis=1)[:, -2]
    bound = p2 / np.maximum(1 - c + p2, 1e-12)  # at the bound the runner-up ties: step over
    top = np.clip(np.maximum(top, bound + 1e-6), 0.0, 1.0)
    out = probs * ((1 - top) / np.maximum(1 - c, 1e-12))[:, None]
    out[np.arange(len(k)), k] = top
    return out / out.sum(axis=1, keepdims=True)


def top_label_isotonic(z: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    t = fit_temperature(z, y)
    p = probabilities(z, t)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
    iso.fit(p.max(axis=1), (p.argmax(axis=1) == y).astype(float))

    def apply(zz: np.ndarray) -> np.ndarray:
        q = probabilities(zz, t)
        return keep_argmax_top(q, iso.predict(q.max(axis=1)))

    return apply


MAPS: dict[str, Fit] = {
    "temperature (shipped)": temperature,
    "temperature + bias": nll_fit(_temp_bias, lambda c: np.zeros(c)),
    "vector scaling": nll_fit(_vector, lambda c: np.r_[np.full(c, 0.5), np.zeros(c)]),
    "top-label isotonic": top_label_isotonic,
}


def cross_fitted(fit: Fit, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Probabilities of every dev item from the map fitted on the other half."""
    folds = fold_ids(len(y))
    out = np.zeros_like(z, dtype=np.float64)
    for k in np.unique(folds):
        test = folds == k
        out[test] = fit(z[~test], y[~test])(z[test])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--run", type=Path, help="the artifact's run (default runs/<run_id>)")
    args = parser.parse_args()
    meta = ArtifactMetadata.read(args.artifact)
    run = args.run or Path("runs") / meta.run_id
    record = read_record(run)
    data = load_tasks(record.run_config(), splits=["dev"], labels=record.labels)
    runtime = Runtime(args.artifact)
    names = list(MAPS)
    print(f"{args.artifact} (run {record.run_name}); cross-fitted dev ECE, percent")
    print("| task | dev texts | before | target | " + " | ".join(names) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(names))
    for task in data:
        texts, labels = task.splits["dev"].texts, np.asarray(task.splits["dev"].labels)
        z = runtime.run(list(texts), [task.name]).logits[task.name].astype(np.float64)
        before = expected_calibration_error(*confidences(probabilities(z), labels))
        target = max(before / 2, 2.0)
        cells = []
        for name in names:
            p = cross_fitted(MAPS[name], z, labels)
            ece = expected_calibration_error(*confidences(p, labels))
            kept = float((p.argmax(axis=1) == z.argmax(axis=1)).mean())
            mark = " ✓" if ece <= target else ""
            cells.append(f"{ece:.2f}{mark}" + ("" if kept == 1.0 else f" ({100 * kept:.1f}% kept)"))
        print(
            f"| {task.name} | {len(labels):,} | {before:.2f} | {target:.2f} | "
            + " | ".join(cells)
            + " |"
        )


if __name__ == "__main__":
    main()
