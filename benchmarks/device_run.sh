#!/usr/bin/env bash
# The accelerator run: issue 17's speed, sequence and whole-brain benchmarks on a lent GPU, in one call of
# under 9 minutes, each benchmark bounded by its own timeout, their JSON written under OUT. Meanwhile the
# machine's idle CPU cores run issue 19's compile-cost benchmark on the CPU backend (JAX_PLATFORMS=cpu): the
# sweep split by method into parallel processes (each size still in a fresh process), and the targets'
# interleaved rounds (`compile.py --bars`); `python benchmarks/compile.py --merge DIR...` joins the parts.
#
# The device image has JAX (with its CUDA plugin), equinox, optax, jaxtyping, networkx, matplotlib and
# numba, but not the brain-modelling stack: carry it as wheels. Once, here, in the repository's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl brainpy==2.9.* brainstate==0.6.* brainevent==0.3.* \
#     braintools==0.4.* brainunit==0.6.* saiunit==0.6.* braintrace==0.2.* tqdm array_api_compat==1.16.*
# then: device.run(command="OUT=$OUT bash benchmarks/device_run.sh 2>&1 | tee $OUT/run.log",
# carry=[".whl", ".before"], timeout_s=560); the results come back as results.tgz.
# Locally, `OUT=/tmp/out DEVICE_QUICK=1 bash benchmarks/device_run.sh` runs the same script at tiny sizes.
# The JSON records the backend and device it ran on (common.machine()); docs/benchmarks.md says which
# numbers came from which device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${OUT:-runs/device}")
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import jax; print('backend', jax.default_backend(), jax.devices())" | tee "$OUT/device.txt"
if [ "${DEVICE_QUICK:-0}" = 1 ]; then
  SPEED=(--quick) SEQUENCE=(--quick) BRAIN=(--quick --only "fusetrace forward" "fusetrace every 50")
else
  SPEED=(--neurons 2048 --rounds 10 --slow-rounds 2)
  SEQUENCE=(--neurons 512 2048 --rounds 5)
  BRAIN=(--steps 1000 --fit-iterations 0 --backend jax_raw)
fi
cd benchmarks
if [ "${DEVICE_QUICK:-0}" = 1 ]; then
  SWEEP=(--populations 2 3 --states 2 3 --states-at 2 --timeout 120) BARS=()
else
  SWEEP=(--populations 2 4 8 16 32 64 --states 2 3 4 5 --timeout 120) BARS=(--bars 3 --timeout 200)
fi
compile_jobs=()
for methods in "forward bptt" es_d_rtrl d_rtrl e_prop; do
  # shellcheck disable=SC2086  # one word per method
  JAX_PLATFORMS=cpu timeout 480 "$PY" compile.py "${SWEEP[@]}" --methods $methods --out "$OUT/compile-${methods%% *}" \
    >"$OUT/compile-${methods%% *}.log" 2>&1 &
  compile_jobs+=($!)
done
if [ ${#BARS[@]} -gt 0 ]; then
  JAX_PLATFORMS=cpu timeout 500 "$PY" compile.py "${BARS[@]}" --out "$OUT/compile-bars" >"$OUT/compile-bars.log" 2>&1 &
  compile_jobs+=($!)
fi
if [ -d ../.before ] && [ ${#BARS[@]} -gt 0 ]; then
  # the same compile benchmark on the commit before issue 19 (carried as .before: `git archive 5c6e9c1 src passes
  # benchmarks pyproject.toml README.md | tar -x -C .before`), es_d_rtrl only, for the run-time target
  (  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site-before ../.before \
    && cd ../.before/benchmarks && PYTHONPATH=/tmp/site-before:${PYTHONPATH:-} JAX_PLATFORMS=cpu timeout 480 "$PY" \
      compile.py --populations 8 32 --states 2 --states-at 2 --methods es_d_rtrl --out "$OUT/compile-before" ) \
    >"$OUT/compile-before.log" 2>&1 &
  compile_jobs+=($!)
fi
timeout 150 "$PY" speed.py "${SPEED[@]}" --out "$OUT/speed" 2>&1 | tail -20 | tee "$OUT/speed.log"
timeout 150 "$PY" sequence.py "${SEQUENCE[@]}" --out "$OUT/sequence" 2>&1 | tail -20 | tee "$OUT/sequence.log"
timeout 150 "$PY" connectome_side_by_side.py "${BRAIN[@]}" --out "$OUT/brain" 2>&1 | tail -30 | tee "$OUT/brain.log"
wait "${compile_jobs[@]}"
# the device tool brings back a handful of files per call (eight, in one session: the rest were lost), at
# most two folders down: everything goes back as one archive, beside the main log
tar -czf "$OUT/results.tgz" -C "$OUT" --exclude results.tgz --exclude run.log . && \
  find "$OUT" -mindepth 1 -maxdepth 1 ! -name results.tgz ! -name run.log -exec rm -rf {} +
ls -la "$OUT"
