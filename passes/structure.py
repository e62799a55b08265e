"""What the step's structure makes identically zero, and how groups reach each other and the loss.

Consumes: an `Analysis`. Produces small static facts, read by the trace updates (to skip arrays that are
zero by construction) and by the credit chains (to know which groups the loss reads and which paths
exist):

* `output_sources`: the sources the step's outputs read, directly or through a contraction's input;
* `state_structure`: for one group and one source feeding it, which states read which (`D[s, t]` not
  identically zero), which states the source enters (`F[s]` not identically zero), and whether the
  outputs read the group's previous values (else `δ_prev ≡ 0`);
* `read_states` / `prev_read_states`: the states whose new / previous values the outputs read;
* `group_edges` and `looping_groups`: the group graph (an edge A -> B for every weight op into B whose
  presynaptic input reads A's values) and the groups on its cycles.

Everything here is derived from the dependency facts, never from values.
"""

import networkx as nx

from fusetrace.analysis import Analysis


def output_sources(analysis: Analysis) -> set:
    """The sources the step's outputs read, directly or through a contraction's input (a readout of this
    step's or of the previous step's values)."""
    facts = analysis.facts
    outputs = analysis.captured.jaxpr.jaxpr.outvars[: analysis.captured.n_outputs]
    pending = [source for v in outputs for source in facts.propagation.of(v)]
    seen = set()
    while pending:
        source = pending.pop()
        if source in seen:
            continue
        seen.add(source)
        if source[0] == "relation":  # a contraction's output: its input's sources
            pending.extend(facts.contractions[source[1]].pre_fact)
    return seen


def relation_source(relation) -> tuple[str, int]:
    """The source a relation injects into its group: its op output, or its parameter leaf."""
    return ("weight", relation.weight_leaf) if relation.elementwise else ("relation", relation.contraction)


def relation_sources(relation) -> tuple[tuple[str, int], ...]:
    """Every source through which a relation reaches its group: its own, and the outputs of the products
    it crosses (`Relation.crossings`: the dependency facts stop at each product's output)."""
    return (relation_source(relation), *(("relation", index) for index in relation.crossings))


def state_structure(analysis: Analysis, group, *sources) -> tuple[dict[int, tuple[int, ...]], tuple[int, ...], bool]:
    """`(reads, injected, prev_read)` of `group` fed by `sources`: for each state s the states t with
    `D[s, t]` not identically zero, the states whose `F` is not identically zero, and whether the output
    reads the group's previous values. From the dependency facts, closed over the group's own new values."""
    facts = analysis.facts
    leaves = list(group.leaves)
    direct = [facts.new_fact(leaf) for leaf in leaves]
    reads = [{t for t, other in enumerate(leaves) if ("hidden", other) in fact} for fact in direct]
    injected = [any(source in fact for source in sources) for fact in direct]
    changed = True
    while changed:  # a new value read by another new value: inherit its dependencies
        changed = False
        for s, fact in enumerate(direct):
            for r, other in enumerate(leaves):
                if ("new", other) in fact and r != s:
                    before = (len(reads[s]), injected[s])
                    reads[s] |= reads[r]
                    injected[s] = injected[s] or injected[r]
                    changed = changed or before != (len(reads[s]), injected[s])
    return (
        {s: tuple(sorted(reads[s])) for s in range(len(leaves))},
        tuple(s for s in range(len(leaves)) if injected[s]),
        bool(prev_read_states(analysis, group)),
    )


def read_states(analysis: Analysis, group) -> tuple[int, ...]:
    """The states of `group` whose new values the outputs read, directly or through a contraction's input
    (an instantaneous readout): `δ_new ≡ 0` for the others."""
    read = output_sources(analysis)
    return tuple(s for s, leaf in enumerate(group.leaves) if ("new", leaf) in read)


def prev_read_states(analysis: Analysis, group) -> tuple[int, ...]:
    """The states of `group` whose previous values the outputs read: `δ_prev ≡ 0` for the others."""
    read = output_sources(analysis)
    return tuple(s for s, leaf in enumerate(group.leaves) if ("hidden", leaf) in read)


def group_edges(analysis: Analysis) -> list[tuple[str, str, int]]:
    """`(A, B, relation index)` for every weight op whose output reaches group B and whose presynaptic input
    reads A's new or previous values — directly, or through other weight ops (a readout of a readout's
    output: a weight -> weight path) — from the dependency facts, whether or not the op's relation into B
    could be traced (then the index is that of one of its op's relations, which says why not)."""
    by_leaf = {leaf: group.name for group in analysis.groups for leaf in group.leaves}
    contractions = analysis.facts.contractions
    sources_of: dict[int, dict] = {}

    def pre_sources(index: int) -> dict:
        """The groups the op's input reads, through any chain of earlier weight ops in the same step (an
        op's input never depends on its own output within a step, so the recursion ends)."""
        if index not in sources_of:
            found: dict = {}
            for kind, leaf in sorted(contractions[index].pre_fact):
                if kind in ("new", "hidden"):
                    found[by_leaf[leaf]] = None
                elif kind == "relation":
                    found.update(pre_sources(leaf))
            sources_of[index] = found
        return sources_of[index]

    relations = analysis.relations
    by_contraction: dict[int, list[int]] = {}
    for i, relation in enumerate(relations):
        if relation.contraction is not None:
            by_contraction.setdefault(relation.contraction, []).append(i)
    edges = []
    for contraction in contractions:
        mine = by_contraction.get(contraction.index)
        if not mine:
            continue
        source_of = ("relation", contraction.index)
        targets = [g.name for g in analysis.groups if any(source_of in analysis.facts.new_fact(i) for i in g.leaves)]
        sources = pre_sources(contraction.index)
        for target in targets:
            via = next((i for i in mine if relations[i].group == target), mine[0])
            edges.extend((source, target, via) for source in sources)
    return edges


def looping_groups(analysis: Analysis) -> set[str]:
    """The groups on a cycle of the group graph (their values come back to them through weight ops)."""
    graph = nx.DiGraph()
    graph.add_edges_from((a, b) for a, b, _ in group_edges(analysis))
    looping = set()
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1 or any(graph.has_edge(g, g) for g in component):
            looping |= component
    return looping
