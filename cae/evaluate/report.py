"""The evaluation report: CSV tables, PNG figures and one HTML page that shows them.

Written into a fresh folder beside the final one and moved into place at the end, so an
interrupted evaluation never leaves half a report.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cae.data.atomic import staging_folder
from cae.tracking.plots import context_contributions_figure

HEADLINE = "r2_mean_top100"
"""The metric the overview plot and the "beats identity" line use when it was computed."""


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """Per method, the median and mean of every metric over the held-out contexts.

    Args:
        scores: rows of ``context, method, <metrics>`` (``score_holdout``'s, concatenated).

    Returns:
        Index ``method`` (in the order first seen); columns ``<metric>_median`` and
        ``<metric>_mean``.
    """
    metrics = [c for c in scores.columns if c not in ("context", "method")]
    grouped = scores.groupby("method", sort=False)[metrics]
    return grouped.median().add_suffix("_median").join(grouped.mean().add_suffix("_mean"))


def headline_metric(scores: pd.DataFrame) -> str:
    """``r2_mean_top100`` when it was computed, else the largest ``r2_mean_top{k}``."""
    if HEADLINE in scores.columns:
        return HEADLINE
    tops = [c for c in scores.columns if c.startswith("r2_mean_top")]
    return max(tops, key=lambda c: int(c.removeprefix("r2_mean_top")))


def beats_identity(scores: pd.DataFrame, metric: str) -> dict[str, bool]:
    """Per context: does the model score higher than the unchanged source cells on ``metric``?
    (Empty when only baselines were scored.)"""
    wide = scores.pivot(index="context", columns="method", values=metric)
    if "model" not in wide.columns:
        return {}
    return {str(c): bool(wide.loc[c, "model"] > wide.loc[c, "identity"]) for c in wide.index}


def methods_figure(scores: pd.DataFrame, metric: str) -> Figure:
    """Grouped bars: ``metric`` per held-out context, one bar per method."""
    wide = scores.pivot(index="context", columns="method", values=metric)
    wide = wide[list(dict.fromkeys(scores["method"]))]
    contexts, methods = list(wide.index), list(wide.columns)
    figure, axis = plt.subplots(figsize=(3.5 + 1.2 * len(contexts), 4), layout="constrained")
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        positions = np.arange(len(contexts)) + (i - (len(methods) - 1) / 2) * width
        axis.bar(positions, wide[method], width, label=method)
    axis.set_xticks(np.arange(len(contexts)), contexts, rotation=30, ha="right")
    axis.set_ylabel(metric)
    axis.set_ylim(0, 1.05)
    axis.set_title(f"{metric} per held-out context")
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def top_genes_figure(genes: pd.DataFrame, field: str) -> Figure:
    """Horizontal bars: the genes with the largest term of one field (root mean square)."""
    rows = genes[genes["field"] == field].sort_values("rank")
    figure, axis = plt.subplots(figsize=(6, 0.6 + 0.3 * max(len(rows), 1)), layout="constrained")
    labels = [f"{g} ({hi} high)" for g, hi in zip(rows["gene"], rows["highest"], strict=True)]
    axis.barh(labels, rows["rms"])
    axis.invert_yaxis()
    axis.set_xlabel("root-mean-square of the field's term")
    axis.set_title(f"{field}: genes with the largest contribution")
    return figure


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0, na_rep="–")


def write_report(
    out_dir: Path,
    *,
    title: str,
    scores: pd.DataFrame,
    per_context: pd.DataFrame,
    top_genes: pd.DataFrame,
    facts: Mapping[str, Any],
    notes: Sequence[str] = (),
) -> Path:
    """Write the tables, figures and ``report.html`` into ``out_dir`` (replacing an older report).

    Args:
        out_dir: the report's folder.
        title: the page title.
        scores: per context and method (:func:`~cae.evaluate.protocol.score_holdout`, concatenated).
        per_context: the L2 contribution per field and value (a ``fold`` column when several
            models were trained).
        top_genes: per field, the genes with the largest term.
        facts: JSON-able summary written to ``evaluation.json`` and shown on the page.
        notes: sentences shown under the title.

    Returns:
        The path of ``report.html``.
    """
    staging = staging_folder(out_dir / "report.html")
    try:
        metric = headline_metric(scores)
        summary = summarise(scores)
        fields = list(dict.fromkeys(per_context["field"]))
        _write_figures(staging, scores, metric, per_context, top_genes, fields)
        scores.to_csv(staging / "scores.csv", index=False)
        summary.to_csv(staging / "summary.csv")
        per_context.to_csv(staging / "contributions.csv", index=False)
        top_genes.to_csv(staging / "top_genes.csv", index=False)
        (staging / "evaluation.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
        page = _page(title, notes, metric, scores, summary, per_context, top_genes, fields, facts)
        (staging / "report.html").write_text(page, encoding="utf-8")
        _move_into(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / "report.html"


def _write_figures(
    staging: Path,
    scores: pd.DataFrame,
    metric: str,
    per_context: pd.DataFrame,
    top_genes: pd.DataFrame,
    fields: Sequence[str],
) -> None:
    """Draw the methods figure and each field's contribution and top-gene figures as PNGs."""
    figures: dict[str, Figure] = {"figures/methods.png": methods_figure(scores, metric)}
    mean_over_folds = (
        per_context.groupby(["field", "value"], as_index=False, sort=False)[
            ["n_cells", "contrib_l2", "effect_l2"]
        ].mean()
        if "fold" in per_context.columns
        else per_context
    )
    for name in fields:
        figures[f"figures/contributions_{name}.png"] = context_contributions_figure(
            mean_over_folds, name
        )
        figures[f"figures/top_genes_{name}.png"] = top_genes_figure(top_genes, name)
    (staging / "figures").mkdir()
    for path, figure in figures.items():
        figure.savefig(staging / path, dpi=110)
        plt.close(figure)


def _move_into(staging: Path, out_dir: Path) -> None:
    """Move every entry of ``staging`` into ``out_dir``, replacing entries of the same name."""
    for item in staging.iterdir():
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)


def _page(
    title: str,
    notes: Sequence[str],
    metric: str,
    scores: pd.DataFrame,
    summary: pd.DataFrame,
    per_context: pd.DataFrame,
    top_genes: pd.DataFrame,
    fields: Sequence[str],
    facts: Mapping[str, Any],
) -> str:
    wins = beats_identity(scores, metric)
    overview = summary[[f"{metric}_median", f"{metric}_mean"]].reset_index()
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(n)}</p>" for n in notes),
        f"<p>The model beats identity on {metric} in {sum(wins.values())} of {len(wins)} "
        "held-out contexts.</p>",
        "<h2>Model beside the baselines</h2>",
        _table_html(overview),
        '<img src="figures/methods.png" alt="methods per context">',
        "<h2>Per held-out context</h2>",
        _table_html(scores),
        "<h2>Contributions</h2>",
        "<p>Mean L2 norm of each field's additive term per context value, on real cells "
        "reconstructed in their own contexts.</p>",
        _table_html(per_context),
    ]
    for name in fields:
        parts += [
            f"<h3>{html.escape(name)}</h3>",
            f'<img src="figures/contributions_{html.escape(name)}.png" alt="{name} contributions">',
            f'<img src="figures/top_genes_{html.escape(name)}.png" alt="{name} top genes">',
            _table_html(top_genes[top_genes["field"] == name]),
        ]
    parts += [
        "<h2>Facts</h2>",
        f"<pre>{html.escape(json.dumps(facts, indent=2, default=str))}</pre>",
    ]
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{font-size:small}"
    body = "\n".join(parts)
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n{body}\n</body></html>\n"
    )
