"""Gated rate cells (issue 18, item 4): `GRUCell`, `LSTMCell`, `MGUCell` from `brainstate.nn`.

* `passes.gates` computes a product that is split into gates gate by gate, and a product with a
  concatenation piece by piece: the rewritten step has the same values as the captured one.
* d_rtrl on each cell equals its definition computed by brute force from the cells' textbook equations,
  written here without fusetrace (float64, 1e-8): dense RTRL with the recurrent state's paths into the
  weight products cut (`D`), the sensitivity carried to the next step keeping each parameter's Jacobian
  only on the neuron it belongs to (a gate column `i`, of any gate, belongs to neuron `i`) — which, for a
  gate read by the cell's other weight (GRU's `r`, MGU's `f` in `concat([x, f * h]) @ W_h`), keeps that
  path's diagonal `W_h[N_in + i, i]` — while the step's own gradient reads the full Jacobian.
* The same cell written with one `Linear` per gate gets the same gradients under d_rtrl and es_d_rtrl.
* The reports name the approximation.
"""

import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fusetrace
from fusetrace.interpret import evaluate
from test_compile_exact import assert_matches, bptt_grads, online_grads, online_learner
from test_deep_credit import _cos_ratio

N_IN, N, N_OUT, STEPS = 3, 5, 2, 15
CELLS = ("gru", "lstm", "mgu")


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


class Net(brainstate.nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.out = brainstate.nn.Linear(N, N_OUT)

    def update(self, x):
        return self.out(self.cell(x))


def _randomise(model, seed: int):
    """Every weight and bias drawn at random (biases too, so that no term vanishes)."""
    key = jax.random.PRNGKey(seed)
    for _, state in sorted(model.states(brainstate.ParamState).items()):
        value = {}
        for name, array in sorted(state.value.items()):
            key, sub = jax.random.split(key)
            value[name] = 0.7 * jax.random.normal(sub, jnp.shape(array), jnp.float64)
        state.value = value


def build(kind: str, batch, seed: int = 0) -> Net:
    cell = {"gru": brainstate.nn.GRUCell, "lstm": brainstate.nn.LSTMCell, "mgu": brainstate.nn.MGUCell}[kind]
    model = Net(cell(N_IN, N, b_init=braintools.init.Constant(0.0)))
    brainstate.nn.init_all_states(model, batch_size=batch)
    _randomise(model, seed)
    return model


def _data(batch):
    shape = (STEPS, batch, N_IN) if batch else (STEPS, N_IN)
    xs = jax.random.normal(jax.random.PRNGKey(1), shape)
    return xs, 0.5 * jax.random.normal(jax.random.PRNGKey(2), (*shape[:-1], N_OUT))


def _loss(output, target):
    return jnp.sum((u.get_mantissa(output) - target) ** 2)


# --------------------------------------------------------------------------- the cells' equations


def _cell(kind: str, p: dict, live: tuple, cut: tuple, x):
    """One step of the cell: `live` states enter the element-wise paths, `cut` the weight products."""
    sig = jax.nn.sigmoid
    if kind == "lstm":
        (h_cut, _), (_, c) = cut, live
        i, g, f, o = jnp.split(jnp.concatenate([x, h_cut]) @ p["W.weight"] + p["W.bias"], 4)
        c = sig(f + 1.0) * c + sig(i) * jnp.tanh(g)
        return (sig(o) * jnp.tanh(c), c)
    ((h,), (h_cut,)) = live, cut
    xh = jnp.concatenate([x, h_cut])
    if kind == "gru":
        r, z = jnp.split(sig(xh @ p["Wrz.weight"] + p["Wrz.bias"]), 2)
        candidate = jnp.tanh(jnp.concatenate([x, r * h_cut]) @ p["Wh.weight"] + p["Wh.bias"])
        return ((1 - z) * h + z * candidate,)
    f = sig(xh @ p["Wf.weight"] + p["Wf.bias"])
    candidate = jnp.tanh(jnp.concatenate([x, f * h_cut]) @ p["Wh.weight"] + p["Wh.bias"])
    return ((1 - f) * h + f * candidate,)


def _params(model) -> dict:
    out = {}
    for path, state in model.states(brainstate.ParamState).items():
        for name, value in state.value.items():
            out[f"{'.'.join(path[1:-1]) if path[0] == 'cell' else 'out'}.{name}"] = value
    return out


def _neuron_of(params: dict) -> np.ndarray:
    """The neuron each raveled parameter element belongs to: its column (gate column) modulo N; -1 for
    the readout's."""
    labels = {}
    for name, value in params.items():
        column = np.broadcast_to(np.arange(value.shape[-1]), value.shape) % N
        labels[name] = np.full(value.shape, -1) if name.startswith("out.") else column
    return np.asarray(ravel_pytree({k: jnp.asarray(v) for k, v in labels.items()})[0]).astype(int)


def d_rtrl_reference(kind: str, model, xs, ys, batch) -> dict:
    """Σ_t of d_rtrl's gradient, by its definition (see the module docstring), dense:
    `M_t = D_t M_{t-1} + mask ⊙ I_t` carried, `g_t = δ_t (D_t M_{t-1} + I_t) + ∂L_t/∂θ|direct`."""
    params = _params(model)
    theta, unravel = ravel_pytree(params)
    owner = _neuron_of(params)
    n_states = 2 if kind == "lstm" else 1
    mask = (np.tile(np.arange(N), n_states)[:, None] == owner[None, :]).astype(float)  # (S·N, P)

    def step(theta, state, state_cut, x):
        split = lambda s: tuple(jnp.split(s, n_states))
        return jnp.concatenate(_cell(kind, unravel(theta), split(state), split(state_cut), x))

    def output(theta, state):
        p = unravel(theta)
        return state[:N] @ p["out.weight"] + p["out.bias"]

    def example(theta, state, sensitivity, x):
        new = step(theta, state, state, x)
        d = jax.jacfwd(step, argnums=1)(theta, state, state, x)  # the weight products' inputs held
        f = jax.jacfwd(step, argnums=0)(theta, state, state, x)
        return new, d @ sensitivity + mask * f, d @ sensitivity + f

    def loss(theta, states, y):
        out = jax.vmap(output, in_axes=(None, 0))(theta, states)
        return _loss(out if batch else out[0], y)

    def body(carry, inputs):
        states, sensitivity, total = carry
        x, y = inputs
        x = x if batch else x[None]
        states, sensitivity, now = jax.vmap(example, in_axes=(None, 0, 0, 0))(theta, states, sensitivity, x)
        direct, delta = jax.grad(loss, argnums=(0, 1))(theta, states, y)
        return (states, sensitivity, total + direct + jnp.einsum("bs,bsp->p", delta, now)), None

    b = batch or 1
    carry = (jnp.zeros((b, n_states * N)), jnp.zeros((b, n_states * N, theta.size)), jnp.zeros_like(theta))
    (_, _, total), _ = jax.lax.scan(body, carry, (xs, ys))
    return unravel(total)


def _online_flat(grads: dict) -> dict:
    return {
        f"{'.'.join(path.split('.')[1:-1]) if path.startswith('cell') else 'out'}.{name}": value
        for path, g in grads.items()
        for name, value in g.items()
    }


# both layouts for the GRU (a split gate, a crossing, the crossed bias), batched for the others
@pytest.mark.parametrize(("kind", "batch"), [("gru", None), ("gru", 2), ("lstm", 2), ("mgu", 2)])
def test_d_rtrl_on_a_gated_cell_is_its_definition(kind, batch):
    xs, ys = _data(batch)
    learner, online = online_learner(build(kind, batch), xs, ys, "d_rtrl", batch, loss=_loss)
    reference = d_rtrl_reference(kind, build(kind, batch), xs, ys, batch)
    got = _online_flat(online)
    assert set(got) == set(reference)
    for name, want in reference.items():
        assert np.linalg.norm(want) > 0, name
        error = np.linalg.norm(np.asarray(got[name]) - want) / np.linalg.norm(want)
        assert error <= 1e-8, f"{kind} {name}: relative error {error:.3g}"
    reports = {r.path: r for r in learner.report()}
    assert all(r.treatment == "trace" for path, r in reports.items() if path.startswith("cell")), learner.summary()


# --------------------------------------------------------------------------- the rewrite keeps the step


@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("kind", CELLS)
def test_splitting_gates_keeps_the_step(kind, batch):
    from fusetrace.capture import capture
    from fusetrace.passes.gates import split_gates
    from fusetrace.passes.simplify import simplify

    model = build(kind, batch)
    x = _data(batch)[0][0]
    captured = simplify(capture(model, x, batch_size=batch))
    split = split_gates(captured)
    dots = lambda c: sum(e.primitive.name == "dot_general" for e in c.jaxpr.jaxpr.eqns)
    assert dots(split) > dots(captured)  # the gates (and the concatenation pieces) got products of their own
    args = [x]
    for var in captured.jaxpr.jaxpr.invars[1:]:
        args.append(jax.random.normal(jax.random.PRNGKey(len(args)), var.aval.shape, var.aval.dtype))
    want = evaluate(captured.jaxpr.jaxpr, captured.jaxpr.consts, args)
    got = evaluate(split.jaxpr.jaxpr, split.jaxpr.consts, args)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- one Linear per gate


class SplitGRU(brainstate.nn.Module):
    """brainstate's GRU written with one `Linear` per gate (as braintrace's cell is); with
    `elementwise_bias`, each gate's bias is a ParamState of its own added element-wise (the reset gate's
    then crosses the candidate's product as a per-neuron parameter, not as a product's bias slice)."""

    def __init__(self, elementwise_bias: bool = False):
        super().__init__()
        self.elementwise_bias = elementwise_bias
        bias = None if elementwise_bias else braintools.init.ZeroInit()
        self.Wr = brainstate.nn.Linear(N_IN + N, N, b_init=bias)
        self.Wz = brainstate.nn.Linear(N_IN + N, N, b_init=bias)
        self.Wh = brainstate.nn.Linear(N_IN + N, N, b_init=bias)
        if elementwise_bias:
            self.br, self.bz, self.bh = (brainstate.ParamState(jnp.zeros(N)) for _ in range(3))
        self.out = brainstate.nn.Linear(N, N_OUT)

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros((batch_size, N) if batch_size else (N,)))

    def _gate(self, name: str, x):
        y = getattr(self, f"W{name}")(x)
        return y + getattr(self, f"b{name}").value if self.elementwise_bias else y

    def update(self, x):
        old = self.h.value
        xh = jnp.concatenate([x, old], axis=-1)
        r, z = jax.nn.sigmoid(self._gate("r", xh)), jax.nn.sigmoid(self._gate("z", xh))
        candidate = jnp.tanh(self._gate("h", jnp.concatenate([x, r * old], axis=-1)))
        self.h.value = (1 - z) * old + z * candidate
        return self.out(self.h.value)


def _as_split(model: Net, batch, elementwise_bias: bool = False) -> SplitGRU:
    other = SplitGRU(elementwise_bias)
    brainstate.nn.init_all_states(other, batch_size=batch)
    wrz, wh = model.cell.Wrz.weight.value, model.cell.Wh.weight.value
    parts = {"r": {k: v[..., :N] for k, v in wrz.items()}, "z": {k: v[..., N:] for k, v in wrz.items()}, "h": wh}
    for name, value in parts.items():
        getattr(other, f"W{name}").weight.value = {"weight": value["weight"]} if elementwise_bias else dict(value)
        if elementwise_bias:
            getattr(other, f"b{name}").value = value["bias"]
    other.out.weight.value = dict(model.out.weight.value)
    return other


def _bias(grads: dict, name: str, elementwise_bias: bool):
    return grads[f"b{name}"] if elementwise_bias else grads[f"W{name}.weight"]["bias"]


@pytest.mark.parametrize(
    ("algorithm", "options", "elementwise_bias"),
    [("d_rtrl", {}, False), ("es_d_rtrl", {"decay": 0.8}, False), ("d_rtrl", {}, True), ("es_d_rtrl", {}, True)],
)
def test_a_split_linear_and_one_linear_per_gate_learn_alike(algorithm, options, elementwise_bias):
    batch = 2
    xs, ys = _data(batch)
    model = build("gru", batch)
    other = _as_split(model, batch, elementwise_bias)
    _, joint = online_learner(model, xs, ys, algorithm, batch, loss=_loss, **options)
    learner, split = online_learner(other, xs, ys, algorithm, batch, loss=_loss, **options)
    if elementwise_bias:  # the reset gate's bias crosses the candidate's product as a per-neuron parameter
        (br,) = [r for r in learner.analysis.relations if r.weight == "br"]
        assert br.elementwise and br.crossings
    wrz = joint["cell.Wrz.weight"]
    pairs = [
        (wrz["weight"][:, :N], split["Wr.weight"]["weight"]),
        (wrz["weight"][:, N:], split["Wz.weight"]["weight"]),
        (wrz["bias"][:N], _bias(split, "r", elementwise_bias)),
        (wrz["bias"][N:], _bias(split, "z", elementwise_bias)),
        (joint["cell.Wh.weight"]["weight"], split["Wh.weight"]["weight"]),
        (joint["cell.Wh.weight"]["bias"], _bias(split, "h", elementwise_bias)),
    ]
    for got, want in pairs:
        assert np.linalg.norm(want) > 0
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.linalg.norm(want))


def test_the_reports_name_the_gates_approximation():
    learner = fusetrace.compile(build("gru", 2), _data(2)[0][0], loss=_loss, algorithm="d_rtrl", batch_size=2)
    why = learner.explain("cell.Wrz.weight")
    assert "diagonal" in why and "cell.Wh.weight" in why
    report = {r.path: r for r in learner.report()}["cell.Wrz.weight.weight"]
    assert not report.exact and report.treatment == "trace"


@pytest.mark.parametrize("kind", CELLS)
def test_a_round_through_the_cells_own_recurrence_brings_every_weight_toward_bptt(kind):
    """`own_loop_hops=1` follows the credit one round through the cell's recurrent weights, which d_rtrl's
    per-gate diagonal drops: every cell weight's summed gradient turns toward BPTT's (here the MGU's
    forget-gate weight from cosine 0.82 to 0.98), none away, and the report says so."""
    xs, ys = _data(2)
    reference = bptt_grads(build(kind, 2), xs, ys, loss=_loss)
    cosines = {}
    for hops in (0, 1):
        learner, online = online_learner(build(kind, 2), xs, ys, "d_rtrl", 2, loss=_loss, own_loop_hops=hops)
        cosines[hops] = {
            path: _cos_ratio(online[path], reference[path])[0] for path in online if path.startswith("cell")
        }
    for path, before in cosines[0].items():
        assert cosines[1][path] >= before - 1e-9 and cosines[1][path] >= 0.95, (
            f"{path}: {before:.4f} -> {cosines[1][path]:.4f}"
        )
    assert "followed once around the loop" in learner.explain(next(iter(cosines[1])))


def test_es_d_rtrl_at_full_rank_is_d_rtrl_through_a_crossed_gate():
    """GRU's reset gate reaches the cell through the other weight's product (a crossing): its step's own
    credit is formed exactly under every algorithm, so es_d_rtrl's "low_rank" trace at a rank that
    truncates nothing equals d_rtrl (found by the fuzz's full-rank check: the factorised relations had
    lost that correction, 8% off)."""
    xs, ys = _data(2)
    _, es = online_learner(build("gru", 2), xs, ys, "es_d_rtrl", 2, loss=_loss, factorisation="low_rank", rank=10_000)
    assert_matches(es, online_grads(build("gru", 2), xs, ys, "d_rtrl", 2, loss=_loss), 1e-8)
