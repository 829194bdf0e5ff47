"""Print the per-task dev table of an ablation (scripts/senteval6_ablation.sh) as markdown.

Usage: python scripts/results_table.py RUNS_DIR PREFIX
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [
    ("single-task models", "single-"),
    ("plain MTL", "mtl"),
    ("+ alignment (Alg. 1)", "align"),
    ("+ SVD weighting (Alg. 2)", "svd"),
    ("+ self-auxiliary towers", "aux"),
    ("everything (aux + alignment + SVD)", "all"),
    ("shipped default (aux + alignment)", "default"),
    ("plain MTL, decontaminated", "decon-mtl"),
    ("shipped default, decontaminated", "decon-default"),
]


def main(runs: Path, prefix: str) -> None:
    records = {
        p.parent.name[len(prefix) + 1 :]: json.loads(p.read_text())
        for p in runs.glob(f"{prefix}-*/run.json")
    }
    tasks = ["mr", "cr", "subj", "mpqa", "sst2", "trec"]
    print("| model | " + " | ".join(t.upper() for t in tasks) + " | avg |")
    print("|---" * (len(tasks) + 2) + "|")
    for label, key in ROWS:
        if key == "single-":
            accs = {}
            for t in tasks:
                rec = records.get(f"single-{t}")
                if rec:
                    accs[t] = rec["dev"][t]["accuracy"]
        else:
            rec = records.get(key)
            accs = {t: rec["dev"][t]["accuracy"] for t in tasks} if rec else {}
        if not accs:
            continue
        cells = [f"{accs[t]:.1f}" if t in accs else "-" for t in tasks]
        avg = sum(accs.values()) / len(accs) if len(accs) == len(tasks) else float("nan")
        print(f"| {label} | " + " | ".join(cells) + f" | {avg:.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
