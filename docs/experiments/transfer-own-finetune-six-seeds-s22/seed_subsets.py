"""Issue 13's routing targets over subsets of a transfer suite's seeds (session 22).

    python docs/experiments/transfer-own-finetune-six-seeds-s22/seed_subsets.py SUITE_DIR

Prints, per task, routed + own paths minus the single-task model (dev, mean over the seeds,
paired by seed, ± the standard error of that mean) for seeds 0-2, seeds 3-5 and all six,
and each subset's targets as the suite report states them (pipeline/experiments/transfer.py).
"""

import json
import math
import sys
from pathlib import Path

from pipeline.experiments import transfer as tr

TASKS = ["mr", "cr", "subj", "mpqa", "sst2", "trec"]
SUBSETS = {"seeds 0-2": [0, 1, 2], "seeds 3-5": [3, 4, 5], "seeds 0-5": [0, 1, 2, 3, 4, 5]}


def analysis(results: dict, seeds: list[int]) -> dict:
    one = {(t, s): results.get(f"single-{t}-s{s}") for t in TASKS for s in seeds}
    return tr.routing_analysis(
        TASKS,
        seeds,
        {k: tr.accuracy(r, k[0]) for k, r in one.items()},
        [results.get(f"own-s{s}") for s in seeds],
        {k: tr.selection_crossfit(r, k[0]) for k, r in one.items()},
    )


def main(suite: Path) -> None:
    results = {p.stem: json.loads(p.read_text()) for p in (suite / "results").glob("*.json")}
    out = {name: analysis(results, seeds) for name, seeds in SUBSETS.items()}
    print("| routed + own − single-task, dev | " + " | ".join(t.upper() for t in TASKS) + " |")
    print("|---" * (len(TASKS) + 1) + "|")
    for name, a in out.items():
        cells = []
        for t in TASKS:
            p = a["tasks"][t]["routed_minus_single_paired"]
            cells.append(f"{p['mean']:+.2f} ± {p['std'] / math.sqrt(p['n']):.2f}")
        done = len(a["seeds"])  # seeds whose routed + own run finished
        label = name if done == len(SUBSETS[name]) else f"{name} ({done} finished)"
        print(f"| {label} | " + " | ".join(cells) + " |")
    for name, a in out.items():
        print(f"\n{name}:")
        lines = tr.routing_section(a, TASKS, "routed + own paths")
        print("\n".join(line for line in lines if line.startswith("- ")))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
