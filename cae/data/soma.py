"""TileDB-SOMA experiments as a source of cells: a local folder or any URI tiledbsoma opens
(the CELLxGENE Census is one, ``cellxgene_census.open_soma()``'s URI).

A :class:`SomaQuery` is the cells an obs value filter selects (all cells without one), the genes a
var value filter selects (all genes without one) and one X layer of one measurement. Its cells,
in ``soma_joinid`` order, are cut into row ranges that :class:`cae.data.store.DataStore` serves as
chunks, so the loader's shuffle windows, resume and per-rank shares work on it as on chunk files.

tiledbsoma is an optional dependency (``pip install 'cae[soma]'``); it is imported only when a
SOMA experiment is opened. A handle is opened lazily in each process (TileDB contexts do not
survive ``fork`` into loader workers) and never pickled.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cae.errors import DataError, MetadataError

# A URI with a scheme (s3://, gs://, tiledb://, file://): only tiledbsoma can tell what it holds.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Columns, in order of preference, whose values name the genes (Census, then tiledbsoma.io).
GENE_NAME_COLUMNS = ("feature_name", "feature_id", "var_id", "gene_ids", "gene_symbols")


def is_soma_uri(path: str) -> bool:
    """Whether ``path`` names a SOMA experiment: a URI with a scheme, or a local folder that is a
    TileDB group (it holds ``__tiledb_group.tdb``)."""
    if _SCHEME.match(path):
        return True
    return os.path.isfile(os.path.join(path, "__tiledb_group.tdb"))


def _tiledbsoma() -> Any:
    try:
        import tiledbsoma
    except ImportError:
        raise DataError(
            "reading a TileDB-SOMA experiment needs tiledbsoma: pip install 'cae[soma]'"
        ) from None
    return tiledbsoma


def _open_experiment(uri: str, tiledb_config: dict[str, str]) -> Any:
    soma = _tiledbsoma()
    context = soma.SOMATileDBContext(tiledb_config=tiledb_config) if tiledb_config else None
    return soma.Experiment.open(uri, context=context)


class SomaQuery:
    """The cells, genes and layer of a SOMA experiment that training or inference reads.

    Build one with :meth:`SomaQuery.open`, which checks everything before any work.
    """

    def __init__(
        self,
        uri: str,
        measurement: str,
        layer: str,
        obs_filter: str | None,
        var_filter: str | None,
        obs_ids: np.ndarray,
        var_ids: np.ndarray,
        genes: list[str],
        obs_columns: list[str],
        tiledb_config: dict[str, str],
    ) -> None:
        self.uri = uri
        self.tiledb_config = tiledb_config
        self.measurement = measurement
        self.layer = layer
        self.obs_filter = obs_filter
        self.var_filter = var_filter
        self.obs_ids = obs_ids  # (N,) sorted soma_joinids of the selected cells
        self.var_ids = var_ids  # (G,) sorted soma_joinids of the selected genes
        self.genes = genes
        self.obs_columns = obs_columns
        self._handle: Any = None
        self._pid: int | None = None

    @classmethod
    def open(
        cls,
        uri: str,
        measurement: str,
        layer: str | None,
        obs_filter: str | None,
        var_filter: str | None,
        tiledb_config: Sequence[str] = (),
    ) -> SomaQuery:
        """Open the experiment at ``uri`` and resolve the query.

        Args:
            uri: a local folder or a URI tiledbsoma opens.
            measurement: the measurement (``ms``) whose X layer and var are read, e.g. ``RNA``.
            layer: the X layer; None takes ``raw`` (the Census's counts) when there is one, else
                the only layer.
            obs_filter: a tiledbsoma value filter on obs, e.g.
                ``is_primary_data == True and tissue_general == 'blood'``; None for every cell.
            var_filter: a value filter on the measurement's var, e.g.
                ``feature_name in ['CD4', 'CD8A']``; None for every gene.
            tiledb_config: TileDB settings as ``key=value`` (a remote store's region, ...).

        Returns:
            The query, with its cells and genes selected.

        Raises:
            DataError: the URI does not open as a SOMA experiment, the measurement or layer does
                not exist, a filter does not parse or selects nothing, or the genes have no
                unique names. Each message names the value and what there is instead.
        """
        _tiledbsoma()  # its own error when the extra is not installed
        config = dict(item.split("=", 1) for item in tiledb_config)
        try:
            experiment = _open_experiment(uri, config)
        except Exception as err:  # tiledbsoma raises several kinds for a missing or foreign URI
            raise DataError(
                f"cannot open {uri} as a TileDB-SOMA experiment: {_first_line(err)}; give a "
                "folder written by tiledbsoma.io.from_h5ad/from_anndata or a SOMA URI"
            ) from None
        with experiment:
            measurements = list(experiment.ms.keys())
            if measurement not in measurements:
                raise DataError(
                    f"{uri} has no measurement '{measurement}'; its measurements: "
                    f"{', '.join(measurements) or 'none'} (set data.soma_measurement)"
                )
            ms = experiment.ms[measurement]
            layers = list(ms.X.keys()) if "X" in ms else []
            layer = _choose_layer(uri, measurement, layer, layers)
            obs_ids = _joinids(experiment.obs, obs_filter, uri, "obs", "data.soma_obs_filter")
            var_ids = _joinids(ms.var, var_filter, uri, "var", "data.soma_var_filter")
            var_columns = list(ms.var.schema.names)
            genes = _gene_names(ms.var, var_ids, var_columns, uri)
            obs_columns = [c for c in experiment.obs.schema.names if c != "soma_joinid"]
        return cls(
            uri, measurement, layer, obs_filter, var_filter, obs_ids, var_ids, genes, obs_columns,
            config,
        )  # fmt: skip

    @property
    def n_cells(self) -> int:
        """Cells the query selects."""
        return len(self.obs_ids)

    def _experiment(self) -> Any:
        """This process's open handle (opened anew after a fork)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = _open_experiment(self.uri, self.tiledb_config)
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = state["_pid"] = None
        return state

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """The X layer's values of the query's cells ``start:stop`` over the query's genes.

        Returns:
            A (stop - start, G) float32 CSR matrix, rows in ``soma_joinid`` order.
        """
        ids = self.obs_ids[start:stop]
        layer = self._experiment().ms[self.measurement].X[self.layer]
        var_coords = slice(None) if self._all_genes() else self.var_ids
        table = layer.read(coords=(ids, var_coords)).tables().concat()
        joinids = table["soma_dim_0"].to_numpy()
        if ids[-1] - ids[0] + 1 == len(ids):  # consecutive cells (no obs filter): no search
            rows = joinids - ids[0]
        else:
            rows = np.searchsorted(ids, joinids)
        # Arrow hands out read-only views: copy into writable arrays (the loader shares them
        # with the training process as tensors), the indices as int32.
        columns = table["soma_dim_1"].to_numpy()
        if not self._all_genes():
            columns = np.searchsorted(self.var_ids, columns)
        columns = columns.astype(np.int32)  # G < 2**31: a gene count, not a cell count
        values = table["soma_data"].to_numpy().astype(np.float32)
        shape = (len(ids), len(self.var_ids))
        if len(rows) and np.any(np.diff(rows) < 0):  # not row-major after all: let scipy sort
            return sp.csr_matrix((values, (rows, columns)), shape=shape)
        indptr = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=len(ids)), out=indptr[1:])
        return sp.csr_matrix((values, columns, indptr), shape=shape)

    def _all_genes(self) -> bool:
        """Whether the genes are exactly var's joinids 0..G-1, so a column is its joinid."""
        ids = self.var_ids
        return int(ids[0]) == 0 and int(ids[-1]) == len(ids) - 1

    def read_obs(self, start: int, stop: int, columns: Sequence[str] | None) -> pd.DataFrame:
        """The obs columns (all but ``soma_joinid`` when None) of cells ``start:stop``.

        Raises:
            MetadataError: a column is not in obs (the message lists obs's columns).
        """
        wanted = list(self.obs_columns if columns is None else columns)
        missing = [c for c in wanted if c not in self.obs_columns]
        if missing:
            shown = ", ".join(self.obs_columns[:20]) or "(none)"
            raise MetadataError(
                f"{self.uri}: obs has no column '{missing[0]}'. Its columns are: {shown}. Fix "
                "the field name in the settings."
            )
        ids = self.obs_ids[start:stop]
        obs = self._experiment().obs
        table = obs.read(coords=(ids,), column_names=["soma_joinid", *wanted]).concat()
        frame = table.to_pandas().set_index("soma_joinid").reindex(ids)
        return frame[wanted].reset_index(drop=True)

    def identity(self) -> str:
        """What identifies the query's data for the fingerprint: URI, measurement, layer,
        filters and a hash of the selected cells' and genes' join ids."""
        digest = hashlib.sha256(self.obs_ids.tobytes())
        digest.update(self.var_ids.tobytes())
        return (
            f"soma:{self.uri}:{self.measurement}:{self.layer}:{self.obs_filter}:"
            f"{self.var_filter}:{digest.hexdigest()[:16]}"
        )


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _choose_layer(uri: str, measurement: str, layer: str | None, layers: list[str]) -> str:
    if layer is not None:
        if layer not in layers:
            raise DataError(
                f"{uri}: measurement '{measurement}' has no X layer '{layer}'; its layers: "
                f"{', '.join(layers) or 'none'} (set data.soma_layer)"
            )
        return layer
    if "raw" in layers:
        return "raw"
    if len(layers) == 1:
        return layers[0]
    raise DataError(
        f"{uri}: measurement '{measurement}' has X layers {', '.join(layers) or 'none'}; "
        "choose one with data.soma_layer (--soma-layer)"
    )


def _joinids(frame: Any, value_filter: str | None, uri: str, axis: str, setting: str) -> np.ndarray:
    """The sorted soma_joinids of ``frame``'s rows that ``value_filter`` selects."""
    try:
        table = frame.read(column_names=["soma_joinid"], value_filter=value_filter).concat()
    except Exception as err:  # tiledbsoma raises SOMAError and others for a bad filter
        raise DataError(
            f"{uri}: the {axis} filter {value_filter!r} ({setting}) does not parse or names a "
            f"column {axis} lacks: {_first_line(err)}; its columns: "
            f"{', '.join(frame.schema.names)}"
        ) from None
    ids = np.sort(table["soma_joinid"].to_numpy().astype(np.int64))
    if len(ids) == 0:
        what = f"the {axis} filter {value_filter!r} ({setting})" if value_filter else axis
        raise DataError(f"{uri}: {what} selects no {'cells' if axis == 'obs' else 'genes'}")
    return ids


def _gene_names(var: Any, var_ids: np.ndarray, columns: list[str], uri: str) -> list[str]:
    """The genes' names from the first of :data:`GENE_NAME_COLUMNS` whose values are unique."""
    for column in GENE_NAME_COLUMNS:
        if column in columns:
            table = var.read(coords=(var_ids,), column_names=["soma_joinid", column]).concat()
            frame = table.to_pandas().set_index("soma_joinid").reindex(var_ids)
            names = frame[column].astype(str).tolist()
            if len(set(names)) == len(names):
                return names
    raise DataError(
        f"{uri}: no var column of {', '.join(GENE_NAME_COLUMNS)} names the selected genes "
        f"uniquely (var's columns: {', '.join(columns)}); the model needs one name per gene"
    )
