"""A whole-brain-sized connectome: a GENERATED graph with the statistics of FlyWire v783 as used by the
whole-brain LIF model of Shiu et al. (138,639 neurons, 15,091,983 weighted connections, heavy-tailed in-
and out-degrees, 78 neuropils), and a loader for a real connectome from a user-supplied file. The LIF
network on it and the neuropil-rate fit: `fusetrace.tasks.flybrain`. Docs: docs/connectome.md.

The generated graph is NOT the fly connectome (which cannot be downloaded here): it matches its sizes and
the shape of its degree and weight distributions, nothing more. `load_connectome(path)` reads a real one
(CSV, or parquet when pandas is installed, with columns pre, post, weight) into the same `Connectome`
record, so everything downstream runs unchanged on it.

Generator (numpy, vectorised, int32 indices, deterministic in `seed`; never a dense matrix): neuropils are
contiguous blocks of neurons with lognormal sizes; every neuron draws a lognormal out- and in-propensity;
a connection's presynaptic neuron is drawn in proportion to its out-propensity, its target neuropil is the
presynaptic neuron's own with probability `local_fraction` (else any neuropil), and its postsynaptic
neuron is drawn within that neuropil in proportion to in-propensity. Duplicate pairs and self-loops are
dropped and drawn again until exactly `n_edges` distinct connections remain. Each connection carries a
synapse count (1 + floor of a lognormal, mean ≈ 3.6 as FlyWire's 54.5 M synapses over 15.1 M
connections) signed by its presynaptic neuron (Dale's law; `excitatory_fraction` excitatory). The full
size takes ~12 s and 1.3 GB at its peak on one CPU core.
"""

import dataclasses
import math
import os
from collections.abc import Sequence

import brainevent
import brainstate
import jax.numpy as jnp
import numpy as np

from .base import bad_argument, check_count

# FlyWire v783 in the whole-brain LIF format of Shiu et al. (docs/connectome.md)
FLYWIRE_NEURONS = 138_639
FLYWIRE_CONNECTIONS = 15_091_983
FLYWIRE_NEUROPILS = 78
MEAN_SYNAPSES = 3.6  # FlyWire: ~54.5 M synapses over ~15.1 M connected pairs


@dataclasses.dataclass(frozen=True, eq=False)
class Connectome:
    """A weighted directed graph of neurons in CSR layout (rows: presynaptic neurons), with neuropil labels.

    Attributes:
        indptr: (n_neurons + 1,) int32: the connections of presynaptic neuron i are `indptr[i]:indptr[i+1]`.
        indices: (n_edges,) int32: the postsynaptic neuron of each connection.
        weights: (n_edges,) float32: signed synapse counts (positive excitatory, negative inhibitory).
        neuropil: (n_neurons,) int32: each neuron's neuropil label, in `range(len(neuropil_names))`.
        neuropil_names: one name per label.
        source: where the graph came from ("generated ..." or the file it was read from).
        ids: (n_neurons,) int64: the original neuron ids of a loaded graph (None for a generated one).

    Raises:
        TaskError: the arrays are inconsistent (shapes, dtypes, ranges, a non-monotone `indptr`).
    """

    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    neuropil: np.ndarray
    neuropil_names: tuple[str, ...]
    source: str
    ids: np.ndarray | None = None

    def __post_init__(self):
        problems = []
        n, e = self.indptr.shape[0] - 1, self.indices.shape[0]
        if self.indptr.dtype != np.int32 or self.indices.dtype != np.int32:
            problems.append("indptr and indices must be int32")
        if self.weights.shape != (e,) or self.weights.dtype != np.float32:
            problems.append(f"weights must be float32 of shape ({e},), got {self.weights.dtype} {self.weights.shape}")
        if n < 1 or self.indptr[0] != 0 or self.indptr[-1] != e or np.any(np.diff(self.indptr) < 0):
            problems.append("indptr must rise from 0 to n_edges")
        if e and (self.indices.min() < 0 or self.indices.max() >= n):
            problems.append("indices must lie in [0, n_neurons)")
        if self.neuropil.shape != (n,) or (
            n and not 0 <= self.neuropil.min() <= self.neuropil.max() < len(self.neuropil_names)
        ):
            problems.append("neuropil must hold one label in range(len(neuropil_names)) per neuron")
        if self.ids is not None and self.ids.shape != (n,):
            problems.append("ids must hold one id per neuron")
        if problems:
            raise bad_argument(
                what="Connectome: " + "; ".join(problems),
                where="fusetrace.tasks.connectome.Connectome(...)",
                why="the CSR arrays, weights and labels describe one graph",
                fix="build it with generate_connectome or load_connectome",
            )

    @property
    def n_neurons(self) -> int:
        return self.indptr.shape[0] - 1

    @property
    def n_edges(self) -> int:
        return self.indices.shape[0]

    @property
    def n_neuropils(self) -> int:
        return len(self.neuropil_names)

    def pre(self) -> np.ndarray:
        """(n_edges,) int32: the presynaptic neuron of each connection."""
        return np.repeat(np.arange(self.n_neurons, dtype=np.int32), np.diff(self.indptr))

    def out_degree(self) -> np.ndarray:
        return np.diff(self.indptr)

    def in_degree(self) -> np.ndarray:
        return np.bincount(self.indices, minlength=self.n_neurons)

    def neuropil_sizes(self) -> np.ndarray:
        return np.bincount(self.neuropil, minlength=self.n_neuropils)

    def csr(self, weights=None) -> brainevent.CSR:
        """The graph as a brainevent CSR matrix (n_neurons × n_neurons, rows presynaptic) holding `weights`
        (default: the connectome's own)."""
        data = jnp.asarray(self.weights if weights is None else weights, brainstate.environ.dftype())
        return brainevent.CSR(
            (data, jnp.asarray(self.indices), jnp.asarray(self.indptr)), shape=(self.n_neurons, self.n_neurons)
        )

    def with_weights(self, weights) -> "Connectome":
        """The same graph with other weights (one per connection)."""
        return dataclasses.replace(self, weights=np.asarray(weights, np.float32))

    def to_csv(self, path: str | os.PathLike, neuropils: str | os.PathLike | None = None) -> None:
        """Write the connections as CSV (`pre,post,weight`, neuron ids as in `ids` when loaded) and, when
        `neuropils` is given, the labels as CSV (`neuron,neuropil`): what `load_connectome` reads."""
        ids = np.arange(self.n_neurons) if self.ids is None else self.ids
        table = np.empty(self.n_edges, dtype=[("pre", np.int64), ("post", np.int64), ("weight", np.float32)])
        table["pre"], table["post"], table["weight"] = ids[self.pre()], ids[self.indices], self.weights
        np.savetxt(path, table, fmt=("%d", "%d", "%.9g"), delimiter=",", header="pre,post,weight", comments="")
        if neuropils is not None:
            names = np.asarray(self.neuropil_names, dtype=object)[self.neuropil]
            rows = np.column_stack([ids.astype(str), names.astype(str)])
            np.savetxt(neuropils, rows, fmt="%s", delimiter=",", header="neuron,neuropil", comments="")


# --------------------------------------------------------------------------- generator


def generate_connectome(
    n_neurons: int = FLYWIRE_NEURONS,
    n_edges: int | None = None,
    *,
    n_neuropils: int = FLYWIRE_NEUROPILS,
    seed: int = 0,
    excitatory_fraction: float = 0.8,
    degree_sigma: float = 1.0,
    neuropil_sigma: float = 0.8,
    local_fraction: float = 0.7,
    mean_synapses: float = MEAN_SYNAPSES,
) -> Connectome:
    """A generated connectome with FlyWire v783's whole-brain-model statistics (NOT the real graph).

    Arguments:
        n_neurons: neurons (FlyWire v783: 138,639).
        n_edges: distinct connections; default keeps FlyWire's mean degree (15,091,983 / 138,639 ≈ 108.9).
        n_neuropils: neuropil labels (contiguous blocks of lognormal sizes; FlyWire has 78).
        seed: the generator's seed (numpy PCG64): the same seed gives the same graph everywhere.
        excitatory_fraction: fraction of neurons whose outgoing weights are positive (Dale's law).
        degree_sigma: σ of the lognormal out- and in-propensities (the heavy tail of the degrees).
        neuropil_sigma: σ of the lognormal neuropil sizes.
        local_fraction: probability that a connection stays within its presynaptic neuron's neuropil.
        mean_synapses: mean synapse count per connection (the weight's magnitude).

    Returns:
        A `Connectome` with exactly `n_edges` connections, no self-loops, no duplicate pairs.

    Raises:
        TaskError: bad sizes or fractions (more connections than neuron pairs, ...).

    Example:
        >>> graph = generate_connectome(5_000, seed=0)          # 544,291 connections
        >>> graph.csr()                                         # doctest: +SKIP
    """
    n_neurons, n_edges, n_neuropils = _checked_sizes(n_neurons, n_edges, n_neuropils)
    for name, value in (("excitatory_fraction", excitatory_fraction), ("local_fraction", local_fraction)):
        if not 0.0 <= value <= 1.0:
            raise bad_argument(what=f"{name}={value}", where=_WHERE, why="it is a probability", fix="pass [0, 1]")
    rng = np.random.default_rng(seed)
    sizes = _block_sizes(rng, n_neurons, n_neuropils, neuropil_sigma)
    neuropil = np.repeat(np.arange(n_neuropils, dtype=np.int32), sizes)
    out_cdf = np.cumsum(rng.lognormal(0.0, degree_sigma, n_neurons))
    in_cdf = np.cumsum(rng.lognormal(0.0, degree_sigma, n_neurons))
    keys = _distinct_pairs(
        rng, n_edges, neuropil, np.concatenate([[0], np.cumsum(sizes)]), out_cdf, in_cdf, local_fraction
    )
    pre, post = np.divmod(keys, n_neurons)
    del keys
    counts = 1.0 + np.floor(rng.lognormal(_lognormal_mu(mean_synapses - 0.5, 1.0), 1.0, n_edges))
    sign = np.where(rng.random(n_neurons) < excitatory_fraction, 1.0, -1.0).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(pre, minlength=n_neurons))]).astype(np.int32)
    return Connectome(
        indptr=indptr,
        indices=post.astype(np.int32),
        weights=(counts.astype(np.float32) * sign[pre]),
        neuropil=neuropil,
        neuropil_names=tuple(f"np{k:02d}" for k in range(n_neuropils)),
        source=f"generated (seed {seed}): FlyWire v783 statistics, not the real connectome",
    )


_WHERE = "fusetrace.tasks.generate_connectome"


def _checked_sizes(n_neurons, n_edges, n_neuropils) -> tuple[int, int, int]:
    n_neurons = check_count(n_neurons, "n_neurons", _WHERE, minimum=2)
    if n_edges is None:
        n_edges = round(n_neurons * FLYWIRE_CONNECTIONS / FLYWIRE_NEURONS)
    n_edges = check_count(n_edges, "n_edges", _WHERE)
    n_neuropils = check_count(n_neuropils, "n_neuropils", _WHERE)
    if n_edges > n_neurons * (n_neurons - 1) // 2 or n_neuropils > n_neurons:
        raise bad_argument(
            what=f"{n_edges} connections and {n_neuropils} neuropils among {n_neurons} neurons",
            where=_WHERE,
            why="the generator draws distinct pairs (at most half of all pairs) and neuropils hold a neuron each",
            fix="ask for fewer connections or neuropils",
        )
    return n_neurons, n_edges, n_neuropils


def _lognormal_mu(mean: float, sigma: float) -> float:
    return math.log(max(mean, 1e-3)) - 0.5 * sigma**2


def _block_sizes(rng: np.random.Generator, n: int, blocks: int, sigma: float) -> np.ndarray:
    """`blocks` positive integer sizes summing to n, proportional to lognormal draws (largest remainder)."""
    share = rng.lognormal(0.0, sigma, blocks)
    spare = n - blocks  # every block gets one neuron, the rest by share
    exact = share / share.sum() * spare
    sizes = np.floor(exact).astype(np.int64)
    sizes[np.argsort(exact - sizes)[::-1][: spare - sizes.sum()]] += 1
    return sizes + 1


def _distinct_pairs(rng, n_edges, neuropil, starts, out_cdf, in_cdf, local_fraction) -> np.ndarray:
    """Exactly `n_edges` distinct keys `pre * n + post` (pre != post), sorted. Each round draws what is
    missing divided by the previous round's yield of new pairs (small neuropils saturate)."""
    n = neuropil.shape[0]
    keys = np.empty(0, np.int64)
    yield_ = 1.0
    while keys.size < n_edges:
        draw = int((n_edges - keys.size) / max(yield_, 0.05) * 1.05) + 64
        pre = np.searchsorted(out_cdf, rng.random(draw) * out_cdf[-1], side="right")
        local = rng.random(draw) < local_fraction
        lo = np.where(local, _cdf_at(in_cdf, starts[neuropil[pre]]), 0.0)
        hi = np.where(local, _cdf_at(in_cdf, starts[neuropil[pre] + 1]), in_cdf[-1])
        post = np.minimum(np.searchsorted(in_cdf, lo + rng.random(draw) * (hi - lo), side="right"), n - 1)
        fresh = np.sort((pre.astype(np.int64) * n + post)[pre != post])
        before = keys.size
        keys = _sorted_unique(np.concatenate([keys, fresh]))
        yield_ = (keys.size - before) / draw
    if keys.size > n_edges:
        keys = np.delete(keys, rng.choice(keys.size, keys.size - n_edges, replace=False))
    return keys


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """Distinct values, sorted (a stable sort merges the two sorted runs it is given in linear time;
    numpy's hash-based `unique` is several times slower here)."""
    values = np.sort(values, kind="stable")
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if values.size else values


def _cdf_at(cdf: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The cumulative mass before neuron `index` (0 for index 0)."""
    return np.where(index > 0, cdf[np.maximum(index - 1, 0)], 0.0)


# --------------------------------------------------------------------------- loader


def load_connectome(
    path: str | os.PathLike,
    *,
    neuropils: str | os.PathLike | None = None,
    n_blocks: int = FLYWIRE_NEUROPILS,
    columns: Sequence[str] = ("pre", "post", "weight"),
) -> Connectome:
    """Read a real connectome (one row per connection) into a `Connectome`.

    Arguments:
        path: a CSV file (optionally .gz) with a header, or a parquet file (needs pandas with pyarrow),
            holding the columns named by `columns`: presynaptic id, postsynaptic id, signed weight
            (e.g. FlyWire's synapse count × ±1 by neurotransmitter). Ids may be any integers (FlyWire root
            ids); they are renumbered 0..n-1 in increasing order and kept in `Connectome.ids`. Repeated
            pairs are summed.
        neuropils: optional CSV with columns `neuron,neuropil` (an id of `path` and a label name); neurons
            it does not list get the label "unassigned". Without it, the neurons (in id order) are cut into
            `n_blocks` contiguous blocks named "block00", ... — labels with no anatomical meaning.
        n_blocks: see `neuropils`.
        columns: the names of the pre, post and weight columns.

    Returns:
        The `Connectome` (its `source` names the file).

    Raises:
        TaskError: a column is missing, or parquet was asked for without pandas/pyarrow.

    Example:
        >>> graph = load_connectome("connections.csv", neuropils="neuropils.csv")   # doctest: +SKIP
        >>> net = connectome_network(graph, batch_size=1)                          # doctest: +SKIP
    """
    pre_ids, post_ids, weights = _read_table(path, tuple(columns))
    ids, inverse = np.unique(np.concatenate([pre_ids, post_ids]), return_inverse=True)
    n = ids.shape[0]
    pre, post = inverse[: pre_ids.shape[0]], inverse[pre_ids.shape[0] :]
    keys, where = np.unique(pre.astype(np.int64) * n + post, return_inverse=True)
    summed = np.bincount(where, weights=weights, minlength=keys.shape[0]).astype(np.float32)
    pre, post = np.divmod(keys, n)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(pre, minlength=n))]).astype(np.int32)
    if neuropils is None:
        sizes = np.full(min(n_blocks, n), n // min(n_blocks, n))
        sizes[: n - sizes.sum()] += 1
        labels = np.repeat(np.arange(sizes.shape[0], dtype=np.int32), sizes)
        names = tuple(f"block{k:02d}" for k in range(sizes.shape[0]))
    else:
        labels, names = _read_neuropils(neuropils, ids)
    return Connectome(
        indptr=indptr,
        indices=post.astype(np.int32),
        weights=summed,
        neuropil=labels,
        neuropil_names=names,
        source=f"loaded from {os.fspath(path)}",
        ids=ids.astype(np.int64),
    )


def _read_table(path, columns: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    name = os.fspath(path)
    if name.endswith(".parquet"):
        try:
            import pandas  # pyright: ignore[reportMissingImports]  (optional: parquet only)
        except ImportError as error:
            raise bad_argument(
                what=f"load_connectome({name!r}): parquet needs pandas (with pyarrow)",
                where="fusetrace.tasks.load_connectome",
                why="numpy reads CSV only",
                fix="pip install pandas pyarrow, or convert the file to CSV",
            ) from error
        frame = pandas.read_parquet(name, columns=list(columns))
        return tuple(frame[c].to_numpy() for c in columns)
    header = _csv_header(name)
    missing = [c for c in columns if c not in header]
    if missing:
        raise bad_argument(
            what=f"load_connectome({name!r}): no column(s) {missing} among {header}",
            where="fusetrace.tasks.load_connectome",
            why="each row is one connection: presynaptic id, postsynaptic id, weight",
            fix="name the columns with columns=(pre, post, weight)",
        )
    use = [header.index(c) for c in columns]
    ids = np.loadtxt(name, delimiter=",", skiprows=1, usecols=use[:2], dtype=np.int64, ndmin=2)
    weights = np.loadtxt(name, delimiter=",", skiprows=1, usecols=use[2], dtype=np.float64, ndmin=1)
    return ids[:, 0], ids[:, 1], weights


def _csv_header(name: str) -> list[str]:
    if name.endswith(".gz"):
        import gzip

        with gzip.open(name, "rt") as file:
            return [c.strip() for c in file.readline().split(",")]
    with open(name) as file:
        return [c.strip() for c in file.readline().split(",")]


def _read_neuropils(path, ids: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    name = os.fspath(path)
    header = _csv_header(name)
    if header[:2] != ["neuron", "neuropil"]:
        raise bad_argument(
            what=f"neuropil file {name!r} starts with columns {header[:2]}",
            where="fusetrace.tasks.load_connectome(..., neuropils=...)",
            why="it maps a neuron id to a neuropil name",
            fix="give it the header `neuron,neuropil`",
        )
    rows = np.loadtxt(name, delimiter=",", skiprows=1, dtype=str, ndmin=2)
    neurons, label_names = rows[:, 0].astype(np.int64), rows[:, 1]
    names, codes = np.unique(label_names, return_inverse=True)
    labels = np.full(ids.shape[0], names.shape[0], np.int32)  # "unassigned" unless listed
    position = np.searchsorted(ids, neurons)
    known = (position < ids.shape[0]) & (ids[np.minimum(position, ids.shape[0] - 1)] == neurons)
    labels[position[known]] = codes[known]
    names = (*(str(x) for x in names), "unassigned")
    if np.all(labels < len(names) - 1):
        names = names[:-1]
    return labels, names
