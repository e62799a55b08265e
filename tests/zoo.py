"""Small brainpy.state models with hand-written expected analyses.

Each public factory returns a `Case` that unpacks as `(model, example_inputs, expected)`:

* `model`: a `brainstate.nn.Module` built only from stock brainpy.state / brainstate parts, its states
  initialised with `init_all_states(model, batch_size)` (unless `init=False`).
* `example_inputs`: one step's `model.update(*inputs)` arguments, batch axis first when batched.
* `expected`: a dict written by reasoning about the model, never read back from fusetrace:

  - `expected["groups"]`: group name -> `{"states": frozenset of dotted state paths, "n_states": int,
    "n_neurons": int, "lti": bool}`. A group's name is the path of its first state in `model.states()`
    order; "lti" is True where the case marks it linear time-invariant (its leaky readout; unmarked
    groups may be LTI too).
  - `expected["relations"]`: weight leaf path -> `(receiving group name or None, op, status)`.
    `op` is None where the primitive is not pinned down by the model (a bias is added, not contracted).
  - `expected["n_pre"]`: weight leaf path -> elements per batch entry of the op's presynaptic input,
    for every 'traced' relation (the `es_d_rtrl` trace size).

State objects are turned into paths by `path_of`, which scans `model.states()` by identity: paths of
shared states are first-found (an AlignPost conductance appears under its post population,
`N._before_updates.(<class 'brainpy.state.Expon'>, ...).syn.g`), so they are never spelled by hand.

`expected` is computed lazily from the model's current state objects, so a case built with
`init=False` can be analysed first (fusetrace then initialises the states) and checked afterwards.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import brainevent
import brainpy  # noqa: F401  (brainpy.state lives inside brainpy >= 2.9)
import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

try:
    import numba  # noqa: F401
except ImportError:
    brainevent.config.set_backend("cpu", "jax_raw")

DT = 0.1 * u.ms
# dt must be set before a model is built: LeakyRateReadout computes exp(-dt/tau) in __init__.
brainstate.environ.set(dt=DT)

TRACED, INSTANTANEOUS, EXCLUDED = "traced", "instantaneous", "excluded"
DOT = "dot_general"


# --------------------------------------------------------------------------- paths and expectations


def path_of(model: brainstate.nn.Module, state: brainstate.State) -> str:
    """The dotted `model.states()` path of `state`, found by object identity."""
    for key, candidate in model.states().items():
        if candidate is state:
            return ".".join(map(str, key))
    raise KeyError(f"{state!r} is not a state of {type(model).__name__}")


def leaf_of(model: brainstate.nn.Module, state: brainstate.State, key: str | None = None) -> str:
    """Path of a weight leaf: the state path, plus `.key` inside a dict-valued ParamState."""
    path = path_of(model, state)
    return path if key is None else f"{path}.{key}"


def state_paths(model: brainstate.nn.Module) -> list[str]:
    """Every state path of `model`, in `model.states()` order."""
    return [".".join(map(str, key)) for key in model.states()]


def hidden_paths(model: brainstate.nn.Module) -> list[str]:
    return [".".join(map(str, k)) for k, s in model.states().items() if isinstance(s, brainstate.HiddenState)]


def weight_leaf_paths(model: brainstate.nn.Module) -> list[str]:
    """Every ParamState leaf path (`.key` appended for dict-valued states)."""
    paths = []
    for key, state in model.states().items():
        if not isinstance(state, brainstate.ParamState):
            continue
        path = ".".join(map(str, key))
        if isinstance(state.value, dict):
            paths.extend(f"{path}.{k}" for k in state.value)
        else:
            paths.append(path)
    return paths


def weight_size(model: brainstate.nn.Module, leaf_path: str) -> tuple[int, np.dtype]:
    """(number of elements, dtype) of a weight leaf."""
    for key, state in model.states().items():
        path = ".".join(map(str, key))
        value = state.value
        if isinstance(value, dict):
            for k, v in value.items():
                if f"{path}.{k}" == leaf_path:
                    return int(np.size(u.get_mantissa(v))), np.dtype(u.get_mantissa(v).dtype)
        elif path == leaf_path:
            return int(np.size(u.get_mantissa(value))), np.dtype(u.get_mantissa(value).dtype)
    raise KeyError(leaf_path)


@dataclasses.dataclass(frozen=True)
class Rel:
    """One expected relation: `weight` leaf path, the state it flows into (None: the output), op, status."""

    weight: str
    into: brainstate.State | None
    op: str | None
    status: str
    n_pre: int | None = None
    same_injection_as: str | None = None  # the weight whose op output enters the group summed with this one's


LTI = "lti"  # marks an expected group as linear time-invariant


def expect(
    model: brainstate.nn.Module,
    groups: Sequence[tuple],
    relations: Sequence[Rel],
) -> dict[str, Any]:
    """Build the `expected` dict from state objects: `groups` is `[(states, n_neurons), ...]`, a group
    written `(states, n_neurons, LTI)` being linear time-invariant (a leaky readout)."""
    order = state_paths(model)
    out_groups: dict[str, dict[str, Any]] = {}
    group_of: dict[str, str] = {}
    for states, n_neurons, *kind in groups:
        members = {path_of(model, s) for s in states}
        assert len(members) == len(states), "a state listed twice in one expected group"
        name = next(p for p in order if p in members)
        out_groups[name] = {
            "states": frozenset(members),
            "n_states": len(members),
            "n_neurons": n_neurons,
            "lti": kind == [LTI],
        }
        group_of.update(dict.fromkeys(members, name))
    out_relations, n_pre, same_injection = {}, {}, set()
    for rel in relations:
        if rel.same_injection_as is not None:
            same_injection.add(frozenset((rel.weight, rel.same_injection_as)))
        group = None if rel.into is None else group_of[path_of(model, rel.into)]
        out_relations[rel.weight] = (group, rel.op, rel.status)
        if rel.status == TRACED:
            assert rel.n_pre is not None, f"{rel.weight}: a traced relation needs n_pre"
            n_pre[rel.weight] = rel.n_pre
    return {"groups": out_groups, "relations": out_relations, "n_pre": n_pre, "same_injection": same_injection}


@dataclasses.dataclass
class Case:
    """A zoo model. Unpacks as `(model, inputs, expected)`; `expected` is computed on access."""

    name: str
    model: brainstate.nn.Module
    inputs: tuple
    batch_size: int | None
    _expect: Callable[[brainstate.nn.Module], dict[str, Any]]

    @property
    def expected(self) -> dict[str, Any]:
        return self._expect(self.model)

    def __iter__(self):
        return iter((self.model, self.inputs, self.expected))

    def init(self):
        brainstate.nn.init_all_states(self.model, batch_size=self.batch_size)
        return self


def _spikes(n: int, batch_size: int | None, seed: int = 0) -> jax.Array:
    """A fixed 0/1 spike pattern (about half active) with the batch axis first when batched."""
    shape = (n,) if batch_size is None else (batch_size, n)
    return jnp.asarray(np.random.RandomState(seed).rand(*shape) < 0.5, dtype=brainstate.environ.dftype())


def _case(name, model, inputs, batch_size, expect_fn, init, seed) -> Case:
    case = Case(name, model, inputs, batch_size, expect_fn)
    if init:
        brainstate.random.seed(seed)
        case.init()
    return case


# Weights and initial potentials are drawn on the host: brainstate.random compiles one XLA kernel per
# new shape (0.1-0.4 s each), which dominated runs over many population sizes.
_RNG = np.random.RandomState(0)


class HostRandom:
    """A seeded numpy initializer, `init(shape) -> array` (a brainunit Quantity when `unit` is given).

    `kind='normal'`: a + b * N(0, 1); `kind='uniform'`: U(a, b). Draws from the zoo's RNG, which each
    factory reseeds, so equal factory calls build equal models.
    """

    def __init__(self, kind: str, a: float, b: float, unit=None):
        self.kind, self.a, self.b, self.unit = kind, a, b, unit

    def __call__(self, shape, **kwargs):
        if self.kind == "normal":
            x = self.a + self.b * _RNG.standard_normal(shape)
        else:
            x = _RNG.uniform(self.a, self.b, size=shape)
        x = jnp.asarray(x, dtype=brainstate.environ.dftype())
        return x if self.unit is None else x * self.unit


def _kaiming(n_pre: int, scale: float = 1.0, unit=None) -> HostRandom:
    return HostRandom("normal", 0.0, scale / np.sqrt(n_pre), unit)


def _begin(seed: int):
    brainstate.environ.set(dt=DT)
    brainstate.random.seed(seed)
    _RNG.seed(seed)


def _current_syn(n: int, tau=5.0 * u.ms):
    """Expon describer for a current-based (mA) AlignPost synapse."""
    return bps.Expon.desc(n, tau=tau, g_initializer=braintools.init.Constant(0.0 * u.mA))


def _dense(n_pre: int, n_post: int, unit=u.mA, scale: float = 2.0):
    """A bias-free dense comm (a bias into a conductance is not a synapse)."""
    return brainstate.nn.Linear(n_pre, n_post, w_init=_kaiming(n_pre, scale, unit), b_init=None)


def _lif(n: int, tau=10.0 * u.ms, **kw):
    return bps.LIF(
        n,
        tau=tau,
        V_th=1.0 * u.mV,
        V_reset=0.0 * u.mV,
        V_rest=0.0 * u.mV,
        V_initializer=HostRandom("uniform", 0.0, 1.0, u.mV),
        **kw,
    )


# --------------------------------------------------------------------------- single population


class LifCuba(brainstate.nn.Module):
    """Input spikes -> dense Linear -> Expon (mA) -> CUBA -> LIF. Returns the LIF spikes."""

    def __init__(self, n_in=6, n=10, tau=10.0 * u.ms, tau_syn=5.0 * u.ms, comm=None):
        super().__init__()
        self.N = _lif(n, tau=tau)
        self.inp = bps.AlignPostProj(
            comm=_dense(n_in, n) if comm is None else comm,
            syn=_current_syn(n, tau_syn),
            out=bps.CUBA.desc(scale=1.0),
            post=self.N,
        )

    def update(self, x):
        self.inp(x)
        return self.N()


def lif_cuba(batch_size=None, n_in=6, n=10, tau=10.0 * u.ms, seed=0, init=True) -> Case:
    """LIF + Expon AlignPost, current-based. One group {V, g}; the input weight is traced onto it."""
    _begin(seed)
    model = LifCuba(n_in, n, tau=tau)

    def expected(m):
        return expect(
            m,
            [([m.N.V, m.inp.syn.g], n)],
            [Rel(leaf_of(m, m.inp.comm.weight, "weight"), m.N.V, DOT, TRACED, n_pre=n_in)],
        )

    return _case("lif_cuba", model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


class LifCoba(brainstate.nn.Module):
    """Input spikes -> Linear (mS) -> Expon -> COBA(E=0) -> LIF: V's decay depends on the new g."""

    def __init__(self, n_in=6, n=10, tau=10.0 * u.ms):
        super().__init__()
        self.N = _lif(n, tau=tau)
        self.inp = bps.AlignPostProj(
            comm=_dense(n_in, n, unit=u.mS, scale=0.5),
            syn=bps.Expon.desc(n, tau=5.0 * u.ms),
            out=bps.COBA.desc(E=5.0 * u.mV),
            post=self.N,
        )

    def update(self, x):
        self.inp(x)
        return self.N()


def lif_coba(batch_size=None, n_in=6, n=10, seed=0, init=True) -> Case:
    """LIF + Expon AlignPost, conductance-based. One group {V, g}."""
    _begin(seed)
    model = LifCoba(n_in, n)

    def expected(m):
        return expect(
            m,
            [([m.N.V, m.inp.syn.g], n)],
            [Rel(leaf_of(m, m.inp.comm.weight, "weight"), m.N.V, DOT, TRACED, n_pre=n_in)],
        )

    return _case("lif_coba", model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


# --------------------------------------------------------------------------- E/I networks


class EINet(brainstate.nn.Module):
    """The shared example's recurrent E/I net: three AlignPost projections onto one LIF + leaky readout.

    `conn`: 'dense' (Linear), 'sparse' (EventFixedProb, scalar weight) or 'eventlinear' for the
    recurrent E and I comms; the input comm is always a dense Linear.
    """

    def __init__(self, n_in=6, n_exc=8, n_inh=4, n_out=2, conn="dense", seed=0):
        super().__init__()
        self.n_in, self.n_exc, self.n_inh, self.n_out = n_in, n_exc, n_inh, n_out
        self.num = n_exc + n_inh
        self.N = bps.LIF(
            self.num,
            V_rest=-60.0 * u.mV,
            V_th=-50.0 * u.mV,
            V_reset=-60.0 * u.mV,
            tau=20.0 * u.ms,
            V_initializer=HostRandom("normal", -55.0, 2.0, u.mV),
        )

        def comm(n_pre, n_post, w):
            if conn == "dense":
                return brainstate.nn.Linear(n_pre, n_post, w_init=braintools.init.Constant(w), b_init=None)
            if conn == "sparse":
                return brainstate.nn.EventFixedProb(n_pre, n_post, conn_num=0.25, conn_weight=w, seed=seed)
            if conn == "eventlinear":
                return brainstate.nn.EventLinear(n_pre, n_post, weight=braintools.init.Constant(w))
            raise ValueError(conn)

        self.E = bps.AlignPostProj(
            comm=comm(n_exc, self.num, 0.6 * u.mS),
            syn=bps.Expon.desc(self.num, tau=5.0 * u.ms),
            out=bps.COBA.desc(E=0.0 * u.mV),
            post=self.N,
        )
        self.I = bps.AlignPostProj(
            comm=comm(n_inh, self.num, 6.7 * u.mS),
            syn=bps.Expon.desc(self.num, tau=10.0 * u.ms),
            out=bps.COBA.desc(E=-80.0 * u.mV),
            post=self.N,
        )
        self.inp = bps.AlignPostProj(
            comm=brainstate.nn.Linear(n_in, self.num, w_init=_kaiming(n_in, 5.0, u.mA), b_init=None),
            syn=_current_syn(self.num),
            out=bps.CUBA.desc(scale=1.0),
            post=self.N,
        )
        self.out = bps.LeakyRateReadout(self.num, n_out, tau=10.0 * u.ms, w_init=_kaiming(self.num))

    def update(self, x_spk, i_ext=20.0 * u.mA):
        spk = self.N.get_spike()
        self.E(spk[..., : self.n_exc])
        self.I(spk[..., self.n_exc :])
        self.inp(x_spk)
        new_spk = self.N(i_ext)
        return self.out(new_spk), new_spk


def _comm_op(conn: str, batch_size: int | None) -> str:
    batched = batch_size is not None
    return {
        "dense": DOT,
        "sparse": "binary_fcnmm" if batched else "ell_binary_matvec",
        "eventlinear": "binary_densemm" if batched else "binary_densemv",
    }[conn]


def _comm_leaf(m, comm) -> str:
    # Linear keeps {'weight': ...}; EventFixedProb / EventLinear keep a bare array.
    return leaf_of(m, comm.weight, "weight" if isinstance(comm.weight.value, dict) else None)


def ei_net(batch_size=None, conn="dense", n_in=6, n_exc=8, n_inh=4, n_out=2, seed=0, init=True) -> Case:
    """Unmerged E/I: three distinct Expon describers give three conductances on N.

    Groups: {V, g_E, g_I, g_inp} (S=4) and the readout {r}. E, I and input weights are traced onto N's
    group; the readout weight is traced onto r's group.
    """
    _begin(seed)
    model = EINet(n_in, n_exc, n_inh, n_out, conn=conn, seed=seed)
    num = n_exc + n_inh
    op = _comm_op(conn, batch_size)

    def expected(m):
        return expect(
            m,
            [([m.N.V, m.E.syn.g, m.I.syn.g, m.inp.syn.g], num), ([m.out.r], n_out, LTI)],
            [
                Rel(_comm_leaf(m, m.E.comm), m.N.V, op, TRACED, n_pre=n_exc),
                Rel(_comm_leaf(m, m.I.comm), m.N.V, op, TRACED, n_pre=n_inh),
                Rel(leaf_of(m, m.inp.comm.weight, "weight"), m.N.V, DOT, TRACED, n_pre=n_in),
                Rel(leaf_of(m, m.out.weight), m.out.r, DOT, TRACED, n_pre=num),
            ],
        )

    name = "ei_net" if conn == "dense" else f"ei_net_{conn}"
    return _case(name, model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


class EIMerged(brainstate.nn.Module):
    """Merged AlignPost: the recurrent E projection and the input projection pass EQUAL describers
    (`Expon.desc(num, tau=5 ms)`, `COBA.desc(E=0 mV)`), so brainpy.state keys them to ONE `_AlignPost`
    on N (`post._before_updates[repr(syn) // repr(out)]`) and both comms add into the same `g`.

    This is the only merge brainpy.state offers: an `AlignPostProj` takes one `comm`, and a
    `brainstate.nn.Sequential` comm chains (W2ᵀ(W1ᵀx)), it does not sum two comms.
    """

    def __init__(self, n_in=6, n_exc=8, n_inh=4):
        super().__init__()
        self.n_exc = n_exc
        num = n_exc + n_inh
        self.N = _lif(num, tau=20.0 * u.ms)

        def exc_syn():
            return bps.Expon.desc(num, tau=5.0 * u.ms)

        def exc_out():
            return bps.COBA.desc(E=5.0 * u.mV)

        self.E = bps.AlignPostProj(
            comm=_dense(n_exc, num, unit=u.mS, scale=0.5), syn=exc_syn(), out=exc_out(), post=self.N
        )
        self.inp = bps.AlignPostProj(
            comm=_dense(n_in, num, unit=u.mS, scale=0.5), syn=exc_syn(), out=exc_out(), post=self.N
        )
        self.I = bps.AlignPostProj(
            comm=_dense(n_inh, num, unit=u.mS, scale=0.5),
            syn=bps.Expon.desc(num, tau=10.0 * u.ms),
            out=bps.COBA.desc(E=-1.0 * u.mV),
            post=self.N,
        )

    def update(self, x):
        spk = self.N.get_spike()
        self.E(spk[..., : self.n_exc])
        self.I(spk[..., self.n_exc :])
        self.inp(x)
        return self.N()


def ei_merged(batch_size=None, n_in=6, n_exc=8, n_inh=4, seed=0, init=True) -> Case:
    """Merged excitatory conductance: group {V, g_exc (shared by E and inp), g_I}, S=3."""
    _begin(seed)
    model = EIMerged(n_in, n_exc, n_inh)
    assert model.E.syn is model.inp.syn, "brainpy.state did not merge equal AlignPost describers"
    num = n_exc + n_inh

    def expected(m):
        return expect(
            m,
            [([m.N.V, m.E.syn.g, m.I.syn.g], num)],
            [
                Rel(leaf_of(m, m.E.comm.weight, "weight"), m.N.V, DOT, TRACED, n_pre=n_exc),
                Rel(
                    leaf_of(m, m.inp.comm.weight, "weight"),
                    m.N.V,
                    DOT,
                    TRACED,
                    n_pre=n_in,
                    same_injection_as=leaf_of(m, m.E.comm.weight, "weight"),
                ),
                Rel(leaf_of(m, m.I.comm.weight, "weight"), m.N.V, DOT, TRACED, n_pre=n_inh),
            ],
        )

    return _case("ei_merged", model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


# --------------------------------------------------------------------------- other neurons and synapses


class AlifCuba(brainstate.nn.Module):
    """Input -> Linear -> Expon (mA) -> CUBA -> ALIF (V and adaptation a)."""

    def __init__(self, n_in=6, n=10):
        super().__init__()
        self.N = bps.ALIF(
            n, tau=10.0 * u.ms, tau_a=50.0 * u.ms, beta=0.2 * u.mV, V_initializer=HostRandom("uniform", 0.0, 1.0, u.mV)
        )
        self.inp = bps.AlignPostProj(
            comm=_dense(n_in, n), syn=_current_syn(n), out=bps.CUBA.desc(scale=1.0), post=self.N
        )

    def update(self, x):
        self.inp(x)
        return self.N()


def alif(batch_size=None, n_in=6, n=10, seed=0, init=True) -> Case:
    """ALIF: group {V, a, g}, S=3."""
    _begin(seed)
    model = AlifCuba(n_in, n)

    def expected(m):
        return expect(
            m,
            [([m.N.V, m.N.a, m.inp.syn.g], n)],
            [Rel(leaf_of(m, m.inp.comm.weight, "weight"), m.N.V, DOT, TRACED, n_pre=n_in)],
        )

    return _case("alif", model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


class LifDualExpon(brainstate.nn.Module):
    """Input -> Linear (mS) -> DualExpon (g_rise, g_decay) -> COBA -> LIF."""

    def __init__(self, n_in=6, n=10):
        super().__init__()
        self.N = _lif(n)
        self.inp = bps.AlignPostProj(
            comm=_dense(n_in, n, unit=u.mS, scale=0.5),
            syn=bps.DualExpon.desc(n, tau_decay=10.0 * u.ms, tau_rise=1.0 * u.ms),
            out=bps.COBA.desc(E=5.0 * u.mV),
            post=self.N,
        )

    def update(self, x):
        self.inp(x)
        return self.N()


def dual_expon(batch_size=None, n_in=6, n=10, seed=0, init=True) -> Case:
    """DualExpon: the weight adds into both g_rise and g_decay; group {V, g_rise, g_decay}, S=3."""
    _begin(seed)
    model = LifDualExpon(n_in, n)

    def expected(m):
        return expect(
            m,
            [([m.N.V, m.inp.syn.g_rise, m.inp.syn.g_decay], n)],
            [Rel(leaf_of(m, m.inp.comm.weight, "weight"), m.N.V, DOT, TRACED, n_pre=n_in)],
        )

    return _case("dual_expon", model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


# --------------------------------------------------------------------------- recurrence and depth


class RSNN(brainstate.nn.Module):
    """Recurrent LIF: its previous spikes `N.get_spike()` feed back through a dense Linear."""

    def __init__(self, n_in=6, n=10, tau=10.0 * u.ms):
        super().__init__()
        self.N = _lif(n, tau=tau)
        self.rec = bps.AlignPostProj(
            comm=_dense(n, n, scale=1.0), syn=_current_syn(n, 10.0 * u.ms), out=bps.CUBA.desc(scale=1.0), post=self.N
        )
        self.inp = bps.AlignPostProj(
            comm=_dense(n_in, n), syn=_current_syn(n, 5.0 * u.ms), out=bps.CUBA.desc(scale=1.0), post=self.N
        )

    def update(self, x):
        self.rec(self.N.get_spike())
        self.inp(x)
        return self.N()


def rsnn(batch_size=None, n_in=6, n=10, seed=0, init=True) -> Case:
    """RSNN: group {V, g_rec, g_inp}; both weights traced onto it (the recurrent one from N's own spikes)."""
    _begin(seed)
    model = RSNN(n_in, n)

    def expected(m):
        return expect(
            m,
            [([m.N.V, m.rec.syn.g, m.inp.syn.g], n)],
            [
                Rel(leaf_of(m, m.rec.comm.weight, "weight"), m.N.V, DOT, TRACED, n_pre=n),
                Rel(leaf_of(m, m.inp.comm.weight, "weight"), m.N.V, DOT, TRACED, n_pre=n_in),
            ],
        )

    return _case("rsnn", model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


class TwoLayer(brainstate.nn.Module):
    """Feed-forward x -> L1 (LIF + Expon) -> L2 (LIF + Expon); L2 reads L1's spikes of this step."""

    def __init__(self, n_in=6, n1=10, n2=5):
        super().__init__()
        self.N1 = _lif(n1)
        self.N2 = _lif(n2)
        self.in1 = bps.AlignPostProj(
            comm=_dense(n_in, n1), syn=_current_syn(n1), out=bps.CUBA.desc(scale=1.0), post=self.N1
        )
        self.in2 = bps.AlignPostProj(
            comm=_dense(n1, n2), syn=_current_syn(n2), out=bps.CUBA.desc(scale=1.0), post=self.N2
        )

    def update(self, x):
        self.in1(x)
        s1 = self.N1()
        self.in2(s1)
        return self.N2()


def two_layer(batch_size=None, n_in=6, n1=10, n2=5, seed=0, init=True) -> Case:
    """Two groups {V1, g1}, {V2, g2}; W1 traced onto layer 1, W2 onto layer 2 (cut at the weight)."""
    _begin(seed)
    model = TwoLayer(n_in, n1, n2)

    def expected(m):
        return expect(
            m,
            [([m.N1.V, m.in1.syn.g], n1), ([m.N2.V, m.in2.syn.g], n2)],
            [
                Rel(leaf_of(m, m.in1.comm.weight, "weight"), m.N1.V, DOT, TRACED, n_pre=n_in),
                Rel(leaf_of(m, m.in2.comm.weight, "weight"), m.N2.V, DOT, TRACED, n_pre=n1),
            ],
        )

    return _case("two_layer", model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


# --------------------------------------------------------------------------- readouts


class LeakyReadoutNet(brainstate.nn.Module):
    """LIF + CUBA input + `LeakyRateReadout` of this step's spikes."""

    def __init__(self, n_in=6, n=10, n_out=3, tau=10.0 * u.ms, tau_out=10.0 * u.ms):
        super().__init__()
        self.hidden = LifCuba(n_in, n, tau=tau)
        self.out = bps.LeakyRateReadout(n, n_out, tau=tau_out, w_init=_kaiming(n))

    def update(self, x):
        return self.out(self.hidden(x))


def leaky_readout(
    batch_size=None, n_in=6, n=10, n_out=3, tau=10.0 * u.ms, tau_out=10.0 * u.ms, seed=0, init=True
) -> Case:
    """Groups {V, g} and {r}; the readout weight is traced onto r's group (r is hidden)."""
    _begin(seed)
    model = LeakyReadoutNet(n_in, n, n_out, tau=tau, tau_out=tau_out)

    def expected(m):
        h = m.hidden
        return expect(
            m,
            [([h.N.V, h.inp.syn.g], n), ([m.out.r], n_out, LTI)],
            [
                Rel(leaf_of(m, h.inp.comm.weight, "weight"), h.N.V, DOT, TRACED, n_pre=n_in),
                Rel(leaf_of(m, m.out.weight), m.out.r, DOT, TRACED, n_pre=n),
            ],
        )

    return _case("leaky_readout", model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


class LinearReadoutNet(brainstate.nn.Module):
    """LIF + CUBA input + an instantaneous `brainstate.nn.Linear` readout (weight and bias)."""

    def __init__(self, n_in=6, n=10, n_out=3):
        super().__init__()
        self.hidden = LifCuba(n_in, n)
        self.fc = brainstate.nn.Linear(n, n_out, w_init=_kaiming(n), b_init=braintools.init.Constant(0.1))

    def update(self, x):
        return self.fc(self.hidden(x))


def linear_readout(batch_size=None, n_in=6, n=10, n_out=3, seed=0, init=True) -> Case:
    """Group {V, g}; fc.weight.weight and fc.weight.bias reach the output with no hidden state in
    between: 'instantaneous', group None. The bias is added, so its op is not pinned down."""
    _begin(seed)
    model = LinearReadoutNet(n_in, n, n_out)

    def expected(m):
        h = m.hidden
        return expect(
            m,
            [([h.N.V, h.inp.syn.g], n)],
            [
                Rel(leaf_of(m, h.inp.comm.weight, "weight"), h.N.V, DOT, TRACED, n_pre=n_in),
                Rel(leaf_of(m, m.fc.weight, "weight"), None, DOT, INSTANTANEOUS),
                Rel(leaf_of(m, m.fc.weight, "bias"), None, None, INSTANTANEOUS),
            ],
        )

    return _case("linear_readout", model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


# --------------------------------------------------------------------------- event / sparse comms


def fixed_prob(batch_size=None, weight="array", n_in=8, n=12, seed=0, init=True) -> Case:
    """`EventFixedProb` (4 targets per pre) into LIF + Expon. `weight='array'`: per-synapse weights from
    an initializer, shape (n_in, conn_num); `'scalar'`: one homogeneous weight of shape ()."""
    _begin(seed)
    conn_weight = HostRandom("normal", 0.5, 0.1, u.mA) if weight == "array" else 0.5 * u.mA
    comm = brainstate.nn.EventFixedProb(n_in, n, conn_num=4, conn_weight=conn_weight, seed=seed)
    model = LifCuba(n_in, n, comm=comm)
    op = _comm_op("sparse", batch_size)

    def expected(m):
        return expect(
            m,
            [([m.N.V, m.inp.syn.g], n)],
            [Rel(leaf_of(m, m.inp.comm.weight), m.N.V, op, TRACED, n_pre=n_in)],
        )

    inputs = (_spikes(n_in, batch_size),)
    return _case(f"fixed_prob_{weight}", model, inputs, batch_size, expected, init, seed)


def event_linear(batch_size=None, n_in=8, n=12, seed=0, init=True) -> Case:
    """`EventLinear` (dense weight, spikes as events) into LIF + Expon."""
    _begin(seed)
    comm = brainstate.nn.EventLinear(n_in, n, weight=_kaiming(n_in, 2.0, u.mA))
    model = LifCuba(n_in, n, comm=comm)
    op = _comm_op("eventlinear", batch_size)

    def expected(m):
        return expect(
            m,
            [([m.N.V, m.inp.syn.g], n)],
            [Rel(leaf_of(m, m.inp.comm.weight), m.N.V, op, TRACED, n_pre=n_in)],
        )

    return _case("event_linear", model, (_spikes(n_in, batch_size),), batch_size, expected, init, seed)


# --------------------------------------------------------------------------- AlignPre


class AlignPreNet(brainstate.nn.Module):
    """Hand-built AlignPre: a pre-sized Expon filters the input spikes, its g goes through a Linear
    comm into a `CurrentProj` (CUBA) onto the post LIF. (`align_pre_projection(syn=Expon)` is broken
    upstream, see DESIGN.md §4.)"""

    def __init__(self, n_pre=6, n_post=10):
        super().__init__()
        self.pre_syn = bps.Expon(n_pre, tau=5.0 * u.ms, g_initializer=braintools.init.Constant(0.0))
        self.N = _lif(n_post)
        self.proj = bps.CurrentProj(comm=_dense(n_pre, n_post, scale=5.0), out=bps.CUBA(scale=1.0), post=self.N)

    def update(self, x):
        self.proj(self.pre_syn(x))
        return self.N()


def align_pre(batch_size=None, n_pre=6, n_post=10, seed=0, init=True) -> Case:
    """Groups {pre_syn.g} (S=1, n_pre neurons) and {N.V} (S=1); the Linear is traced onto N's group
    with the presynaptic trace g (n_pre elements) as its input."""
    _begin(seed)
    model = AlignPreNet(n_pre, n_post)

    def expected(m):
        return expect(
            m,
            [([m.pre_syn.g], n_pre), ([m.N.V], n_post)],
            [Rel(leaf_of(m, m.proj.comm.weight, "weight"), m.N.V, DOT, TRACED, n_pre=n_pre)],
        )

    return _case("align_pre", model, (_spikes(n_pre, batch_size),), batch_size, expected, init, seed)


# --------------------------------------------------------------------------- registry


def _partial(fn, **kw):
    def build(batch_size=None, init=True, **more):
        return fn(batch_size=batch_size, init=init, **kw, **more)

    build.__name__ = fn.__name__
    return build


ZOO: dict[str, Callable[..., Case]] = {
    "lif_cuba": lif_cuba,
    "lif_coba": lif_coba,
    "ei_net": ei_net,
    "ei_net_sparse": _partial(ei_net, conn="sparse"),
    "ei_net_eventlinear": _partial(ei_net, conn="eventlinear"),
    "ei_merged": ei_merged,
    "alif": alif,
    "dual_expon": dual_expon,
    "rsnn": rsnn,
    "two_layer": two_layer,
    "leaky_readout": leaky_readout,
    "linear_readout": linear_readout,
    "fixed_prob_array": _partial(fixed_prob, weight="array"),
    "fixed_prob_scalar": _partial(fixed_prob, weight="scalar"),
    "event_linear": event_linear,
    "align_pre": align_pre,
}
