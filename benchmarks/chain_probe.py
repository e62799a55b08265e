"""What the credit chains between two populations of one recurrent layer add to a hidden weight's
gradient, along a training run (docs/limitations.md, issue 16).

    python benchmarks/chain_probe.py [--probes 0 75 100] [--seed 0] [--out DIR]

The run is the demo's recipe with the default credit depth (`fusetrace demo`: the evidence network,
shortened task, batch 64, Adam 2e-3 constant, clipping 1), trained with es_d_rtrl. At each probe the
current weights are held fixed and, on one fixed batch of fresh trials, each algorithm (es_d_rtrl,
d_rtrl) forms its summed per-step gradient twice: with the default depth (`full`) and with
`credit_depth=1` (`direct`: each population's credit through the readout only). Their difference is
the chains' term. Per hidden weight it records the term's size against the direct one, its cosine with
BPTT's gradient and with the part of BPTT's that the (best-scaled) direct term misses, and the share of
entries whose sign agrees with BPTT's, with and without the chains. Writes
benchmarks/results/chain_probe.json (or under --out).
"""

import argparse
import dataclasses

import common
import es_diagnosis
import jax.numpy as jnp

from fusetrace.cli import RunConfig, build, demo_config
from fusetrace.passes.fuse import DEFAULT_CREDIT_DEPTH

PROBE_SEED = 10**8  # the fixed batch: far from every training seed


def _config(seed: int, algorithm: str, **options) -> RunConfig:
    """`fusetrace demo`'s run (`cli.demo_config`) with the default credit depth, then `options`."""
    return dataclasses.replace(demo_config(algorithm, seed), **{"credit_depth": DEFAULT_CREDIT_DEPTH, **options})


def _cos(a, b) -> float:
    return float(es_diagnosis._cos(a, b))


def _terms(full, direct, reference) -> dict:
    chain = full - direct
    scale = jnp.sum(direct * reference) / jnp.sum(direct * direct)
    missed = reference - scale * direct
    signs = lambda x: float(jnp.mean(jnp.sign(x) == jnp.sign(reference)))
    return {
        "chain_over_direct": float(jnp.linalg.norm(chain) / jnp.linalg.norm(direct)),
        "cos_chain_bptt": _cos(chain, reference),
        "cos_chain_missed": _cos(chain, missed),
        "sign_agreement_full": signs(full),
        "sign_agreement_direct": signs(direct),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, nargs="+", default=[0, 75, 100])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write results/ under this folder")
    args = parser.parse_args(argv)
    _, learner, trainer, _ = build(_config(args.seed, "es_d_rtrl"))
    methods = {
        (algorithm, depth): common.summing(build(_config(args.seed, algorithm, **options))[1])
        for algorithm in ("es_d_rtrl", "d_rtrl")
        for depth, options in (("full", {}), ("direct", {"credit_depth": 1}))
    }
    bptt = build(_config(args.seed, "bptt"))[2]
    batch = trainer.sample(PROBE_SEED)
    weights = list(learner.params)
    state, rows = trainer.init(), []
    for iteration in range(max(args.probes) + 1):
        if iteration in args.probes:
            params = state["params"]
            reference = es_diagnosis._bptt_total(bptt, params, batch)
            got = {
                key: es_diagnosis._mantissas(method(params, batch.inputs, batch.targets))
                for key, method in methods.items()
            }
            for algorithm in ("es_d_rtrl", "d_rtrl"):
                for i, weight in enumerate(weights):
                    if weight.startswith("out"):  # the readout's own weight: no chain
                        continue
                    row = {"iteration": iteration, "algorithm": algorithm, "weight": weight}
                    row |= _terms(got[algorithm, "full"][i], got[algorithm, "direct"][i], reference[i])
                    rows.append(row)
                    print(row, flush=True)
        if iteration < max(args.probes):
            state, _ = trainer.iteration(state)
    json_path, _ = common.output_paths(args.out, "chain_probe")
    common.write_json(json_path, {"seed": args.seed, "probes": args.probes, "rows": rows})


if __name__ == "__main__":
    main()
