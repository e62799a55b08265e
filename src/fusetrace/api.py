"""The public entry points and the one visible pipeline:
capture -> simplify -> step facts -> hidden groups -> relations -> graph (-> derive -> fuse)."""

import brainstate

from .analysis import Analysis
from .capture import capture
from .graph import build_graph
from .passes.hidden import find_groups
from .passes.relations import find_relations
from .passes.simplify import simplify
from .stepfacts import step_facts


def analyze(model: brainstate.nn.Module, *example_inputs, batch_size: int | None = None) -> Analysis:
    """Analyse one step of `model`: hidden groups, weight relations and the dependency graph.

    Arguments:
        model: a `brainstate.nn.Module` (e.g. built from brainpy.state parts). Its states are
            initialised with `batch_size` unless they already exist with that batch size.
        example_inputs: the arguments of one `model.update(...)` call; batched inputs carry the
            batch axis first.
        batch_size: the batch size, or None for unbatched states.

    Returns:
        An `Analysis` with `.groups`, `.relations`, `.graph`, `.summary()`, `.to_dot()`, `.explain()`.

    Raises:
        UnsupportedPrimitiveError: a primitive without a rule lies on a hidden/weight path.
        NotNeuronAlignedError: a hidden state's update mixes neurons without a weight.
        CaptureError: the step cannot be traced.

    Example:
        >>> analysis = fusetrace.analyze(net, x0, batch_size=16)   # doctest: +SKIP
        >>> print(analysis.summary())                              # doctest: +SKIP
    """
    captured = simplify(capture(model, *example_inputs, batch_size=batch_size))
    facts = step_facts(captured)
    groups = find_groups(facts)
    relations = find_relations(facts, groups)
    return Analysis(captured=captured, facts=facts, groups=groups, relations=relations,
                    graph=build_graph(facts, groups, relations))
