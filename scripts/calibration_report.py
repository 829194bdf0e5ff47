"""Per-task calibration of a run's exported artifact on its dev data, as `polytask export` fits
it (pipeline/calibration.py), without exporting again; behind docs/results.md's "Calibration".

    python scripts/calibration_report.py runs/latest [--artifact DIR] [--output /tmp/calibrated]

Copies RUN/artifact (or --artifact, e.g. one `polytask export RUN --output DIR` wrote) to
--output (default a temporary directory; the run is not changed), fits each task's calibration
on dev through serving.runtime and prints, per task: the method chosen, T, dev ECE before,
after (2-fold cross-fitted, the method choice inside each fold, mean over 10 random splits),
the temperature alone cross-fitted on the same splits, and after in-sample (percent, 15
equal-width bins), the NLL before and after, and the ECE a perfectly calibrated model would
still show on that many texts (labels drawn from its own calibrated confidences, mean of 200
draws): the sampling floor.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.calibration import calibrate_artifact, confidences, expected_calibration_error
from pipeline.data import load_tasks
from pipeline.runs import read_record
from serving.artifact import ArtifactMetadata
from serving.runtime import Runtime


def sampling_floor(confidence: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """Mean ECE (percent) of a perfectly calibrated model with these confidences."""
    rng = np.random.default_rng(seed)
    return float(
        np.mean(
            [
                expected_calibration_error(confidence, rng.random(len(confidence)) < confidence)
                for _ in range(draws)
            ]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--artifact", type=Path, help="default RUN/artifact")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    out = args.output or Path(tempfile.mkdtemp(prefix="calibrated-")) / "artifact"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(args.artifact or args.run / "artifact", out)
    record = read_record(args.run)
    data = load_tasks(record.run_config(), splits=["dev"], labels=record.labels)
    dev = {t.name: (t.splits["dev"].texts, t.splits["dev"].labels) for t in data}
    start = time.monotonic()
    meta = calibrate_artifact(out, ArtifactMetadata.read(out), dev)
    meta.write(out)
    runtime = Runtime(out, device="cpu")
    print(f"run {record.run_name}, artifact copy {out} ({time.monotonic() - start:.0f}s)")
    print(
        f"{'task':<6} {'n':>5} {'method':<21} {'T':>6} {'ECE before':>10} {'after (CV)':>10} "
        f"{'T only':>6} {'in-sample':>9} {'floor':>6} {'NLL before':>10} {'after':>7}  target"
    )
    for info in meta.tasks:
        c = info.calibration
        texts, labels = dev[info.name]
        served = runtime.run(texts, [info.name]).probabilities[info.name]
        conf, _ = confidences(served, labels)
        met = c.ece_after <= c.ece_before / 2 or c.ece_after < 2.0
        print(
            f"{info.name:<6} {c.n:>5} {c.method:<21} {c.temperature:>6.3f} {c.ece_before:>10.2f} "
            f"{c.ece_after:>10.2f} {c.ece_after_temperature:>6.2f} {c.ece_after_in_sample:>9.2f} "
            f"{sampling_floor(conf):>6.2f} {c.nll_before:>10.4f} {c.nll_after:>7.4f}  "
            f"{'met' if met else 'not met'}"
        )


if __name__ == "__main__":
    main()
