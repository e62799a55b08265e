"""Pictures: training curves, a spike raster, and the drawing of an analysis or learner (SVG or PNG;
with Graphviz's `dot` program when it is on PATH, else a layered layout drawn with matplotlib)."""

import io
import os
import pathlib
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")  # files only; never opens a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.path import Path

from .drawing import (
    PAD,
    READOUT_COLOR,
    ROW_H,
    TITLE_H,
    TREATMENT_COLORS,
    TREATMENT_MEANING,
    Arrow,
    Box,
    Drawing,
    Terminal,
    layered,
    midpoint,
    to_dot,
)


def curves(history: list[dict], path: str | os.PathLike) -> None:
    """Loss (and accuracy, when recorded) per iteration, with the held-out validation points where
    the run recorded them (`validation_loss`, `validation_accuracy`)."""
    keys = [k for k in ("loss", "accuracy") if any(k in h for h in history)]
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        for name, style in ((key, {"lw": 1.5}), (f"validation_{key}", {"marker": "o", "ms": 3, "lw": 1})):
            iterations = [i + 1 for i, h in enumerate(history) if name in h]
            if iterations:
                values = [h[name] for h in history if name in h]
                axis.plot(iterations, values, label=name.replace("_", " "), **style)
        axis.set_xlabel("iteration")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        if any(f"validation_{key}" in h for h in history):
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def raster(spikes: np.ndarray, path: str | os.PathLike, dt_ms: float = 1.0, title: str = "") -> None:
    """A spike raster of `spikes` (T, neurons), one dot per spike."""
    times, neurons = np.nonzero(np.asarray(spikes) > 0)
    figure, axis = plt.subplots(figsize=(8, 3.2))
    axis.scatter(times * dt_ms, neurons, s=2, c="k", marker="|")
    axis.set_xlabel("time (ms)")
    axis.set_ylabel("neuron")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def graph(subject, path: str | os.PathLike, title: str = "") -> None:
    """The drawing of `subject` (an `Analysis`, a `Learner` or a `drawing.Drawing`) to `path` (SVG or PNG,
    by its suffix): see `draw`."""
    drawing = subject if isinstance(subject, Drawing) else subject.drawing(title=title)
    draw(drawing, path)


def dot_program() -> str | None:
    """Graphviz's `dot` on PATH, or None."""
    return shutil.which("dot")


def draw(drawing: Drawing, path: str | os.PathLike, *, engine: str = "auto") -> str:
    """Write `drawing` to `path`: SVG for `.svg`, else PNG (or any format matplotlib knows by suffix).

    Arguments:
        drawing: what to draw (`analysis.drawing()` or `learner.drawing()`).
        path: the file to write.
        engine: "dot" (Graphviz, needs the `dot` program), "matplotlib" (the layered fallback), or "auto":
            dot when present.

    Returns:
        The engine used: "dot" or "matplotlib".
    """
    engine = _engine(engine)
    suffix = pathlib.Path(path).suffix.lstrip(".").lower() or "png"
    if engine == "dot":
        pathlib.Path(path).write_bytes(_run_dot(drawing, "svg" if suffix == "svg" else "png"))
        return engine
    figure = _figure(drawing)
    dpi = min(DPI, MAX_PIXELS / max(figure.get_size_inches()))  # a very large network still fits a PNG
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(path, dpi=dpi, format=suffix)
    plt.close(figure)
    return engine


def svg(drawing: Drawing, *, engine: str = "auto") -> str:
    """`drawing` as an inline `<svg>` element (no XML prolog), for HTML."""
    engine = _engine(engine)
    if engine == "dot":
        text = _run_dot(drawing, "svg").decode()
    else:
        figure, buffer = _figure(drawing), io.StringIO()
        with matplotlib.rc_context({"svg.fonttype": "none"}):
            figure.savefig(buffer, format="svg")
        plt.close(figure)
        text = buffer.getvalue()
    return text[text.index("<svg") :]


DPI = 130
MAX_PIXELS = 16_000  # the longest side of a PNG drawn with matplotlib
DOT_TIMEOUT_S = 120  # a 30-population drawing takes well under a second


def _engine(engine: str) -> str:
    if engine not in ("auto", "dot", "matplotlib"):
        raise ValueError(f"unknown engine {engine!r}; choose 'auto', 'dot' or 'matplotlib'")
    if engine == "auto":
        return "dot" if dot_program() else "matplotlib"
    if engine == "dot" and dot_program() is None:
        raise FileNotFoundError("Graphviz's `dot` program is not on PATH; install graphviz or use engine='matplotlib'")
    return engine


def _run_dot(drawing: Drawing, kind: str) -> bytes:
    command = [str(dot_program()), f"-T{kind}", *(["-Gdpi=110"] if kind == "png" else [])]
    result = subprocess.run(command, input=to_dot(drawing).encode(), capture_output=True, timeout=DOT_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"dot failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def _figure(drawing: Drawing):
    """The layered fallback: boxes with their states, arrows coloured by treatment, a legend."""
    layout = layered(drawing)
    margin = 0.4
    width, height = layout.width + 2 * margin, layout.height + 2 * margin + 0.5
    figure = plt.figure(figsize=(max(width, 4.0), max(height, 2.0)))
    axis = figure.add_axes((0, 0, 1, 1))
    axis.set_xlim(-margin, max(width, 4.0) - margin)
    axis.set_ylim(max(height, 2.0) - margin, -margin - 0.5)  # y grows downwards, like the layout
    axis.set_aspect("equal")
    axis.axis("off")
    if drawing.title:
        axis.text(layout.width / 2, -0.3, drawing.title, ha="center", va="center", fontsize=10, weight="bold")
    for box in drawing.boxes:
        _draw_box(axis, box, layout.places[box.id])
    for terminal in drawing.terminals:
        _draw_terminal(axis, terminal, layout.places[terminal.id])
    for arrow in drawing.arrows:
        _draw_arrow(axis, drawing, layout, arrow)
    _legend(axis, drawing)
    return figure


def _draw_box(axis, box: Box, place) -> None:
    x, y, w, h = place
    axis.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.08", fc="#eef2f9", ec="#4c72b0", lw=1)
    )
    axis.text(x + w / 2, y + 0.17, box.title, ha="center", va="center", fontsize=9, weight="bold")
    axis.text(x + w / 2, y + 0.36, box.subtitle, ha="center", va="center", fontsize=6.5, color="#444444")
    for index, (_, label) in enumerate(box.rows):
        row_y = y + TITLE_H + (index + 0.5) * ROW_H
        axis.add_patch(
            FancyBboxPatch(
                (x + PAD / 2, row_y - ROW_H * 0.42),
                w - PAD,
                ROW_H * 0.84,
                boxstyle="round,pad=0,rounding_size=0.05",
                fc="white",
                ec="#9aa9c7",
                lw=0.6,
            )
        )
        axis.text(x + w / 2, row_y, label, ha="center", va="center", fontsize=7.5)


def _draw_terminal(axis, terminal: Terminal, place) -> None:
    x, y, w, h = place
    if terminal.kind == "point":
        axis.plot([x + w / 2], [y + h / 2], marker="o", ms=3, color="#555555")
        return
    axis.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.12", fc="#f7f7f7", ec="#555555"))
    axis.text(x + w / 2, y + h / 2, terminal.label, ha="center", va="center", fontsize=7)


def _draw_arrow(axis, drawing: Drawing, layout, arrow: Arrow) -> None:
    curve = layout.curve(drawing, arrow)
    color = TREATMENT_COLORS.get(arrow.treatment, READOUT_COLOR)
    path = Path(curve, [Path.MOVETO, Path.CURVE4, Path.CURVE4, Path.CURVE4])
    axis.add_patch(
        FancyArrowPatch(
            path=path,
            arrowstyle="-|>",
            mutation_scale=9,
            color=color,
            lw=1.3 if arrow.treatment else 0.9,
            linestyle="-" if arrow.treatment else (0, (4, 3)),
        )
    )
    if arrow.label:
        x, y = midpoint(curve)
        axis.text(
            x,
            y,
            arrow.label,
            ha="center",
            va="center",
            fontsize=6,
            color=color,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
        )


def _legend(axis, drawing: Drawing) -> None:
    handles = [Line2D([], [], color=TREATMENT_COLORS[t], lw=2, label=TREATMENT_MEANING[t]) for t in drawing.treatments]
    if any(not arrow.treatment for arrow in drawing.arrows):
        handles.append(Line2D([], [], color=READOUT_COLOR, lw=1, linestyle=(0, (4, 3)), label="read by the output"))
    if handles:
        axis.legend(handles=handles, loc="lower left", fontsize=7, frameon=False, title="weights", title_fontsize=7)
