"""Figures of an `evaluation.offline` report, and the directory that shows them.

    recall_by_source   recall@k of the final list, split by the source that proposed each hit
    ndcg_by_stage      NDCG@k of the candidates after each stage, of the final list and of the baselines
    coverage           catalogue coverage@k of the final list and of the baselines

Each figure is a line per series over k, drawn from the report's JSON values alone, so what
the figure shows is what the JSON holds. `write_report` writes report.json, one PNG per
figure and report.html showing them beside the printed table.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: figures render off screen with the Agg canvas

FIGURES = ("recall_by_source", "ndcg_by_stage", "coverage")
BASELINES = ("pipeline", "retrieval", "popularity")


def figure_series(report: dict) -> dict[str, dict[str, list[float]]]:
    """{figure: {series label: values at each of report["ks"]}}, the numbers every figure plots."""
    ks, lists = report["ks"], report["lists"]
    stages = [name for name in lists if name not in BASELINES]
    return {
        "recall_by_source": {name: [source[f"recall@{k}"] for k in ks] for name, source in report["sources"].items()},
        "ndcg_by_stage": {name: [lists[name][f"ndcg@{k}"] for k in ks] for name in [*stages, *BASELINES]},
        "coverage": {name: [report["beyond"][name][f"coverage@{k}"] for k in ks] for name in BASELINES},
    }


def build_figures(report: dict) -> dict[str, Figure]:
    """One figure per name of `FIGURES`, a line per series of `figure_series`, k on the x axis."""
    titles = {"recall_by_source": ("recall@k of the final list, by source", "recall@k"),
              "ndcg_by_stage": ("NDCG@k by stage, against the baselines", "NDCG@k"),
              "coverage": ("catalogue coverage@k", "coverage@k")}
    figures = {}
    for name, series in figure_series(report).items():
        figure = Figure(figsize=(6, 4), layout="constrained")
        axes = figure.add_subplot()
        for label, values in series.items():
            axes.plot(report["ks"], values, marker="o", label=label)
        title, ylabel = titles[name]
        axes.set(title=title, xlabel="k", ylabel=ylabel, xticks=report["ks"])
        axes.legend(fontsize="small")
        figures[name] = figure
    return figures


def write_report(report: dict, table: str, out: Path) -> list[Path]:
    """report.json, <figure>.png for each figure and report.html (the table and the figures) in
    ``out``, created if needed; returns the written paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    written[0].write_text(json.dumps(report, indent=1))
    for name, figure in build_figures(report).items():
        figure.savefig(out / f"{name}.png", dpi=100)
        written.append(out / f"{name}.png")
    images = "\n".join(f'<h2>{name.replace("_", " ")}</h2>\n<img src="{name}.png" alt="{name}">' for name in FIGURES)
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>recstack offline evaluation</title></head>"
            f"<body>\n<h1>Offline evaluation: {html.escape(report['data'])} ({report['part']})</h1>\n"
            f"<pre>{html.escape(table)}</pre>\n{images}\n<p>Values: <a href=\"report.json\">report.json</a></p>"
            "\n</body></html>\n")
    written.append(out / "report.html")
    written[-1].write_text(page)
    return written
