#!/usr/bin/env bash
# The long differential fuzz over several processes (docs/reliability.md):
#   bash tests/fuzz_parallel.sh NETWORKS PROCESSES [SEED]
# starts PROCESSES shards (FUSETRACE_FUZZ_SHARD=i/PROCESSES), each testing its share of NETWORKS, each with
# one XLA thread, waits for them, and merges their reports into runs/fuzz/seed<SEED>-x<PROCESSES>.md
# (FUSETRACE_FUZZ_DIR moves the folder). Exits non-zero when any shard found a disagreement or failed.
# PYTHON names another interpreter that has the project and its test needs (a lent machine's, say); then no
# .venv is made. FUSETRACE_FUZZ_TIMEOUT=S stops each shard after S seconds: the networks it tested by then
# are in its .jsonl, and the merged report counts them.
set -uo pipefail
cd "$(dirname "$0")/.."
networks=${1:?usage: bash tests/fuzz_parallel.sh NETWORKS PROCESSES [SEED]}
processes=${2:?usage: bash tests/fuzz_parallel.sh NETWORKS PROCESSES [SEED]}
run_seed=${3:-0}
folder=${FUSETRACE_FUZZ_DIR:-runs/fuzz}
mkdir -p "$folder"
if [ -z "${PYTHON:-}" ]; then
  bash dev test --co -q tests/test_fuzz.py >/dev/null  # creates .venv once, before the shards start
fi
python=${PYTHON:-.venv/bin/python}
pids=()
for ((i = 0; i < processes; i++)); do
  FUSETRACE_FUZZ=$networks FUSETRACE_FUZZ_SHARD=$i/$processes FUSETRACE_FUZZ_SEED=$run_seed \
    FUSETRACE_FUZZ_DIR=$folder XLA_FLAGS="--xla_cpu_multi_thread_eigen=false ${XLA_FLAGS:-}" \
    timeout "${FUSETRACE_FUZZ_TIMEOUT:-0}" "$python" -m pytest -q -p no:cacheprovider tests/test_fuzz.py -k long_fuzz \
    >"$folder/seed$run_seed-shard${i}of$processes.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
if ((processes == 1)); then reports=("$folder/seed$run_seed.jsonl"); else reports=("$folder"/seed"$run_seed"-shard*of"$processes".jsonl); fi
"$python" tests/fuzz_report.py "${reports[@]}" >"$folder/seed$run_seed-x$processes.md"
head -n 3 "$folder/seed$run_seed-x$processes.md"
exit $status
