"""Online training loop: a `Learner`, an optax optimizer and a task sampler.

One iteration draws a batch of sequences (deterministically from `seed` and the iteration number),
runs the fused learner over it inside ONE jit-compiled `lax.scan`, and applies the optimizer every
`update_every` steps (1: fully online; 0: once at the end of the sequence), with optional global-norm
clipping. A loss read only every k-th step (`gradient_every=k`) forms the gradient only there: the other
steps advance states and traces alone (`Learner.step(..., gradient=False)`), which is exact because their
loss is zero (the trainer checks that it is). The state that must survive a crash (params, optimizer
state, iteration counter) is one pytree, saved atomically by `fusetrace.checkpoint`; resuming from it
continues bit for bit.
"""

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checks
from .api import Learner
from .api import _leaves_from as api_leaves
from .errors import CompileError, four_part


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
        self.learner, self.sample, self.seed, self.metric = learner, sample, seed, metric
        self.update_every, self.gradient_every = update_every, gradient_every
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
        params, opt_state, losses, outputs, skipped = self._sequence(
            state["params"], state["opt_state"], batch.inputs, batch.targets, self.learner.constants
        )
        if float(skipped) != 0.0:
            raise CompileError(
                four_part(
                    what=f"steps skipped by gradient_every={self.gradient_every} had a non-zero loss "
                    f"({float(skipped):.3g})",
                    where=f"fusetrace.Trainer.iteration, iteration {int(state['iteration'])}",
                    why="only steps t with (t + 1) % gradient_every == 0 form a gradient; the others' would be lost",
                    fix="read the loss only at those steps (mask the others) or use gradient_every=1",
                )
            )
        new_state = {"params": params, "opt_state": opt_state, "iteration": state["iteration"] + 1}
        metrics = {"loss": float(jnp.mean(losses))}
        if self.metric is not None:
            metrics.update(self.metric(outputs, batch))
        return new_state, IterationResult(metrics["loss"], outputs, metrics)

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

        initial = api_leaves(captured, params, learner.init()["model"])
        _, (losses, outputs) = jax.lax.scan(body, initial, (inputs, targets))
        return losses, outputs

    def _apply(self, params, opt_state, grads):
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def _run_sequence(self, params, opt_state, inputs, targets, constants):
        """One sequence, compiled; `constants` (`Learner.constants`) are arguments, not embedded."""
        learner, every, k = self.learner, self.update_every, self.gradient_every
        zeros = jax.tree.map(jnp.zeros_like, params)

        def body(carry, chunk):  # k steps: k - 1 without a gradient, then one with it
            params, opt_state, state, accumulated, skipped, t = carry

            def advance(carry, step_inputs):
                state, skipped = carry
                state, res = learner.step(params, state, *step_inputs, gradient=False, constants=constants)
                return (state, skipped + jnp.abs(res.loss)), (res.loss, res.output)

            first = jax.tree.map(lambda a: a[:-1], chunk)
            (state, skipped), (losses, outputs) = jax.lax.scan(advance, (state, skipped), first)
            state, res = learner.step(params, state, *jax.tree.map(lambda a: a[-1], chunk), constants=constants)
            accumulated = jax.tree.map(jnp.add, accumulated, res.grads)
            t = t + k
            if every > 0:
                params, opt_state, accumulated = jax.lax.cond(
                    t % every == 0,
                    lambda p, o, a: (*self._apply(p, o, a), zeros),
                    lambda p, o, a: (p, o, a),
                    params,
                    opt_state,
                    accumulated,
                )
            losses, outputs = jax.tree.map(
                lambda a, b: jnp.concatenate([a, b[None]]), (losses, outputs), (res.loss, res.output)
            )
            return (params, opt_state, state, accumulated, skipped, t), (losses, outputs)

        chunks = jax.tree.map(lambda a: a.reshape(-1, k, *a.shape[1:]), (inputs, targets))
        carry = (params, opt_state, learner.init(), zeros, jnp.zeros(()), jnp.zeros((), jnp.int32))
        (params, opt_state, _, accumulated, skipped, _), (losses, outputs) = jax.lax.scan(body, carry, chunks)
        losses, outputs = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), (losses, outputs))
        if every == 0:
            params, opt_state = self._apply(params, opt_state, accumulated)
        return params, opt_state, losses, outputs, skipped


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

    def _run_sequence(self, params, opt_state, inputs, targets, constants):
        def total_loss(params):
            losses, outputs = self._forward(params, inputs, targets, constants)
            return jnp.sum(losses), (losses, outputs)

        grads, (losses, outputs) = jax.grad(total_loss, has_aux=True)(params)
        params, opt_state = self._apply(params, opt_state, grads)
        return params, opt_state, losses, outputs, jnp.zeros(())
