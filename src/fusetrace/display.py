"""Text views of an analysis: `summary`, `to_dot`, `explain`. Output is deterministic (it follows leaf
and relation order), so it can be diffed and tested."""

import networkx as nx


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def summary(analysis) -> str:
    from .analysis import ALGORITHMS

    batch = analysis.batch_size
    lines = [f"fusetrace analysis (batch size {batch if batch is not None else 'none'})", "", "hidden groups:"]
    for group in analysis.groups:
        kind = "linear time-invariant" if group.lti else "nonlinear"
        lines.append(f"  {group.name}: {group.n_neurons} neurons x {group.n_states} states per neuron ({kind})")
        lines.extend(f"    - {path}" for path in group.states)
    lines += ["", "weight relations:"]
    for relation in analysis.relations:
        target = f" -> {relation.group}" if relation.group else ""
        lines.append(f"  {relation.weight}: {relation.status} via {relation.op}{target}")
        if relation.status == "traced" and relation.elementwise:
            lines.append("    a parameter added element-wise: its trace is per neuron")
        elif relation.status == "traced":
            lines.append(f"    presynaptic input: {relation.n_pre} per batch entry")
        if relation.positions > 1:
            lines.append(
                f"    d_rtrl trace per output position: {relation.positions} positions share each kernel element "
                "(one kernel copy per output position)"
            )
        if relation.reason:
            lines.append(f"    reason: {relation.reason}")
    lines += ["", "trace memory:"]
    lines.extend(
        f"  {name}: {analysis.trace_bytes(name)} bytes ({_bytes(analysis.trace_bytes(name))})" for name in ALGORITHMS
    )
    return "\n".join(lines) + "\n"


_SHAPES = {"hidden": "ellipse", "weight": "box", "relation": "diamond", "input": "invhouse", "output": "house"}


def _quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: nx.DiGraph) -> str:
    lines = ["digraph fusetrace {", "  rankdir=LR;"]
    for node, data in graph.nodes(data=True):
        label = f"{data['op']}\\n{data['status']}" if data["kind"] == "relation" else str(data.get("path") or node)
        lines.append(f"  {_quote(node)} [label={_quote(label)}, shape={_SHAPES[data['kind']]}];")
    for source, target, data in graph.edges(data=True):
        style = ", style=dashed" if data.get("role") in ("coupling", "direct") else ""
        lines.append(f"  {_quote(source)} -> {_quote(target)} [label={_quote(data['role'])}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def explain(analysis, path: str) -> str:
    leaves = {leaf.path: leaf for leaf in analysis.captured.leaves}
    if path not in leaves:
        state_leaves = [leaf.path for leaf in analysis.captured.leaves if leaf.state_path == path]
        if not state_leaves:
            raise KeyError(f"no state or weight `{path}`; known: {sorted(leaves)}")
        return "\n".join(explain(analysis, p) for p in state_leaves)
    leaf = leaves[path]
    if leaf.role == "hidden":
        group = analysis.group_of(path)
        feeding = [r for r in analysis.relations if r.group == group.name and r.status == "traced"]
        lines = [
            f"`{path}` is a hidden state of group `{group.name}` ({group.n_states} states per neuron, "
            f"{group.n_neurons} neurons{', linear time-invariant' if group.lti else ''})."
        ]
        lines.append("Its group is fed by: " + (", ".join(r.weight for r in feeding) or "no traced weight") + ".")
        return "\n".join(lines) + "\n"
    if leaf.role == "weight":
        lines = []
        for relation in analysis.relations_of(path):
            target = f" into group `{relation.group}`" if relation.group else ""
            lines.append(f"`{path}` is {relation.status} via `{relation.op}`{target}.")
            if relation.pre_recurrent:
                lines.append(
                    f"  Its presynaptic input reads the previous state of {', '.join(relation.pre_recurrent)} "
                    "(a recurrent path: per-neuron traces approximate it)."
                )
            if relation.pre_new:
                lines.append(f"  Its presynaptic input reads this step's new state of {', '.join(relation.pre_new)}.")
            if relation.reason:
                lines.append(f"  Reason: {relation.reason}")
        return "\n".join(lines) + "\n"
    return f"`{path}` is a {leaf.role.replace('_', '-')} state: it is carried through the step but gets no trace.\n"
