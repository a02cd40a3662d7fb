"""Two-level loading: whole chunks prefetched in the background, mini-batches drawn in memory
across a shuffle window of several chunks.

The outer :class:`torch.utils.data.DataLoader` (batch size 1 chunk, ``num_workers`` persistent
background processes, ``prefetch_factor`` chunks each) only reads from disk. A chunk travels from
its worker to the training process in shared memory (its arrays as torch tensors), not through a
pipe. :class:`EpochOrder` permutes the chunks every epoch and cuts the order into windows of at
most ``data.shuffle_chunks`` chunks; :func:`iter_batches` pools a window's rows, shuffles them and
densifies each whole batch in one call (never row by row). Atlas exports come sorted (one dataset
= one assay), so a batch sliced out of one chunk would never contrast assays; a window drawn at
random from the permuted chunks does. The workers read the next window while batches are drawn
from this one: memory is bounded by two windows, never by the data set. On an accelerator the
batch's sparse arrays are pinned, copied without blocking and densified there; the input
transform runs per batch on the training device.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import cast

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cae.data.contexts import Selection, any_selected, selection_fields
from cae.data.store import DataStore
from cae.data.vocabulary import Vocabularies
from cae.errors import DataError
from cae.types import CP10K


@dataclass
class LoadedChunk:
    """One chunk in memory: its expression, encoded contexts and train/validation rows."""

    chunk_id: str
    expression: sp.csr_matrix  # (n_cells, G) float32
    contexts: np.ndarray  # (n_cells, F) int64 vocabulary indices, 0 = <unk>
    train_rows: np.ndarray  # int64 row indices used for training
    val_rows: np.ndarray  # int64 row indices held out for validation
    library: np.ndarray | None = None  # (n_cells,) float64 totals of data.library_key, if set

    def __reduce__(self) -> tuple:
        """Pickle the arrays as torch tensors: between a loader worker and the training process
        they then travel in shared memory instead of being copied through a pipe."""
        matrix = self.expression
        arrays = (matrix.data, matrix.indices, matrix.indptr, self.contexts)
        rows = (self.train_rows, self.val_rows)
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (*arrays, *rows))
        library = None if self.library is None else torch.from_numpy(self.library)
        return _rebuild_chunk, (self.chunk_id, matrix.shape, *tensors, library)


def _rebuild_chunk(
    chunk_id: str,
    shape: tuple[int, int],
    data: torch.Tensor,
    indices: torch.Tensor,
    indptr: torch.Tensor,
    contexts: torch.Tensor,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    library: torch.Tensor | None,
) -> LoadedChunk:
    """The inverse of :meth:`LoadedChunk.__reduce__` (numpy views of the received tensors)."""
    matrix = sp.csr_matrix((data.numpy(), indices.numpy(), indptr.numpy()), shape=shape)
    totals = None if library is None else library.numpy()
    rows = (train_rows.numpy(), val_rows.numpy())
    return LoadedChunk(chunk_id, matrix, contexts.numpy(), *rows, totals)


@dataclass
class Batch:
    """A dense mini-batch on the training device, and its contexts on the host too (so that target
    sampling, which runs on the host, never waits for the device)."""

    x: torch.Tensor  # (B, G) transformed expression
    contexts: torch.Tensor  # (B, F) int64, on the training device
    host_contexts: torch.Tensor  # (B, F) int64, on the host
    library: torch.Tensor | None = None  # (B, 1) total counts per cell, under log1p_cp10k


def split_rows(
    chunk_id: str,
    n_cells: int,
    val_fraction: float,
    seed: int,
    held_out: bool,
    excluded: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split a chunk's rows into training and validation rows, the same way in every process.

    Args:
        chunk_id: the chunk's id (part of the split's seed, so chunks split independently).
        n_cells: rows in the chunk.
        val_fraction: fraction of rows held out from a training chunk.
        seed: the training seed.
        held_out: the whole chunk is a validation chunk.
        excluded: (n_cells,) bool, rows in neither set (``data.exclude``); the split of the
            other rows does not depend on it.

    Returns:
        ``(train_rows, val_rows)``, sorted int64 index arrays.
    """
    rows = np.arange(n_cells, dtype=np.int64)
    if held_out:
        train, val = rows[:0], rows
    elif (n_val := round(n_cells * val_fraction)) == 0:
        train, val = rows, rows[:0]
    else:
        rng = np.random.default_rng([seed, int(chunk_id)])
        is_val = np.zeros(n_cells, dtype=bool)
        is_val[rng.choice(n_cells, size=n_val, replace=False)] = True
        train, val = rows[~is_val], rows[is_val]
    if excluded is not None:
        train, val = train[~excluded[train]], val[~excluded[val]]
    return train, val


class ChunkDataset(Dataset[LoadedChunk]):
    """Item ``i`` is chunk ``i`` of the store, read, checked and encoded (in loader workers)."""

    def __init__(
        self,
        store: DataStore,
        vocabularies: Vocabularies,
        null_values: Sequence[str],
        *,
        val_chunks: Sequence[str],
        val_fraction: float,
        seed: int,
        exclude: Sequence[Selection] = (),
        library_key: str | None = None,
    ) -> None:
        self.store = store
        self.library_key = library_key
        self.vocabularies = vocabularies
        self.null_values = tuple(null_values)
        self.val_chunks = {int(c) for c in val_chunks}
        self.val_fraction = val_fraction
        self.seed = seed
        self.exclude = list(exclude)

    def __len__(self) -> int:
        return len(self.store.chunks)

    def __getitem__(self, index: int) -> LoadedChunk:
        chunk = self.store.chunks[index]
        expression = self.store.read_expression(chunk)
        fields = self.vocabularies.fields
        key = [] if self.library_key is None else [self.library_key]
        frame = self.store.read_metadata(
            chunk, list(dict.fromkeys([*fields, *selection_fields(self.exclude), *key]))
        )
        contexts = self.vocabularies.encode(
            frame[list(fields)], self.null_values, source=chunk.metadata_name
        )
        train_rows, val_rows = split_rows(
            chunk.chunk_id,
            chunk.n_cells,
            self.val_fraction,
            self.seed,
            held_out=int(chunk.chunk_id) in self.val_chunks,
            excluded=any_selected(frame, self.exclude) if self.exclude else None,
        )
        library = None
        if self.library_key is not None:
            library = cell_totals(
                frame[self.library_key].to_numpy(),
                np.asarray(expression.sum(axis=1)).ravel(),
                f"{chunk.metadata_name} column '{self.library_key}' (data.library_key)",
            )
        return LoadedChunk(chunk.chunk_id, expression, contexts, train_rows, val_rows, library)


def balanced_windows(n_items: int, size: int) -> list[int]:
    """Sizes of the fewest windows of at most ``size`` items that hold ``n_items``, differing by at
    most one (10 chunks in windows of 8: ``[5, 5]``, not ``[8, 2]``, so no window mixes only a
    few chunks)."""
    if n_items == 0:
        return []
    count = -(-n_items // size)
    return [n_items // count + (i < n_items % count) for i in range(count)]


class EpochOrder(Sampler[int]):
    """Chunk order for one epoch: the given chunk indices permuted by a seed of ``(seed, epoch)``,
    so a resumed run visits chunks in the same order as an uninterrupted one. With several
    training processes every rank permutes alike and takes every ``world_size``-th chunk from
    ``rank`` on: disjoint shares of the same epoch order.

    Each rank's share is cut into shuffle windows of at most ``window`` consecutive chunks
    (:func:`balanced_windows`): the trainer pools a window's cells and draws every mini-batch
    across them. The permutation makes a window a random draw of chunks, so sorted data
    (chunks written in dataset order) still mix inside every window.
    """

    def __init__(
        self,
        indices: Sequence[int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        window: int = 1,
    ) -> None:
        self.indices = list(indices)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.window = window
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_windows: int = 0) -> None:
        """Choose the epoch whose order the next iteration yields, leaving out its first
        ``skip_windows`` windows (already trained before a preemption)."""
        self.epoch = epoch
        self.skip = skip_windows

    def shares(self, epoch: int) -> list[list[int]]:
        """Every rank's chunks, in order, for ``epoch``."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, "chunks"))
        permutation = torch.randperm(len(self.indices), generator=generator).tolist()
        ordered = [self.indices[i] for i in permutation]
        return [ordered[rank :: self.world_size] for rank in range(self.world_size)]

    def windows(self, epoch: int, rank: int | None = None) -> list[list[int]]:
        """The shuffle windows of ``rank``'s share (this process's by default) in ``epoch``."""
        share = self.shares(epoch)[self.rank if rank is None else rank]
        bounds = np.cumsum([0, *balanced_windows(len(share), self.window)])
        return [share[a:b] for a, b in pairwise(bounds)]

    def remaining(self) -> list[list[int]]:
        """The windows the next iteration yields (those of the set epoch, after the skipped)."""
        return self.windows(self.epoch)[self.skip :]

    def __len__(self) -> int:
        return sum(len(window) for window in self.remaining())

    def __iter__(self) -> Iterator[int]:
        return (index for window in self.remaining() for index in window)


def _keep(item: LoadedChunk) -> LoadedChunk:
    """Collate function of the chunk loader: chunks travel as they are."""
    return item


def chunk_loader(
    dataset: ChunkDataset,
    order: EpochOrder | Sequence[int],
    num_workers: int,
    prefetch_factor: int,
    window: int = 1,
) -> DataLoader:
    """The outer loader: one chunk per item, prefetched by persistent background workers.

    Args:
        dataset: the chunks.
        order: which chunk comes when (an :class:`EpochOrder`, or a fixed list of indices).
        num_workers: background processes (0 reads in the training process).
        prefetch_factor: chunks each worker keeps ready.
        window: chunks in a shuffle window; the workers keep at least that many ready, so the
            next window is read while batches are drawn from this one (memory: two windows).

    Returns:
        A ``DataLoader`` yielding :class:`LoadedChunk` objects.
    """
    workers = min(num_workers, len(order))
    kind = dataset.store.kind
    if kind == "anndata" and "fork" not in multiprocessing.get_all_start_methods():
        workers = 0  # an AnnData in memory reaches workers only by fork
    if workers > 0:  # never more ahead than there are chunks (a huge window would spin)
        prefetch_factor = min(max(prefetch_factor, -(-window // workers)), len(order))
    # TileDB's threads do not survive fork(): a forked worker hangs on its first SOMA read. An
    # AnnData in memory is inherited by a forked worker; a spawned one would be sent a copy.
    context = {"soma": "spawn", "anndata": "fork"}.get(kind) if workers > 0 else None
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=order,
        # With batch_size=None the loader passes each item, not a list, to collate_fn; torch's
        # stubs type only the batched case.
        collate_fn=_keep,  # type: ignore[arg-type]
        num_workers=workers,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0,
        multiprocessing_context=context,
    )


def windows_of(chunks: Iterable[LoadedChunk], sizes: Iterable[int]) -> Iterator[list[LoadedChunk]]:
    """Group a loader's chunks, in the order it yields them, into windows of the given sizes."""
    stream = iter(chunks)
    for size in sizes:
        yield [next(stream) for _ in range(size)]


def densify(block: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """Turn a whole CSR mini-batch into a dense float32 tensor on ``device`` in one call.

    On an accelerator only the sparse arrays travel (pinned, copied without blocking) and are
    densified there: far less to copy than the dense batch for wide gene spaces. On the CPU scipy
    densifies directly.
    """
    if device.type == "cpu":
        return torch.from_numpy(block.toarray())
    index_type = np.int64 if block.indptr.dtype == np.int64 else np.int32
    arrays = (block.indptr.astype(index_type), block.indices.astype(index_type), block.data)
    crow, col, values = (to_device(torch.from_numpy(a), device) for a in arrays)
    return torch.sparse_csr_tensor(crow, col, values, size=block.shape).to_dense()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device``: pinned and without blocking for an accelerator (the
    copy overlaps the work already queued), unchanged for the CPU."""
    if device.type == "cpu":
        return tensor
    pinned = tensor.pin_memory() if torch.cuda.is_available() else tensor
    return pinned.to(device, non_blocking=True)


def apply_transform(x: torch.Tensor, transform: str) -> torch.Tensor:
    """Apply the input transform to a dense batch.

    Args:
        x: (B, G) expression as stored.
        transform: ``log1p_cp10k`` (counts -> log1p of counts per 10,000) or ``none``.

    Returns:
        (B, G) model-space expression.
    """
    return transform_with_library(x, transform)[0]


def transform_with_library(
    x: torch.Tensor, transform: str, library: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`apply_transform`, and under ``log1p_cp10k`` the (B, 1) library sizes it normalised
    by: ``library`` when given (each cell's total over all its genes, ``data.library_key``),
    else :func:`library_sizes` (summed once); None for values used as stored."""
    if transform == "none":
        return x, None
    if library is None:
        library = library_sizes(x)
    library = library.to(device=x.device, dtype=x.dtype)
    return torch.log1p(x * (CP10K / library)), library


def cell_totals(values: np.ndarray, row_sums: np.ndarray, source: str) -> np.ndarray:
    """Each cell's total counts over all its genes, read from a metadata column
    (``data.library_key``), checked against the counts of the genes read.

    Args:
        values: (n,) the column's values.
        row_sums: (n,) each cell's sum over the genes read.
        source: where the column is, for messages (file and column).

    Returns:
        (n,) float64 totals.

    Raises:
        DataError: a value is not a number, not finite, not > 0, or below the cell's sum over
            the genes read (a total over all genes cannot be); the message names the row and
            value.
    """
    try:
        totals = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(
            f"{source} holds values that are not numbers (e.g. {values[0]!r}); it must give each "
            "cell's total counts over all its genes"
        ) from None
    sums = np.asarray(row_sums, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(totals) | (totals <= 0) | (totals < sums * (1 - 1e-6) - 1e-6)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"{source} row {row} holds {totals[row]:g} but the cell's counts of the genes read "
            f"sum to {sums[row]:g}; it must give each cell's total counts over all its genes "
            "(> 0 and at least that sum), e.g. scanpy's total_counts computed before the genes "
            "were subset"
        )
    return totals


def library_sizes(x: torch.Tensor) -> torch.Tensor:
    """(B, G) counts -> (B, 1) each cell's total (at least 1e-12: all-zero cells stay zero)."""
    return x.sum(dim=1, keepdim=True).clamp_min(1e-12)


def iter_batches(
    chunks: Sequence[LoadedChunk],
    rows: Sequence[np.ndarray],
    batch_size: int,
    device: torch.device,
    transform: str,
    generator: torch.Generator | None = None,
) -> Iterator[Batch]:
    """Draw mini-batches across the pooled rows of several in-memory chunks (a shuffle window).

    Args:
        chunks: the loaded chunks of the window.
        rows: for each chunk, which of its rows to visit (its ``train_rows`` or ``val_rows``).
        batch_size: cells per batch (the last batch may be smaller).
        device: where the batch goes.
        transform: the input transform applied to each batch on ``device``.
        generator: shuffles the pooled rows when given, so that every batch mixes the chunks;
            chunk by chunk, in order, otherwise.

    Yields:
        :class:`Batch` objects; within a batch the cells are grouped by chunk, ascending.
    """
    counts = [len(r) for r in rows]
    owner = np.repeat(np.arange(len(chunks)), counts)  # (N,) which chunk each pooled row is in
    local = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)  # (N,) row in it
    if generator is not None:
        permutation = torch.randperm(len(local), generator=generator).numpy()
        owner, local = owner[permutation], local[permutation]
    for start in range(0, len(local), batch_size):
        which, index = owner[start : start + batch_size], local[start : start + batch_size]
        # One slice per chunk: the batch's rows grouped by chunk, ascending inside each (kinder
        # to the cache than the drawn order; in-order batches stay in order).
        grouped = np.lexsort((index, which))
        which, index = which[grouped], index[grouped]
        edges = np.searchsorted(which, np.arange(len(chunks) + 1))
        parts = [
            (chunks[k], index[edges[k] : edges[k + 1]])
            for k in range(len(chunks))
            if edges[k + 1] > edges[k]
        ]
        blocks = [chunk.expression[part] for chunk, part in parts]
        block = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
        x = densify(block, device)  # (B, G)
        # numpy, not torch, indexing: tiny, and torch's can wait on a busy machine's other thread
        host = torch.from_numpy(np.concatenate([chunk.contexts[part] for chunk, part in parts]))
        totals = None
        if chunks[0].library is not None:  # data.library_key: every chunk has its totals
            own = np.concatenate([cast(np.ndarray, c.library)[part] for c, part in parts])
            totals = torch.from_numpy(own)[:, None]
        x_model, library = transform_with_library(x, transform, totals)
        yield Batch(x_model, to_device(host, device), host, library)


def single_value_batches(contexts: torch.Tensor) -> np.ndarray:
    """Which fields take a single known value across a batch (``<unk>`` cells aside).

    Args:
        contexts: (B, F) int64 vocabulary indices on the host, 0 = ``<unk>``.

    Returns:
        (F,) bool; a field whose cells are all ``<unk>`` counts as not single-valued.
    """
    known = contexts > 0
    low = torch.where(known, contexts, torch.iinfo(torch.int64).max).amin(dim=0)  # (F,)
    high = torch.where(known, contexts, -1).amax(dim=0)  # (F,)
    return (low == high).numpy()


def expected_single_value_fraction(counts: Sequence[int], batch_size: int) -> float:
    """The fraction of batches in which a field takes one value when the cells are fully shuffled:
    ``sum_v p_v ** B`` over its known values (sampling with replacement; a close upper bound).

    Args:
        counts: cells per known value.
        batch_size: cells per batch.
    """
    total = sum(counts)
    if total == 0:
        return 0.0
    return float(sum((c / total) ** batch_size for c in counts))


def epoch_seed(seed: int, epoch: int, purpose: str) -> int:
    """A seed for one purpose in one epoch, independent of every other (stable across runs)."""
    purposes = {"chunks": 1, "rows": 2, "targets": 3, "validation": 4, "validation_rows": 5}
    return int(np.random.SeedSequence([seed, epoch, purposes[purpose]]).generate_state(1)[0])
