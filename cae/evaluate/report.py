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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cae.data.atomic import staging_folder
from cae.evaluate.protocol import slug
from cae.tracking.plots import context_contributions_figure


@dataclass
class ModelViews:
    """What the report shows of each evaluated model, keyed by held-out context.

    Attributes:
        histories: the training's per-epoch metrics (loss curves).
        embeddings: the UMAP of real, reconstructed and moved cells
            (:func:`~cae.evaluate.embedding.umap_of`).
    """

    histories: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    embeddings: dict[str, pd.DataFrame] = field(default_factory=dict)


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


DISTRIBUTION = ("r2_var", "energy_distance", "auc_two_sample")
"""Metrics of the predicted cells' distribution (beside their mean) the overview shows."""


def overview(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The headline ``metric``'s median and mean per method, and the median of each
    :data:`DISTRIBUTION` metric that was computed.

    Args:
        summary: :func:`summarise`'s frame.
        metric: the headline metric (:func:`headline_metric`).

    Returns:
        Index ``method``; columns ``<metric>_median``, ``<metric>_mean``, ``<distribution>_median``.
    """
    wanted = [f"{metric}_median", f"{metric}_mean", *(f"{m}_median" for m in DISTRIBUTION)]
    return summary[[c for c in wanted if c in summary.columns]]


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


LOSS_EXCLUDED = ("accuracy", "single_value_batches")
"""Per-epoch ``train/*`` and ``val/*`` metrics that are not loss terms."""


def loss_terms(history: Sequence[Mapping[str, float]]) -> list[str]:
    """The loss terms a training recorded (``loss``, ``reconstruction``, ...): those with a
    ``train/`` or ``val/`` value in some epoch that is not zero in every epoch."""
    terms: dict[str, bool] = {}
    for row in history:
        for key, value in row.items():
            side, _, term = key.partition("/")
            if side in ("train", "val") and not any(word in term for word in LOSS_EXCLUDED):
                terms[term] = terms.get(term, False) or value != 0
    return [term for term, used in terms.items() if used]


def loss_figure(history: Sequence[Mapping[str, float]], title: str) -> Figure:
    """Small multiples: each loss term's training and validation value over epochs.

    Args:
        history: the training's per-epoch metrics (``epoch``, ``train/<term>``, ``val/<term>``).
        title: the figure's title (the model's held-out context).

    Returns:
        The figure (the caller saves and closes it).
    """
    terms = loss_terms(history) or ["loss"]
    columns = min(4, len(terms))
    rows = -(-len(terms) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, 2.6 * rows), layout="constrained", squeeze=False
    )
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    for axis, term in zip(axes.flat, terms, strict=False):
        for side in ("train", "val"):
            values = [row.get(f"{side}/{term}", np.nan) for row in history]
            axis.plot(epochs, values, marker="o", markersize=3, label=side)
        axis.set_title(term, fontsize="medium")
        axis.set_xlabel("epoch")
    for axis in list(axes.flat)[len(terms) :]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    figure.suptitle(f"Loss terms per epoch: {title}")
    return figure


KIND_COLOURS = {
    "real": "tab:blue", "reconstructed": "tab:green", "moved": "tab:red",
    "moved_sampled": "tab:orange",
}  # fmt: skip


def umap_figure(embedding: pd.DataFrame, title: str) -> Figure:
    """Scatter of one UMAP (:func:`~cae.evaluate.embedding.umap_of`), coloured by kind of cell.

    Args:
        embedding: rows ``kind, umap_1, umap_2``.
        title: the figure's title (the held-out context).

    Returns:
        The figure (the caller saves and closes it).
    """
    figure, axis = plt.subplots(figsize=(6, 5), layout="constrained")
    for kind, rows in embedding.groupby("kind", sort=False):
        axis.scatter(rows["umap_1"], rows["umap_2"], s=6, alpha=0.6, linewidths=0,
                     color=KIND_COLOURS.get(str(kind)), label=f"{kind} ({len(rows)})")  # fmt: skip
    axis.set_xlabel("UMAP 1")
    axis.set_ylabel("UMAP 2")
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(f"Real, reconstructed and moved cells: {title}")
    axis.legend(fontsize="small", markerscale=3)
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
    models: ModelViews | None = None,
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
        models: per held-out context, the model's loss curves and UMAP (none when only
            baselines were scored).

    Returns:
        The path of ``report.html``.
    """
    staging = staging_folder(out_dir / "report.html")
    try:
        metric = headline_metric(scores)
        summary = summarise(scores)
        fields = list(dict.fromkeys(per_context["field"]))
        views = models or ModelViews()
        _write_figures(staging, scores, metric, per_context, top_genes, fields)
        _write_model_views(staging, views)
        scores.to_csv(staging / "scores.csv", index=False)
        summary.to_csv(staging / "summary.csv")
        per_context.to_csv(staging / "contributions.csv", index=False)
        top_genes.to_csv(staging / "top_genes.csv", index=False)
        (staging / "evaluation.json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
        tables = (scores, summary, per_context, top_genes)
        page = _page(title, notes, metric, tables, fields, facts, views)
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


def _write_model_views(staging: Path, views: ModelViews) -> None:
    """Draw each context's loss curves and UMAP as ``figures/{loss,umap}_<context>.png``; the
    UMAP coordinates go to ``umap.csv``."""
    figures = [(f"loss_{slug(c)}", loss_figure(h, c)) for c, h in views.histories.items() if h]
    figures += [(f"umap_{slug(c)}", umap_figure(e, c)) for c, e in views.embeddings.items()]
    (staging / "figures").mkdir(exist_ok=True)
    for name, figure in figures:
        figure.savefig(staging / "figures" / f"{name}.png", dpi=110)
        plt.close(figure)
    if views.embeddings:
        frames = [e.assign(context=c) for c, e in views.embeddings.items()]
        embedding = pd.concat(frames, ignore_index=True)
        embedding[["context", "kind", "umap_1", "umap_2"]].to_csv(staging / "umap.csv", index=False)


def _model_views_html(views: ModelViews) -> str:
    """The page's section of loss curves and UMAPs, one pair per held-out context."""
    if not views.histories and not views.embeddings:
        return ""
    parts = [
        "<h2>Training and the model's cells</h2>",
        "<p>Loss terms per epoch (training and validation). UMAP (scanpy: PCA, neighbours, "
        "umap; fitted on all kinds together) of real held-out cells, the model's "
        "reconstruction of the source cells (source to source), the same source cells moved "
        "to the held-out context (the model's mean) and, for a model that draws counts, the "
        "moved cells as counts at each source cell's depth (moved_sampled). Moved "
        "cells beside reconstructions but apart from real cells show what the model's output "
        "misses; the table gives, per kind, the fraction of each "
        "cell's graph neighbours of each kind.</p>",
    ]
    for context in dict.fromkeys([*views.histories, *views.embeddings]):
        name = html.escape(slug(context))
        parts.append(f"<h3>{html.escape(context)}</h3>")
        if views.histories.get(context):
            parts.append(f'<img src="figures/loss_{name}.png" alt="loss curves {name}">')
        if context in views.embeddings:
            mix = pd.DataFrame(views.embeddings[context].attrs.get("neighbours", {})).T
            parts.append(f'<img src="figures/umap_{name}.png" alt="UMAP {name}">')
            parts.append(_table_html(mix.rename_axis("kind").reset_index()))
    return "\n".join(parts) + "\n"


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
    tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame],
    fields: Sequence[str],
    facts: Mapping[str, Any],
    views: ModelViews,
) -> str:
    """The HTML page; ``tables`` are the scores, summary, per-context and top-genes tables."""
    scores, summary, per_context, top_genes = tables
    wins = beats_identity(scores, metric)
    medians = overview(summary, metric).reset_index()
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(n)}</p>" for n in notes),
        f"<p>The model beats identity on {metric} in {sum(wins.values())} of {len(wins)} "
        "held-out contexts.</p>",
        "<h2>Model beside the baselines</h2>",
        "<p>Over held-out contexts. r2_var: squared Pearson of per-gene variances (1 is best); "
        "energy_distance: between predicted and real cells in PCA space (0 is best); "
        "auc_two_sample: cross-validated ROC AUC of a classifier telling predicted from real "
        "cells (0.5 is best: it cannot tell them apart).</p>",
        _table_html(medians),
        '<img src="figures/methods.png" alt="methods per context">',
        "<h2>Per held-out context</h2>",
        _table_html(scores),
        _model_views_html(views),
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
