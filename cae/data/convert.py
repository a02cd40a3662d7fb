"""``cae convert``: a folder of chunks with pickled metadata, rewritten with parquet metadata.

Unpickling a ``.pkl`` file can run code, so pickled metadata is trusted input only. Parquet holds
data and nothing else: convert pickles you trust once, then share the parquet folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow as pa

from cae.config import DataConfig
from cae.data.atomic import atomic_folder
from cae.data.store import Chunk, DataStore
from cae.errors import DataError

log = logging.getLogger(__name__)


def convert_to_parquet(data: DataConfig, out: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the data set at ``data.path`` to ``out`` with every metadata chunk as parquet.

    Each ``<name>.pkl`` metadata chunk becomes ``<name>.parquet`` (same stem, so the same chunk
    id); parquet metadata chunks, the expression chunks and ``genes.txt`` are copied as they are.
    The data set is validated first (pairing, row and gene counts, every pickle a DataFrame), and
    ``out`` is built in a temporary folder and renamed into place, so a failure leaves nothing.

    Args:
        data: the data settings (``path`` must be a folder of chunks; the globs pick the files).
        out: the folder to create; it must not be the input folder.
        overwrite: replace ``out`` if it exists and is not empty.

    Returns:
        The metadata files written, in chunk order.

    Raises:
        DataError: the input is not a folder of chunks or does not validate, ``out`` is the input
            folder, ``out`` exists (without ``overwrite``), or a metadata column cannot be stored
            as parquet (the message names the file and the column).
    """
    source = Path(data.path)
    out = Path(out)
    store = _open_chunk_folder(data, source, out)
    written: list[Path] = []
    with atomic_folder(out, overwrite=overwrite) as tmp:
        for chunk in store.chunks:
            written.append(out / _copy_chunk(store, chunk, tmp).name)
        genes = source / "genes.txt"
        if genes.is_file():
            shutil.copy2(genes, tmp / genes.name)
    log.info("wrote %d parquet metadata chunks to %s", len(written), out)
    return written


def _open_chunk_folder(data: DataConfig, source: Path, out: Path) -> DataStore:
    """The store over the chunk folder ``source``; refuses a file, SOMA or ``out == source``."""
    if source.is_file():
        raise DataError(
            f"{source} is a file; cae convert reads a folder of chunks with .pkl metadata "
            "(an .h5ad needs no conversion)"
        )
    if out.resolve() == source.resolve():
        raise DataError(
            f"--out {out} is the input folder; choose another folder (the input stays as it is)"
        )
    store = DataStore.open(data)
    if store.kind != "chunks":
        raise DataError(
            f"{data.path} is a TileDB-SOMA experiment; cae convert reads a folder of chunks with "
            ".pkl metadata (a SOMA experiment needs no conversion)"
        )
    return store


def _copy_chunk(store: DataStore, chunk: Chunk, tmp: Path) -> Path:
    """Copy one chunk into ``tmp``, its metadata as parquet; returns the metadata file."""
    assert chunk.metadata is not None  # a folder store always pairs a metadata file
    shutil.copy2(chunk.expression, tmp / chunk.expression.name)
    target = tmp / f"{chunk.metadata.stem}.parquet"
    if chunk.metadata.suffix == ".parquet":
        shutil.copy2(chunk.metadata, target)
        return target
    frame = store.read_metadata(chunk)
    try:
        frame.to_parquet(target)
    except pa.ArrowException as err:
        raise DataError(
            f"cannot store {chunk.metadata.name} as parquet: {err}; convert that "
            "column to strings (frame[column].astype(str)) or drop it, then run "
            "cae convert again"
        ) from None
    return target
