"""Online training loop: a `Learner`, an optax optimizer and a task sampler.

One iteration draws a batch of sequences (deterministically from `seed` and the iteration number),
runs the fused learner over it inside ONE jit-compiled program — one `Learner.scan` per window of
`update_every` steps (1: fully online; 0: the whole sequence), each followed by the optimizer update,
with optional global-norm clipping. Within a window the per-step gradients are summed in the scan (for
es_d_rtrl its weight products are contracted once per window, not once per step). A loss read only every
k-th step (`gradient_every=k`) forms the gradient only there: the other steps advance states and traces
alone (`Learner.scan`'s loss mask), which is exact because their loss is zero (the trainer checks that
it is). The state that must survive a crash (params, optimizer
state, iteration counter) is one pytree, saved atomically by `fusetrace.checkpoint`; resuming from it
continues bit for bit.

Faults: every batch is checked against the learner's example step before it is traced
(`fusetrace.checks`). A non-finite loss, gradient or updated weight either stops training with a
`NonFiniteError` naming the iteration, time step and weights (`on_nonfinite="stop"`, the default; the
iteration's results are dropped, so the caller still holds the last finite state), or skips the
optimizer update it would have poisoned (`"skip"`; counted as `skipped_updates` in the metrics). Updates
are guarded inside the compiled loop either way, and an iteration never returns non-finite weights.
"""

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checks
from .api import Learner
from .errors import CompileError, NonFiniteError, four_part
from .leaves import leaves_from

NONFINITE_MODES = ("stop", "skip")


class Batch(Protocol):
    """What a task sampler returns: `inputs` with time first (T, batch, ...) and `targets`, a pytree
    whose leaves have time first; `targets[t]` is what the learner's loss receives at step t."""

    inputs: Any
    targets: Any


@dataclasses.dataclass(frozen=True)
class IterationResult:
    loss: float  # mean loss per step
    outputs: Any  # (T, batch, ...) readout outputs
    metrics: dict


class Trainer:
    """Drive `learner` over batches from `sample(seed) -> Batch` with an optax `optimizer`.

    Arguments:
        learner: a compiled `fusetrace.Learner`.
        sample: `sample(seed)` returns a `Batch` (deterministic in its seed).
        optimizer: an optax `GradientTransformation`.
        update_every: apply the optimizer every k steps (1: fully online); 0: at the sequence end.
        gradient_every: form the gradient only at steps t with (t + 1) % gradient_every == 0, for a loss
            that is zero at every other step (read-outs every k steps); the sequence length and
            `update_every` must be multiples of it. An iteration whose skipped steps had a non-zero
            loss raises `CompileError` (their gradient would have been dropped).
        clip_norm: optional global-norm clipping of each update's accumulated gradient.
        seed: base seed of the batches (iteration i uses `seed + i`).
        metric: optional `metric(outputs, batch) -> dict` of extra numbers per iteration.
        step_mask: optional `step_mask(batch) -> (T,) bool`, the steps whose loss can be non-zero (the
            others form no gradient: exact, and checked like `gradient_every`'s skipped steps); e.g. a
            task's recall window. None: every step.
        chunk: `Learner.scan`'s deferred-contraction chunk (None: its default; 0: products step by step).
            Only the steps between the first and the last that form a gradient are buffered.
        on_nonfinite: "stop" (default): a non-finite loss, gradient or updated weight raises
            `NonFiniteError` naming the iteration and time step; "skip": such an update is not applied
            (params and optimizer state stay as they were) and the metrics count `skipped_updates`.

    Raises:
        CompileError: a bad schedule or `on_nonfinite` value.

    Example:
        >>> trainer = Trainer(learner, lambda s: task(batch=16, seed=s), optax.adam(1e-3))  # doctest: +SKIP
        >>> state = trainer.init()                                                       # doctest: +SKIP
        >>> state, result = trainer.iteration(state)                                    # doctest: +SKIP
    """

    def __init__(
        self,
        learner: Learner,
        sample: Callable[[int], Batch],
        optimizer: optax.GradientTransformation,
        *,
        update_every: int = 1,
        gradient_every: int = 1,
        clip_norm: float | None = None,
        seed: int = 0,
        metric: Callable[[Any, Batch], dict] | None = None,
        on_nonfinite: str = "stop",
        step_mask: Callable[[Batch], Any] | None = None,
        chunk: int | None = None,
    ):
        if update_every < 0:
            raise CompileError(
                four_part(
                    what=f"update_every={update_every}",
                    where="fusetrace.Trainer(...)",
                    why="it counts steps between optimizer updates (0: once per sequence)",
                    fix="use 1 for fully online learning, k > 1 for every k steps, or 0",
                )
            )
        if gradient_every < 1 or (update_every > 0 and update_every % gradient_every):
            raise CompileError(
                four_part(
                    what=f"gradient_every={gradient_every} with update_every={update_every}",
                    where="fusetrace.Trainer(...)",
                    why="the gradient is formed every gradient_every steps, so updates can only fall on those steps",
                    fix="use gradient_every >= 1 that divides update_every (or update_every=0)",
                )
            )
        if on_nonfinite not in NONFINITE_MODES:
            raise CompileError(
                four_part(
                    what=f"on_nonfinite={on_nonfinite!r}",
                    where="fusetrace.Trainer(...)",
                    why="a non-finite loss, gradient or weight either stops training or skips that update",
                    fix="use on_nonfinite='stop' (the default) or 'skip'",
                )
            )
        self.learner, self.sample, self.seed, self.metric = learner, sample, seed, metric
        self.on_nonfinite = on_nonfinite
        self.update_every, self.gradient_every = update_every, gradient_every
        self.step_mask, self.chunk = step_mask, chunk
        self.optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optimizer) if clip_norm else optimizer
        self._sequence = jax.jit(self._run_sequence)
        self._evaluate = jax.jit(self._forward)

    def init(self) -> dict:
        """The training state: params (as compiled), optimizer state, iteration counter."""
        params = self.learner.params
        return {"params": params, "opt_state": self.optimizer.init(params), "iteration": jnp.zeros((), jnp.int32)}

    def batch(self, iteration: int) -> Batch:
        return self.sample(self.seed + int(iteration))

    def iteration(self, state: dict) -> tuple[dict, IterationResult]:
        """Run one batch of sequences, learning online; returns the new state and what happened.

        Raises:
            InputError: the sampler's batch does not match the learner's example step.
            NonFiniteError: (on_nonfinite="stop") a non-finite loss, gradient or updated weight; in either
                mode, weights that would leave the iteration non-finite. `state` is then still the last
                finite one.
            CompileError: steps skipped by `gradient_every` had a non-zero loss.
        """
        iteration = int(state["iteration"])
        batch = self.batch(iteration)
        where = f"fusetrace.Trainer.iteration, iteration {iteration + 1}: the batch of sample({self.seed + iteration})"
        checks.check_batch(self.learner, batch, where)
        n_steps = jax.tree.leaves(batch.inputs)[0].shape[0]
        if n_steps % self.gradient_every:
            raise CompileError(
                four_part(
                    what=f"a sequence of {n_steps} steps with gradient_every={self.gradient_every}",
                    where="fusetrace.Trainer.iteration",
                    why="the gradient is formed at the last step of every gradient_every steps",
                    fix="make the sequence length a multiple of gradient_every",
                )
            )
        active = np.ones(n_steps, bool) if self.step_mask is None else np.asarray(self.step_mask(batch), bool)
        params, opt_state, losses, outputs, quiet, health = self._sequence(
            state["params"], state["opt_state"], batch.inputs, batch.targets, self.learner.constants, active
        )
        self._check_finite(iteration, losses, health)
        if float(quiet) != 0.0:
            raise CompileError(
                four_part(
                    what=f"steps skipped by gradient_every={self.gradient_every} (or step_mask) had a non-zero loss "
                    f"({float(quiet):.3g})",
                    where=f"fusetrace.Trainer.iteration, iteration {iteration + 1}",
                    why="only steps t with (t + 1) % gradient_every == 0 form a gradient; the others' would be lost",
                    fix="read the loss only at those steps (mask the others) or use gradient_every=1",
                )
            )
        new_state = {"params": params, "opt_state": opt_state, "iteration": state["iteration"] + 1}
        metrics = {"loss": float(jnp.mean(losses))}
        if self.on_nonfinite == "skip":
            metrics["skipped_updates"] = int(health["skipped_updates"])
        if self.metric is not None:
            metrics.update(self.metric(outputs, batch))
        return new_state, IterationResult(metrics["loss"], outputs, metrics)

    def _check_finite(self, iteration: int, losses, health: dict) -> None:
        """Raise `NonFiniteError` for what went non-finite in (0-based) `iteration`: with "stop", the first
        non-finite loss or gradient or a refused update; with either mode, non-finite weights."""
        problem = None
        if self.on_nonfinite == "stop" and not bool(health["clean"]):
            problem = _first_nonfinite(np.asarray(losses), health)
        if problem is None and not bool(health["params_finite"]):
            problem = "the weights are non-finite"
        if problem is None:
            return
        raise NonFiniteError(
            four_part(
                what=f"iteration {iteration + 1}: {problem}",
                where=f"fusetrace.Trainer.iteration (on_nonfinite={self.on_nonfinite!r}); nothing of this iteration "
                f"is kept: the weights are those after iteration {iteration}",
                why="the loss, a gradient or the weights overflowed or met an undefined operation (a learning rate "
                "too large, unclipped gradients, a diverging network, or NaN in the batch)",
                fix="lower the learning rate, clip the gradient norm (clip_norm=), check the batch, or pass "
                "on_nonfinite='skip' to skip such updates (counted as skipped_updates in the metrics)",
            )
        )

    def evaluate(self, params, batches: Iterable[Batch]) -> dict:
        """Mean loss and metrics of `params` over held-out `batches` (each of the compiled batch size),
        run forward only: no learning, no traces. Each batch weighs the same; they are read one at a
        time, so a generator keeps only one in memory."""
        per_batch = []
        for j, batch in enumerate(batches):
            checks.check_batch(self.learner, batch, f"fusetrace.Trainer.evaluate: held-out batch {j}")
            losses, outputs = self._evaluate(params, batch.inputs, batch.targets, self.learner.constants)
            per_batch.append({"loss": float(jnp.mean(losses)), **(self.metric(outputs, batch) if self.metric else {})})
        if not per_batch:
            raise CompileError(
                four_part(
                    what="evaluate(params, batches) without batches",
                    where="fusetrace.Trainer.evaluate",
                    why="the metrics are means over the batches",
                    fix="pass at least one batch",
                )
            )
        return {key: float(np.mean([entry[key] for entry in per_batch])) for key in per_batch[0]}

    def _forward(self, params, inputs, targets, constants):
        """The captured dynamics over one sequence from the initial state: per-step losses and outputs."""
        learner = self.learner
        captured = learner.analysis.with_constants(constants).captured

        def body(leaves, step_inputs):
            x, target = step_inputs
            x_leaves = captured.strip_inputs(*(x if len(learner.snapshot.inputs) > 1 else (x,)))
            outputs, new_leaves = captured.step(x_leaves, leaves)
            loss = learner.step_loss(outputs, target)
            return new_leaves, (loss, captured.wrap_outputs(outputs))

        initial = leaves_from(captured, params, learner.init()["model"])
        _, (losses, outputs) = jax.lax.scan(body, initial, (inputs, targets))
        return losses, outputs

    def _apply(self, params, opt_state, grads):
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def _guarded_apply(self, params, opt_state, grads, ok):
        """The optimizer step where `ok` (the window's losses were finite), the gradient and the new
        weights are finite; else params and optimizer state unchanged. Also returns 1 when skipped, else 0."""
        new_params, new_opt_state = self._apply(params, opt_state, grads)
        ok = ok & _finite(grads) & _finite(new_params)
        kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), (new_params, new_opt_state), (params, opt_state))
        return *kept, 1 - ok.astype(jnp.int32)

    def _window(self, params, state, inputs, targets, constants, active, learn: bool = True):
        """`Learner.scan` over one update window (its steps' gradients summed; es_d_rtrl's weight products
        contracted once). Only steps t with (t + 1) % gradient_every == 0 form a gradient (none when not
        `learn`). Returns the new state, the losses, outputs and gradient, and the summed |loss| of the
        steps without a gradient (finite ones)."""
        steps = jax.tree.leaves(inputs)[0].shape[0]
        forms = ((jnp.arange(steps) + 1) % self.gradient_every == 0) & active & learn
        state, result = self.learner.scan(
            params, state, inputs, targets, loss_mask=forms, constants=constants, chunk=self.chunk
        )
        quiet = jnp.sum(jnp.where(~forms & jnp.isfinite(result.loss), jnp.abs(result.loss), 0.0))
        return state, result.loss, result.output, result.grads, quiet

    def _run_sequence(self, params, opt_state, inputs, targets, constants, active):
        """One sequence, compiled; `constants` (`Learner.constants`) are arguments, not embedded; `active`
        (T,) marks the steps that may form a gradient (`step_mask`). The steps
        run in windows of `update_every` (the whole sequence when 0), each one `Learner.scan` followed by
        its optimizer update; a tail shorter than a window forms no gradient (as no update would use it).
        Returns params, optimizer state, per-step losses and outputs, the summed |loss| of steps without a
        gradient, and the health record: per update, which weights' gradients were finite (`grad_finite`,
        at the window's last step), and how many updates were skipped."""
        steps = jax.tree.leaves(inputs)[0].shape[0]
        window = self.update_every or steps
        full = steps - steps % window

        def body(carry, part):
            params, opt_state, state, skipped = carry
            inputs, targets, active = part
            state, losses, outputs, grads, quiet = self._window(params, state, inputs, targets, constants, active)
            params, opt_state, count = self._guarded_apply(params, opt_state, grads, _finite(losses))
            return (params, opt_state, state, skipped + count), (losses, outputs, _leaf_finite(grads), quiet)

        windows = jax.tree.map(lambda a: a[:full].reshape(-1, window, *a.shape[1:]), (inputs, targets, active))
        carry = (params, opt_state, self.learner.init(), jnp.zeros((), jnp.int32))
        (params, opt_state, state, skipped), (losses, outputs, finite, quiet) = jax.lax.scan(body, carry, windows)
        losses, outputs = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), (losses, outputs))
        quiet = jnp.sum(quiet)
        if full < steps:  # the tail: no update follows it
            tail_inputs, tail_targets, tail_active = jax.tree.map(lambda a: a[full:], (inputs, targets, active))
            _, tail_losses, tail_outputs, _, _ = self._window(
                params, state, tail_inputs, tail_targets, constants, tail_active, learn=False
            )
            losses, outputs = jax.tree.map(
                lambda a, b: jnp.concatenate([a, b]), (losses, outputs), (tail_losses, tail_outputs)
            )
        health = _health(losses, finite, jnp.arange(window - 1, full, window), skipped, params)
        return params, opt_state, losses, outputs, quiet, health


def _finite(tree) -> jax.Array:
    """Whether every floating-point leaf of `tree` (Quantities included) is finite, as a bool scalar."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.ones((), bool)


def _leaf_finite(grads):
    """Per weight leaf of `grads`, whether it is finite (a bool scalar each; the structure of the params)."""
    return jax.tree.map(lambda g: jnp.all(jnp.isfinite(u.get_mantissa(g))), grads, is_leaf=u.math.is_quantity)


def _health(losses, grad_finite, grad_steps, skipped, params) -> dict:
    """What stayed finite in one iteration, for the host: per gradient formed, which weights' were finite
    (`grad_finite`, formed at `grad_steps`), the updates skipped, and two summaries read every iteration
    (`clean`: no non-finite loss or gradient and no skipped update; `params_finite`)."""
    grads_finite = jnp.all(jnp.stack([jnp.all(flag) for flag in jax.tree.leaves(grad_finite)] or [jnp.ones((), bool)]))
    clean = _finite(losses) & (skipped == 0) & grads_finite
    return {
        "grad_finite": grad_finite,
        "grad_steps": grad_steps,
        "skipped_updates": skipped,
        "clean": clean,
        "params_finite": _finite(params),
    }


def _first_nonfinite(losses: np.ndarray, health: dict) -> str | None:
    """What went non-finite first in an iteration (a loss, or named gradients), or a refused update."""
    bad_losses = np.flatnonzero(~np.isfinite(losses))
    named = jax.tree_util.tree_flatten_with_path(health["grad_finite"])[0]
    names = [".".join(str(getattr(key, "key", key)) for key in path) for path, _ in named]
    flags = np.stack([np.asarray(flag) for _, flag in named]) if named else np.ones((0, 0), bool)
    bad_grads = np.flatnonzero(~flags.all(axis=0)) if named else np.zeros(0, int)
    steps = np.asarray(health["grad_steps"])
    if bad_losses.size and (not bad_grads.size or bad_losses[0] <= steps[bad_grads[0]]):
        return f"non-finite loss ({losses[bad_losses[0]]}) at time step {bad_losses[0]}"
    if bad_grads.size:
        which = ", ".join(f"`{name}`" for name, ok in zip(names, flags[:, bad_grads[0]], strict=True) if not ok)
        return f"non-finite gradient of {which} formed at time step {steps[bad_grads[0]]}"
    if int(health["skipped_updates"]):
        return "an optimizer update made the weights non-finite"
    return None


class BPTTTrainer(Trainer):
    """The same training loop with exact BPTT gradients over each whole sequence (a baseline: its
    memory grows with the sequence length). The optimizer steps once per sequence."""

    def __init__(
        self, learner: Learner, sample: Callable[[int], Batch], optimizer: optax.GradientTransformation, **options
    ):
        if options.get("update_every", 0) != 0:
            raise CompileError(
                four_part(
                    what="BPTT with update_every != 0",
                    where="fusetrace.trainer.BPTTTrainer(...)",
                    why="BPTT needs the whole sequence before it has a gradient",
                    fix="leave update_every at 0 (one update per sequence)",
                )
            )
        super().__init__(learner, sample, optimizer, **{**options, "update_every": 0})

    def _run_sequence(self, params, opt_state, inputs, targets, constants, active):
        del active  # BPTT differentiates the whole sequence at once

        def total_loss(params):
            losses, outputs = self._forward(params, inputs, targets, constants)
            return jnp.sum(losses), (losses, outputs)

        grads, (losses, outputs) = jax.grad(total_loss, has_aux=True)(params)
        params, opt_state, skipped = self._guarded_apply(params, opt_state, grads, _finite(losses))
        finite = jax.tree.map(lambda ok: ok[None], _leaf_finite(grads))  # one gradient, at the last step
        health = _health(losses, finite, jnp.asarray([losses.shape[0] - 1]), skipped, params)
        return params, opt_state, losses, outputs, jnp.zeros(()), health
