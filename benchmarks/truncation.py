"""Networks for `fusetrace train --network benchmarks.truncation:FACTORY` (run from the repository root).

`stopped_dms_network`: the DMS reference network with its recurrent spikes detached from the gradient.
BPTT on it computes exactly `d_rtrl`'s gradient on the plain network (tests/test_tasks.py), so
`fusetrace train --task dms --algorithm bptt --network benchmarks.truncation:stopped_dms_network`
trains as `d_rtrl` with one update per trial does, at BPTT's speed: what the truncation to each
neuron's own sensitivities costs on the task, and a fast way to choose d_rtrl's training settings.
"""

from fusetrace.tasks import dms_network


def stopped_dms_network():
    return dms_network(stop_recurrent_gradient=True)
