"""Hypothesis strategies drawing `fuzz_models.Spec`s: random networks that stay inside the grammar.

`specs()` draws populations first, then for each population the projections into it (at least one
driver: an input for the first, an input or the previous population's new spikes for the others, plus
optional recurrent, lateral/backward, skip and extra input projections), then readouts, inputs, outputs,
loss, control flow, batch size and the extra invariant to check. Upstream constraints are respected here,
not discovered by the oracle: binary event comms only read 0/1 spikes; delays only unbatched (brainpy's
delay buffers ignore the batch axis); conductance-based outputs and learnable thresholds only on LIF-like
populations; rate cells take their comms' outputs directly.
"""

import hypothesis.strategies as st

import fuzz_models as fm

LIF_LIKE = ("lif", "lif_ref", "alif")


def sometimes(draw, one_in: int) -> bool:
    """True with probability 1/`one_in`; False for hypothesis's simplest draw, so shrinking drops options."""
    return draw(st.integers(0, one_in - 1)) == one_in - 1


@st.composite
def conv_population(draw, n_in: int) -> fm.Population:
    """A spiking population laid out as the positions x channels of a kernel-2 convolution of the input."""
    kind = draw(st.sampled_from(fm.SPIKING))
    channels = draw(st.integers(1, 2))
    return fm.Population(
        kind=kind,
        size=(n_in - 1) * channels,
        hetero_tau=draw(st.booleans()),
        param=draw(st.sampled_from(["none", "bias"] + ["threshold"] * (kind == "lif"))),
        surrogate=draw(st.sampled_from(("relu", "sigmoid"))),
        channels=channels,
    )


@st.composite
def populations(draw, earlier: tuple) -> fm.Population:
    # the first population is spiking: a rate cell alone has no spikes for the rate check to look at
    kind = draw(st.sampled_from(fm.NEURON_KINDS if earlier else fm.SPIKING))
    params = ["none", "none", "bias"] + ["threshold"] * (kind == "lif")
    # sometimes as large as an earlier population, so that projections into both can share one weight
    same = earlier and sometimes(draw, 3)
    return fm.Population(
        kind=kind,
        size=draw(st.sampled_from([p.size for p in earlier])) if same else draw(st.integers(3, 6)),
        hetero_tau=draw(st.booleans()),
        param=draw(st.sampled_from(params)),
        surrogate=draw(st.sampled_from(("relu", "sigmoid"))),
    )


def _binary_source(spec_pops, source: str, stp: bool, synapse: str) -> bool:
    """The comm's input is 0/1 spikes: an input or a spiking population, not filtered or scaled first."""
    if stp or synapse.startswith("pre_"):
        return False
    return source.startswith("x") or spec_pops[int(source[1:])].spiking


@st.composite
def projections(draw, pops, target: int, source: str, timing: str, batch) -> fm.Projection:
    post = pops[target]
    spikes_in = source.startswith("x") or pops[int(source[1:])].spiking
    if post.kind in fm.RATE:
        synapse = "current"
    else:  # Izhikevich's update ignores delta (voltage) inputs
        synapse = draw(st.sampled_from([s for s in fm.SYNAPSES if s != "delta" or post.kind != "izhikevich"]))
    stp = spikes_in and synapse != "delta" and sometimes(draw, 6)
    binary_ok = _binary_source(pops, source, stp, synapse)
    comms = [c for c in fm.COMMS if binary_ok or c not in fm.BINARY_COMMS]
    if batch == post.size:  # upstream: a batched EventFixedProb is wrong when batch == n_post (test_fuzz_regressions)
        comms = [c for c in comms if not c.startswith("fixed_prob")]
    # a weight transformed before its op is drawn rarely: it is refused whenever it reads a hidden state
    comm = draw(st.sampled_from([c for c in comms if c not in ("transformed", "conv")] * 2 + ["transformed"]))
    coba = post.kind in LIF_LIKE and synapse.startswith("post_") and sometimes(draw, 4)
    delay = draw(st.sampled_from((0, 0, 1, 2))) if batch is None and synapse.startswith("post_") else 0
    inhibitory = source.startswith("p") and timing == "prev" and draw(st.booleans())
    return fm.Projection(
        source=source,
        target=target,
        comm=comm,
        synapse=synapse,
        coba=coba,
        transform=draw(st.sampled_from(fm.TRANSFORMS)) if comm == "transformed" else "none",
        stp=stp,
        delay=delay,
        timing=timing,
        sign=-1.0 if inhibitory else 1.0,
        scale=draw(st.sampled_from((1.1, 0.8, 1.5))) * (0.6 if timing == "prev" else 1.0),
    )


def _sources(pops, target: int, n_inputs: int):
    """`(source, timing)` pairs a projection into `target` may read, by wiring kind."""
    inputs = [(f"x{i}", "new") for i in range(n_inputs)]
    feed = [(f"p{target - 1}", "new")] if target > 0 else []
    skip = [(f"p{k}", "new") for k in range(target - 1)]
    recurrent = [(f"p{target}", "prev")]
    lateral = [(f"p{k}", "prev") for k in range(len(pops)) if k != target]
    return inputs, feed, skip, recurrent, lateral


@st.composite
def conv_projection(draw, pops, batch) -> fm.Projection:
    """The one projection into a convolution population: input 0 through a small `Conv1d`."""
    synapse = draw(st.sampled_from(("post_expon", "post_dual_expon", "current")))
    scale = draw(st.sampled_from((1.1, 0.8, 1.5)))
    return fm.Projection(source="x0", target=0, comm="conv", synapse=synapse, scale=scale)


@st.composite
def wiring(draw, pops, n_inputs: int, batch) -> tuple[fm.Projection, ...]:
    found = [draw(conv_projection(pops, batch))] if pops[0].channels else []
    for target in range(len(found), len(pops)):
        inputs, feed, skip, recurrent, lateral = _sources(pops, target, n_inputs)
        drivers = inputs if target == 0 else feed + feed + inputs  # mostly a feed-forward stack
        chosen = [draw(st.sampled_from(drivers))]
        for options in (inputs, skip, recurrent, lateral):
            if options and len(chosen) < 3 and sometimes(draw, 4):  # small programs compile fast
                chosen.append(draw(st.sampled_from(options)))
        for source, timing in dict.fromkeys(chosen):
            found.append(draw(projections(pops, target, source, timing, batch)))
    return tuple(_tie(draw, found, pops, n_inputs))


def _tie(draw, found: list, pops, n_inputs: int) -> list:
    """Sometimes make a projection reuse an earlier one's comm (same source, shape and units)."""
    tied = list(found)
    for i, proj in enumerate(found):
        for k in range(i):
            other = found[k]
            same = (
                other.source == proj.source
                and pops[other.target].size == pops[proj.target].size
                and fm.SCALES[pops[other.target].kind].current == fm.SCALES[pops[proj.target].kind].current
                and (other.synapse == "delta") == (proj.synapse == "delta")
                and (other.comm not in fm.BINARY_COMMS or _binary_source(pops, proj.source, proj.stp, proj.synapse))
                and other.synapse.startswith("pre_") == proj.synapse.startswith("pre_")
                and other.coba == proj.coba
                and other.tie is None
                and "conv" not in (other.comm, proj.comm)
            )
            if same and sometimes(draw, 3):
                tied[i] = fm.Projection(
                    **{**proj.__dict__, "comm": other.comm, "transform": other.transform, "tie": k, "sign": other.sign}
                )
                break
    return tied


@st.composite
def readouts(draw, pops) -> tuple[fm.Readout, ...]:
    found = []
    for _ in range(draw(st.sampled_from((1, 1, 2, 3)))):
        kind = draw(st.sampled_from(fm.READOUTS))
        if found and sometimes(draw, 4):  # in series, reading an earlier readout's output
            sources, read = (f"r{draw(st.integers(0, len(found) - 1))}",), "spikes"
            if fm.is_early(found[int(sources[0][1:])]) or found[int(sources[0][1:])].kind == "none":
                sources, read = (f"p{len(pops) - 1}",), "spikes"
        else:
            last = len(pops) - 1
            several = st.lists(st.integers(0, last), min_size=1, max_size=2)
            ks = [last] if draw(st.booleans()) else sorted(set(draw(several)))
            sources = tuple(f"p{k}" for k in ks)
            read = draw(st.sampled_from(("spikes", "spikes", "prev_spikes", "V")))
        found.append(fm.Readout(kind, sources, read, size=draw(st.integers(2, 3))))
    return tuple(found)


def _noise_target(draw, pops) -> int | None:
    """Sometimes a population (not a convolution's) that receives an input noise current."""
    targets = [k for k, pop in enumerate(pops) if not pop.channels]
    return draw(st.sampled_from(targets)) if targets and sometimes(draw, 4) else None


@st.composite
def specs(draw, max_populations: int = 3) -> fm.Spec:
    n_inputs = tuple(draw(st.integers(2, 5)) for _ in range(2 if sometimes(draw, 4) else 1))
    n_pops = draw(st.sampled_from(tuple(n for n in (1, 1, 2, 2, 3) if n <= max_populations)))
    first = draw(conv_population(n_inputs[0])) if n_inputs[0] > 2 and sometimes(draw, 6) else None
    pops = (first,) if first else ()
    while len(pops) < n_pops:
        pops += (draw(populations(pops)),)
    check = draw(st.sampled_from(("none", "none", "none", "jit_eager", "batch_one", "scan_loop")))
    batch = None if check == "batch_one" else draw(st.sampled_from((2, None, 1, 3)))
    projs = draw(wiring(pops, len(n_inputs), batch))
    if check == "batch_one" and any(p.delay for p in projs):
        check = "scan_loop"  # brainpy's delay buffers ignore the batch axis: no batched twin
    reads = draw(readouts(pops))
    outputs = draw(st.sampled_from(("single", "tuple", "dict"))) if len(reads) > 1 else "single"
    return fm.Spec(
        populations=pops,
        projections=projs,
        readouts=reads,
        n_inputs=n_inputs,
        input_rate=draw(st.sampled_from((0.5, 0.3, 0.7))),
        noise=_noise_target(draw, pops),
        batch=batch,
        outputs=outputs,
        loss=draw(st.sampled_from(fm.LOSSES)),
        regularizer=sometimes(draw, 4),
        control=draw(st.sampled_from(fm.CONTROLS)),
        steps=8,
        seed=draw(st.integers(0, 2**16)),
        check=check,
        dropout=any(r.kind != "none" for r in reads) and sometimes(draw, 6),
    )
