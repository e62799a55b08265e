#!/usr/bin/env bash
# The learning benchmark of issue 16 (docs/results.md, "es_d_rtrl's factorisations, learning"): es_d_rtrl's
# factorisations against d_rtrl, BPTT and braintrace's pp_prop on the same network, initial weights and
# batches, held out (validation every k iterations, test on unseen batches), three seeds each.
#   bash benchmarks/learning_runs.sh                 # the full sizes (hours on a 2-core CPU)
#   ITER=20 SEEDS=0 bash benchmarks/learning_runs.sh # a quick pass
# Each run writes runs/learning/<task>-<name>-s<seed>/metrics.json; `python benchmarks/learning.py figure`
# draws the curves and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
F=(${PY} -m fusetrace.cli)
SEEDS=${SEEDS:-"0 1 2"}
DMS_ITER=${ITER:-300}
EVIDENCE_ITER=${ITER:-600}
DMS=(--task dms --batch 32 --lr 2e-3 --clip 1.0 --schedule cosine
  --validate-every 10 --validation-batches 8 --test-batches 32 --iterations "${DMS_ITER}")
GIF=("${DMS[@]}" --network benchmarks.peer_networks:gif_dms_network)
EVIDENCE_RECIPE=(--task evidence --batch 64 --lr 2e-3 --clip 1.0 --schedule cosine
  --validate-every 10 --validation-batches 4 --test-batches 16 --iterations "${EVIDENCE_ITER}")
# e-prop's LIF/ALIF network, the task's reference network until issue 16 moved it to the GIF design, whose
# runs name it as they were made (the same draws as `fusetrace train --task evidence` today)
EVIDENCE=("${EVIDENCE_RECIPE[@]}" --network fusetrace.tasks:ei_evidence_network)
EVIDENCE_GIF=("${EVIDENCE_RECIPE[@]}" --network benchmarks.peer_networks:gif_evidence_network)
run() {  # task-args name seed fusetrace-args...
  local -n args=$1; local name=$2 seed=$3; shift 3
  local dir="runs/learning/${args[1]}-${name}-s${seed}"
  [ -f "${dir}/metrics.json" ] || "${F[@]}" train "${args[@]}" --seed "${seed}" "$@" --run-dir "${dir}"
}
for seed in ${SEEDS}; do
  for task in DMS EVIDENCE; do
    run $task bptt "$seed" --algorithm bptt
    run $task es_d_rtrl "$seed" --algorithm es_d_rtrl
    [ $task = DMS ] && run $task es_d_rtrl0.99 "$seed" --algorithm es_d_rtrl --decay 0.99  # pp_prop's decay there
    run $task es_d_rtrl-low_rank8 "$seed" --algorithm es_d_rtrl --factorisation low_rank --rank 8
    run $task es_d_rtrl-low_rank2 "$seed" --algorithm es_d_rtrl --factorisation low_rank --rank 2
    [ $task = EVIDENCE ] && run $task es_d_rtrl-low_rank4-balanced "$seed" --algorithm es_d_rtrl \
      --factorisation low_rank --rank 4 --rank-metric balanced  # the truncation's norm (docs/concepts.md)
    [ $task = EVIDENCE ] && run $task es_d_rtrl-low_rank4-spike "$seed" --algorithm es_d_rtrl \
      --factorisation low_rank --rank 4 --rank-metric spike
    [ $task = EVIDENCE ] && run $task es_d_rtrl-low_rank4-spike-depth1 "$seed" --algorithm es_d_rtrl \
      --factorisation low_rank --rank 4 --rank-metric spike --credit-depth 1
    [ $task = EVIDENCE ] && run $task es_d_rtrl-low_rank4-balanced-depth1 "$seed" --algorithm es_d_rtrl \
      --factorisation low_rank --rank 4 --rank-metric balanced --credit-depth 1  # the control of the one above
    run $task es_d_rtrl-matched "$seed" --algorithm es_d_rtrl --factorisation matched
    run $task d_rtrl "$seed" --algorithm d_rtrl
  done
  # the peer's own DMS network (GIF neurons, a readout of standardize(V - V_th)); braintrace cannot compile it
  run GIF gif-bptt "$seed" --algorithm bptt
  run GIF gif-es_d_rtrl0.99 "$seed" --algorithm es_d_rtrl --decay 0.99
  run GIF gif-es_d_rtrl-low_rank2 "$seed" --algorithm es_d_rtrl --factorisation low_rank --rank 2
  run GIF gif-es_d_rtrl-low_rank1 "$seed" --algorithm es_d_rtrl --factorisation low_rank --rank 1
  run GIF gif-d_rtrl "$seed" --algorithm d_rtrl
  # the same design sized for evidence accumulation (an exploration of issue 16, not the reference network)
  run EVIDENCE_GIF gif-bptt "$seed" --algorithm bptt
  run EVIDENCE_GIF gif-es_d_rtrl "$seed" --algorithm es_d_rtrl
  run EVIDENCE_GIF gif-es_d_rtrl-low_rank4 "$seed" --algorithm es_d_rtrl --factorisation low_rank --rank 4
  run EVIDENCE_GIF gif-es_d_rtrl-low_rank2 "$seed" --algorithm es_d_rtrl --factorisation low_rank --rank 2
  run EVIDENCE_GIF gif-es_d_rtrl-low_rank3 "$seed" --algorithm es_d_rtrl --factorisation low_rank --rank 3
  run EVIDENCE_GIF gif-d_rtrl "$seed" --algorithm d_rtrl  # issue 16's item 4 (about 1.2 h per seed here)
  # braintrace's pp_prop on the same GIF networks, written with Gif's two moving states (TwoStateGif: braintrace
  # refuses brainpy.state's Gif; tests/test_peer_networks.py shows the two are one network)
  $PY benchmarks/learning.py peer --task dms --network benchmarks.peer_networks:two_state_gif_dms_network \
    --seed "$seed" --iterations "${DMS_ITER}" --batch 32 --lr 2e-3 --schedule cosine --clip 1.0 --decay 0.99 \
    --validate-every 10 --validation-batches 8 --test-batches 32 --run-dir "runs/learning/dms-gif-pp_prop-s${seed}"
  $PY benchmarks/learning.py peer --task evidence --network benchmarks.peer_networks:two_state_gif_evidence_network \
    --seed "$seed" --iterations "${EVIDENCE_ITER}" --batch 64 --lr 2e-3 --schedule cosine --clip 1.0 --decay 0.9 \
    --validate-every 10 --validation-batches 4 --test-batches 16 --run-dir "runs/learning/evidence-gif-pp_prop-s${seed}"
  $PY benchmarks/learning.py peer --task dms --seed "$seed" --iterations "${DMS_ITER}" --batch 32 --lr 2e-3 \
    --schedule cosine --clip 1.0 --decay 0.99 --validate-every 10 --validation-batches 8 --test-batches 32 \
    --run-dir "runs/learning/dms-pp_prop-s${seed}"
  $PY benchmarks/learning.py peer --task evidence --network fusetrace.tasks:ei_evidence_network --seed "$seed" \
    --iterations "${EVIDENCE_ITER}" --batch 64 \
    --lr 2e-3 --schedule cosine --clip 1.0 --decay 0.9 --validate-every 10 --validation-batches 4 \
    --test-batches 16 --run-dir "runs/learning/evidence-pp_prop-s${seed}"
done
