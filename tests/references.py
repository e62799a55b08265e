"""Brute-force gradient references for testing fusetrace's online-learning step.

Nothing here imports fusetrace: these are independent oracles, slow and dense on purpose, meant for tiny
networks (tens of hidden values, ~100 parameters) in float64.

Consumes: a `brainstate.nn.Module` (built from brainpy.state parts) stepped by `model.update(x_t)`, a
sequence of inputs `xs`, targets, and `loss_fn(output, target) -> scalar`.
Produces: gradients as dicts `{param path: value}` shaped like `functional_step`'s `params` (unit-free
mantissas), from

* `bptt_grads`: exact gradient of `Σ_t loss_fn(o_t, target_t)` by `jax.grad` through a `lax.scan`.
* `bptt_grads_stopgrad`: the same for the model with its recurrent presynaptic spikes detached (the graph
  whose exact gradient e-prop computes); the model must expose a `stop_recurrent_grad` flag.
* `rtrl_reference`: dense RTRL with one-step windows, with the Jacobian masked to the per-neuron blocks of
  each hidden group and the cross-group credit through linear time-invariant readouts kept — the quantity
  `d_rtrl` computes (DESIGN.md §2).
* `es_d_rtrl_naive`: the dense formulas of `es_d_rtrl` (DESIGN.md §2) for `RecurrentLIF` models.

Invariants: the model's states are never changed by these functions (tracing slices and restores them).
Sharp edges: hidden states are keyed by the dotted path of `model.states()`; the trace itself matches states
by object identity, so a state reached under another path (an LIF `V` seen as `E.post.V`) is still found.
States that the step uses but that are not in `model.states()` (brainstate's global `RandomState`) are
rejected: a reference must be deterministic. Non-hidden, non-parameter states ("others") are carried
through the step and must not carry the batch axis.
"""

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import brainpy  # noqa: F401  (brainpy.state lives inside brainpy >= 2.9)
import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

PyTree = Any
Params = dict[str, PyTree]
Hidden = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------------------
# functional steps
# ---------------------------------------------------------------------------------------------------------


def path_key(path: Sequence) -> str:
    """The dotted key of a `model.states()` path: `('out', 'r') -> 'out.r'`."""
    return ".".join(str(k) for k in path)


def path_of(model: brainstate.nn.Module, state: brainstate.State) -> str:
    """The dotted key under which `model.states()` lists `state` (matched by identity)."""
    for path, candidate in model.states().items():
        if candidate is state:
            return path_key(path)
    raise KeyError(f"{type(state).__name__} is not a state of the model")


def _mantissa(tree: PyTree) -> PyTree:
    return jax.tree.map(u.get_mantissa, tree, is_leaf=u.math.is_quantity)


def _model_states(model: brainstate.nn.Module) -> tuple[dict, dict, dict]:
    """`(params, hidden, others)`: each `{dotted path: State}` in `model.states()` order."""
    params, hidden, others = {}, {}, {}
    for path, state in model.states().items():
        if isinstance(state, brainstate.ParamState):
            params[path_key(path)] = state
        elif isinstance(state, brainstate.HiddenState):
            hidden[path_key(path)] = state
        else:
            others[path_key(path)] = state
    return params, hidden, others


@contextlib.contextmanager
def _first_example(hidden_states: dict, batch_size: int | None):
    """Temporarily give every hidden state the value of batch element 0 (for tracing one example)."""
    if batch_size is None:
        yield
        return
    saved = {key: state.value for key, state in hidden_states.items()}
    try:
        for key, state in hidden_states.items():
            state.value = jax.tree.map(lambda a: a[0], saved[key])
        yield
    finally:
        for key, state in hidden_states.items():
            state.value = saved[key]


@dataclasses.dataclass(frozen=True)
class _Traced:
    """One model method traced for ONE example: a closed jaxpr over `(*arg leaves, *state leaves)`."""

    jaxpr: Any
    keys: tuple[tuple[str, str], ...]  # (kind, path) per traced state, kind in params/hidden/others
    out_treedef: Any
    written: frozenset[str]  # paths of the states the method writes


def _trace(model, method: Callable, example_args: tuple, batch_size: int | None) -> _Traced:
    params, hidden, others = _model_states(model)
    kind_of = [
        (kind, path, state)
        for kind, table in (("params", params), ("hidden", hidden), ("others", others))
        for path, state in table.items()
    ]
    if batch_size is not None:
        example_args = jax.tree.map(lambda a: a[0], example_args)
    function = brainstate.transform.StatefulFunction(method, return_only_write=False)
    with _first_example(hidden, batch_size):
        function.make_jaxpr(*example_args)
        jaxpr = function.get_jaxpr(*example_args)
        states = function.get_states(*example_args)
        written_states = function.get_write_states(*example_args)
        out_treedef = function.get_out_treedef(*example_args)

    def key_of(state):
        for kind, path, candidate in kind_of:
            if candidate is state:
                return kind, path
        raise ValueError(
            f"the step uses a {type(state).__name__} that is not in model.states() (a global RandomState?); "
            "a brute-force reference needs a deterministic step: feed random inputs as arguments"
        )

    keys = tuple(key_of(state) for state in states)
    written = frozenset(key_of(state)[1] for state in written_states)
    if any(kind == "params" for kind, path in map(key_of, written_states)):
        raise ValueError("the step writes a ParamState; references treat parameters as constants of a step")
    return _Traced(jaxpr, keys, out_treedef, written)


def _pure(traced: _Traced) -> Callable:
    """`f(params, hidden, others, *args) -> (out, new_hidden, new_others)` for ONE example, on mantissas."""

    def step(params: Params, hidden: Hidden, others: dict, *args):
        tables = {"params": params, "hidden": hidden, "others": others}
        state_values = [tables[kind][path] for kind, path in traced.keys]
        flat = jax.tree.leaves((args, {}, state_values))
        outs = jax.core.eval_jaxpr(traced.jaxpr.jaxpr, traced.jaxpr.consts, *flat)
        out, new_values = _mantissa(traced.out_treedef.unflatten(outs))
        new_hidden, new_others = dict(hidden), dict(others)
        for (kind, path), value in zip(traced.keys, new_values, strict=True):
            if kind == "hidden":
                new_hidden[path] = value
            elif kind == "others":
                new_others[path] = value
        return out, new_hidden, new_others

    return step


def _batched(step: Callable, batch_size: int | None) -> Callable:
    """Map a one-example step over a leading batch axis of hidden states and inputs."""
    if batch_size is None:
        return step
    return jax.vmap(step, in_axes=(None, 0, None, 0), out_axes=(0, 0, None))


def _current_values(model) -> tuple[Params, Hidden, dict]:
    params, hidden, others = _model_states(model)
    return tuple({path: _mantissa(state.value) for path, state in table.items()} for table in (params, hidden, others))


def functional_step(model: brainstate.nn.Module, example_input, batch_size: int | None = None):
    """A pure version of `model.update`, on unit-free mantissas.

    Arguments:
        model: an initialised `brainstate.nn.Module` (with `batch_size` when given).
        example_input: one step's input (leading batch axis when `batch_size` is given).
        batch_size: the batch size the model's hidden states were initialised with, or None.

    Returns:
        `(step_fn, params, hidden, others)`. `step_fn(params, hidden, others, x) -> (output, new_hidden,
        new_others)` is pure (jit/grad/vmap-safe); `params` is `{path: mantissa value}` for every
        `ParamState` (a `Linear`'s value is `{'weight': ...}`), `hidden` likewise for `HiddenState`s,
        `others` for the remaining states; all hold the model's current values. `x` and the output are
        mantissas in the units of `example_input` / of the model's output.

    Example:
        >>> step_fn, params, hidden, others = functional_step(model, x0)
        >>> out, hidden, others = step_fn(params, hidden, others, x0)
    """
    traced = _trace(model, model.update, (example_input,), batch_size)
    return (_batched(_pure(traced), batch_size), *_current_values(model))


# ---------------------------------------------------------------------------------------------------------
# BPTT
# ---------------------------------------------------------------------------------------------------------


def state_grad(loss: Callable, weights) -> dict:
    """`brainstate.transform.grad(loss, weights)()` as one XLA program: eagerly, every op of the gradient
    is dispatched and compiled on its own, several times slower than the whole compiled once."""
    return brainstate.transform.jit(brainstate.transform.grad(loss, weights))()


def bptt_grads(model, xs, targets, loss_fn: Callable, batch_size: int | None = None) -> Params:
    """Exact gradient of `Σ_t loss_fn(o_t, target_t)` over the whole sequence, from the current states.

    Arguments:
        model: initialised model; its states are not modified.
        xs: inputs, leading time axis `(T, [batch,] ...)`; Quantities are reduced to mantissas.
        targets: pytree with leading time axis `T`, passed step by step to `loss_fn`.
        loss_fn: `loss_fn(output_t, target_t) -> scalar` (output with the batch axis when batched).
        batch_size: as for `functional_step`.

    Returns:
        `{param path: gradient}` shaped like `functional_step`'s `params`.
    """
    xs = _mantissa(xs)
    step_fn, params, hidden, others = functional_step(model, jax.tree.map(lambda a: a[0], xs), batch_size)

    def total_loss(params):
        def body(carry, inputs):
            hidden, others = carry
            x, target = inputs
            out, hidden, others = step_fn(params, hidden, others, x)
            return (hidden, others), loss_fn(out, target)

        _, losses = lax.scan(body, (hidden, others), (xs, targets))
        return jnp.sum(losses)

    return jax.jit(jax.grad(total_loss))(params)


@contextlib.contextmanager
def stop_recurrent(model):
    """Within the block, `model.stop_recurrent_grad` is True (so traces detach recurrent spikes)."""
    if not hasattr(model, "stop_recurrent_grad"):
        raise TypeError(f"{type(model).__name__} has no `stop_recurrent_grad` flag to detach recurrent inputs")
    saved = model.stop_recurrent_grad
    model.stop_recurrent_grad = True
    try:
        yield model
    finally:
        model.stop_recurrent_grad = saved


def bptt_grads_stopgrad(model, xs, targets, loss_fn: Callable, batch_size: int | None = None) -> Params:
    """`bptt_grads` of the graph where recurrent presynaptic spikes are detached (`stop_gradient`).

    The forward pass is unchanged; only the gradient paths `spike_{t-1} -> W_rec -> h_t` are cut. This is the
    graph whose exact gradient e-prop (and `d_rtrl` on a recurrent layer) computes. The model must have a
    `stop_recurrent_grad` attribute read by its step (like `RecurrentLIF`).
    """
    with stop_recurrent(model):
        return bptt_grads(model, xs, targets, loss_fn, batch_size)


# ---------------------------------------------------------------------------------------------------------
# RTRL
# ---------------------------------------------------------------------------------------------------------


def _index_labels(hidden_one: Hidden) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """For the raveled hidden vector: the path index and the neuron index of every entry."""
    paths = list(hidden_one)
    state_label = ravel_pytree({p: jnp.full(jnp.shape(v), i) for i, (p, v) in enumerate(hidden_one.items())})[0]
    neuron_label = ravel_pytree({p: jnp.arange(jnp.size(v)).reshape(jnp.shape(v)) for p, v in hidden_one.items()})[0]
    return np.asarray(state_label).astype(int), np.asarray(neuron_label).astype(int), paths


def hidden_mask(
    hidden_one: Hidden, groups: Sequence[Sequence[str]] | None, lti_groups: Sequence[Sequence[str]] = ()
) -> np.ndarray | None:
    """The 0/1 mask applied to `∂h_t/∂h_{t-1}` (over the raveled hidden vector of one example).

    Entry `(i, j)` is kept when `i` and `j` belong to the same group and, for a group of `groups`, to the
    same neuron (the per-neuron `S×S` blocks); for a group of `lti_groups` the whole group block is kept.
    Everything between different groups is zeroed. `groups=None` returns None (no masking: exact RTRL).
    """
    if groups is None:
        return None
    state_label, neuron_label, paths = _index_labels(hidden_one)
    group_of, is_lti = {}, {}
    for index, group in enumerate([*groups, *lti_groups]):
        sizes = {int(np.size(hidden_one[p])) for p in group}
        if len(sizes) != 1:
            raise ValueError(f"group {list(group)} mixes neuron counts {sorted(sizes)}")
        for path in group:
            if path in group_of:
                raise ValueError(f"hidden state {path!r} is in two groups")
            group_of[path] = index
            is_lti[path] = index >= len(groups)
    missing = [p for p in paths if p not in group_of]
    if missing:
        raise ValueError(f"hidden states {missing} are in no group; list every hidden path in groups or lti_groups")
    group_label = np.array([group_of[paths[s]] for s in state_label])
    lti_label = np.array([is_lti[paths[s]] for s in state_label])
    same_group = group_label[:, None] == group_label[None, :]
    same_neuron = neuron_label[:, None] == neuron_label[None, :]
    return (same_group & (lti_label[:, None] | same_neuron)).astype(float)


def _check_stage_methods(model):
    for method in ("update_hidden", "update_lti", "output"):
        if not callable(getattr(model, method, None)):
            raise TypeError(
                f"rtrl_reference needs {type(model).__name__}.{method}(): split the step as "
                "update(x) == update_hidden(x); update_lti(); return output()"
            )


def _check_stages(hidden: dict, lti_paths: set[str], traced_hidden: _Traced, traced_lti: _Traced):
    bad = traced_hidden.written & lti_paths
    if bad:
        raise ValueError(f"update_hidden writes LTI states {sorted(bad)}; they must be advanced in update_lti")
    bad = traced_lti.written - lti_paths
    if bad:
        raise ValueError(f"update_lti writes {sorted(bad)}, which are not listed in lti_groups")
    unknown = lti_paths - set(hidden)
    if unknown:
        raise ValueError(f"lti_groups name unknown hidden states {sorted(unknown)}")


def _per_example(model, xs, batch_size: int | None):
    """`(params, hidden, others, xs, hidden_one, batched)` from the model's current states, with an
    unbatched model turned into a batch of one (one code path) and `hidden_one` its first example."""
    params, hidden, others = _current_values(model)
    batched = batch_size is not None
    if not batched:
        hidden = jax.tree.map(lambda a: a[None], hidden)
        xs = jax.tree.map(lambda a: a[:, None], xs)
    return params, hidden, others, xs, jax.tree.map(lambda a: a[0], hidden), batched


def rtrl_reference(
    model,
    xs,
    targets,
    loss_fn: Callable,
    groups: Sequence[Sequence[str]] | None,
    lti_groups: Sequence[Sequence[str]] = (),
    batch_size: int | None = None,
) -> Params:
    """Brute-force RTRL with one-step windows: `Σ_t g_t` with dense, masked sensitivity matrices.

    The model must split its step in three methods (as `RecurrentLIF` does):
    `update(x) == update_hidden(x); update_lti(); return output()`, where `update_hidden` advances every
    hidden state except those of `lti_groups`, `update_lti` advances exactly the `lti_groups` states from
    the NEW values of the others, and `output` reads states without writing them.

    Per example (vmapped over the batch), with `h` all hidden values raveled and `θ` all parameters raveled,
    `S1`, `S2` the two stages (each the identity on the states it does not write), `Mask` from `hidden_mask`:

        J1 = ∂S1/∂h (h_{t-1}),  I1 = ∂S1/∂θ,   J2 = ∂S2/∂h (after stage 1),  I2 = ∂S2/∂θ   (jacfwd, dense)
        M_t = J2 (Mask ⊙ J1 · M_{t-1} + I1) + I2,      M_0 = 0
        g_t = Σ_b δ_t[b] · M_t[b] + ∂L_t/∂θ|direct,   δ_t = ∂L_t/∂h_t, h_t independent leaves of output()

    Mask keeps per-neuron `S×S` blocks within each group of `groups` (so cross-neuron credit through recurrent
    weights is dropped, but a self-connection `W[n, n]` stays: call it on the model under `stop_recurrent`
    to cut weight paths entirely, as DESIGN.md's `D_t` does), and zeroes everything between groups. An LTI
    group's rows get the credit from the other groups through J2 — `∂r_t/∂h^A_t · M^A_t` with `M^A_t` the
    MASKED sensitivity of group A — plus its own `∂r_t/∂r_{t-1}`. J2 is not masked. `groups=None` means no
    mask: exact RTRL, equal to `bptt_grads`.

    Arguments:
        groups: lists of hidden paths (keys of `functional_step`'s `hidden`), one list per spiking group; all
            states of a group have the same neuron count. None for exact RTRL.
        lti_groups: lists of hidden paths of linear time-invariant readouts (e.g. `[['out.r']]`).
        Others as for `bptt_grads`; the loss may mix batch elements (δ is taken on the batched output).

    Returns:
        `{param path: gradient}` shaped like `functional_step`'s `params`.
    """
    xs = _mantissa(xs)
    x0 = jax.tree.map(lambda a: a[0], xs)
    _, hidden_states, _ = _model_states(model)
    lti_paths = {path for group in lti_groups for path in group}
    _check_stage_methods(model)
    traced_hidden = _trace(model, model.update_hidden, (x0,), batch_size)
    traced_lti = _trace(model, model.update_lti, (), batch_size)
    traced_output = _trace(model, model.output, (), batch_size)
    _check_stages(hidden_states, lti_paths, traced_hidden, traced_lti)
    stage_hidden, stage_lti, output = map(_pure, (traced_hidden, traced_lti, traced_output))

    params, hidden, others, xs, hidden_one, batched = _per_example(model, xs, batch_size)
    theta, unravel_params = ravel_pytree(params)
    _, unravel_hidden = ravel_pytree(hidden_one)
    ravel_hidden = lambda tree: ravel_pytree(tree)[0]
    mask = hidden_mask(hidden_one, groups, lti_groups)

    def stage1(theta, h, others, x):
        _, new_hidden, new_others = stage_hidden(unravel_params(theta), unravel_hidden(h), others, x)
        return ravel_hidden(new_hidden), new_others

    def stage2(theta, h, others):
        _, new_hidden, new_others = stage_lti(unravel_params(theta), unravel_hidden(h), others)
        return ravel_hidden(new_hidden), new_others

    def out_one(theta, h, others):
        return output(unravel_params(theta), unravel_hidden(h), others)[0]

    def example_step(theta, h, sensitivity, others, x):
        h1, others1 = stage1(theta, h, others, x)
        j1, _ = jax.jacfwd(stage1, argnums=1, has_aux=True)(theta, h, others, x)
        i1, _ = jax.jacfwd(stage1, argnums=0, has_aux=True)(theta, h, others, x)
        h2, others2 = stage2(theta, h1, others1)
        j2, _ = jax.jacfwd(stage2, argnums=1, has_aux=True)(theta, h1, others1)
        i2, _ = jax.jacfwd(stage2, argnums=0, has_aux=True)(theta, h1, others1)
        if mask is not None:
            j1 = j1 * mask
        return h2, j2 @ (j1 @ sensitivity + i1) + i2, others2

    def step_loss(theta, h2, others, target):
        out = jax.vmap(out_one, in_axes=(None, 0, None))(theta, h2, others)
        return loss_fn(out if batched else jax.tree.map(lambda o: o[0], out), target)

    @jax.jit
    def body(carry, inputs):
        h, sensitivity, others, grad = carry
        x, target = inputs
        h2, sensitivity, others = jax.vmap(example_step, in_axes=(None, 0, 0, None, 0), out_axes=(0, 0, None))(
            theta, h, sensitivity, others, x
        )
        grad_theta, delta = jax.grad(step_loss, argnums=(0, 1))(theta, h2, others, target)
        grad = grad + grad_theta + jnp.einsum("bn,bnp->p", delta, sensitivity)
        return (h2, sensitivity, others, grad), None

    h = jax.vmap(ravel_hidden)(hidden)
    sensitivity = jnp.zeros((*h.shape, theta.size), theta.dtype)
    carry = (h, sensitivity, others, jnp.zeros_like(theta))
    (_, _, _, grad), _ = lax.scan(body, carry, (xs, targets))
    return unravel_params(grad)


# ---------------------------------------------------------------------------------------------------------
# a tiny model with the split step
# ---------------------------------------------------------------------------------------------------------


def soft_spike(x):
    """A smooth spike `sigmoid(4x)` (x in threshold units): a differentiable step for finite differences."""
    return jax.nn.sigmoid(4.0 * x)


class RecurrentLIF(brainstate.nn.Module):
    """One LIF layer with AlignPost Expon/CUBA input (and optional recurrent) projections and a readout.

    Hidden states (paths of `model.states()`): the LIF `N.V`, one Expon `g` per projection (input tau 5 ms,
    recurrent tau `rec_tau`, 8 ms by default, so they are not merged; brainpy merges them into one `g` at
    5 ms), and `out.r` for the leaky readout. Units: mV and mA.

    Arguments:
        n_in, n_rec, n_out: sizes.
        readout: 'leaky' (`brainpy.state.LeakyRateReadout`, a hidden `r`) or 'linear' (`brainstate.nn.Linear`,
            with bias, no state).
        stop_recurrent_grad: detach the recurrent presynaptic spikes (forward unchanged).
        recurrent: include the recurrent projection; False gives a feed-forward layer.
        dt, tau_mem: step and membrane time constant; `spk_fun` the LIF spike function (default
            `braintools.surrogate.ReluGrad()`, built here so it takes the dtype current at construction).
        w_in_scale, w_rec_scale: KaimingNormal scales of input and recurrent weights (mA).
        rec_tau: the recurrent synapse's time constant.

    The step is split for `rtrl_reference`: `update(x) == update_hidden(x); update_lti(); return output()`.
    `groups()` returns `(groups, lti_groups)` for `rtrl_reference`; `relations()` and `presynaptic(x)`
    name the hidden-layer weights and their presynaptic inputs for `es_d_rtrl_naive`.
    """

    def __init__(
        self,
        n_in: int,
        n_rec: int,
        n_out: int,
        readout: str = "leaky",
        stop_recurrent_grad: bool = False,
        recurrent: bool = True,
        dt=1.0 * u.ms,
        tau_mem=10.0 * u.ms,
        spk_fun: Callable | None = None,
        w_in_scale: float = 3.0,
        w_rec_scale: float = 1.0,
        rec_tau=8.0 * u.ms,
    ):
        super().__init__()
        if readout not in ("leaky", "linear"):
            raise ValueError(f"readout must be 'leaky' or 'linear', got {readout!r}")
        self.readout, self.stop_recurrent_grad, self.dt = readout, stop_recurrent_grad, dt
        self.n_in, self.n_rec, self.n_out = n_in, n_rec, n_out
        with brainstate.environ.context(dt=dt):
            spk_fun = braintools.surrogate.ReluGrad() if spk_fun is None else spk_fun
            # every LIF constant is passed explicitly: brainpy's defaults are built at import time, in
            # float32 when brainpy is imported before float64 is enabled
            self.N = bps.LIF(
                n_rec,
                tau=tau_mem,
                spk_fun=spk_fun,
                R=1.0 * u.ohm,
                V_th=1.0 * u.mV,
                V_reset=0.0 * u.mV,
                V_rest=0.0 * u.mV,
                V_initializer=braintools.init.Uniform(0.0 * u.mV, 1.0 * u.mV),
            )
            self.inp = self._projection(n_in, w_in_scale, 5.0 * u.ms)
            self.rec = self._projection(n_rec, w_rec_scale, rec_tau) if recurrent else None
            if readout == "leaky":
                self.out = bps.LeakyRateReadout(n_rec, n_out, tau=10.0 * u.ms)
            else:
                self.out = brainstate.nn.Linear(n_rec, n_out)

    def _projection(self, n_pre, scale, tau):
        return bps.AlignPostProj(
            comm=brainstate.nn.Linear(
                n_pre, self.n_rec, b_init=None, w_init=braintools.init.KaimingNormal(scale=scale, unit=u.mA)
            ),
            syn=bps.Expon.desc(self.n_rec, tau=tau, g_initializer=braintools.init.Constant(0.0 * u.mA)),
            out=bps.CUBA.desc(scale=1.0),
            post=self.N,
        )

    def update_hidden(self, x, y_shift: dict[str, jax.Array] | None = None):
        """Advance the spiking group (V and the synaptic g's) by one step.

        `y_shift` (mantissas in mA, keyed like `relations()`) is added to each projection's weight output
        `y = u @ W`; it exists so that `F_t = ∂h_t/∂y_t` can be taken by differentiation.
        """
        with brainstate.environ.context(dt=self.dt):
            if self.rec is not None:
                spikes = self.N.get_spike()
                if self.stop_recurrent_grad:
                    spikes = lax.stop_gradient(spikes)
                self.rec(spikes)
            self.inp(x)
            if y_shift is not None:
                for name, shift in y_shift.items():
                    getattr(self, name).syn.add_delta_input(f"y_shift_{name}", shift * u.mA)
            self.N()

    def update_lti(self):
        """Advance the leaky readout from the NEW spikes (nothing for a linear readout)."""
        if self.readout == "leaky":
            with brainstate.environ.context(dt=self.dt):
                self.out(self.N.get_spike())

    def output(self):
        """The step's output from the current (new) states; writes nothing."""
        if self.readout == "leaky":
            return self.out.r.value
        return self.out(self.N.get_spike())

    def update(self, x):
        self.update_hidden(x)
        self.update_lti()
        return self.output()

    def spike_input(self):
        """The argument of the LIF's spike function at the current V, `(V − V_th) / (V_th − V_reset)` (the
        formula of brainpy.state's `LIF.get_spike`); writes nothing."""
        return (self.N.V.value - self.N.V_th) / (self.N.V_th - self.N.V_reset)

    def relations(self) -> dict[str, str]:
        """`{projection name: weight path}` of the weights that feed the spiking group."""
        names = ["inp"] + (["rec"] if self.rec is not None else [])
        return {name: path_of(self, getattr(self, name).comm.weight) for name in names}

    def presynaptic(self, x) -> dict[str, Any]:
        """`{projection name: u_t}`, each projection's presynaptic input, read BEFORE the step."""
        inputs = {"inp": x}
        if self.rec is not None:
            inputs["rec"] = self.N.get_spike()
        return inputs

    def groups(self) -> tuple[list[list[str]], list[list[str]]]:
        """`(groups, lti_groups)` of hidden paths for `rtrl_reference`."""
        spiking = [self.N.V, self.inp.syn.g] + ([self.rec.syn.g] if self.rec is not None else [])
        lti = [[path_of(self, self.out.r)]] if self.readout == "leaky" else []
        paths = list(dict.fromkeys(path_of(self, state) for state in spiking))  # a merged synapse once
        return [paths], lti


def build_recurrent_lif(n_in=3, n_rec=4, n_out=2, batch_size=None, seed=0, **kw) -> RecurrentLIF:
    """A seeded, initialised `RecurrentLIF` (keyword arguments go to the constructor)."""
    brainstate.random.seed(seed)
    model = RecurrentLIF(n_in, n_rec, n_out, **kw)
    brainstate.nn.init_all_states(model, batch_size=batch_size)
    return model


# ---------------------------------------------------------------------------------------------------------
# es_d_rtrl, naive
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FactorSetup:
    """What the factorised references share: the model's stages as pure functions of its raveled hidden
    vector (recurrent spikes detached), the per-example values, and the raveled vector's layout."""

    relations: dict
    stage_hidden: Callable
    presynaptic: Callable
    output: Callable
    params: Any
    hidden: Any
    others: Any
    xs: Any
    batched: bool
    theta: jax.Array
    unravel_params: Callable
    unravel_hidden: Callable
    ravel_hidden: Callable
    groups: Any
    mask: np.ndarray | None
    labels: np.ndarray  # the state path index of every raveled hidden entry
    neurons: np.ndarray  # its neuron index
    paths: list
    to_neuron: np.ndarray  # (hidden entry, neuron) membership of the spiking group: sums each neuron's S states


def _factor_setup(model, xs, batch_size) -> _FactorSetup:
    xs = _mantissa(xs)
    relations = model.relations()
    x0 = jax.tree.map(lambda a: a[0], xs)
    batch = () if batch_size is None else (batch_size,)
    shift0 = {name: jnp.zeros((*batch, model.n_rec)) for name in relations}
    with stop_recurrent(model):
        traced_hidden = _trace(model, model.update_hidden, (x0, shift0), batch_size)
    presynaptic = _pure(_trace(model, model.presynaptic, (x0,), batch_size))
    output = _pure(_trace(model, model.output, (), batch_size))
    params, hidden, others, xs, hidden_one, batched = _per_example(model, xs, batch_size)
    theta, unravel_params = ravel_pytree(params)
    _, unravel_hidden = ravel_pytree(hidden_one)
    groups, _ = model.groups()
    labels, neurons, paths = _index_labels(hidden_one)
    in_group = np.isin(np.array(paths)[labels], groups[0])
    return _FactorSetup(
        relations=relations,
        stage_hidden=_pure(traced_hidden),
        presynaptic=presynaptic,
        output=output,
        params=params,
        hidden=hidden,
        others=others,
        xs=xs,
        batched=batched,
        theta=theta,
        unravel_params=unravel_params,
        unravel_hidden=unravel_hidden,
        ravel_hidden=lambda tree: ravel_pytree(tree)[0],
        groups=groups,
        mask=hidden_mask(hidden_one, groups, [[p] for p in hidden_one if p not in groups[0]]),
        labels=labels,
        neurons=neurons,
        paths=paths,
        to_neuron=np.eye(model.n_rec)[neurons] * in_group[:, None],
    )


def es_d_rtrl_naive(
    model: RecurrentLIF,
    xs,
    targets,
    loss_fn: Callable,
    alpha: float,
    batch_size: int | None = None,
    factorisation: str = "filtered",
) -> Params:
    """`es_d_rtrl` of DESIGN.md §2 by its dense formulas, for a `RecurrentLIF` with a linear readout (or a
    model with the same methods, such as tests/fuzz_models.py's single-population networks).

    Per hidden-layer weight `W` (`relations()`: input and recurrent) and per example, from `t = 0`:

        ε^u_t = α ε^u_{t-1} + u_t                           u_t = `presynaptic(x_t)` (I,)
        ε^f_t = α D_t ε^f_{t-1} + (1 − α) F_t               over the raveled hidden vector
        dW   += Σ_b ε^u_t[b] ⊗ (Σ_s δ_t[b, s, n] ε^f_t[b, s, n]) / c_t,     c_t = 1 − α^{t+1}

    That is the "filtered" factorisation; the "averaged" one has `ε^u_t = α ε^u_{t-1} + (1 − α) u_t`
    and `ε^f_t = D_t ε^f_{t-1} + F_t` (same gradient formula).

    `D_t` is `∂h_t/∂h_{t-1}` of the step with recurrent spikes detached (weight paths cut), masked to the
    per-neuron blocks of the spiking group; `F_t = ∂h_t/∂y_t` is one JVP with a ones tangent on the weight
    output `y = u @ W`; `δ_t = ∂L_t/∂h_t` with the new hidden values as leaves. Weights with no temporal
    relation (the readout's weight and bias) get their exact same-step gradient `∂L_t/∂θ`.

    Degenerate exact cases: `T = 1` (any α), and α → 1 when a weight's `u_t` is constant in time (then
    `ε^u_t / c_t = u / (1 − α)` and `ε^f_t / (1 − α)` tends to the `d_rtrl` trace).
    """
    protocol = ("update_hidden", "output", "relations", "presynaptic", "groups", "n_rec", "stop_recurrent_grad")
    if any(not hasattr(model, name) for name in protocol) or getattr(model, "readout", None) != "linear":
        raise NotImplementedError(
            "es_d_rtrl_naive is written for one spiking group with a stateless readout: a RecurrentLIF(readout="
            "'linear') or a model with its protocol (update_hidden(x, y_shift), output(), relations(), "
            "presynaptic(x), groups(), n_rec, stop_recurrent_grad and readout == 'linear')"
        )
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    gains = {"filtered": (1.0, alpha, 1.0 - alpha), "averaged": (1.0 - alpha, 1.0, 1.0)}
    if factorisation not in gains:
        raise ValueError(f"unknown factorisation {factorisation!r}")
    pre_gain, post_decay, post_gain = gains[factorisation]
    s = _factor_setup(model, xs, batch_size)
    relations, stage_hidden, presynaptic, output = s.relations, s.stage_hidden, s.presynaptic, s.output
    params, hidden, others, xs, batched = s.params, s.hidden, s.others, s.xs, s.batched
    theta, unravel_params, unravel_hidden, ravel_hidden = s.theta, s.unravel_params, s.unravel_hidden, s.ravel_hidden
    mask, to_neuron = s.mask, s.to_neuron

    def stage1(h, others, x, shift):
        _, new_hidden, new_others = stage_hidden(params, unravel_hidden(h), others, x, shift)
        return ravel_hidden(new_hidden), new_others

    def example_step(h, trace_u, trace_f, others, x):
        zero = {name: jnp.zeros(model.n_rec) for name in relations}
        ones = {name: jnp.ones(model.n_rec) for name in relations}
        presyn = presynaptic(params, unravel_hidden(h), others, x)[0]
        h1, others1 = stage1(h, others, x, zero)
        jacobian, _ = jax.jacfwd(stage1, argnums=0, has_aux=True)(h, others, x, zero)
        trace_u, trace_f = dict(trace_u), dict(trace_f)
        for name in relations:
            tangent = {key: ones[key] if key == name else zero[key] for key in relations}
            f = jax.jvp(lambda s: stage1(h, others, x, s)[0], (zero,), (tangent,))[1]
            trace_u[name] = alpha * trace_u[name] + pre_gain * presyn[name]
            trace_f[name] = post_decay * (mask * jacobian) @ trace_f[name] + post_gain * f
        return h1, trace_u, trace_f, others1

    def step_loss(theta, h1, others, target):
        out = jax.vmap(lambda h: output(unravel_params(theta), unravel_hidden(h), others)[0])(h1)
        return loss_fn(out if batched else jax.tree.map(lambda o: o[0], out), target)

    @jax.jit
    def body(carry, inputs):
        h, trace_u, trace_f, others, grad, step = carry
        x, target = inputs
        h1, trace_u, trace_f, others = jax.vmap(example_step, in_axes=(0, 0, 0, None, 0), out_axes=(0, 0, 0, None))(
            h, trace_u, trace_f, others, x
        )
        grad_theta, delta = jax.grad(step_loss, argnums=(0, 1))(theta, h1, others, target)
        grad = jax.tree.map(jnp.add, grad, unravel_params(grad_theta))
        correction = 1.0 - alpha ** (step + 1)
        for name, path in relations.items():
            learning = (delta * trace_f[name]) @ to_neuron  # (batch, n_rec)
            update = {"weight": jnp.einsum("bi,bn->in", trace_u[name], learning) / correction}
            grad[path] = jax.tree.map(jnp.add, grad[path], update)
        return (h1, trace_u, trace_f, others, grad, step + 1), None

    h = jax.vmap(ravel_hidden)(hidden)
    n_batch = h.shape[0]
    trace_u = {name: jnp.zeros((n_batch, jnp.shape(params[path]["weight"])[0])) for name, path in relations.items()}
    trace_f = {name: jnp.zeros_like(h) for name in relations}
    grad = jax.tree.map(jnp.zeros_like, params)
    carry = (h, trace_u, trace_f, others, grad, 0)
    (*_, grad, _), _ = lax.scan(body, carry, (xs, targets))
    return grad


def es_d_rtrl_components_naive(
    model: RecurrentLIF,
    xs,
    targets,
    loss_fn: Callable,
    factorisation: str,
    rank: int = 1,
    batch_size: int | None = None,
    stacked: bool = False,
    pinv_rtol: float = 1e-10,
    metric: str = "plain",
) -> Params:
    """`es_d_rtrl`'s "matched" and "low_rank" factorisations by their dense definitions, for a
    `RecurrentLIF` with a linear readout. Per hidden-layer weight (or, `stacked`, for all of them at once:
    their inputs stacked into one presynaptic vector, valid when they share `F`), per example:

    "low_rank": the dense trace `E (I × H)` over the raveled hidden vector, with its best rank-r
    approximation (SVD) taken after every step: `E_t = trunc_r(E_{t-1} D_tᵀ + u_t f_tᵀ)`,
    `dW += Σ_b E_t[b] δ_t[b]` summed per neuron. `metric="balanced"`: the approximation best in the norm
    that scales every state's columns of `E` to unit norm first, `trunc_r(E) = U_r U_rᵀ E` with `U_r`
    the top r left singular vectors of `E` so scaled. `metric="spike"`: best in the norm `‖E M_t^{1/2}‖`,
    `M_t = D_tᵀ M_{t-1} D_t + J_tᵀ J_t` (H × H, `M_{-1} = 0`) with `J_t` the Jacobian of the spike
    function's argument (`spike_input()`) w.r.t. the new hidden vector: `U_r` the top r eigenvectors of
    `E M_t Eᵀ`.

    "matched": with `A_t` the mean over the batch and the neurons of the per-neuron `S×S` blocks of `D_t`:
    `ū_t = A_t ū_{t-1} + 1 ⊗ u_t` (S filters of the input), `b_t = (A_t ⊗ D_t) b_{t-1} + 1 ⊗ f_t`,
    `G_t = A_t G_{t-1} A_tᵀ + 1 1ᵀ`, `c_t = pinv(G_t) b_t`, `dW += Σ_b Σ_k ū_{t,k}[b] ⊗ (δ_t[b] · c_{t,k}[b])`.

    `D_t`, `f_t`, `δ_t` as in `es_d_rtrl_naive`.
    """
    if not isinstance(model, RecurrentLIF) or model.readout != "linear":
        raise NotImplementedError("es_d_rtrl_components_naive is written for RecurrentLIF(readout='linear') only")
    if factorisation not in ("matched", "low_rank"):
        raise ValueError(f"unknown factorisation {factorisation!r}")
    if metric not in ("plain", "balanced", "spike"):
        raise ValueError(f"unknown metric {metric!r}")
    s = _factor_setup(model, xs, batch_size)
    spike_input = _pure(_trace(model, model.spike_input, (), batch_size)) if metric == "spike" else None
    relations, stage_hidden, presynaptic, output = s.relations, s.stage_hidden, s.presynaptic, s.output
    params, hidden, others, xs, batched = s.params, s.hidden, s.others, s.xs, s.batched
    theta, unravel_params, unravel_hidden, ravel_hidden = s.theta, s.unravel_params, s.unravel_hidden, s.ravel_hidden
    groups, mask, to_neuron = s.groups, s.mask, s.to_neuron
    labels, neurons, paths = s.labels, s.neurons, s.paths
    # index[s, n]: the raveled entry of the group's state s of neuron n
    index = np.array(
        [
            [np.flatnonzero((labels == paths.index(p)) & (neurons == n))[0] for n in range(model.n_rec)]
            for p in groups[0]
        ]
    )
    sets = [list(relations)] if stacked else [[name] for name in relations]

    def stage1(h, others, x, shift):
        _, new_hidden, new_others = stage_hidden(params, unravel_hidden(h), others, x, shift)
        return ravel_hidden(new_hidden), new_others

    def example_derivatives(h, others, x):
        zero = {name: jnp.zeros(model.n_rec) for name in relations}
        presyn = presynaptic(params, unravel_hidden(h), others, x)[0]
        h1, others1 = stage1(h, others, x, zero)
        jacobian = mask * jax.jacfwd(stage1, argnums=0, has_aux=True)(h, others, x, zero)[0]
        fs = {}
        for name in relations:
            tangent = {key: jnp.ones(model.n_rec) if key == name else zero[key] for key in relations}
            fs[name] = jax.jvp(lambda s: stage1(h, others, x, s)[0], (zero,), (tangent,))[1]
        spike_rows = None
        if spike_input is not None:  # (n_rec, H): ∂x/∂h of the spike function's argument x
            spike_rows = jax.jacfwd(lambda h: spike_input(params, unravel_hidden(h), others1)[0])(h1)
        return h1, others1, jacobian, presyn, fs, spike_rows

    def step_loss(theta, h1, others, target):
        out = jax.vmap(lambda h: output(unravel_params(theta), unravel_hidden(h), others)[0])(h1)
        return loss_fn(out if batched else out[0], target)

    state_of = np.full(index.max() + 1, -1)
    for state, columns in enumerate(index):
        state_of[columns] = state
    assert (state_of >= 0).all(), "every raveled hidden entry is one of the group's states"

    def truncate(e, m):
        if metric == "spike":
            left = jnp.linalg.eigh(e @ m @ e.T)[1][:, ::-1][:, :rank]
            return left @ (left.T @ e)
        scaled = e
        if metric == "balanced":
            squared = jnp.stack([jnp.sum(e[:, columns] ** 2) for columns in index])  # (S,)
            scaled = e * jnp.where(squared > 0, 1.0 / jnp.sqrt(jnp.where(squared > 0, squared, 1.0)), 0.0)[state_of]
        left = jnp.linalg.svd(scaled, full_matrices=False)[0][:, :rank]
        return left @ (left.T @ e)

    def advance(state, names, jacobian, presyn, fs, a, m):
        u_t = jnp.concatenate([presyn[name] for name in names], axis=-1)  # (B, I)
        f = fs[names[0]]  # (B, H): the stacked relations share it
        if factorisation == "low_rank":
            moved = jnp.einsum("bih,bgh->big", state, jacobian) + u_t[:, :, None] * f[:, None, :]
            return jax.vmap(truncate)(moved, m)
        filters, moments, gram = state
        filters = jnp.einsum("kl,bli->bki", a, filters) + u_t[:, None, :]
        moments = jnp.einsum("kl,bgh,blh->bkg", a, jacobian, moments) + f[:, None, :]
        gram = a @ gram @ a.T + 1.0
        return filters, moments, gram

    def gradient(state, delta):
        if factorisation == "low_rank":
            return jnp.einsum("bih,bh,hn->in", state, delta, to_neuron)
        filters, moments, gram = state
        coefficients = jnp.einsum("kl,blh->bkh", jnp.linalg.pinv(gram, rtol=pinv_rtol, hermitian=True), moments)
        return jnp.einsum("bki,bkh,bh,hn->in", filters, coefficients, delta, to_neuron)

    @jax.jit
    def body(carry, inputs):
        h, states, m, others, grad = carry
        x, target = inputs
        h1, others1, jacobian, presyn, fs, spike_rows = jax.vmap(
            example_derivatives, in_axes=(0, None, 0), out_axes=(0, None, 0, 0, 0, 0)
        )(h, others, x)
        if spike_rows is not None:
            m = jnp.einsum("bgh,bgk,bkl->bhl", jacobian, m, jacobian)
            m = m + jnp.einsum("bnh,bnl->bhl", spike_rows, spike_rows)
        blocks = jacobian[:, index[:, None, :], index[None, :, :]]  # (B, S, S, N)
        a = jnp.mean(blocks, axis=(0, 3))
        grad_theta, delta = jax.grad(step_loss, argnums=(0, 1))(theta, h1, others1, target)
        grad = jax.tree.map(jnp.add, grad, unravel_params(grad_theta))
        states = [advance(state, names, jacobian, presyn, fs, a, m) for state, names in zip(states, sets, strict=True)]
        for state, names in zip(states, sets, strict=True):
            total = gradient(state, delta)
            sizes = np.cumsum([0] + [jnp.shape(params[relations[name]]["weight"])[0] for name in names])
            for name, lo, hi in zip(names, sizes[:-1], sizes[1:], strict=True):
                grad[relations[name]] = jax.tree.map(jnp.add, grad[relations[name]], {"weight": total[lo:hi]})
        return (h1, states, m, others1, grad), None

    h = jax.vmap(ravel_hidden)(hidden)
    n_batch, n_hidden, n_states = h.shape[0], h.shape[1], len(groups[0])
    states = []
    for names in sets:
        n_pre = sum(jnp.shape(params[relations[name]]["weight"])[0] for name in names)
        if factorisation == "low_rank":
            states.append(jnp.zeros((n_batch, n_pre, n_hidden)))
        else:
            zeros = (jnp.zeros((n_batch, n_states, n_pre)), jnp.zeros((n_batch, n_states, n_hidden)))
            states.append((*zeros, jnp.zeros((n_states, n_states))))
    grad = jax.tree.map(jnp.zeros_like, params)
    m = jnp.zeros((n_batch, n_hidden, n_hidden))
    (*_, grad), _ = lax.scan(body, (h, states, m, others, grad), (xs, targets))
    return grad
