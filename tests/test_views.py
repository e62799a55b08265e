"""Views of an analysis and a learner: the drawing (data, Graphviz text, the layered fallback), SVG and
PNG files, the notebook HTML (`_repr_html_`), and `fusetrace inspect --report`.

Graphviz is optional: every test passes without the `dot` program; the ones that need it skip.
"""

import html.parser
import json
import pathlib
import xml.etree.ElementTree as ElementTree

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax.numpy as jnp
import pytest

import fusetrace
from fusetrace import plots
from fusetrace.cli import main as cli_main
from fusetrace.drawing import TREATMENT_COLORS, layered, to_dot
from fusetrace.inspection import FILES
from test_naming import FORBIDDEN, ei_example_module

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_DOT = plots.dot_program() is not None
ENGINES = ["matplotlib", pytest.param("dot", marks=pytest.mark.skipif(not HAS_DOT, reason="no Graphviz `dot`"))]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WEIGHTS = ("inE.comm.weight", "EE.comm.weight", "EI.comm.weight", "IE.comm.weight", "out.weight")


@pytest.fixture(scope="module")
def ei_learner():
    model, example, loss = ei_example_module().ei_network()
    return fusetrace.compile(model, example, loss=loss, algorithm="d_rtrl")


@pytest.fixture
def without_dot(monkeypatch):
    monkeypatch.setattr(plots, "dot_program", lambda: None)


# --------------------------------------------------------------------------- names in a learner's views


def test_learner_report_and_explain_use_names(ei_learner):
    reports = {r.name: r for r in ei_learner.report()}
    assert set(reports) == {leaf.name for leaf in ei_learner.analysis.captured.leaves if leaf.role == "weight"}
    assert not any(bad in ei_learner.summary() for bad in FORBIDDEN)
    assert "group `E` lies on a loop" in reports["EE.comm.weight.weight"].why
    assert ei_learner.explain("EE.comm.weight") == ei_learner.explain(ei_learner.analysis.path_of("EE.comm.weight"))
    assert "d_rtrl: EE.comm.weight.weight: trace;" in ei_learner.explain("EE.comm.weight")
    assert repr(ei_learner).startswith("Learner(algorithm='d_rtrl', groups=[E, I, out], params=[")
    named = ei_learner.with_names(ei_learner.init())
    assert set(named["model"]) == {"E.V", "E.syn[inE,EE].g", "E.syn[IE].g", "I.V", "I.syn[EI].g", "out.r"}
    assert set(ei_learner.with_names(ei_learner.params)) == set(WEIGHTS)


# --------------------------------------------------------------------------- the drawing as data


def test_drawing_of_the_ei_example(ei_learner):
    """Boxes are the groups with their states; each weight one arrow from the state its input reads to
    the state it enters first, coloured by the learner's treatment (d_rtrl: only the readout is exact)."""
    drawing = ei_learner.drawing()
    boxes = {box.title: [label for _, label in box.rows] for box in drawing.boxes}
    assert boxes == {"E": ["V", "syn[inE,EE].g", "syn[IE].g"], "I": ["V", "syn[EI].g"], "out": ["r"]}
    row = {f"{box.title}.{label}": ident for box in drawing.boxes for ident, label in box.rows}
    arrows = {arrow.label.split("\n")[0]: arrow for arrow in drawing.arrows if arrow.label}
    assert set(arrows) == set(WEIGHTS)
    assert (arrows["EE.comm.weight"].source, arrows["EE.comm.weight"].target) == (row["E.V"], row["E.syn[inE,EE].g"])
    assert (arrows["IE.comm.weight"].source, arrows["IE.comm.weight"].target) == (row["I.V"], row["E.syn[IE].g"])
    assert arrows["inE.comm.weight"].source == "in0" and arrows["out.weight"].target == row["out.r"]
    assert {name: arrow.treatment for name, arrow in arrows.items()} == {
        **dict.fromkeys(WEIGHTS[:4], "approximate"),
        "out.weight": "exact",
    }
    assert all(arrow.label.endswith("\ndot_general") for arrow in arrows.values())
    assert {arrow.treatment for arrow in ei_learner.analysis.drawing().arrows if arrow.label} == {"traced"}


def test_dot_text_uses_names_and_short_ids(ei_learner):
    drawing = ei_learner.drawing(title="E/I")
    text = to_dot(drawing)
    assert text.startswith("digraph fusetrace {") and text.count(" -> ") == len(drawing.arrows)
    for box in drawing.boxes:
        assert f"  {box.id} [shape=plaintext" in text and f"<b>{box.title}</b>" in text
    assert TREATMENT_COLORS["exact"] in text and TREATMENT_COLORS["approximate"] in text
    assert not any(bad in text for bad in FORBIDDEN)
    assert ei_learner.to_dot() == to_dot(ei_learner.drawing())


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("engine", ENGINES)
def test_draw_writes_svg_and_png(ei_learner, engine, tmp_path):
    drawing = ei_learner.drawing(title="E/I")
    assert plots.draw(drawing, tmp_path / "g.svg", engine=engine) == engine
    plots.draw(drawing, tmp_path / "g.png", engine=engine)
    svg = (tmp_path / "g.svg").read_text()
    ElementTree.fromstring(svg)  # well-formed XML
    assert all(name in svg for name in WEIGHTS) and "syn[inE,EE].g" in svg
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC


class ManyPopulations(brainstate.nn.Module):
    """`n_pop` LIF populations in layers of `width`: input -> the first layer, each population -> the one
    `width` further on, some with a recurrent projection, and a leaky readout of the last layer."""

    def __init__(self, n_pop=32, width=8, n=3, n_in=2):
        super().__init__()
        self.width = width
        self.pops = [bps.LIF(n, V_th=1.0 * u.mV, tau=10.0 * u.ms) for _ in range(n_pop)]
        self.inputs = [self._projection(n_in, n, self.pops[i]) for i in range(width)]
        self.forward = [self._projection(n, n, self.pops[i]) for i in range(width, n_pop)]
        self.recurrent = [self._projection(n, n, self.pops[i]) for i in range(0, n_pop, 5)]
        self.out = bps.LeakyRateReadout(n * width, 2, tau=10.0 * u.ms)

    @staticmethod
    def _projection(n_pre, n, post):
        return bps.AlignPostProj(
            comm=brainstate.nn.Linear(n_pre, n, w_init=braintools.init.KaimingNormal(unit=u.mA), b_init=None),
            syn=bps.Expon.desc(n, tau=5.0 * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA)),
            out=bps.CUBA.desc(scale=1.0),
            post=post,
        )

    def update(self, x):
        spikes = [pop.get_spike() for pop in self.pops]
        for projection in self.inputs:
            projection(x)
        for k, projection in enumerate(self.forward):
            projection(spikes[k])
        for k, projection in enumerate(self.recurrent):
            projection(spikes[5 * k])
        new = [pop(0.0 * u.mA) for pop in self.pops]
        return self.out(jnp.concatenate(new[-self.width :], axis=-1))


def test_layered_fallback_at_32_populations(tmp_path):
    """Without Graphviz: 33 groups in five columns, no box over another, every forward arrow left to
    right, each loop within its box's reach; the PNG is written."""
    brainstate.environ.set(dt=1.0 * u.ms)
    analysis = fusetrace.analyze(ManyPopulations(), jnp.zeros(2))
    drawing = analysis.drawing()
    assert len(drawing.boxes) == 33 and {box.title for box in drawing.boxes} >= {f"pops[{i}]" for i in range(32)}
    layout = layered(drawing)
    places = [layout.places[box.id] for box in drawing.boxes]
    assert len({round(x + w / 2, 6) for x, _, w, _ in places}) == 5  # 4 layers of populations, the readout
    for i, (x0, y0, w0, h0) in enumerate(places):
        for x1, y1, w1, h1 in places[i + 1 :]:
            assert x0 + w0 <= x1 or x1 + w1 <= x0 or y0 + h0 <= y1 or y1 + h1 <= y0, "boxes overlap"
    for arrow in drawing.arrows:
        (sx, _), *_, (tx, _) = layout.curve(drawing, arrow)
        if drawing.owner(arrow.source) != drawing.owner(arrow.target):
            assert sx < tx, f"{arrow.label} runs right to left"
    assert plots.draw(drawing, tmp_path / "many.png", engine="matplotlib") == "matplotlib"
    assert (tmp_path / "many.png").stat().st_size > 10_000


# --------------------------------------------------------------------------- notebooks


class _Tags(html.parser.HTMLParser):
    """Start tags, and the text of every table cell and caption; fails on a closing tag that does not
    match the open one (SVG's self-closed elements are allowed)."""

    VOID = frozenset({"br", "img", "meta", "hr", "input", "link"})

    def __init__(self):
        super().__init__()
        self.tags, self.cells, self.open = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing open"

    def handle_data(self, data):
        if self.open and self.open[-1] in ("td", "caption", "th"):
            self.cells.append(data)


def _parsed(text: str) -> _Tags:
    parser = _Tags()
    parser.feed(text)
    parser.close()
    assert not parser.open, f"unclosed: {parser.open}"
    return parser


@pytest.mark.parametrize("engine", ENGINES)
def test_repr_html_holds_tables_and_drawing(ei_learner, engine, monkeypatch):
    if engine == "matplotlib":
        monkeypatch.setattr(plots, "dot_program", lambda: None)
    learner_view = _parsed(ei_learner._repr_html_())
    assert "svg" in learner_view.tags and learner_view.tags.count("table") == 4
    assert {"the fused program by part (estimated)", "forward dynamics", "total"} <= set(learner_view.cells)
    assert "per weight (d_rtrl)" in learner_view.cells
    assert {f"{w}.weight" if w != "out.weight" else w for w in WEIGHTS} <= set(learner_view.cells)
    assert {"exact", "approximate", "E.V, E.syn[inE,EE].g, E.syn[IE].g"} <= set(learner_view.cells)
    analysis_view = _parsed(ei_learner.analysis._repr_html_())
    assert "svg" in analysis_view.tags and {"weight relations", "hidden groups"} <= set(analysis_view.cells)
    for text in (ei_learner._repr_html_(), ei_learner.analysis._repr_html_()):
        assert not any(bad in text for bad in FORBIDDEN)


# --------------------------------------------------------------------------- fusetrace inspect --report


def test_cli_inspect_report(tmp_path, monkeypatch, capsys):
    """The docs' command: the E/I example with d_rtrl writes every report file, in the user's names."""
    monkeypatch.chdir(ROOT)  # where `examples.ei_inspect` imports from
    folder = tmp_path / "report"
    argv = ["inspect", "examples.ei_inspect:ei_network", "--algorithm", "d_rtrl", "--report", str(folder)]
    assert cli_main(argv) == 0
    assert "E.syn[inE,EE].g" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert not (ROOT / "graph.png").exists() or (ROOT / "graph.png").stat().st_mtime < folder.stat().st_mtime
    report = json.loads((folder / "report.json").read_text())
    assert [g["name"] for g in report["groups"]] == ["E", "I", "out"]
    assert report["groups"][1]["states"][0] == {"name": "I.V", "path": "EI.post.V"}
    exact = {w["weight"]: w["exact"] for w in report["learner"]["weights"]}
    assert exact == {**{f"{w}.weight": False for w in WEIGHTS[:4]}, "out.weight": True}
    program = report["learner"]["program"]
    assert {"forward", "derivatives", "traces", "credit_chains"} <= set(program)
    assert all(part["equations"] > 0 for part in program.values())
    markdown = (folder / "report.md").read_text()
    assert "## The fused program by part" in markdown and "| D and F derivatives |" in markdown
    assert "## Per weight (d_rtrl)" in markdown and "| I | 10 | 2 | nonlinear | I.V, I.syn[EI].g |" in markdown
    for name in ("summary.txt", "report.md", "graph.svg"):
        assert not any(bad in (folder / name).read_text() for bad in FORBIDDEN), name
    ElementTree.fromstring((folder / "graph.svg").read_text())
    assert (folder / "graph.png").read_bytes()[:8] == PNG_MAGIC
