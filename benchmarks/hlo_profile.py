"""Where one method's step spends its time: XLA's per-op times from `jax.profiler`, the compiled memory,
and (optionally) the optimised HLO, for the speed benchmark's model.

    python benchmarks/hlo_profile.py "fusetrace es_d_rtrl" [--neurons 2048] [--batch 16] [--calls 5] [--hlo FILE]

The method is one of common.METHODS ("forward", "bptt", "fusetrace d_rtrl", "fusetrace es_d_rtrl",
"braintrace D_RTRL", "braintrace pp_prop"). XLA's CPU runtime records one profiler event per HLO
instruction (a fusion, a dot, ...); the table sums them over all threads and divides by the number of
calls. `--hlo` writes the optimised HLO text, to read which jaxpr equations an op came from (its
`metadata`). Nothing is written to the results.
"""

import argparse
import collections
import pathlib
import tempfile

import common
import jax

RUNTIME_EVENTS = ("ThunkExecutor", "PjitFunction", "block_until_ready", "$")  # not HLO instructions


def op_times(program: common.Program, calls: int) -> dict[str, float]:
    """Milliseconds per call of each HLO instruction of `program` (summed over threads)."""
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        for _ in range(calls):
            jax.block_until_ready(program.run())
        jax.profiler.stop_trace()
        (trace,) = pathlib.Path(folder).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(trace))
    totals: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if not any(event.name.startswith(prefix) for prefix in RUNTIME_EVENTS):
                    totals[event.name] += event.duration_ns / 1e6 / calls
    return dict(totals.most_common())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=common.METHODS)
    parser.add_argument("--neurons", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--hlo", help="write the optimised HLO text here")
    args = parser.parse_args(argv)
    common.configure(32)
    spec = common.Spec(n=args.neurons)
    model = common.build(spec, args.batch)
    program = common.step_program(args.method, model, args.batch, common.input_bank(spec, args.batch, 8), 100)
    for _ in range(2):
        jax.block_until_ready(program.run())
    compiled = program.lower().compile()
    memory = common.compiled_memory(program.lower())
    if args.hlo:
        pathlib.Path(args.hlo).write_text(compiled.as_text())
    times = op_times(program, args.calls)
    total = sum(times.values())
    print(f"{args.method}, N = {args.neurons}, B = {args.batch}: {total:.2f} ms of HLO ops per call")
    total_mib, temp_mib = memory["total_bytes"] / 2**20, memory["temp_size_in_bytes"] / 2**20
    print(f"compiled memory {total_mib:.1f} MiB (temporaries {temp_mib:.1f})")
    for name, ms in list(times.items())[: args.top]:
        print(f"  {ms:10.3f} ms  {100 * ms / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
