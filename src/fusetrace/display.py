"""Text and HTML views of an analysis and a learner: `summary`, `explain`, `html`. Everything shown uses
the user's names (`I.V`, `E.syn[inE].g`; `fusetrace.naming`), never brainstate's raw paths. Output is
deterministic (it follows leaf and relation order), so it can be diffed and tested.

The analysis is duck-typed (its `groups`, `relations`, `captured`, `names`, ...): this module imports
neither `fusetrace.analysis` nor `fusetrace.api`; callers pass what is not on the analysis.
"""

import html


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _group_line(analysis, group) -> str:
    kind = "linear time-invariant" if group.lti else "nonlinear"
    name = analysis.names.group(group.name)
    return f"  {name}: {group.n_neurons} neurons x {group.n_states} states per neuron ({kind})"


def _relation_lines(analysis, relation) -> list[str]:
    names = analysis.names
    target = f" -> {names.group(relation.group)}" if relation.group else ""
    lines = [f"  {names.name_of(relation.weight)}: {relation.status} via {relation.op}{target}"]
    if relation.status == "traced" and relation.elementwise:
        lines.append("    a parameter added element-wise: its trace is per neuron")
    elif relation.status == "traced":
        lines.append(f"    presynaptic input: {relation.n_pre} per batch entry")
    if relation.view:
        lines.append(
            f"    reads {names.name_of(relation.weight)}{relation.view} (a gate, or a piece of a concatenated input)"
        )
    if relation.positions > 1:
        lines.append(
            f"    d_rtrl trace per output position: {relation.positions} positions share each kernel element "
            "(one kernel copy per output position)"
        )
    if relation.reason:
        lines.append(f"    reason: {names.translate(relation.reason)}")
    return lines


def summary(analysis, trace_memory: dict[str, int]) -> str:
    """Groups with their states, weight relations with reasons, and `trace_memory` (algorithm -> bytes)."""
    batch = analysis.batch_size
    lines = [f"fusetrace analysis (batch size {batch if batch is not None else 'none'})", "", "hidden groups:"]
    for group in analysis.groups:
        lines.append(_group_line(analysis, group))
        lines.extend(f"    - {analysis.names.name_of(path)}" for path in group.states)
    if any(leaf.role == "random" for leaf in analysis.captured.leaves):
        lines += [
            "",
            "random numbers: the step draws from brainstate's global key, carried in the learner's state as",
            "  state['model']['<random>'] (the key at compile time); the gradients are those of the model run",
            "  from that key",
        ]
    lines += ["", "weight relations:"]
    for relation in analysis.relations:
        lines += _relation_lines(analysis, relation)
    lines += ["", "trace memory:"]
    lines.extend(f"  {name}: {size} bytes ({_bytes(size)})" for name, size in trace_memory.items())
    return "\n".join(lines) + "\n"


def explain(analysis, path: str) -> str:
    """What fusetrace does with the state or weight at `path` (a raw path or a name), and why."""
    names = analysis.names
    raw = names.resolve(path)
    leaves = {leaf.path: leaf for leaf in analysis.captured.leaves}
    if raw is None or raw not in leaves:
        state_leaves = [leaf.path for leaf in analysis.captured.leaves if leaf.state_path == raw]
        if not state_leaves:
            known = sorted(leaf.name for leaf in analysis.captured.leaves)
            raise KeyError(f"no state, weight or group `{path}`; known: {known}")
        return "\n".join(explain(analysis, p) for p in state_leaves)
    leaf = leaves[raw]
    if leaf.role == "hidden":
        return _explain_hidden(analysis, leaf)
    if leaf.role == "weight":
        return _explain_weight(analysis, leaf)
    return (
        f"`{leaf.name}` is a {leaf.role.replace('_', '-')} state: it is carried through the step but gets no trace.\n"
    )


def _explain_hidden(analysis, leaf) -> str:
    names = analysis.names
    group = analysis.group_of(leaf.path)
    feeding = [r for r in analysis.relations if r.group == group.name and r.status == "traced"]
    lines = [
        f"`{leaf.name}` is a hidden state of group `{names.group(group.name)}` ({group.n_states} states per neuron, "
        f"{group.n_neurons} neurons{', linear time-invariant' if group.lti else ''})."
    ]
    fed = ", ".join(names.name_of(r.weight) for r in feeding) or "no traced weight"
    lines.append(f"Its group is fed by: {fed}.")
    return "\n".join(lines) + "\n"


def _explain_weight(analysis, leaf) -> str:
    names = analysis.names
    lines = []
    for relation in analysis.relations_of(leaf.path):
        target = f" into group `{names.group(relation.group)}`" if relation.group else ""
        lines.append(f"`{leaf.name}` is {relation.status} via `{relation.op}`{target}.")
        if relation.pre_recurrent:
            groups = ", ".join(names.group(g) for g in relation.pre_recurrent)
            lines.append(
                f"  Its presynaptic input reads the previous state of {groups} "
                "(a recurrent path: per-neuron traces approximate it)."
            )
        if relation.pre_new:
            groups = ", ".join(names.group(g) for g in relation.pre_new)
            lines.append(f"  Its presynaptic input reads this step's new state of {groups}.")
        if relation.reason:
            lines.append(f"  Reason: {names.translate(relation.reason)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- tables (HTML and markdown)

Table = tuple[list[str], list[list[str]]]  # header, rows


def group_rows(analysis) -> Table:
    """The hidden groups: name, neurons, states per neuron, kind, states."""
    names = analysis.names
    rows = [
        [
            names.group(g.name),
            str(g.n_neurons),
            str(g.n_states),
            "linear time-invariant" if g.lti else "nonlinear",
            ", ".join(names.name_of(p) for p in g.states),
        ]
        for g in analysis.groups
    ]
    return ["group", "neurons", "states per neuron", "kind", "states"], rows


def relation_rows(analysis) -> Table:
    """The weight relations (the per-weight view of a bare analysis)."""
    names = analysis.names
    rows = [
        [
            names.name_of(r.weight),
            r.status,
            r.op,
            names.group(r.group) if r.group else "",
            str(r.n_pre) if r.status == "traced" and not r.elementwise else "",
            names.translate(r.reason),
        ]
        for r in analysis.relations
    ]
    return ["weight", "status", "op", "into group", "presynaptic input", "reason"], rows


def report_rows(reports) -> Table:
    """A learner's per-weight reports (`Learner.report()`)."""
    rows = [
        [
            r.name or r.path,
            r.treatment,
            " + ".join("x".join(map(str, s)) or "scalar" for s in r.trace_shapes) or "none",
            _bytes(r.trace_bytes),
            "exact" if r.exact else "approximate",
            r.why,
        ]
        for r in reports
    ]
    return ["weight", "treatment", "trace shapes", "trace memory", "gradient", "why"], rows


def memory_rows(trace_memory: dict[str, int]) -> Table:
    """Trace memory per algorithm."""
    return ["algorithm", "bytes", "size"], [[name, str(size), _bytes(size)] for name, size in trace_memory.items()]


def html_table(table: Table, caption: str) -> str:
    """`table` as an HTML `<table>` with a caption; every cell escaped."""
    header, rows = table
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return (
        f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def markdown_table(table: Table) -> str:
    """`table` as a GitHub-flavoured markdown table (`|` in cells escaped)."""
    header, rows = table

    def line(cells):
        return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]) + "\n"


STYLE = (
    "<style>.fusetrace table{border-collapse:collapse;margin:0.4em 0;font-size:0.9em}"
    ".fusetrace th,.fusetrace td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}"
    ".fusetrace caption{text-align:left;font-weight:bold}.fusetrace svg{max-width:100%;height:auto}</style>"
)


def html_view(title: str, tables: list[str], svg: str) -> str:
    """One `<div>` for a notebook: a title, `tables` (HTML), then the drawing (inline SVG)."""
    parts = [STYLE, f'<div class="fusetrace"><h4>{html.escape(title)}</h4>', *tables]
    parts.append(f'<div class="fusetrace-drawing">{svg}</div></div>')
    return "".join(parts)
