#!/usr/bin/env bash
# The training runs reported in docs/results.md (CPU; about two hours on 2 cores).
# Each writes runs/results/<name>/{metrics.json,curves.png,...}.
#   bash benchmarks/results_runs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
F=.venv/bin/fusetrace
EVIDENCE=(--task evidence --batch 64 --lr 2e-3 --clip 1.0 --option shorten=0.2)
$F train "${EVIDENCE[@]}" --algorithm bptt --iterations 200 --run-dir runs/results/evidence-bptt
$F train "${EVIDENCE[@]}" --algorithm es_d_rtrl --iterations 200 --run-dir runs/results/evidence-es_d_rtrl
$F train "${EVIDENCE[@]}" --algorithm d_rtrl --iterations "${D_RTRL_ITER:-200}" --run-dir runs/results/evidence-d_rtrl-200
$F train --task dms --algorithm es_d_rtrl --iterations "${DMS_ITER:-300}" --batch 32 --lr 2e-3 --clip 1.0 \
  --run-dir runs/results/dms-es_d_rtrl-300
$F train --task dms --algorithm es_d_rtrl --iterations 300 --batch 32 --lr 2e-3 --clip 1.0 --schedule cosine \
  --rate-reg 0.02 --target-rate 10 --run-dir runs/results/dms-es_d_rtrl-cosine-300
$F train --task dms --algorithm bptt --iterations 100 --batch 32 --lr 2e-3 --clip 1.0 --run-dir runs/results/dms-bptt
# Full-length evidence accumulation (2,250 ms trials), then delayed match-to-sample with d_rtrl.
FULL=(--task evidence --batch 64 --lr 2e-3 --clip 1.0 --iterations 200)
$F train "${FULL[@]}" --algorithm bptt --run-dir runs/results/evidence-full-bptt
$F train "${FULL[@]}" --algorithm es_d_rtrl --run-dir runs/results/evidence-full-es_d_rtrl
$F train "${FULL[@]}" --algorithm es_d_rtrl --decay 0.99 --run-dir runs/results/evidence-full-es_d_rtrl-099
$F train "${FULL[@]}" --algorithm es_d_rtrl --decay 0.99 --factorisation averaged \
  --run-dir runs/results/evidence-full-es_d_rtrl-averaged-099
$F train "${FULL[@]}" --algorithm d_rtrl --run-dir runs/results/evidence-full-d_rtrl
$F train --task dms --algorithm d_rtrl --iterations 150 --batch 32 --lr 2e-3 --clip 1.0 --schedule cosine \
  --rate-reg 0.02 --target-rate 10 --run-dir runs/results/dms-d_rtrl-cosine-150
$F train --task dms --algorithm d_rtrl --iterations 100 --batch 32 --lr 2e-3 --clip 1.0 --run-dir runs/results/dms-d_rtrl-100
