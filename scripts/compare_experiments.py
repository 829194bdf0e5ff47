"""Compare two runs of the same experiment suite: is every mean reproduced within its spread?

    python scripts/compare_experiments.py SUITE_DIR_A SUITE_DIR_B

Reads both `results.json` files, matches every run by name, and prints the largest absolute
difference of any run's per-task dev accuracy, then for the transfer suite each variant's mean
accuracy per task in A and B against the seed standard deviation A reports. Exit status 1 when
a mean moved by more than its standard deviation (or when the runs differ).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(a: Path, b: Path) -> int:
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    if ra["meta"]["suite"] != rb["meta"]["suite"] or set(ra["runs"]) != set(rb["runs"]):
        print("the two directories hold different suites or different runs")
        return 1
    worst = max(
        abs(x - rb["runs"][name]["dev"][task])
        for name, run in ra["runs"].items()
        if run["status"] == "ok" and rb["runs"][name]["status"] == "ok"
        for task, x in run["dev"].items()
    )
    print(f"{len(ra['runs'])} runs matched; largest per-run dev accuracy difference: {worst:.4f}")
    if ra["meta"]["suite"] != "transfer":
        return 0
    moved = 0
    acc_a, acc_b = ra["analysis"]["accuracy"], rb["analysis"]["accuracy"]
    print(f"{'variant':<8} {'task':<6} {'mean A':>8} {'mean B':>8} {'|diff|':>7} {'std A':>6}")
    for variant, row in acc_a.items():
        for task, sa in row.items():
            sb = acc_b[variant][task]
            diff = abs(sa["mean"] - sb["mean"])
            flag = "" if diff <= sa["std"] else "  MOVED"
            moved += bool(flag)
            print(
                f"{variant:<8} {task:<6} {sa['mean']:>8.2f} {sb['mean']:>8.2f} {diff:>7.2f} "
                f"{sa['std']:>6.2f}{flag}"
            )
    print(f"{moved} means moved by more than their seed standard deviation")
    return 1 if moved else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
