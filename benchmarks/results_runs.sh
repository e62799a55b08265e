#!/usr/bin/env bash
# The training runs reported in docs/results.md (CPU; about three hours on 2 cores).
# Each writes runs/results/<name>/{metrics.json,curves.png,...}.
#   bash benchmarks/results_runs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
F=.venv/bin/fusetrace
EVIDENCE=(--task evidence --network fusetrace.tasks:ei_evidence_network --batch 64 --lr 2e-3 --clip 1.0 --option shorten=0.2)
$F train "${EVIDENCE[@]}" --algorithm bptt --iterations 200 --run-dir runs/results/evidence-bptt
$F train "${EVIDENCE[@]}" --algorithm es_d_rtrl --iterations 200 --run-dir runs/results/evidence-es_d_rtrl
$F train "${EVIDENCE[@]}" --algorithm d_rtrl --iterations "${D_RTRL_ITER:-200}" --run-dir runs/results/evidence-d_rtrl-200
$F train --task dms --algorithm es_d_rtrl --iterations "${DMS_ITER:-300}" --batch 32 --lr 2e-3 --clip 1.0 \
  --run-dir runs/results/dms-es_d_rtrl-300
$F train --task dms --algorithm es_d_rtrl --iterations 300 --batch 32 --lr 2e-3 --clip 1.0 --schedule cosine \
  --rate-reg 0.02 --target-rate 10 --run-dir runs/results/dms-es_d_rtrl-cosine-300
$F train --task dms --algorithm bptt --iterations 100 --batch 32 --lr 2e-3 --clip 1.0 --run-dir runs/results/dms-bptt
# Full-length evidence accumulation (2,250 ms trials), then delayed match-to-sample with d_rtrl.
FULL=(--task evidence --network fusetrace.tasks:ei_evidence_network --batch 64 --lr 2e-3 --clip 1.0 --iterations 200)
$F train "${FULL[@]}" --algorithm bptt --run-dir runs/results/evidence-full-bptt
$F train "${FULL[@]}" --algorithm es_d_rtrl --run-dir runs/results/evidence-full-es_d_rtrl
$F train "${FULL[@]}" --algorithm es_d_rtrl --decay 0.99 --run-dir runs/results/evidence-full-es_d_rtrl-099
$F train "${FULL[@]}" --algorithm es_d_rtrl --decay 0.99 --factorisation averaged \
  --run-dir runs/results/evidence-full-es_d_rtrl-averaged-099
$F train "${FULL[@]}" --algorithm d_rtrl --run-dir runs/results/evidence-full-d_rtrl
$F train --task dms --algorithm d_rtrl --iterations 150 --batch 32 --lr 2e-3 --clip 1.0 --schedule cosine \
  --rate-reg 0.02 --target-rate 10 --run-dir runs/results/dms-d_rtrl-cosine-150
$F train --task dms --algorithm d_rtrl --iterations 100 --batch 32 --lr 2e-3 --clip 1.0 --run-dir runs/results/dms-d_rtrl-100
# Delayed match-to-sample with held-out validation (every 5 iterations, 8 batches; the best weights are
# kept) and a final test of the final and best weights on 32 unseen batches. "truncated" is BPTT on the
# network with its recurrent spikes detached: exactly d_rtrl's gradient, at BPTT's speed.
HELD_OUT=(--validate-every 5 --validation-batches 8 --test-batches 32)
DMS=(--task dms --batch 32 --clip 1.0 "${HELD_OUT[@]}")
TRUNCATED=(--algorithm bptt --network benchmarks.truncation:stopped_dms_network)
BEST=(--iterations 300 --lr 2e-3 --schedule cosine --rate-reg 0.02 --target-rate 10)
$F train "${DMS[@]}" --algorithm bptt --iterations 100 --lr 2e-3 --run-dir runs/results/dms-bptt-validated-100
$F train "${DMS[@]}" "${TRUNCATED[@]}" --iterations 100 --lr 2e-3 --run-dir runs/results/dms-truncated-bptt-100
$F train "${DMS[@]}" "${TRUNCATED[@]}" "${BEST[@]}" --run-dir runs/results/dms-truncated-cosine-300
$F train "${DMS[@]}" "${TRUNCATED[@]}" --iterations 300 --lr 1e-3 --schedule cosine \
  --run-dir runs/results/dms-truncated-lr1e-3-300
$F train "${DMS[@]}" --algorithm d_rtrl "${BEST[@]}" --run-dir runs/results/dms-d_rtrl-validated-cosine-300
$F train "${DMS[@]}" --algorithm es_d_rtrl "${BEST[@]}" --run-dir runs/results/dms-es_d_rtrl-validated-cosine-300
$F train --task dms --algorithm es_d_rtrl --iterations 300 --batch 64 --lr 2e-3 --clip 1.0 --schedule cosine \
  --rate-reg 0.02 --target-rate 10 "${HELD_OUT[@]}" --test-batches 16 --run-dir runs/results/dms-es_d_rtrl-validated-b64-300
for seed in 1 2; do
  $F train "${DMS[@]}" "${TRUNCATED[@]}" "${BEST[@]}" --seed $seed --run-dir runs/results/dms-truncated-cosine-300-seed$seed
done
# Full-length evidence accumulation with held-out validation (every 10 iterations, 4 batches) and test.
EVIDENCE_HELD_OUT=(--task evidence --network fusetrace.tasks:ei_evidence_network --batch 64 --lr 2e-3 --clip 1.0 --validate-every 10 --validation-batches 4 \
  --test-batches 16)
COSINE=(--iterations 300 --schedule cosine)
$F train "${EVIDENCE_HELD_OUT[@]}" --iterations 200 --algorithm bptt --run-dir runs/results/evidence-full-bptt-validated
$F train "${EVIDENCE_HELD_OUT[@]}" --iterations 200 --algorithm d_rtrl --run-dir runs/results/evidence-full-d_rtrl-validated
$F train "${EVIDENCE_HELD_OUT[@]}" "${COSINE[@]}" --algorithm d_rtrl \
  --run-dir runs/results/evidence-full-d_rtrl-validated-cosine-300
$F train "${EVIDENCE_HELD_OUT[@]}" "${COSINE[@]}" --algorithm d_rtrl --rate-reg 0.02 --target-rate 10 \
  --run-dir runs/results/evidence-full-d_rtrl-validated-cosine-reg-300
$F train "${EVIDENCE_HELD_OUT[@]}" --iterations 200 --algorithm es_d_rtrl \
  --run-dir runs/results/evidence-full-es_d_rtrl-validated
$F train "${EVIDENCE_HELD_OUT[@]}" "${COSINE[@]}" --algorithm es_d_rtrl \
  --run-dir runs/results/evidence-full-es_d_rtrl-validated-cosine-300
$F train "${EVIDENCE_HELD_OUT[@]}" --iterations 200 --schedule cosine --algorithm es_d_rtrl --rate-reg 0.02 \
  --target-rate 10 --run-dir runs/results/evidence-full-es_d_rtrl-validated-cosine
$F train "${EVIDENCE_HELD_OUT[@]}" --iterations 600 --schedule cosine --algorithm d_rtrl \
  --run-dir runs/results/evidence-full-d_rtrl-validated-cosine-600
# Temporal XOR (TASKS.md), the task where depth matters: two feed-forward ALIF layers, the first one
# learning or frozen at its initial weights (--freeze in1), three seeds; held-out test on 1,024 trials.
XOR=(--task xor --iterations 600 --batch 32 --lr 5e-3 --clip 1.0 --validate-every 100 --validation-batches 8
  --test-batches 32 --checkpoint-every 100)
for seed in 0 1 2; do
  for algorithm in bptt d_rtrl e_prop es_d_rtrl; do
    $F train "${XOR[@]}" --algorithm "$algorithm" --seed "$seed" --run-dir "runs/results/xor-$algorithm-s$seed"
    $F train "${XOR[@]}" --algorithm "$algorithm" --seed "$seed" --freeze in1 \
      --run-dir "runs/results/xor-$algorithm-frozen-s$seed"
  done
done
