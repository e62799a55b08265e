"""The networkx dependency graph of a step, built from its facts, groups and relations.

Node schema (node id -> attributes; every node has `kind`):

* `hidden:<path>`   kind="hidden",  path, name, group (raw group name), group_name, shape, dtype, unit
* `weight:<path>`   kind="weight",  path, name, shape, dtype, unit
* `op:<index>`      kind="relation", op (primitive name), weight, weight_name, group (or None), group_name,
                    status, reason (in the user's names), n_pre
* `input:<index>`   kind="input",   shape
* `output:<index>`  kind="output",  shape

Edge schema (every edge has `role`):

* weight -> op: role="weight"
* hidden/input -> op: role="pre", time="t-1" (previous value) or "t" (this step's new value)
* op -> hidden: role="tail", elementwise (bool)
* hidden -> hidden: role="coupling" (the target's new value reads the source element-wise)
* hidden -> output: role="readout"; op/weight -> output: role="direct"

`path`, `weight` and `group` are the raw brainstate paths (the keys everywhere else); `name`,
`weight_name` and `group_name` are the user's names (`fusetrace.naming`), for display.

Nodes are added in leaf order, then relation order; the graph is frozen.
"""

import networkx as nx

from ._compat import aval_shape
from .capture import Captured
from .naming import Names
from .stepfacts import StepFacts


def hidden_node(path: str) -> str:
    return f"hidden:{path}"


def weight_node(path: str) -> str:
    return f"weight:{path}"


def _leaf_attrs(leaf) -> dict:
    return {"path": leaf.path, "name": leaf.name, "shape": leaf.shape, "dtype": str(leaf.dtype), "unit": str(leaf.unit)}


def build_graph(facts: StepFacts, groups, relations) -> nx.DiGraph:
    captured: Captured = facts.captured
    jaxpr = captured.jaxpr.jaxpr
    graph = nx.DiGraph()
    names = Names.of(captured.leaves, groups)
    group_of = {leaf: g.name for g in groups for leaf in g.leaves}
    leaf_node = {}
    for index, var in enumerate(jaxpr.invars[: captured.n_inputs]):
        graph.add_node(f"input:{index}", kind="input", shape=aval_shape(var))
    for index, leaf in enumerate(captured.leaves):
        if leaf.role == "hidden":
            leaf_node[index] = hidden_node(leaf.path)
            group = group_of[index]
            graph.add_node(
                leaf_node[index], kind="hidden", group=group, group_name=names.group(group), **_leaf_attrs(leaf)
            )
        elif leaf.role == "weight":
            leaf_node[index] = weight_node(leaf.path)
            graph.add_node(leaf_node[index], kind="weight", **_leaf_attrs(leaf))
    for index, var in enumerate(jaxpr.outvars[: captured.n_outputs]):
        graph.add_node(f"output:{index}", kind="output", shape=aval_shape(var))
    contraction_node = {}
    for index, relation in enumerate(relations):
        node = f"op:{index}"
        graph.add_node(
            node,
            kind="relation",
            op=relation.op,
            weight=relation.weight,
            weight_name=names.name_of(relation.weight),
            group=relation.group,
            group_name=None if relation.group is None else names.group(relation.group),
            status=relation.status,
            reason=names.translate(relation.reason),
            n_pre=relation.n_pre,
        )
        graph.add_edge(weight_node(relation.weight), node, role="weight")
        if relation.contraction is not None:
            contraction_node[relation.contraction] = node
            _pre_edges(graph, facts.contractions[relation.contraction].pre_fact, leaf_node, node)
    for j in sorted(facts.new_vars):
        for (kind, i), dep in sorted(facts.new_fact(j).items()):
            if kind in ("hidden", "new") and i != j and i in leaf_node:
                graph.add_edge(leaf_node[i], leaf_node[j], role="coupling")
            elif kind == "relation" and i in contraction_node:
                graph.add_edge(contraction_node[i], leaf_node[j], role="tail", elementwise=dep.one_to_one)
    for index, var in enumerate(jaxpr.outvars[: captured.n_outputs]):
        for (kind, i), _ in sorted(facts.propagation.of(var).items()):
            if kind in ("new", "hidden") and i in leaf_node:
                graph.add_edge(leaf_node[i], f"output:{index}", role="readout")
            elif kind == "relation" and i in contraction_node:
                graph.add_edge(contraction_node[i], f"output:{index}", role="direct")
            elif kind == "weight" and i in leaf_node:
                graph.add_edge(leaf_node[i], f"output:{index}", role="direct")
    return nx.freeze(graph)


def _pre_edges(graph, pre_fact, leaf_node, node) -> None:
    for (kind, i), _ in sorted(pre_fact.items()):
        if kind == "input":
            graph.add_edge(f"input:{i}", node, role="pre", time="t")
        elif kind in ("hidden", "new") and i in leaf_node:
            graph.add_edge(leaf_node[i], node, role="pre", time="t-1" if kind == "hidden" else "t")
