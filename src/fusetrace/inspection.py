"""`fusetrace inspect --report DIR`: an analysis (and a learner's per-weight report) written to one folder.

Consumes an `Analysis` and, optionally, a `Learner` compiled from the same model. Produces, in `folder`:

* `summary.txt`: `analysis.summary()`, or `learner.summary()` (the same, then the per-weight report and
  the fused program by part);
* `report.md`: the drawing, then tables of groups, weight relations, the per-weight report, trace
  memory and the fused program by part (`Learner.program_summary`), every state and weight by the user's
  name;
* `report.json`: the same as data, each name beside its raw path (`path`: the key in `Learner.params`,
  `learner.init()["model"]` and checkpoints);
* `graph.svg`, `graph.png`: the drawing (`fusetrace.plots.draw`).
"""

import json
import pathlib

from . import display, plots

FILES = ("summary.txt", "report.md", "report.json", "graph.svg", "graph.png")


def write_report(analysis, folder, *, learner=None, title: str = "", engine: str = "auto") -> list[pathlib.Path]:
    """Write the report files (`FILES`) for `analysis` (and `learner`) into `folder`; return their paths.

    Arguments:
        analysis: what `fusetrace.analyze` returned (or `learner.analysis`).
        folder: created when missing; files of an earlier report there are replaced.
        learner: a `Learner` of the same model, to include its algorithm's per-weight report.
        title: the heading (the command's MODULE:FACTORY).
        engine: how to draw (`fusetrace.plots.draw`): "auto", "dot" or "matplotlib".

    Returns:
        The paths written, in the order of `FILES`.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    subject = learner if learner is not None else analysis
    paths = [folder / name for name in FILES]
    paths[0].write_text(subject.summary())
    paths[1].write_text(markdown(analysis, learner, title))
    paths[2].write_text(json.dumps(data(analysis, learner, title), indent=1) + "\n")
    drawing = subject.drawing(title=title)
    plots.draw(drawing, paths[3], engine=engine)
    plots.draw(drawing, paths[4], engine=engine)
    return paths


def markdown(analysis, learner=None, title: str = "") -> str:
    """The report as markdown: the drawing (`graph.svg` beside it), then its tables."""
    heading = f"# fusetrace inspect: {title}" if title else "# fusetrace inspect"
    batch = analysis.batch_size
    parts = [heading, "", f"Batch size: {batch if batch is not None else 'none'}.", "", "![drawing](graph.svg)", ""]
    parts += ["## Hidden groups", "", display.markdown_table(display.group_rows(analysis))]
    parts += ["## Weight relations", "", display.markdown_table(display.relation_rows(analysis))]
    if learner is not None:
        parts += [
            f"## Per weight ({learner.algorithm})",
            "",
            display.markdown_table(display.report_rows(learner.report())),
        ]
    parts += ["## Trace memory", "", display.markdown_table(display.memory_rows(analysis.trace_memory()))]
    if learner is not None:
        parts += [
            "## The fused program by part",
            "",
            "Estimated from the step's jaxpr before XLA fuses it (`fusetrace.program`).",
            "",
            display.markdown_table(learner.program_summary().rows()),
        ]
    return "\n".join(parts)


def data(analysis, learner=None, title: str = "") -> dict:
    """The report as JSON-ready data; names for reading, raw `path`s for looking values up."""
    names = analysis.names
    leaves = {leaf.path: leaf for leaf in analysis.captured.leaves}
    found = {
        "title": title,
        "batch_size": analysis.batch_size,
        "groups": [_group(analysis, group, leaves) for group in analysis.groups],
        "relations": [_relation(names, relation) for relation in analysis.relations],
        "trace_memory": analysis.trace_memory(),
    }
    if learner is not None:
        found["learner"] = {
            "algorithm": learner.algorithm,
            "weights": [_report(r) for r in learner.report()],
            "program": learner.program_summary().as_dict(),
        }
    return found


def _group(analysis, group, leaves) -> dict:
    states = [{"name": leaves[p].name, "path": p} for p in group.states]
    return {
        "name": analysis.names.group(group.name),
        "path": group.name,
        "n_neurons": group.n_neurons,
        "n_states": group.n_states,
        "lti": group.lti,
        "states": states,
    }


def _relation(names, relation) -> dict:
    return {
        "weight": names.name_of(relation.weight),
        "path": relation.weight,
        "status": relation.status,
        "op": relation.op,
        "group": names.group(relation.group) if relation.group else None,
        "n_pre": relation.n_pre,
        "reason": names.translate(relation.reason),
    }


def _report(report) -> dict:
    return {
        "weight": report.name or report.path,
        "path": report.path,
        "treatment": report.treatment,
        "exact": report.exact,
        "trace_shapes": [list(shape) for shape in report.trace_shapes],
        "trace_bytes": report.trace_bytes,
        "why": report.why,
    }
