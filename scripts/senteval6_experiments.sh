#!/usr/bin/env bash
# polytask: the experiment suites behind docs/results.md ("Experiments"), on the six SentEval
# tasks with the frozen default encoder. Run from the repository root:
#   bash scripts/senteval6_experiments.sh        (about an hour on 2 cores, features cached)
# Each line is one `polytask experiment` command; its report.md, plots and results.json land
# in $OUT/<suite>. Every run of a suite is an ordinary training run of the config.
set -euo pipefail
PT=${PT:-.venv/bin/polytask}
CFG=configs/senteval6.yaml
OUT=${OUT:-runs/experiments/senteval6}
SEEDS=${SEEDS:-3}

run() { local name=$1; shift; $PT experiment $CFG --seeds "$SEEDS" --output "$OUT/$name" "$@"; }

run transfer --suite transfer
# The same without cross-task sentence overlap (MR, SUBJ, SST-2 share Rotten Tomatoes snippets).
run transfer-decontaminated --suite transfer --set decontaminate=true
run capacity --suite capacity
# MPQA: large, and none of its dev sentences are in another task's training data.
run noise --suite noise --noise-task mpqa --noise-fractions 0.2,0.5
run affinity --suite affinity
