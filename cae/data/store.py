"""The data set on disk: chunk discovery, pairing, validation and fingerprinting.

Two layouts are accepted:

* a folder of chunks, CELLxGENE Census style: ``<prefix>_counts_<N>.npz`` (a CSR matrix written
  by ``scipy.sparse.save_npz``, cells x genes) beside ``<prefix>_metadata_<N>.pkl`` or
  ``.parquet`` (the per-cell DataFrame, rows aligned with the matrix). Files pair by their chunk
  id ``N``, never by sorted position. An optional ``genes.txt`` (one name per line) names the genes.
* one ``.h5ad`` file (AnnData): its rows are read in chunks of ``h5ad_chunk_size`` cells;
* a TileDB-SOMA experiment (a local folder or a URI, :mod:`cae.data.soma`): the cells an obs
  filter selects, in chunks of ``h5ad_chunk_size`` cells;
* an AnnData object in memory (:meth:`DataStore.from_anndata`, for the Python API): row ranges of
  its ``X`` (or a layer), metadata from its ``.obs``, checked as an .h5ad is. Loader workers
  reach it by ``fork`` (a spawned worker could not re-open it).

``.pkl`` metadata is unpickled, which can run code: read pickles only from sources you trust, and
share metadata as ``.parquet``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
from isal import isal_zlib

from cae.data.soma import SomaQuery, is_soma_uri
from cae.errors import CAEError, DataError, MetadataError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import anndata

    from cae.config import DataConfig

METADATA_SUFFIXES = (".pkl", ".parquet")
# What numpy and zipfile raise for a truncated, corrupt or foreign .npz (zipfile raises
# NotImplementedError for a version or compression it lacks, RuntimeError for an encrypted member).
# (isal's stubs declare isal_zlib.error an Exception instance; it is the exception class.)
_NPZ_ERRORS: tuple[type[Exception], ...] = (
    OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error,
    cast(type[Exception], isal_zlib.error), NotImplementedError, RuntimeError,
)  # fmt: skip
_CHUNK_ID = re.compile(r"(\d+)$")
# The arrays of each sparse format, as scipy.sparse.save_npz and AnnData name them.
_SPARSE_ARRAYS = {
    "csr": ("data", "indices", "indptr"),
    "csc": ("data", "indices", "indptr"),
    "coo": ("data", "row", "col"),
}
# More genes than any expression matrix holds: a header declaring more is corrupt (and naming them
# gene_0 ... would exhaust memory).
MAX_GENES = 10_000_000
# Under log1p_cp10k, an input whose largest value is below this is taken for normalised values
# (log1p of counts per 10,000 stays below about 9.2; raw counts of thousands of cells exceed it).
COUNTS_AT_LEAST = 20.0
# Gene names that mean a name is missing (compared stripped and in lower case).
_MISSING_NAMES = frozenset({"", "nan", "none", "null", "<na>"})


@dataclass(frozen=True)
class Chunk:
    """One chunk of cells: where its expression and metadata live and how big it is."""

    chunk_id: str
    expression: Path
    metadata: Path | None  # None for .h5ad, SOMA and AnnData chunks, whose metadata is the obs
    n_cells: int
    n_genes: int
    rows: tuple[int, int] | None = None  # row range inside an .h5ad or a SOMA query

    @property
    def name(self) -> str:
        """A name for messages: the expression file, with the row range for .h5ad chunks."""
        if self.rows is not None:
            return f"{self.expression.name}[{self.rows[0]}:{self.rows[1]}]"
        return self.expression.name

    @property
    def metadata_name(self) -> str:
        """The metadata file's name for messages (the obs for .h5ad and SOMA chunks)."""
        return self.metadata.name if self.metadata is not None else f"{self.name}.obs"


class DataStore:
    """A validated, chunked data set. Build one with :meth:`DataStore.open`."""

    def __init__(
        self,
        path: Path | str,
        chunks: Sequence[Chunk],
        genes: Sequence[str],
        kind: Literal["chunks", "h5ad", "soma", "anndata"],
        *,
        obs: pd.DataFrame | None = None,
        var: pd.DataFrame | None = None,
        h5ad_layer: str | None = None,
        soma: SomaQuery | None = None,
        matrix: Any = None,
        columns: np.ndarray | None = None,
    ) -> None:
        self.path = path  # a SOMA URI stays a string (a Path would fold its "//")
        self.chunks = list(chunks)
        self.genes = list(genes)
        self.kind = kind
        self.layer = h5ad_layer  # the .h5ad or AnnData layer read (None: X)
        # Per gene (in ``genes`` order) the input's var row: .h5ad and AnnData only.
        self.var = var if var is not None else pd.DataFrame(index=pd.Index(self.genes))
        self._obs = obs  # .h5ad and AnnData: the obs, its index the cell names
        self._soma = soma
        self._matrix = matrix  # AnnData: its X or layer, in memory
        self._columns = columns  # AnnData: the columns of ``genes`` (None: every column)

    @property
    def n_genes(self) -> int:
        """Number of genes (columns) in every chunk."""
        return len(self.genes)

    @property
    def n_cells(self) -> int:
        """Number of cells over all chunks."""
        return sum(chunk.n_cells for chunk in self.chunks)

    @classmethod
    def open(cls, config: DataConfig) -> DataStore:
        """Discover, pair and check the shapes of every chunk named by ``config``.

        Args:
            config: the data settings (``path``, globs, ``h5ad_layer``, ``h5ad_chunk_size``,
                and the ``soma_*`` settings for a SOMA experiment).

        Returns:
            The store, with row and gene counts checked for every chunk.

        Raises:
            DataError: nothing matched, a file is unreadable or unpaired, two files share a chunk
                id, a chunk is empty, row counts of a pair differ, or gene counts differ between
                chunks; a SOMA experiment does not open or its query selects nothing. The
                message names the file or URI.
        """
        if is_soma_uri(str(config.path)):
            return cls._open_soma(config)
        soma_only = {
            "data.soma_obs_filter (--obs-filter)": config.soma_obs_filter,
            "data.soma_var_filter (--var-filter)": config.soma_var_filter,
            "data.soma_layer (--soma-layer)": config.soma_layer,
        }
        for setting, value in soma_only.items():
            if value is not None:  # silently ignored, it would train on cells not chosen
                raise DataError(
                    f"{setting} = {value!r} applies to a TileDB-SOMA experiment, but "
                    f"{config.path} is not one; leave the setting out, or give the experiment"
                )
        path = Path(config.path)
        if not path.exists():
            raise DataError(
                f"data path {path} does not exist; give a folder of chunks, an .h5ad file or a "
                "TileDB-SOMA experiment (`cae synth --out data/demo` writes the demo data)"
            )
        if path.is_file():
            if path.suffix != ".h5ad":
                raise DataError(f"{path} is a file but not an .h5ad; give an .h5ad or a folder")
            return cls._open_h5ad(path, config.h5ad_layer, config.h5ad_chunk_size)
        return cls._open_folder(path, config.expression_glob, config.metadata_glob)

    @classmethod
    def _open_folder(cls, path: Path, expression_glob: str, metadata_glob: str) -> DataStore:
        expression = _by_chunk_id(sorted(path.glob(expression_glob)), "expression")
        if not expression:
            raise DataError(
                f"no expression chunks match '{expression_glob}' in {path}; set "
                "data.expression_glob (--expression-glob) to your files' pattern"
            )
        metadata_files = [
            p for p in sorted(path.glob(metadata_glob)) if p.suffix in METADATA_SUFFIXES
        ]
        metadata = _by_chunk_id(metadata_files, "metadata")
        unpaired = sorted(set(expression) - set(metadata), key=int)
        if unpaired:
            chunk_id = unpaired[0]
            raise DataError(
                f"{expression[chunk_id].name} has no metadata chunk with id {chunk_id} matching "
                f"'{metadata_glob}' (.pkl or .parquet) in {path}; add it or move the file away"
            )
        orphans = sorted(set(metadata) - set(expression), key=int)
        if orphans:
            chunk_id = orphans[0]
            raise DataError(
                f"{metadata[chunk_id].name} has no expression chunk with id {chunk_id} matching "
                f"'{expression_glob}' in {path}; add it or move the file away"
            )
        chunks = []
        for chunk_id in sorted(expression, key=int):
            n_cells, n_genes = _npz_shape(expression[chunk_id])
            n_rows = _metadata_rows(metadata[chunk_id])
            if n_cells == 0:
                raise DataError(f"{expression[chunk_id].name} holds no cells; remove the chunk")
            if n_rows != n_cells:
                raise DataError(
                    f"{metadata[chunk_id].name} has {n_rows:,} rows but "
                    f"{expression[chunk_id].name} has {n_cells:,}; metadata rows must align "
                    "one to one with expression rows: write the pair again from one table, or "
                    "move it away"
                )
            chunks.append(
                Chunk(chunk_id, expression[chunk_id], metadata[chunk_id], n_cells, n_genes)
            )
        _check_gene_counts(chunks)
        genes = _read_genes(path / "genes.txt", chunks[0].n_genes)
        return cls(path, chunks, genes, "chunks")

    @classmethod
    def _open_h5ad(cls, path: Path, layer: str | None, chunk_size: int) -> DataStore:
        import anndata

        try:
            adata = anndata.read_h5ad(path, backed="r")
        except Exception as err:  # h5py and anndata raise many kinds for a broken file
            raise _unreadable_h5ad(path, err) from None
        try:
            if layer is not None and layer not in adata.layers:
                raise DataError(
                    f"{path} has no layer '{layer}'; its layers: "
                    f"{', '.join(adata.layers) or 'none'}"
                )
            if adata.n_obs == 0:
                raise DataError(f"{path} holds no cells")
            if adata.n_vars == 0:
                raise DataError(f"{path} holds no genes (its var is empty); give one with genes")
            fix = "give every gene one name in var_names and write the .h5ad again"
            genes = _gene_names(list(adata.var_names), f"{path} var_names", fix)
            obs = _check_columns(adata.obs, f"{path.name}.obs")
            _check_h5ad_matrix(path, layer, (adata.n_obs, adata.n_vars), list(adata.layers))
            chunks = _row_chunks(path, adata.n_obs, len(genes), chunk_size)
            var = adata.var.set_axis(genes)
        except CAEError:
            raise
        except Exception as err:  # a broken element that anndata opened lazily
            raise _unreadable_h5ad(path, err) from None
        finally:
            adata.file.close()
        return cls(path, chunks, genes, "h5ad", obs=obs, var=var, h5ad_layer=layer)

    @classmethod
    def from_anndata(
        cls,
        adata: anndata.AnnData,
        layer: str | None = None,
        genes: Sequence[str] | None = None,
        chunk_size: int = 20_000,
    ) -> DataStore:
        """A store over an AnnData object in memory: nothing is written or copied.

        Args:
            adata: the cells; its ``.obs`` holds the fields, its ``var_names`` the genes.
            layer: the layer to read instead of ``X``.
            genes: the genes to read, in this order (None: every gene, in ``var_names`` order).
            chunk_size: rows per chunk.

        Returns:
            The store (kind ``anndata``); its chunks' names read ``AnnData[start:stop]``.

        Raises:
            DataError: ``adata`` is a view or backed by a file, has no cells or genes, no such
                layer (or no X), a matrix of other than numbers, gene names that are missing or
                repeat, or lacks one of ``genes``. Values are checked as chunks are read.
            MetadataError: ``.obs`` columns that repeat or are not named by strings.
        """
        if adata.is_view:  # every read of a view's X would copy the whole subset
            raise DataError("adata is a view of another AnnData; pass adata.copy()")
        if adata.isbacked:  # a file handle does not survive the loader's fork
            raise DataError(
                f"adata is backed by {adata.filename}; give that file as data.path (it is "
                "streamed from disk), or load it with adata.to_memory()"
            )
        if layer is not None and layer not in adata.layers:
            raise DataError(
                f"adata has no layer '{layer}'; its layers: {', '.join(adata.layers) or 'none'} "
                "(leave layer out to read .X)"
            )
        matrix = adata.X if layer is None else adata.layers[layer]
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise DataError(f"adata holds {adata.n_obs} cells x {adata.n_vars} genes; give cells")
        if matrix is None:
            raise DataError("adata has no X; put the expression into .X, or name its layer")
        _check_dtype(np.dtype(matrix.dtype), "biuf", "adata's expression matrix")
        fix = "give every gene one name, e.g. adata.var_names_make_unique()"
        names = _gene_names(list(adata.var_names), "adata.var_names", fix)
        columns = None if genes is None else gene_positions(names, genes, "adata")
        chosen = names if columns is None else [names[i] for i in columns]
        obs = _check_columns(adata.obs, "adata.obs")
        var = adata.var if columns is None else adata.var.iloc[columns]
        name = Path("AnnData")  # chunks read AnnData[start:stop] in messages
        chunks = _row_chunks(name, adata.n_obs, len(chosen), chunk_size)
        return cls(
            "AnnData", chunks, chosen, "anndata", obs=obs, var=var, h5ad_layer=layer,
            matrix=matrix, columns=columns,
        )  # fmt: skip

    @classmethod
    def _open_soma(cls, config: DataConfig) -> DataStore:
        uri = str(config.path)
        query = SomaQuery.open(
            uri,
            config.soma_measurement,
            config.soma_layer,
            config.soma_obs_filter,
            config.soma_var_filter,
            config.soma_tiledb_config,
        )
        name = Path(uri.rstrip("/"))  # for messages: the experiment's last path part
        chunks = _row_chunks(name, query.n_cells, len(query.genes), config.h5ad_chunk_size)
        return cls(uri, chunks, query.genes, "soma", soma=query)

    def chunk(self, chunk_id: str) -> Chunk:
        """Return the chunk with this id.

        Raises:
            DataError: no chunk has that id; the message lists the ids there are.
        """
        for chunk in self.chunks:
            if chunk_id.isdigit() and int(chunk.chunk_id) == int(chunk_id):
                return chunk
        known = ", ".join(c.chunk_id for c in self.chunks[:20])
        raise DataError(f"no chunk with id {chunk_id} in {self.path}; chunk ids: {known}")

    def read_expression(self, chunk: Chunk) -> sp.csr_matrix:
        """Read one chunk's expression as a float32 CSR matrix and check its values.

        Raises:
            DataError: the file is unreadable, its sparse structure is broken (pointers or
                indices outside the matrix), or it holds negative or non-finite values.
        """
        if self._soma is not None:
            assert chunk.rows is not None
            matrix = self._soma.read_rows(*chunk.rows)
        elif self._matrix is not None:
            assert chunk.rows is not None
            block = self._matrix[chunk.rows[0] : chunk.rows[1]]
            block = block if self._columns is None else block[:, self._columns]
            matrix = block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
        elif chunk.rows is not None:
            matrix = self._read_h5ad_rows(chunk)
        else:
            try:
                matrix = load_npz(chunk.expression)
            except _NPZ_ERRORS as err:
                raise _unreadable_npz(chunk.expression, err) from None
        _check_structure(matrix, chunk.name)  # before scipy walks it: bad indices crash it
        matrix = sp.csr_matrix(matrix, dtype=np.float32)
        if matrix.shape != (chunk.n_cells, chunk.n_genes):
            raise DataError(
                f"{chunk.name} holds a {matrix.shape[0]:,} x {matrix.shape[1]:,} matrix but its "
                f"header said {chunk.n_cells:,} x {chunk.n_genes:,}; the file changed while reading"
            )
        _check_values(matrix.data, chunk.name)
        return matrix

    def _read_h5ad_rows(self, chunk: Chunk) -> sp.csr_matrix:
        import anndata

        assert chunk.rows is not None
        start, stop = chunk.rows
        try:
            adata = anndata.read_h5ad(chunk.expression, backed="r")
            try:
                source = adata.X if self.layer is None else adata.layers[self.layer]
                block = source[start:stop]
            finally:
                adata.file.close()
            return block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
        except Exception as err:  # h5py, anndata and scipy raise many kinds for broken elements
            raise DataError(
                f"cannot read {chunk.name}: {_reason(err)}; the file is truncated or corrupt: "
                "write it again with AnnData.write_h5ad, or move it away"
            ) from None

    def read_metadata(self, chunk: Chunk, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Read one chunk's per-cell metadata (only ``columns`` when given).

        Raises:
            DataError: the file is unreadable or does not hold a DataFrame.
            MetadataError: a requested column is missing (the message lists the columns there).
        """
        if self._soma is not None:
            assert chunk.rows is not None
            return self._soma.read_obs(*chunk.rows, columns)
        if chunk.metadata is None:
            assert self._obs is not None and chunk.rows is not None
            frame = self._obs.iloc[chunk.rows[0] : chunk.rows[1]].reset_index(drop=True)
        else:
            frame = _read_metadata_file(chunk.metadata, columns)
        return frame if columns is None else select_fields(frame, columns, chunk.metadata_name)

    def cell_names(self, chunk: Chunk) -> pd.Index:
        """The names of one chunk's cells: the obs names of an .h5ad or AnnData, the
        ``soma_joinid`` of a SOMA experiment's cells, ``<chunk id>_<row>`` for chunk files (whose
        metadata names no cells)."""
        assert chunk.rows is not None or self._obs is None
        if self._obs is not None and chunk.rows is not None:
            return self._obs.index[chunk.rows[0] : chunk.rows[1]].astype(str)
        if self._soma is not None and chunk.rows is not None:
            return pd.Index(self._soma.obs_ids[chunk.rows[0] : chunk.rows[1]].astype(str))
        return pd.Index([f"{chunk.chunk_id}_{i}" for i in range(chunk.n_cells)])

    def iter_metadata(self, columns: Sequence[str]) -> Iterator[tuple[str, pd.DataFrame]]:
        """Yield ``(metadata file name, DataFrame)`` for every chunk, in chunk order."""
        for chunk in self.chunks:
            yield chunk.metadata_name, self.read_metadata(chunk, columns)

    def check_values(self, transform: str, progress: bool = False) -> None:
        """Read every chunk once and check its values before training starts.

        Args:
            transform: the input transform; ``log1p_cp10k`` also rejects cells with zero counts
                and warns when the values do not look like counts (:class:`CountsDoubt`).
            progress: show a progress bar.

        Raises:
            DataError: naming the first chunk with negative, non-finite or (for ``log1p_cp10k``)
                all-zero cells.
        """
        from tqdm.auto import tqdm

        shown = None if progress else True  # None: a bar only on a terminal
        doubts = CountsDoubt(str(self.path), transform)
        for chunk in tqdm(self.chunks, desc="checking chunks", unit="chunk", disable=shown):
            matrix = self.read_expression(chunk)
            doubts.check(matrix)
            if transform == "log1p_cp10k":
                totals = np.asarray(matrix.sum(axis=1)).ravel()
                empty = np.flatnonzero(totals <= 0)
                if empty.size:
                    raise DataError(
                        f"{chunk.name} has {empty.size:,} cells with zero total counts (first row "
                        f"{empty[0]}); transform log1p_cp10k cannot normalise them: drop those "
                        "cells, or set data.transform=none if the values are already normalised"
                    )
        doubts.finish()

    def fingerprint(self) -> str:
        """A short hash identifying the data set: file names, sizes and shapes of every chunk
        (for a SOMA experiment: its URI, layer, filters and selected cells and genes)."""
        digest = hashlib.sha256()
        if self._soma is not None:
            digest.update(self._soma.identity().encode())
            digest.update("\n".join(self.genes).encode())
            return digest.hexdigest()[:16]
        if self._matrix is not None:  # in memory: its shape, layer, cells and genes
            assert self._obs is not None
            digest.update(f"anndata:{self.n_cells}x{self.n_genes}:{self.layer};".encode())
            digest.update("\n".join(map(str, self._obs.index)).encode())
            digest.update("\n".join(self.genes).encode())
            return digest.hexdigest()[:16]
        for chunk in self.chunks:
            for file in (chunk.expression, chunk.metadata):
                if file is not None:
                    digest.update(f"{file.name}:{file.stat().st_size};".encode())
            digest.update(
                f"{chunk.chunk_id}:{chunk.rows}:{chunk.n_cells}x{chunk.n_genes};".encode()
            )
        digest.update("\n".join(self.genes).encode())
        return digest.hexdigest()[:16]


def check_cell_names(names: pd.Index, source: str) -> None:
    """Refuse cell names that repeat: outputs keep the input's names, and a name must find one
    cell.

    Raises:
        DataError: naming ``source``, how many repeat and one of them.
    """
    repeated = names[names.duplicated()]
    if len(repeated):
        raise DataError(
            f"{source} names {len(repeated):,} cells more than once (e.g. {repeated[0]!r}); give "
            "every cell its own name: adata.obs_names_make_unique() (and, for a file, write it "
            "again)"
        )


def select_fields(frame: pd.DataFrame, fields: Sequence[str], source: str) -> pd.DataFrame:
    """The ``fields`` columns of a metadata frame, in that order.

    Raises:
        MetadataError: a field is not a column (the message names ``source`` and its columns).
    """
    missing = [c for c in fields if c not in frame.columns]
    if missing:
        shown = ", ".join(map(str, frame.columns[:20])) or "(none)"
        more = f" and {len(frame.columns) - 20} more" if len(frame.columns) > 20 else ""
        raise MetadataError(
            f"{source}: metadata has no field '{missing[0]}'. Its columns are: {shown}{more}. "
            "Fix the field name in the settings or add the column."
        )
    return frame[list(fields)]


class CountsDoubt:
    """Warns, once, when values read under the ``log1p_cp10k`` transform do not look like raw
    counts: values that are not whole numbers, or none above :data:`COUNTS_AT_LEAST` by the
    end (log-normalised values, which the transform would normalise a second time).

    Args:
        source: the input, for the message.
        transform: the transform the values go through; any other than ``log1p_cp10k`` is not
            checked.
    """

    def __init__(self, source: str, transform: str) -> None:
        self.source = source
        self.active = transform == "log1p_cp10k"
        self.largest = 0.0

    def check(self, matrix: sp.csr_matrix) -> None:
        """Look at one chunk's values (a CSR matrix); warn at the first that are not counts."""
        if not self.active or matrix.nnz == 0:
            return
        self.largest = max(self.largest, float(matrix.data.max()))
        fractional = matrix.data[matrix.data != np.round(matrix.data)]
        if fractional.size:
            self._warn(f"holds values that are not whole numbers (e.g. {fractional[0]:g})")

    def finish(self) -> None:
        """After the last chunk: warn when no value reached :data:`COUNTS_AT_LEAST`."""
        if self.active and self.largest < COUNTS_AT_LEAST:
            self._warn(f"has no value above {COUNTS_AT_LEAST:g} (the largest is {self.largest:g})")

    def _warn(self, what: str) -> None:
        log.warning(
            "%s %s: transform log1p_cp10k expects raw counts, and already log-normalised "
            "values would be normalised twice; read the counts (a layer: --layer / layer=) or "
            "use data.transform=none for normalised values",
            self.source,
            what,
        )
        self.active = False


def gene_positions(
    available: Sequence[str], wanted: Sequence[str], source: str, whose: str = "the"
) -> np.ndarray:
    """Positions of ``wanted`` genes among ``available`` ones, in ``wanted``'s order.

    Args:
        available: the input's gene names.
        wanted: the genes to read.
        source: the input, for the message.
        whose: whose genes ``wanted`` are, for the message (``the model's``).

    Raises:
        DataError: some of ``wanted`` are not in ``available`` (the message names a few).
    """
    where = {gene: i for i, gene in enumerate(available)}
    missing = [g for g in wanted if g not in where]
    if missing:
        raise DataError(
            f"{source} lacks {len(missing):,} of {whose} {len(wanted):,} genes, e.g. "
            f"{', '.join(missing[:5])}; give an input with every one of these genes (its "
            "var_names or genes.txt must name them)"
        )
    return np.array([where[g] for g in wanted], dtype=np.int64)


def _row_chunks(source: Path, n_rows: int, n_genes: int, size: int) -> list[Chunk]:
    """Chunks of ``size`` consecutive rows (the last may be shorter) of an .h5ad or SOMA query."""
    return [
        Chunk(str(i), source, None, min(start + size, n_rows) - start, n_genes,
              rows=(start, min(start + size, n_rows)))
        for i, start in enumerate(range(0, n_rows, size))
    ]  # fmt: skip


def _by_chunk_id(files: Sequence[Path], what: str) -> dict[str, Path]:
    """Index files by the number at the end of their stem; ``_7`` and ``_007`` are the same id."""
    found: dict[str, Path] = {}
    for file in files:
        match = _CHUNK_ID.search(file.stem)
        if match is None:
            raise DataError(
                f"{file} matches the {what} pattern but its name does not end in a chunk number "
                "(like human_counts_7.npz); rename it or narrow the pattern"
            )
        chunk_id = str(int(match.group(1)))
        if chunk_id in found:
            raise DataError(
                f"{found[chunk_id].name} and {file.name} both have chunk id {chunk_id}; each "
                f"{what} chunk needs its own id: rename or move one of them"
            )
        found[chunk_id] = file
    return found


def _npz_shape(path: Path) -> tuple[int, int]:
    """Read a sparse .npz's shape from its headers, without loading the matrix, and check that
    its arrays' declared sizes and types fit that shape and the bytes the file holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {
                name.removesuffix(".npy"): _npy_header(path, archive, name)
                for name in archive.namelist()
                if name.endswith(".npy")
            }
            for name, (shape, kinds) in {"format": ((), "SU"), "shape": ((2,), "iu")}.items():
                if name not in arrays or arrays[name][0] != shape:
                    found = f"a {arrays[name][0]} '{name}'" if name in arrays else f"no '{name}'"
                    raise DataError(
                        f"{path} is not a sparse matrix file ({found} array; np.savez writes "
                        "dense arrays): write it again with scipy.sparse.save_npz, or move it away"
                    )
                _check_dtype(arrays[name][1], kinds, f"{path}: its '{name}' array")
            with archive.open("format.npy") as member:
                fmt = np.lib.format.read_array(member, allow_pickle=False).item()
            with archive.open("shape.npy") as member:
                shape = tuple(int(n) for n in np.lib.format.read_array(member, allow_pickle=False))
    except _NPZ_ERRORS as err:
        raise _unreadable_npz(path, err) from None
    fmt = fmt.decode(errors="replace") if isinstance(fmt, bytes) else str(fmt)
    return _check_sparse_layout(
        str(path), fmt, shape, arrays, "write it again with scipy.sparse.save_npz, or move it away"
    )


def _npy_header(
    path: Path, archive: zipfile.ZipFile, name: str
) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype one ``.npy`` member of an .npz declares, checked against the bytes the
    member holds (a header claiming more would have numpy allocate it before finding out)."""
    info = archive.getinfo(name)
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        header = member.tell()
    what = f"{path}: its '{name.removesuffix('.npy')}' array"
    if dtype.hasobject:
        raise DataError(
            f"{what} holds Python objects, which only an unsafe unpickling reads; store numbers: "
            "write it again with scipy.sparse.save_npz from a numeric matrix, or move it away"
        )
    declared = math.prod(shape) * dtype.itemsize
    if header + declared != info.file_size:
        raise DataError(
            f"{what} declares {math.prod(shape):,} values ({declared:,} bytes) but holds "
            f"{info.file_size - header:,} bytes; the file is truncated or corrupt: write it again "
            "with scipy.sparse.save_npz, or move it away"
        )
    return shape, dtype


def _check_dtype(dtype: np.dtype, kinds: str, what: str) -> None:
    """Refuse an array whose dtype is not of one of ``kinds`` (numpy kind letters: ``biuf`` for
    numbers, ``iu`` for integers, ``SU`` for text)."""
    if dtype.kind not in kinds:
        expected = {"biuf": "numbers", "iu": "integers", "SU": "text"}[kinds]
        raise DataError(
            f"{what} holds {dtype} values, expected {expected}; write the matrix again from a "
            "valid one (scipy.sparse.save_npz, AnnData.write_h5ad), or move it away"
        )


def _check_sparse_layout(
    name: str,
    fmt: str,
    shape: tuple[int, ...],
    arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    fix: str,
) -> tuple[int, int]:
    """Check a sparse matrix's declared layout against its arrays' declared shapes and dtypes.

    Args:
        name: the file (and element) for messages.
        fmt: the sparse format, ``csr``, ``csc`` or ``coo``.
        shape: the declared matrix shape.
        arrays: ``{array name: (shape, dtype)}`` of the stored arrays.
        fix: what to do, ending the message.

    Returns:
        ``(cells, genes)``.

    Raises:
        DataError: another format, not 2-D, a negative or over-large dimension, a missing array,
            an array that is not 1-D or of the wrong dtype, or array lengths that do not fit.
    """
    if fmt not in _SPARSE_ARRAYS or len(shape) != 2:
        raise DataError(f"{name} holds a sparse '{fmt}' matrix of shape {shape}; expected CSR 2-D")
    n_cells, n_genes = shape
    if n_cells < 0 or n_genes < 0 or n_genes > MAX_GENES:
        raise DataError(
            f"{name} declares a {n_cells:,} x {n_genes:,} matrix (at most {MAX_GENES:,} genes); "
            f"its header is corrupt: {fix}"
        )
    for array in _SPARSE_ARRAYS[fmt]:
        if array not in arrays:
            raise DataError(f"{name} lacks the '{array}' array of a {fmt} matrix: {fix}")
        if len(arrays[array][0]) != 1:
            raise DataError(f"{name}: its '{array}' array is {arrays[array][0]}, not 1-D: {fix}")
        _check_dtype(arrays[array][1], "biuf" if array == "data" else "iu", f"{name}: '{array}'")
    length = {array: arrays[array][0][0] for array in _SPARSE_ARRAYS[fmt]}
    problem = None
    if fmt == "coo":
        if not length["data"] == length["row"] == length["col"]:
            problem = f"{length['row']:,} row and {length['col']:,} column indices"
            problem += f" for {length['data']:,} values"
    elif length["indices"] != length["data"]:
        problem = f"{length['indices']:,} indices for {length['data']:,} values"
    else:
        major = n_cells if fmt == "csr" else n_genes
        if length["indptr"] != major + 1:
            lines = "rows" if fmt == "csr" else "columns"
            problem = f"{length['indptr']:,} pointers for {major:,} {lines}"
    if problem is not None:
        raise DataError(f"{name} is a broken sparse matrix ({problem}): {fix}")
    return n_cells, n_genes


def load_npz(path: Path) -> sp.spmatrix:
    """``scipy.sparse.load_npz``, faster for CSR and CSC files: their two large arrays (values and
    column indices) are inflated at once in two threads, each by ISA-L (``isal``, about twice as
    fast as zlib on chunk files), which lets go of the GIL. Other formats are read by scipy.

    The arrays' headers are parsed in the calling thread: numpy parses them with
    ``ast.literal_eval``, and CPython 3.11's AST constructor is not safe to run in two threads at
    once (it fails now and then with "AST constructor recursion depth mismatch", CPython issue
    106905).

    Raises:
        What ``numpy.load`` and ``scipy.sparse.load_npz`` raise on a bad file.
    """
    with np.load(path, allow_pickle=False) as members:
        fmt = members["format"].item()
        fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        if fmt not in ("csr", "csc"):
            return sp.load_npz(path)
        shape, indptr = tuple(members["shape"]), members["indptr"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        contents = list(pool.map(lambda name: _npz_member(path, name), ["data", "indices"]))
    data, indices = (np.lib.format.read_array(io.BytesIO(c), allow_pickle=False) for c in contents)
    kind = sp.csr_matrix if fmt == "csr" else sp.csc_matrix
    return kind((data, indices, indptr), shape=shape)


def _npz_member(path: Path, name: str) -> bytes:
    """The ``.npy`` bytes of one array of an ``.npz`` file: a deflated one inflated by ISA-L (the
    member's size and CRC checked, as zipfile does), a stored one read as it is."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_DEFLATED:
            return archive.read(info)
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        header = file.read(30)  # the local file header; its name and extra field follow
        if header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local file header of {info.filename}")
        skip = int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
        file.seek(skip, 1)
        raw = file.read(info.compress_size)
    content = isal_zlib.decompress(raw, -15)  # a raw deflate stream, as zip members are
    if len(content) != info.file_size or isal_zlib.crc32(content) != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC or size of {info.filename}")
    return content


def _unreadable_npz(path: Path, err: Exception) -> DataError:
    return DataError(
        f"cannot read {path}: {_reason(err)}; the file is truncated or was not written by "
        "scipy.sparse.save_npz: write it again with save_npz, or move it away"
    )


def _unreadable_h5ad(path: Path, err: Exception) -> DataError:
    return DataError(
        f"cannot read {path} as .h5ad: {_reason(err)}; the file is truncated or corrupt: write it "
        "again with AnnData.write_h5ad, or move it away"
    )


def _reason(err: BaseException) -> str:
    """An exception as one short line for a message (library errors span lines or say little)."""
    text = " ".join(str(err).split())
    text = text if len(text) <= 300 else text[:300] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_h5ad_matrix(
    path: Path, layer: str | None, shape: tuple[int, int], layers: Sequence[str]
) -> None:
    """Check the stored layout of the .h5ad matrix that is read (``X``, or the layer), against
    the cells and genes of its obs and var, before any of its rows is read."""
    import h5py

    where = "X" if layer is None else f"layers/{layer}"
    name = f"{path}:{where}"
    fix = "write the .h5ad again with AnnData.write_h5ad from a valid matrix, or move it away"
    with h5py.File(path, "r") as file:
        element = file.get(where)
        if element is None:
            raise DataError(
                f"{path} has no X matrix (layers: {', '.join(layers) or 'none'}); write the "
                "expression into .X, or set data.h5ad_layer to the layer that holds it"
            )
        if isinstance(element, h5py.Dataset):
            _check_dtype(element.dtype, "biuf", name)
            declared = tuple(element.shape)
        else:
            fmt = element.attrs.get("encoding-type", "")
            fmt = fmt.decode(errors="replace") if isinstance(fmt, bytes) else str(fmt)
            arrays = {key: (tuple(item.shape), item.dtype) for key, item in element.items()
                      if isinstance(item, h5py.Dataset)}  # fmt: skip
            declared = tuple(int(n) for n in np.ravel(element.attrs.get("shape", ())))
            _check_sparse_layout(name, fmt.removesuffix("_matrix"), declared, arrays, fix)
    if declared != shape:
        raise DataError(
            f"{name} is a {' x '.join(f'{n:,}' for n in declared)} matrix but obs and var name "
            f"{shape[0]:,} cells and {shape[1]:,} genes: {fix}"
        )


def _metadata_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # pyarrow raises its own error types for broken files
            raise DataError(f"cannot read {path} as parquet: {err}") from None
    return len(_read_metadata_file(path, None))


def _read_metadata_file(path: Path, columns: Sequence[str] | None) -> pd.DataFrame:
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises its own error types for broken files
            raise DataError(f"cannot read {path} as parquet: {_reason(err)}") from None
        return _check_columns(frame, path.name)
    try:
        frame = pd.read_pickle(path)
    except Exception as err:  # unpickling runs the file's own code: it can raise anything
        raise DataError(
            f"cannot unpickle {path}: {_reason(err)}; the file is truncated, corrupt or needs "
            "other library versions than these: write it again as parquet "
            "(DataFrame.to_parquet), or with to_pickle under these versions"
        ) from None
    if not isinstance(frame, pd.DataFrame):
        raise DataError(
            f"{path} holds a {type(frame).__name__}, not a pandas DataFrame; save the per-cell "
            "metadata with DataFrame.to_pickle or to_parquet"
        )
    return _check_columns(frame, path.name)


def _check_columns(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """``frame``, if its columns are one level of unique string names (a field names one column).

    Raises:
        MetadataError: naming ``source`` and the offending columns.
    """
    columns = frame.columns
    if isinstance(columns, pd.MultiIndex):
        raise MetadataError(
            f"{source}: metadata columns have {columns.nlevels} levels (e.g. {columns[0]!r}); "
            "give them one level of names, e.g. frame.columns = ['_'.join(map(str, c)) for c in "
            "frame.columns]"
        )
    not_text = [c for c in columns if not isinstance(c, str)]
    if not_text:
        raise MetadataError(
            f"{source}: metadata column {not_text[0]!r} ({type(not_text[0]).__name__}) is not "
            "named by a string; name every column with a string, e.g. "
            "frame.columns = frame.columns.astype(str)"
        )
    repeated = list(dict.fromkeys(columns[columns.duplicated()]))
    if repeated:
        shown = ", ".join(repr(c) for c in repeated[:5])
        raise MetadataError(
            f"{source}: metadata columns {shown} appear more than once; give every column a "
            "unique name"
        )
    return frame


def _check_gene_counts(chunks: Sequence[Chunk]) -> None:
    first = chunks[0]
    for chunk in chunks[1:]:
        if chunk.n_genes != first.n_genes:
            raise DataError(
                f"{chunk.name} has {chunk.n_genes:,} genes but {first.name} has "
                f"{first.n_genes:,}; every chunk must share one gene space: write {chunk.name} "
                "again with the same genes, or move it away"
            )


def _read_genes(path: Path, n_genes: int) -> list[str]:
    if not path.exists():
        return [f"gene_{i}" for i in range(n_genes)]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"cannot read {path} as text: {_reason(err)}; write one gene name per line in UTF-8, "
            "or remove it"
        ) from None
    genes = [line.strip() for line in text.splitlines() if line.strip()]
    if len(genes) != n_genes:
        raise DataError(
            f"{path} names {len(genes):,} genes but the chunks have {n_genes:,}; fix or remove it"
        )
    return _gene_names(genes, str(path), "write one unique gene name per line")


def _gene_names(genes: Sequence[object], source: str, fix: str) -> list[str]:
    """``genes``, if every one is a name of text, on one line, not empty or missing, and unique.

    Raises:
        DataError: naming ``source``, the first bad name and its position, or the repeated names.
    """
    for position, gene in enumerate(genes):
        if (not isinstance(gene, str) or gene.strip().lower() in _MISSING_NAMES
                or "\n" in gene or "\r" in gene):  # fmt: skip
            raise DataError(
                f"{source}: gene {position:,} is named {gene!r} ({type(gene).__name__}); every "
                f"gene needs a name of text, not empty or missing and on one line: {fix}"
            )
    counts = Counter(genes)
    repeated = [gene for gene, count in counts.items() if count > 1]
    if repeated:
        shown = ", ".join(f"{gene} ({counts[gene]} times)" for gene in repeated[:5])
        more = f" and {len(repeated) - 5:,} more" if len(repeated) > 5 else ""
        raise DataError(
            f"{source} names genes more than once: {shown}{more}; gene names must be unique "
            f"(one column per gene): {fix}"
        )
    return [str(gene) for gene in genes]


def _check_structure(matrix: sp.spmatrix | sp.sparray, name: str) -> None:
    """Reject a CSR/CSC matrix whose pointers or indices do not fit its shape (vectorised): scipy
    trusts them, so an index past the end reads or writes out of bounds (a crash), and a negative
    one wraps around to another gene (silently wrong rows)."""
    if not sp.issparse(matrix) or matrix.format not in ("csr", "csc"):
        return  # dense blocks and COO (checked by scipy when built) have no pointers to trust
    major, minor = matrix.shape if matrix.format == "csr" else matrix.shape[::-1]
    lines, across = ("rows", "column") if matrix.format == "csr" else ("columns", "row")
    indptr, indices = matrix.indptr, matrix.indices
    problem = None
    if len(indptr) != major + 1:
        problem = f"{len(indptr):,} pointers for {major:,} {lines}"
    elif indptr[0] != 0 or indptr[-1] != len(indices) or len(indices) != len(matrix.data):
        problem = (
            f"pointers from {indptr[0]:,} to {indptr[-1]:,} over {len(indices):,} indices and "
            f"{len(matrix.data):,} values"
        )
    elif len(indptr) > 1 and np.any(np.diff(indptr) < 0):
        problem = "pointers that decrease"
    elif len(indices) and (indices.min() < 0 or indices.max() >= minor):
        problem = f"{across} indices from {indices.min():,} to {indices.max():,} for {minor:,}"
    if problem is not None:
        raise DataError(
            f"{name} is a broken sparse matrix ({problem}); write it again from a valid matrix "
            "(scipy.sparse.save_npz, AnnData.write_h5ad), or move it away"
        )


def _check_values(values: np.ndarray, name: str) -> None:
    """Reject negative and non-finite stored values (vectorised over the CSR data array)."""
    finite = np.isfinite(values)
    if not finite.all():
        bad = values[~finite]
        raise DataError(
            f"{name} holds {bad.size:,} non-finite values (e.g. {bad[0]}); expression must be "
            "finite: fix or drop those cells"
        )
    negative = values < 0
    if negative.any():
        raise DataError(
            f"{name} holds {int(negative.sum()):,} negative values (e.g. {values[negative][0]}); "
            "expression must be counts or normalised values >= 0: fix or drop those cells"
        )
