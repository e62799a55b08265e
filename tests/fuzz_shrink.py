"""Shrink a generated network that breaks a promise to a smaller one that still breaks it (a dev tool).

The long fuzz run records failing specs without shrinking them (it keeps going); hypothesis shrinks only
in the default run. `shrink(spec, keeps)` greedily tries simpler variants — fewer populations,
projections and readouts, plainer neurons, comms, synapses, loss, outputs and control flow — and keeps
each one for which `keeps(outcome)` still holds:

    .venv/bin/python tests/fuzz_shrink.py "Spec(...)" "reported exact" [algorithm]

prints each smaller spec found and the last one's disagreements.
"""

import dataclasses
import sys

import brainstate
import jax

import fuzz_models as fm
import fuzz_oracle
from fuzz_models import Population, Projection, Readout, Spec  # noqa: F401  (eval of a printed spec)


def _without_projection(spec: fm.Spec, index: int) -> fm.Spec | None:
    projs = []
    for i, proj in enumerate(spec.projections):
        if i == index:
            continue
        tie = proj.tie
        if tie == index:
            proj = dataclasses.replace(proj, tie=None)
        elif tie is not None and tie > index:
            proj = dataclasses.replace(proj, tie=tie - 1)
        projs.append(proj)
    return dataclasses.replace(spec, projections=tuple(projs))


def _rename(source: str, gone: int) -> str | None:
    kind, k = source[0], int(source[1:])
    if k == gone:
        return None
    return f"{kind}{k - 1}" if k > gone else source


def _without_population(spec: fm.Spec, gone: int) -> fm.Spec | None:
    if len(spec.populations) == 1:
        return None
    projs, kept = [], {}
    for i, proj in enumerate(spec.projections):
        if proj.target == gone or proj.source == f"p{gone}":
            continue
        kept[i] = len(projs)
        source = proj.source if proj.source.startswith("x") else _rename(proj.source, gone)
        target = proj.target - (proj.target > gone)
        projs.append(dataclasses.replace(proj, source=source, target=target))
    projs = [dataclasses.replace(p, tie=kept.get(p.tie)) if p.tie is not None else p for p in projs]
    readouts = []
    for readout in spec.readouts:
        sources = tuple(_rename(s, gone) if s.startswith("p") else s for s in readout.sources)
        if None in sources:
            return None
        readouts.append(dataclasses.replace(readout, sources=sources))
    noise = None if spec.noise in (None, gone) else spec.noise - (spec.noise > gone)
    pops = spec.populations[:gone] + spec.populations[gone + 1 :]
    return dataclasses.replace(spec, populations=pops, projections=tuple(projs), readouts=tuple(readouts), noise=noise)


def _without_readout(spec: fm.Spec, index: int) -> fm.Spec | None:
    if len(spec.readouts) == 1 or any(f"r{index}" in r.sources for r in spec.readouts):
        return None
    readouts = []
    for i, readout in enumerate(spec.readouts):
        if i != index:
            sources = tuple(
                f"r{int(s[1:]) - 1}" if s.startswith("r") and int(s[1:]) > index else s for s in readout.sources
            )
            readouts.append(dataclasses.replace(readout, sources=sources))
    outputs = spec.outputs if len(readouts) > 1 else "single"
    return dataclasses.replace(spec, readouts=tuple(readouts), outputs=outputs)


PLAIN_SPEC = {
    "control": "none",
    "regularizer": False,
    "noise": None,
    "loss": "mse",
    "check": "none",
    "outputs": "single",
}
PLAIN_POPULATION = {"hetero_tau": False, "param": "none", "surrogate": "relu", "kind": "lif"}
PLAIN_PROJECTION = {"stp": False, "delay": 0, "coba": False, "synapse": "post_expon", "comm": "linear", "tie": None}


def _replaced(items: tuple, index: int, item) -> tuple:
    return (*items[:index], item, *items[index + 1 :])


def candidates(spec: fm.Spec):
    """Simpler variants of `spec`, roughly largest cut first."""
    for k in reversed(range(len(spec.populations))):
        yield _without_population(spec, k)
    for i in reversed(range(len(spec.projections))):
        yield _without_projection(spec, i)
    for i in reversed(range(len(spec.readouts))):
        yield _without_readout(spec, i)
    for name, value in PLAIN_SPEC.items():
        if getattr(spec, name) != value:
            yield dataclasses.replace(spec, **{name: value})
    if spec.batch not in (None,):
        yield dataclasses.replace(spec, batch=None)
    for k, pop in enumerate(spec.populations):
        for name, value in PLAIN_POPULATION.items():
            if getattr(pop, name) != value:
                changed = dataclasses.replace(pop, **{name: value})
                if changed.param == "threshold" and changed.kind != "lif":
                    continue
                yield dataclasses.replace(spec, populations=_replaced(spec.populations, k, changed))
    for i, proj in enumerate(spec.projections):
        for name, value in PLAIN_PROJECTION.items():
            if getattr(proj, name) != value:
                extra = {"transform": "none"} if name == "comm" else {}
                changed = dataclasses.replace(proj, **{name: value, **extra})
                yield dataclasses.replace(spec, projections=_replaced(spec.projections, i, changed))
    for i, readout in enumerate(spec.readouts):
        if readout.kind != "linear":
            changed = dataclasses.replace(readout, kind="linear")
            yield dataclasses.replace(spec, readouts=_replaced(spec.readouts, i, changed))


def shrink(spec: fm.Spec, keeps, algorithms=fuzz_oracle.ALGORITHMS, verbose: bool = True) -> fm.Spec:
    """The smallest variant of `spec` found for which `keeps(outcome)` holds (greedy, to a fixed point)."""
    improved = True
    while improved:
        improved = False
        for candidate in candidates(spec):
            if candidate is None:
                continue
            try:
                outcome = fuzz_oracle.check_model(candidate, algorithms)
            except Exception:
                continue
            if outcome.rejected is None and keeps(outcome):
                spec, improved = candidate, True
                if verbose:
                    print(repr(spec), flush=True)
                break
    return spec


def main(text: str, words: str, algorithm: str | None = None):
    jax.config.update("jax_enable_x64", True)  # as tests/conftest.py: the oracle's tolerances are float64's
    brainstate.environ.set(precision=64, dt=fm.DT)
    algorithms = (algorithm,) if algorithm else fuzz_oracle.ALGORITHMS
    spec = shrink(eval(text), lambda o: any(words in d for d in o.disagreements), algorithms)
    print("minimal:", repr(spec))
    for line in fuzz_oracle.check_model(spec, algorithms).disagreements:
        print("  ", line)


if __name__ == "__main__":
    main(*sys.argv[1:])
