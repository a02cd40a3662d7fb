"""Interpretable summaries of the additive decomposition: how much each field explains, per context
value and per gene. Accumulated batch by batch on the device, read once."""

from __future__ import annotations

import pandas as pd
import torch

from cae.data.vocabulary import UNK, Vocabularies
from cae.model.cae import CAEOutput


class ContextTable:
    """Per field and context value: cells, the summed L2 of the field's head, base and all heads,
    and the summed effect of the field (:meth:`cae.model.cae.CAE.field_effects`) per gene.

    Args:
        vocabularies: the model's vocabularies (rows of the table).
        n_genes: G, genes per cell.
        device: where the sums live.
    """

    def __init__(self, vocabularies: Vocabularies, n_genes: int, device: torch.device) -> None:
        self.vocabularies = vocabularies
        sizes = vocabularies.sizes()
        self.sums = {f: torch.zeros(sizes[f], 4, device=device) for f in vocabularies.fields}
        self.effects = {
            f: torch.zeros(sizes[f], n_genes, device=device) for f in vocabularies.fields
        }

    def add(
        self,
        contexts: torch.Tensor,
        norms: dict[str, torch.Tensor],
        effects: dict[str, torch.Tensor],
    ) -> None:
        """Add a batch: (B, F) context indices, per-head (B,) L2 norms (``contribution_l2``) and
        per field the (B, G) effects (``CAE.field_effects``)."""
        total = torch.stack(list(norms.values())).sum(dim=0)  # (B,)
        for column, name in enumerate(self.vocabularies.fields):
            values = torch.stack(
                [torch.ones_like(total), norms[name], norms["base"], total], dim=1
            )  # (B, 4)
            self.sums[name].index_add_(0, contexts[:, column], values)
            self.effects[name].index_add_(0, contexts[:, column], effects[name].float())

    def tensors(self) -> list[torch.Tensor]:
        """Every accumulator, for summing the tables of several processes in place."""
        return [*self.sums.values(), *self.effects.values()]

    def frame(self) -> pd.DataFrame:
        """One row per field and value seen: ``field, value, n_cells, contrib_l2`` (mean L2 of the
        field's term), ``contrib_share`` (its share of all heads' L2), ``base_l2`` and
        ``effect_l2``: the L2 norm over genes of the mean effect of the value over its cells (how
        far the field's term of those cells lies, on average, from its mean over the field's
        values; what the value changes in their expression)."""
        rows = []
        for name in self.vocabularies.fields:
            labels = [UNK, *self.vocabularies.by_field[name].values]
            effect = torch.linalg.vector_norm(self.effects[name], dim=1).cpu().tolist()
            for index, (n, field_l2, base_l2, total) in enumerate(self.sums[name].cpu().tolist()):
                if n > 0:
                    rows.append(
                        {
                            "field": name,
                            "value": labels[index],
                            "n_cells": int(n),
                            "contrib_l2": field_l2 / n,
                            "contrib_share": field_l2 / total if total else 0.0,
                            "base_l2": base_l2 / n,
                            "effect_l2": effect[index] / n,
                        }
                    )
        return pd.DataFrame(rows, columns=list(CONTEXT_COLUMNS))


CONTEXT_COLUMNS = (
    "field", "value", "n_cells", "contrib_l2", "contrib_share", "base_l2", "effect_l2",
)  # fmt: skip
"""The columns of :meth:`ContextTable.frame`."""


def field_means(per_context: pd.DataFrame, column: str) -> dict[str, float]:
    """Per field, the cell-weighted mean over its values of a column of
    :meth:`ContextTable.frame` (``contrib_l2``, ``effect_l2``, ...), in the table's field order.

    Raises:
        KeyError: the table has no such column.
    """
    weighted = per_context[column] * per_context["n_cells"]
    groups = weighted.groupby(per_context["field"], sort=False)
    totals = groups.sum() / per_context["n_cells"].groupby(per_context["field"], sort=False).sum()
    return {str(field): float(value) for field, value in totals.items()}


class GeneContributions:
    """Per field, gene and context value: the mean of the field's term over cells.

    Args:
        vocabularies: the model's vocabularies.
        genes: gene names, in the model's order.
        device: where the sums live.
    """

    def __init__(self, vocabularies: Vocabularies, genes: list[str], device: torch.device) -> None:
        self.vocabularies = vocabularies
        self.genes = genes
        sizes = vocabularies.sizes()
        n_genes = len(genes)
        self.sums = {f: torch.zeros(sizes[f], n_genes, device=device) for f in vocabularies.fields}
        self.squares = {f: torch.zeros(n_genes, device=device) for f in vocabularies.fields}
        self.counts = {f: torch.zeros(sizes[f], device=device) for f in vocabularies.fields}

    def add(self, contexts: torch.Tensor, out: CAEOutput) -> None:
        """Add a batch: (B, F) context indices and the model's output on it."""
        for column, name in enumerate(self.vocabularies.fields):
            values = out.fields[name]  # (B, G)
            index = contexts[:, column]
            self.sums[name].index_add_(0, index, values)
            self.squares[name] += (values * values).sum(dim=0)
            self.counts[name].index_add_(0, index, torch.ones_like(index, dtype=values.dtype))

    def top_genes(self, k: int) -> pd.DataFrame:
        """Per field, the ``k`` genes whose term is largest (root mean square over cells).

        Returns:
            Columns ``field, rank, gene, rms`` (the gene's root-mean-square term), ``range`` (its
            largest minus smallest mean over the field's known values: how much moving a cell
            between contexts changes it) and ``highest``/``lowest`` (the values at the two ends).
        """
        rows = []
        for name in self.vocabularies.fields:
            counts = self.counts[name]
            n = float(counts.sum())
            if n == 0:
                continue
            rms = (self.squares[name] / n).sqrt().cpu()
            labels = [UNK, *self.vocabularies.by_field[name].values]
            known = [i for i in range(1, len(labels)) if counts[i] > 0]
            means = (self.sums[name][known] / counts[known, None]).cpu()  # (V, G)
            for rank, gene in enumerate(torch.argsort(rms, descending=True)[:k].tolist(), 1):
                column = means[:, gene]
                rows.append(
                    {
                        "field": name,
                        "rank": rank,
                        "gene": self.genes[gene],
                        "rms": float(rms[gene]),
                        "range": float(column.max() - column.min()) if known else 0.0,
                        "highest": labels[known[int(column.argmax())]] if known else "",
                        "lowest": labels[known[int(column.argmin())]] if known else "",
                    }
                )
        return pd.DataFrame(
            rows, columns=["field", "rank", "gene", "rms", "range", "highest", "lowest"]
        )
