#!/usr/bin/env bash
# The training runs reported in docs/results.md (CPU; about 75 minutes on 2 cores).
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
