"""PNG figures of a training's contributions (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def contribution_shares_figure(history: Sequence[dict[str, float]], heads: Sequence[str]) -> Figure:
    """Line plot of every head's contribution share over epochs.

    Args:
        history: per-epoch metrics holding ``epoch`` and ``contrib_share/<head>``.
        heads: ``base`` and the fields, in legend order.

    Returns:
        The matplotlib figure (the caller saves or logs it, then closes it).
    """
    figure, axis = plt.subplots(figsize=(6, 4), layout="constrained")
    epochs = [row["epoch"] for row in history]
    for head in heads:
        axis.plot(epochs, [row.get(f"contrib_share/{head}", float("nan")) for row in history],
                  marker="o", label=head)  # fmt: skip
    axis.set_xlabel("epoch")
    axis.set_ylabel("share of the summed L2 contribution")
    axis.set_yscale("log")
    axis.set_title("Contribution of each head")
    axis.legend()
    return figure


def field_effects_figure(final: Mapping[str, float], fields: Sequence[str]) -> Figure:
    """Bar chart of every field's effect (``effect_l2``, what fields are ranked by) beside its
    contribution (``contrib_l2``) at the end of a training, largest effect first.

    Args:
        final: the last epoch's metrics (``effect_l2/<field>``, ``contrib_l2/<field>``).
        fields: the fields to draw.

    Returns:
        The matplotlib figure.
    """
    ranked = sorted(fields, key=lambda f: final.get(f"effect_l2/{f}", 0.0), reverse=True)
    return _paired_bars(
        list(ranked),
        ("effect_l2 (rank by this)", [final.get(f"effect_l2/{f}", np.nan) for f in ranked]),
        ("contrib_l2 (mean L2 of the term per cell)",
         [final.get(f"contrib_l2/{f}", np.nan) for f in ranked]),
        f"Field effects after epoch {int(final.get('epoch', 0))}",
        height=0.8,
    )  # fmt: skip


def context_contributions_figure(table: pd.DataFrame, field: str) -> Figure:
    """Bar chart of one field's L2 contribution and effect per context value.

    Args:
        table: the per-context table (columns ``field``, ``value``, ``n_cells``, ``contrib_l2``,
            ``effect_l2``).
        field: which field to draw.

    Returns:
        The matplotlib figure.
    """
    rows = table[table["field"] == field].sort_values("effect_l2", ascending=False)
    labels = [f"{value} (n={n:,})" for value, n in zip(rows["value"], rows["n_cells"], strict=True)]
    return _paired_bars(
        labels,
        ("term (mean L2 per cell)", list(rows["contrib_l2"])),
        ("effect (L2 of the mean)", list(rows["effect_l2"])),
        f"{field}: contribution per context",
        height=0.6,
    )


def _paired_bars(
    labels: list[str],
    upper: tuple[str, Sequence[float]],
    lower: tuple[str, Sequence[float]],
    title: str,
    height: float,
) -> Figure:
    """Horizontal bars, two per label (``upper`` above ``lower``, each ``(legend, values)``),
    labels from top to bottom; ``height`` inches of figure besides 0.6 per label."""
    figure, axis = plt.subplots(
        figsize=(6, height + 0.6 * max(len(labels), 1)), layout="constrained"
    )
    where = np.arange(len(labels))
    axis.barh(where - 0.2, upper[1], height=0.4, label=upper[0])
    axis.barh(where + 0.2, lower[1], height=0.4, label=lower[0])
    axis.set_yticks(where, labels)
    axis.invert_yaxis()
    axis.set_xlabel("L2 norm over genes")
    axis.legend(loc="lower right", fontsize="small")
    axis.set_title(title)
    return figure
