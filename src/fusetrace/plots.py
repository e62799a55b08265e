"""Pictures of a run: training curves, a spike raster, and a drawing of the compiled graph (PNG)."""

import os

import matplotlib

matplotlib.use("Agg")  # files only; never opens a window

import matplotlib.pyplot as plt
import networkx as nx
import numpy as np

_COLORS = {"hidden": "#4c72b0", "weight": "#dd8452", "relation": "#55a868", "input": "#8172b3", "output": "#c44e52"}


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


def graph(graph: nx.DiGraph, path: str | os.PathLike, title: str = "") -> None:
    """The dependency graph, laid out left to right by node kind, colored by kind."""
    order = {"input": 0, "weight": 1, "relation": 2, "hidden": 3, "output": 4}
    columns: dict[int, list] = {}
    for node, data in graph.nodes(data=True):
        columns.setdefault(order[data["kind"]], []).append(node)
    positions = {node: (column, -row) for column, nodes in columns.items() for row, node in enumerate(nodes)}
    labels = {}
    for node, data in graph.nodes(data=True):
        text = data.get("op") if data["kind"] == "relation" else data.get("path", node)
        labels[node] = str(text) if len(str(text)) <= 28 else "…" + str(text)[-27:]
    figure, axis = plt.subplots(figsize=(12, 1.2 + 0.55 * max(len(c) for c in columns.values())))
    nx.draw_networkx_edges(graph, positions, ax=axis, arrows=True, alpha=0.5, node_size=900)
    for kind, column in order.items():
        nodes = columns.get(column, [])
        nx.draw_networkx_nodes(
            graph, positions, nodelist=nodes, node_color=_COLORS[kind], node_size=900, ax=axis, label=kind
        )
    nx.draw_networkx_labels(graph, positions, labels, font_size=7, ax=axis)
    axis.set_title(title)
    axis.legend(loc="upper right", fontsize=7, markerscale=0.4)
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
