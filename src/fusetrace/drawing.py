"""A drawing that explains an analysis: groups as boxes holding their states, weights as labelled arrows
coloured by what the learner does with them; its Graphviz text and a layered layout of its own.

Consumes: an analysis (its `graph`, `groups`, `relations` and `names`; duck-typed, this module imports
no other part of fusetrace) and, for a learner, its `WeightReport`s. Produces a `Drawing` (plain data),
`to_dot(drawing)` and `layered(drawing)`, the positions `fusetrace.plots` draws with matplotlib when
Graphviz's `dot` program is absent.

Arrows: one per weight relation, from the state its presynaptic input reads (or the step's input) to
the state its op output enters first (the receiving state no other receiving state feeds within the
step; an AlignPost weight enters its synapse's conductance, not the membrane), or to the step output
for a weight with no hidden state in between. A relation with several sources or targets meets them at
a junction point; one with none starts (or ends) at a point of its own. Grey dashed arrows show what the
step's outputs read. Node ids are short (`s3`, `g0`, `in0`): no raw brainstate path reaches the text.
"""

import dataclasses
import html

# what a weight gets, for a learner (from its report) and for a bare analysis (from its relation)
TREATMENT_COLORS = {
    "exact": "#1a9850",
    "approximate": "#e66101",
    "same-step": "#2c7bb6",
    "none": "#8c8c8c",
    "traced": "#5e3c99",
    "instantaneous": "#2c7bb6",
    "excluded": "#8c8c8c",
}
READOUT_COLOR = "#9e9e9e"
TREATMENT_MEANING = {
    "exact": "exact gradient (equals BPTT's)",
    "approximate": "approximate gradient",
    "same-step": "same-step credit only",
    "none": "no gradient (unused or excluded)",
    "traced": "traced (eligibility trace)",
    "instantaneous": "instantaneous (same-step gradient)",
    "excluded": "excluded (no trace; see explain)",
}


@dataclasses.dataclass(frozen=True)
class Box:
    """A hidden group: `title` (its name), `subtitle` (size and kind), one `(id, label)` row per state."""

    id: str
    title: str
    subtitle: str
    rows: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Terminal:
    """A node outside the groups: kind "input", "output", or "point" (a junction, a source or a sink)."""

    id: str
    label: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Arrow:
    """`source` -> `target` (row or terminal ids); `treatment` keys `TREATMENT_COLORS`, "" for a readout."""

    source: str
    target: str
    label: str = ""
    treatment: str = ""


@dataclasses.dataclass(frozen=True)
class Drawing:
    """The picture of one analysis (or learner), as data."""

    title: str
    boxes: tuple[Box, ...]
    terminals: tuple[Terminal, ...]
    arrows: tuple[Arrow, ...]

    def __post_init__(self):
        known = {row for box in self.boxes for row, _ in box.rows} | {t.id for t in self.terminals}
        unknown = [end for arrow in self.arrows for end in (arrow.source, arrow.target) if end not in known]
        if unknown:
            raise ValueError(f"arrows end at unknown nodes {unknown}")

    def owner(self, node: str) -> str:
        """The box holding row `node`, or `node` itself (a terminal)."""
        return next((box.id for box in self.boxes if any(row == node for row, _ in box.rows)), node)

    @property
    def treatments(self) -> tuple[str, ...]:
        """The treatments the arrows show, in `TREATMENT_COLORS` order (the legend)."""
        present = {arrow.treatment for arrow in self.arrows}
        return tuple(t for t in TREATMENT_COLORS if t in present)


def treatment_of_report(report) -> str:
    """A learner's treatment of one weight: exact / approximate / same-step / none."""
    if report.treatment == "unused":
        return "none"
    if report.treatment == "same-step":
        return "same-step"
    return "exact" if report.exact else "approximate"


def build_drawing(analysis, reports=None, title: str = "") -> Drawing:
    """The drawing of `analysis`; with a learner's `reports`, arrows coloured by its treatments."""
    graph = analysis.graph
    by_weight = {report.path: treatment_of_report(report) for report in reports or ()}
    rows = _state_rows(analysis)
    boxes = tuple(_box(analysis, index, group, rows) for index, group in enumerate(analysis.groups))
    terminals: dict[str, Terminal] = {}
    arrows: list[Arrow] = []
    for index, relation in enumerate(analysis.relations):
        treatment = by_weight.get(relation.weight, "none") if reports is not None else relation.status
        label = f"{_weight_label(analysis, relation)}\n{relation.op}"
        sources = _ends(graph, f"op:{index}", rows, terminals, incoming=True)
        targets = _targets(analysis, f"op:{index}", rows, terminals)
        arrows += _relation_arrows(index, sources, targets, label, treatment, terminals)
    arrows += _readout_arrows(analysis, rows, terminals)
    return Drawing(title, boxes, tuple(terminals.values()), tuple(dict.fromkeys(arrows)))


def _state_rows(analysis) -> dict[str, str]:
    """`{graph node of each hidden state: its row id}`."""
    leaves = analysis.captured.leaves
    return {f"hidden:{leaves[i].path}": f"s{i}" for group in analysis.groups for i in group.leaves}


def _box(analysis, index: int, group, rows: dict[str, str]) -> Box:
    title = analysis.names.group(group.name)
    kind = "linear time-invariant" if group.lti else "nonlinear"
    states = "state" if group.n_states == 1 else "states"
    subtitle = f"{group.n_neurons} neurons x {group.n_states} {states}, {kind}"
    leaves = analysis.captured.leaves
    labelled = tuple((rows[f"hidden:{leaves[i].path}"], _relative(leaves[i].name, title)) for i in group.leaves)
    return Box(f"g{index}", title, subtitle, labelled)


def _relative(name: str, group: str) -> str:
    return name[len(group) + 1 :] if name.startswith(group + ".") else name


def _weight_label(analysis, relation) -> str:
    """The weight's state name when the state has this one leaf, else the leaf's name."""
    leaf = analysis.captured.leaves[relation.weight_leaf]
    siblings = sum(other.state_path == leaf.state_path for other in analysis.captured.leaves)
    return leaf.state_name if siblings == 1 else leaf.name


def _terminal(node: str, data: dict, terminals: dict[str, Terminal]) -> str:
    kind, index = node.split(":")
    ident = f"{'in' if kind == 'input' else 'out'}{index}"
    shape = "x".join(map(str, data.get("shape", ()))) or "scalar"
    terminals.setdefault(ident, Terminal(ident, f"{kind} {index}\n({shape})", kind))
    return ident


def _ends(graph, op: str, rows, terminals, *, incoming: bool) -> list[str]:
    """The row or terminal ids at the other end of `op`'s pre edges (incoming) or direct edges."""
    found = []
    edges = graph.in_edges(op, data=True) if incoming else graph.out_edges(op, data=True)
    for source, target, data in edges:
        node = source if incoming else target
        if data["role"] not in ("pre", "direct"):
            continue
        found.append(rows[node] if node in rows else _terminal(node, graph.nodes[node], terminals))
    return _one_per_group(graph, found, rows)


def _one_per_group(graph, ids: list[str], rows: dict[str, str]) -> list[str]:
    """`ids` without repeats and with only the first state of each group."""
    group_of = {row: graph.nodes[node]["group"] for node, row in rows.items()}
    kept, seen = [], set()
    for ident in ids:
        key = group_of.get(ident, ident)
        if key not in seen:
            seen.add(key)
            kept.append(ident)
    return kept


def _targets(analysis, op: str, rows, terminals) -> list[str]:
    """The receiving states of `op` that no other receiving state feeds within the step, one per group;
    then the outputs it reaches directly."""
    graph = analysis.graph
    tails = [t for _, t, d in graph.out_edges(op, data=True) if d["role"] == "tail"]
    first = [
        t for t in tails if not any(graph.has_edge(s, t) and graph.edges[s, t]["role"] == "coupling" for s in tails)
    ]
    chosen, seen_groups = [], set()
    for node in first or tails:
        group = graph.nodes[node]["group"]
        if group not in seen_groups:
            seen_groups.add(group)
            chosen.append(rows[node])
    return chosen + _ends(graph, op, rows, terminals, incoming=False)


def _relation_arrows(index, sources, targets, label, treatment, terminals) -> list[Arrow]:
    if not sources:
        sources = [_point(f"p{index}", terminals)]
    if not targets:
        targets = [_point(f"q{index}", terminals)]
    if len(sources) == 1 and len(targets) == 1:
        return [Arrow(sources[0], targets[0], label, treatment)]
    junction = _point(f"j{index}", terminals)
    return [Arrow(source, junction, "", treatment) for source in sources] + [
        Arrow(junction, target, label, treatment) for target in targets
    ]


def _point(ident: str, terminals: dict[str, Terminal]) -> str:
    terminals.setdefault(ident, Terminal(ident, "", "point"))
    return ident


def _readout_arrows(analysis, rows, terminals) -> list[Arrow]:
    """One grey arrow from each group to each output that reads its states."""
    graph, arrows, seen = analysis.graph, [], set()
    for source, target, data in graph.edges(data=True):
        if data["role"] != "readout" or source not in rows:
            continue
        key = (graph.nodes[source]["group"], target)
        if key not in seen:
            seen.add(key)
            arrows.append(Arrow(rows[source], _terminal(target, graph.nodes[target], terminals)))
    return arrows


# --------------------------------------------------------------------------- Graphviz text


def _html(text: str) -> str:
    return html.escape(text, quote=True)


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(drawing: Drawing) -> str:
    """The drawing in Graphviz dot syntax: each group one box (an HTML table: its name, then one row per
    state, each row a port arrows attach to), and a legend of the treatments shown."""
    lines = [
        "digraph fusetrace {",
        '  graph [rankdir=LR, newrank=true, fontname="Helvetica", nodesep=0.3, ranksep=0.7, labelloc=t,'
        f' label="{_dot_escape(drawing.title)}"];',
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=8, arrowsize=0.7];',
    ]
    lines += [f"  {box.id} [shape=plaintext, label={_dot_box(box)}];" for box in drawing.boxes]
    lines += [f"  {terminal.id} [{_dot_terminal(terminal)}];" for terminal in drawing.terminals]
    port = {row: f"{box.id}:{row}" for box in drawing.boxes for row, _ in box.rows}
    for arrow in drawing.arrows:
        source, target = port.get(arrow.source, arrow.source), port.get(arrow.target, arrow.target)
        if drawing.owner(arrow.source) == drawing.owner(arrow.target):  # a loop within a group: right to left
            source, target = f"{source}:e", f"{target}:w"
        lines.append(f"  {source} -> {target} [{_dot_arrow(arrow)}];")
    if drawing.treatments:
        readout = any(not arrow.treatment for arrow in drawing.arrows)
        lines.append(f"  legend [shape=plaintext, label={_dot_legend(drawing.treatments, readout)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_box(box: Box) -> str:
    title = f'<b>{_html(box.title)}</b><br/><font point-size="8">{_html(box.subtitle)}</font>'
    rows = "".join(
        f'<tr><td port="{row}" bgcolor="white" border="1" style="rounded" color="#9aa9c7">{_html(label)}</td></tr>'
        for row, label in box.rows
    )
    table = '<table border="1" style="rounded" bgcolor="#eef2f9" color="#4c72b0" cellborder="0" cellspacing="4">'
    return f"<{table}<tr><td>{title}</td></tr>{rows}</table>>"


def _dot_terminal(terminal: Terminal) -> str:
    if terminal.kind == "point":
        return 'shape=point, width=0.06, color="#555555"'
    shape = "cds" if terminal.kind == "input" else "box"
    return (
        f'label="{_dot_escape(terminal.label)}", shape={shape}, fontsize=9, style="filled,rounded", fillcolor="#f7f7f7"'
    )


def _dot_arrow(arrow: Arrow) -> str:
    if not arrow.treatment:
        return f'color="{READOUT_COLOR}", style=dashed, arrowhead=open'
    color = TREATMENT_COLORS[arrow.treatment]
    parts = [f'color="{color}"', f'fontcolor="{color}"', "penwidth=1.5"]
    if arrow.label:
        parts.append(f'label="{_dot_escape(arrow.label)}"')
    return ", ".join(parts)


def _dot_legend(treatments: tuple[str, ...], readout: bool) -> str:
    swatch = '<td bgcolor="{}" width="14"></td><td align="left">{}</td>'
    rows = "".join(f"<tr>{swatch.format(TREATMENT_COLORS[t], _html(TREATMENT_MEANING[t]))}</tr>" for t in treatments)
    if readout:
        dashes = f'<td><font color="{READOUT_COLOR}">- - -</font></td><td align="left">read by the output</td>'
        rows += f"<tr>{dashes}</tr>"
    head = '<tr><td colspan="2"><b>weights</b></td></tr>'
    return f'<<table border="0" cellspacing="2" cellpadding="2">{head}{rows}</table>>'


# --------------------------------------------------------------------------- a layered layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each box and terminal goes: `places[id] = (x, y, width, height)` (top-left corner, y down,
    in inches), and the whole picture's `width` and `height`."""

    places: dict[str, tuple[float, float, float, float]]
    width: float
    height: float
    bottom: float  # the lowest node's lower edge (feedback arrows run under it)

    def anchor(self, drawing: Drawing, node: str, side: str) -> tuple[float, float]:
        """Where an arrow meets `node` on `side` ("left", "right" or "bottom"); a row is met at its height."""
        box = drawing.owner(node)
        x, y, w, h = self.places[box]
        if side == "bottom":
            return x + w / 2, y + h
        if box == node:
            return (x + w if side == "right" else x), y + h / 2
        rows = next(b.rows for b in drawing.boxes if b.id == box)
        row = next(i for i, (ident, _) in enumerate(rows) if ident == node)
        return (x + w if side == "right" else x), y + TITLE_H + (row + 0.5) * ROW_H

    def curve(self, drawing: Drawing, arrow: Arrow) -> tuple[tuple[float, float], ...]:
        """The four control points of `arrow`'s cubic Bézier curve: a forward arrow leaves its source's
        right side for its target's left; one within a box loops over its top, right to left; a feedback
        arrow (to the same or an earlier layer) leaves its source's left side and runs under the picture
        into its target's lower edge."""
        source_box, target_box = drawing.owner(arrow.source), drawing.owner(arrow.target)
        if self.places[source_box][0] + self.places[source_box][2] < self.places[target_box][0]:
            (x0, y0), (x1, y1) = self.anchor(drawing, arrow.source, "right"), self.anchor(drawing, arrow.target, "left")
            bend = (x1 - x0) / 2
            return (x0, y0), (x0 + bend, y0), (x1 - bend, y1), (x1, y1)
        if source_box == target_box:
            (x0, y0), (x1, y1) = self.anchor(drawing, arrow.source, "right"), self.anchor(drawing, arrow.target, "left")
            top = self.places[source_box][1] - LOOP_H / 0.75  # the curve's apex is LOOP_H above the box
            return (x0, y0), (x0 + LOOP_W, top), (x1 - LOOP_W, top), (x1, y1)
        (x0, y0), (x1, y1) = self.anchor(drawing, arrow.source, "left"), self.anchor(drawing, arrow.target, "bottom")
        low = y1 + (self.bottom + FEEDBACK_DEPTH / 2 - y1) / 0.75  # the curve dips about half-way into the margin
        return (x0, y0), (x0 - LAYER_GAP / 2, low), (x1, low), (x1, y1)


def midpoint(curve: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """The point half-way along a cubic Bézier curve (t = 1/2), where its label goes."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = curve
    return (x0 + 3 * x1 + 3 * x2 + x3) / 8, (y0 + 3 * y1 + 3 * y2 + y3) / 8


CHAR_W, ROW_H, TITLE_H, PAD = 0.075, 0.24, 0.5, 0.15  # inches, at the fallback's 8-9 pt fonts
LAYER_GAP, NODE_GAP = 1.9, 0.35
LOOP_W, LOOP_H = 0.5, 0.45  # a loop within a box: its reach beside the box and its height above it
FEEDBACK_DEPTH = 0.8  # the margin under the picture where feedback arrows run


def layered(drawing: Drawing) -> Layout:
    """A left-to-right layered layout: inputs first, outputs last, every other node one layer after the
    latest node feeding it (feedback arrows ignored), nodes in a layer ordered by their neighbours'
    mean position (a few barycentre sweeps)."""
    nodes = [t.id for t in drawing.terminals if t.kind == "input"] + [b.id for b in drawing.boxes]
    nodes += [t.id for t in drawing.terminals if t.kind == "point"]
    outputs = [t.id for t in drawing.terminals if t.kind == "output"]
    edges = list(dict.fromkeys((drawing.owner(a.source), drawing.owner(a.target)) for a in drawing.arrows))
    forward = _acyclic([e for e in edges if e[0] != e[1] and e[1] not in outputs], nodes)
    rank = _ranks(nodes, forward)
    last = max(rank.values(), default=-1) + 1
    rank.update(dict.fromkeys(outputs, last))
    layers = _ordered_layers([*nodes, *outputs], rank, edges)
    return _place(drawing, layers)


def _acyclic(edges: list[tuple[str, str]], nodes: list[str]) -> list[tuple[str, str]]:
    """`edges` without those that close a cycle in a depth-first search from `nodes` in order."""
    successors: dict[str, list[str]] = {node: [] for node in nodes}
    for source, target in edges:
        successors.setdefault(source, []).append(target)
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    back = set()
    for root in nodes:
        if root in state:
            continue
        stack = [(root, iter(successors.get(root, ())))]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                back.add((node, child))
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(successors.get(child, ()))))
    return [edge for edge in edges if edge not in back]


def _ranks(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """The longest-path layer of each node of the acyclic `edges`."""
    rank = dict.fromkeys(nodes, 0)
    for _ in nodes:  # at most len(nodes) relaxations in an acyclic graph
        changed = False
        for source, target in edges:
            if rank.get(target, 0) < rank.get(source, 0) + 1:
                rank[target] = rank.get(source, 0) + 1
                changed = True
        if not changed:
            break
    return rank


def _ordered_layers(nodes: list[str], rank: dict[str, int], edges) -> list[list[str]]:
    layers: list[list[str]] = [[] for _ in range(max(rank.values(), default=0) + 1)]
    for node in nodes:
        layers[rank[node]].append(node)
    neighbours: dict[str, list[str]] = {node: [] for node in nodes}
    for source, target in edges:
        if source != target:
            neighbours[source].append(target)
            neighbours[target].append(source)
    for _ in range(4):
        position = {node: i for layer in layers for i, node in enumerate(layer)}
        for layer in layers:
            layer.sort(key=lambda n: _barycentre(n, neighbours, position))
    return [layer for layer in layers if layer]


def _barycentre(node: str, neighbours: dict[str, list[str]], position: dict[str, int]) -> float:
    around = [position[n] for n in neighbours[node] if n in position]
    return sum(around) / len(around) if around else position[node]


def _size(drawing: Drawing, node: str) -> tuple[float, float]:
    box = next((b for b in drawing.boxes if b.id == node), None)
    if box is not None:
        longest = max([len(box.title) + 4, 0.8 * len(box.subtitle), *(len(label) + 2 for _, label in box.rows)])
        return longest * CHAR_W + 2 * PAD, TITLE_H + len(box.rows) * ROW_H + PAD
    terminal = next(t for t in drawing.terminals if t.id == node)
    if terminal.kind == "point":
        return 0.08, 0.08
    lines = terminal.label.split("\n")
    return max(len(line) for line in lines) * CHAR_W + 2 * PAD, len(lines) * ROW_H + PAD


def _place(drawing: Drawing, layers: list[list[str]]) -> Layout:
    """Layers side by side, each one's nodes stacked and centred; a box with a loop gets room above it."""
    looped = {drawing.owner(a.source) for a in drawing.arrows if drawing.owner(a.source) == drawing.owner(a.target)}
    sizes = {node: _size(drawing, node) for layer in layers for node in layer}
    above = {node: LOOP_H + 0.2 if node in looped else 0.0 for node in sizes}
    heights = [sum(sizes[n][1] + above[n] for n in layer) + NODE_GAP * (len(layer) - 1) for layer in layers]
    total_h = max(heights, default=0.0)
    places, x = {}, LOOP_W
    for layer, layer_h in zip(layers, heights, strict=True):
        width = max(sizes[n][0] for n in layer)
        y = (total_h - layer_h) / 2
        for node in layer:
            w, h = sizes[node]
            places[node] = (x + (width - w) / 2, y + above[node], w, h)
            y += above[node] + h + NODE_GAP
        x += width + LAYER_GAP
    return Layout(places, x - LAYER_GAP + LOOP_W, total_h + FEEDBACK_DEPTH, total_h)
