#!/usr/bin/env bash
# The training runs reported in docs/results.md (CPU; long). Each writes runs/results/<name>/metrics.json.
#   bash benchmarks/results_runs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
F=.venv/bin/fusetrace
ITER=${ITER:-100}
$F train --task evidence --algorithm bptt --iterations "$ITER" --batch 64 --lr 5e-3 --option shorten=0.2 --run-dir runs/results/evidence-bptt
$F train --task evidence --algorithm d_rtrl --iterations "$ITER" --batch 64 --lr 5e-3 --option shorten=0.2 --run-dir runs/results/evidence-d_rtrl
$F train --task dms --algorithm es_d_rtrl --iterations "${DMS_ITER:-60}" --batch 32 --lr 5e-3 --run-dir runs/results/dms-es_d_rtrl
