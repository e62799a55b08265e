"""A two-population E/I network to look at with `fusetrace inspect` (docs/inspect.md).

Excitatory LIF population `E` and inhibitory `I`, an input projection `inE`, recurrent projections
`EE`, `EI` (E -> I) and `IE` (I -> E), and a leaky readout `out` of E's spikes. `inE` and `EE` use the
same synapse describer onto E, so brainpy.state merges them into ONE exponential synapse whose
conductance both feed; `IE` has a slower synapse of its own.

    fusetrace inspect examples.ei_inspect:ei_network --report docs/images/ei-report
    fusetrace inspect examples.ei_inspect:ei_network --report DIR --algorithm d_rtrl

`ei_network()` returns `(model, example_input, loss)`: with the loss, the report includes what the
online learner does with each weight.
"""

import brainpy  # noqa: F401  (brainpy.state lives inside brainpy >= 2.9)
import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax.numpy as jnp

N_IN, N_E, N_I, N_OUT = 20, 40, 10, 2


def _linear(n_pre: int, n_post: int, scale: float) -> brainstate.nn.Linear:
    return brainstate.nn.Linear(
        n_pre, n_post, w_init=braintools.init.KaimingNormal(scale=scale, unit=u.mA), b_init=None
    )


def _synapse(n: int, tau_ms: float):
    return bps.Expon.desc(n, tau=tau_ms * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA))


class EINetwork(brainstate.nn.Module):
    """Input -> E; E -> E, E -> I, I -> E; E -> leaky readout. Returns the readout."""

    def __init__(self, n_in: int = N_IN, n_e: int = N_E, n_i: int = N_I, n_out: int = N_OUT):
        super().__init__()
        self.E = bps.LIF(n_e, V_th=1.0 * u.mV, tau=20.0 * u.ms)
        self.I = bps.LIF(n_i, V_th=1.0 * u.mV, tau=10.0 * u.ms)
        self.inE = bps.AlignPostProj(
            comm=_linear(n_in, n_e, 2.0), syn=_synapse(n_e, 10.0), out=bps.CUBA.desc(scale=1.0), post=self.E
        )
        self.EE = bps.AlignPostProj(
            comm=_linear(n_e, n_e, 1.0), syn=_synapse(n_e, 10.0), out=bps.CUBA.desc(scale=1.0), post=self.E
        )
        self.EI = bps.AlignPostProj(
            comm=_linear(n_e, n_i, 1.0), syn=_synapse(n_i, 10.0), out=bps.CUBA.desc(scale=1.0), post=self.I
        )
        self.IE = bps.AlignPostProj(
            comm=_linear(n_i, n_e, 1.0), syn=_synapse(n_e, 20.0), out=bps.CUBA.desc(scale=-1.0), post=self.E
        )
        self.out = bps.LeakyRateReadout(n_e, n_out, tau=20.0 * u.ms)

    def update(self, x):
        spikes_e, spikes_i = self.E.get_spike(), self.I.get_spike()
        self.inE(x)
        self.EE(spikes_e)
        self.EI(spikes_e)
        self.IE(spikes_i)
        self.I(0.0 * u.mA)
        return self.out(self.E(0.0 * u.mA))


def readout_loss(output, target):
    """Squared error of the readout."""
    return 0.5 * jnp.sum((u.get_mantissa(output) - target) ** 2)


def ei_network():
    """`(model, example_input, loss)` of the E/I network: one step's input is `N_IN` input spikes."""
    brainstate.environ.set(dt=1.0 * u.ms)
    brainstate.random.seed(0)
    return EINetwork(), jnp.zeros(N_IN), readout_loss
