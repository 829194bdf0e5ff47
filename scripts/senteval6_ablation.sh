#!/usr/bin/env bash
# polytask: the per-task dev table of docs/results.md (single-task models, plain MTL, and what
# each method adds), on the frozen default encoder. Run from the repository root:
#   bash scripts/senteval6_ablation.sh            (about 30 minutes on 2 cores, features cached)
# Each run is a plain `polytask train` of configs/senteval6.yaml with --set overrides; the
# table is printed by scripts/results_table.py from the runs' run.json records.
set -euo pipefail
PT=${PT:-.venv/bin/polytask}
CFG=configs/senteval6.yaml
STAMP=${STAMP:-$(date +%Y%m%d-%H%M%S)}
OFF_AUX="--set aux.enabled=false"
OFF_ALIGN="--set alignment.enabled=false"

for task in mr cr subj mpqa sst2 trec; do
  $PT train $CFG --tasks $task $OFF_AUX $OFF_ALIGN --run-name "abl-$STAMP-single-$task"
done
$PT train $CFG $OFF_AUX $OFF_ALIGN --run-name "abl-$STAMP-mtl"
$PT train $CFG $OFF_AUX --run-name "abl-$STAMP-align"
$PT train $CFG $OFF_AUX $OFF_ALIGN --set weighting.method=svd --run-name "abl-$STAMP-svd"
$PT train $CFG $OFF_ALIGN --run-name "abl-$STAMP-aux"
$PT train $CFG --set weighting.method=svd --run-name "abl-$STAMP-all"
$PT train $CFG --run-name "abl-$STAMP-default"

# The same without cross-task sentence overlap (MR, SUBJ and SST-2 share Rotten Tomatoes
# snippets; see docs/results.md): training rows equal to another task's dev rows are dropped.
# Single-task runs are unaffected (one task has no other task's dev rows to drop).
$PT train $CFG $OFF_AUX $OFF_ALIGN --set decontaminate=true --run-name "abl-$STAMP-decon-mtl"
$PT train $CFG --set decontaminate=true --run-name "abl-$STAMP-decon-default"
.venv/bin/python scripts/results_table.py runs "abl-$STAMP"
