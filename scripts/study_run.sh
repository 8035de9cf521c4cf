#!/bin/bash
# The whole study (issue 15; docs/study/README.md), from the repo root, resumable: after a kill, run it again and
# every finished job is skipped and a killed one resumes from its last checkpoint. ~10 CPU hours on a 2-core Xeon.
#   nohup scripts/study_run.sh > study/run.log 2>&1 &
set -euo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p study
# part 1: the learning rates, on math's validation slice (seed 1; the picked lrs' jobs are the math grid's seed-1 jobs).
# The pick (e.g. study.lr.dpo=0.0001 ...; exit 2 if a method has no coherent lr) is kept in study/lr_picked.txt and the
# other lrs' jobs go to study/lr_selection: a rerun of this script reads the file instead of selecting again.
if [ ! -f study/lr_picked.txt ]; then
  $PY -m reprpo_pl.train -m experiment=study_math seed=1 method.lr=3e-5,1e-4,3e-4
  $PY scripts/study_pick_lr.py study/math --set-aside study/lr_selection > study/lr_picked.tmp
  mv study/lr_picked.tmp study/lr_picked.txt
fi
LR=$(cat study/lr_picked.txt)
echo "picked: $LR"
$PY scripts/study_sync.py study
# part 2: the grids, seeds 1-3 per method, source by source;
# part 3: the difficulty pair's target-tuned reference (trained on math_hard, seed 1) for the differential elicitation
for source in math unhelpful_alpaca math_easy math_hard; do
  $PY -m reprpo_pl.train -m experiment=study_$source $LR
  $PY scripts/study_sync.py study
done
