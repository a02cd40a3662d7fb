"""Real, reconstructed and moved cells on one UMAP, and how their neighbourhoods mix.

The kinds of one held-out context:

* ``real``: real held-out cells (the target context);
* ``reconstructed``: the model's pass of the source cells in their own contexts (source -> source);
* ``moved``: the model's counterfactual of the same source cells to the target context (its mean);
* ``moved_sampled``: for a model that draws counts (``TrainedModel.sampling_refusal``), the
  counts of ``moved`` at each source cell's depth, log-normalised: what a user who asks for
  sampled cells gets.

Moved cells are compared with reconstructions, not raw cells: both are the model's output, so a
gap between moved and real cells that reconstructions share is the decoder's smoothing, and a gap
they do not share is the move. The embedding is scanpy's (PCA, ``neighbors``, ``umap``) fitted on
all kinds together, with a fixed seed; scanpy is imported here only when a UMAP is drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cae.evaluate.protocol import moved_cells

if TYPE_CHECKING:
    from cae.config import EvaluateConfig
    from cae.evaluate.protocol import EvalCells, Holdout
    from cae.train.checkpoint import TrainedModel

KINDS = ("real", "reconstructed", "moved", "moved_sampled")
"""The kinds of cells on the UMAP, in legend order."""

MIN_CELLS = 5
"""Fewest cells of each kind worth a UMAP (fewer leave the neighbour graph degenerate)."""

log = logging.getLogger(__name__)


def sample_rows(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``min(n, size)`` rows drawn without replacement."""
    return np.arange(n) if n <= size else np.sort(rng.choice(n, size, replace=False))


def umap_of(cells: Mapping[str, np.ndarray], seed: int, n_neighbors: int = 15) -> pd.DataFrame:
    """One UMAP of several kinds of cells, fitted on all of them together.

    Args:
        cells: ``{kind: (n_kind, G) log-normalised cells}`` (subsample them first: the cost grows
            with the number of cells).
        seed: the random state of the PCA and the UMAP.
        n_neighbors: neighbours of each cell in the graph the UMAP is built from.

    Returns:
        One row per cell: ``kind``, ``umap_1``, ``umap_2``, in the order of ``cells``, and in
        ``attrs["neighbours"]`` the neighbour mix (:func:`neighbour_mix`).
    """
    import anndata
    import scanpy as sc

    kinds = np.concatenate([[kind] * len(x) for kind, x in cells.items()])
    data = np.concatenate(list(cells.values())).astype(np.float32)
    adata = anndata.AnnData(
        data, obs=pd.DataFrame({"kind": kinds}, index=[str(i) for i in range(len(kinds))])
    )
    n_pcs = min(50, data.shape[0] - 1, data.shape[1] - 1)
    sc.pp.pca(adata, n_comps=n_pcs, random_state=seed)
    sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, len(kinds) - 1), random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    frame = pd.DataFrame(adata.obsm["X_umap"], columns=["umap_1", "umap_2"]).assign(kind=kinds)
    frame = frame[["kind", "umap_1", "umap_2"]]
    frame.attrs["neighbours"] = neighbour_mix(adata.obsp["distances"], kinds)
    return frame


def neighbour_mix(graph: sp.spmatrix, kinds: np.ndarray) -> dict[str, dict[str, float]]:
    """Per kind, the fraction of its cells' graph neighbours that are of each kind.

    Args:
        graph: (n, n) k-nearest-neighbour graph (a stored entry per neighbour).
        kinds: (n,) each cell's kind.

    Returns:
        ``{kind: {neighbour kind: fraction}}``; moved cells apart from real ones show as a small
        ``mix["moved"]["real"]``.
    """
    coo = sp.coo_matrix(graph)
    pairs = pd.crosstab(kinds[coo.row], kinds[coo.col], normalize="index")
    return {
        str(kind): {str(other): float(pairs.loc[kind, other]) for other in pairs.columns}
        for kind in pairs.index
    }


def model_cells(
    trained: TrainedModel, cells: EvalCells, holdout: Holdout, config: EvaluateConfig
) -> dict[str, np.ndarray]:
    """The kinds of cells of one held-out context (:data:`KINDS`), each sampled to
    ``config.umap_cells``.

    The same sampled source cells are reconstructed (source -> source) and moved (source ->
    the held-out values); real cells are sampled from the held-out cells.

    Args:
        trained: the model.
        cells: from :func:`~cae.evaluate.protocol.collect_cells`.
        holdout: the held-out context (its moved fields and target values).
        config: ``umap_cells`` and ``seed``.

    Returns:
        ``{kind: (n, G) log-normalised cells}`` in :data:`KINDS` order.
    """
    rng = np.random.default_rng([config.seed, 17])
    rows = sample_rows(len(cells.source), config.umap_cells, rng)
    raw = cells.source_raw[rows]
    meta = cells.source_meta.iloc[rows][trained.metadata_columns]
    reconstructed, _ = moved_cells(trained, raw, meta, {}, config.seed)
    moved, sampled = moved_cells(trained, raw, meta, holdout.targets, config.seed)
    real = cells.real[sample_rows(len(cells.real), config.umap_cells, rng)]
    kinds = {"real": real, "reconstructed": reconstructed, "moved": moved}
    return kinds if sampled is None else {**kinds, "moved_sampled": sampled}


def model_umap(
    trained: TrainedModel, cells: EvalCells, holdout: Holdout, config: EvaluateConfig
) -> pd.DataFrame | None:
    """The UMAP of :func:`model_cells` (:func:`umap_of`); None, with a warning, when
    ``config.umap_cells`` is 0 or a kind has fewer than :data:`MIN_CELLS` cells."""
    if config.umap_cells == 0:
        return None
    kinds = model_cells(trained, cells, holdout, config)
    if min(len(x) for x in kinds.values()) < MIN_CELLS:
        counts = ", ".join(f"{len(x)} {kind}" for kind, x in kinds.items())
        log.warning(
            "%s: no UMAP of %s cells (%d of each kind at least)", holdout.name, counts, MIN_CELLS
        )
        return None
    return umap_of(kinds, config.seed)
