"""Tests of ``cae.data.loader``: row splits, chunk order, the chunk loader and mini-batches."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from cae.config import DataConfig
from cae.data.loader import (
    ChunkDataset,
    EpochOrder,
    LoadedChunk,
    apply_transform,
    balanced_windows,
    chunk_loader,
    densify,
    expected_single_value_fraction,
    iter_batches,
    single_value_batches,
    split_rows,
)
from cae.data.store import DataStore
from cae.data.synth import SynthConfig, generate, log1p_cp10k
from cae.data.vocabulary import DEFAULT_NULL_VALUES, Vocabularies, build_field_specs

CPU = torch.device("cpu")

# --------------------------------------------------------------------------------------------------
# split_rows


@pytest.mark.parametrize(("n_cells", "fraction"), [(100, 0.1), (37, 0.25), (7, 0.5), (1000, 0.02)])
def test_split_rows_partitions_the_chunk(n_cells: int, fraction: float) -> None:
    train, val = split_rows("3", n_cells, fraction, seed=0, held_out=False)
    assert train.dtype == val.dtype == np.int64
    assert len(val) == round(n_cells * fraction)
    assert len(train) + len(val) == n_cells
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n_cells))
    assert np.all(np.diff(train) > 0)
    assert np.all(np.diff(val) > 0)


def test_split_rows_deterministic_and_seeded() -> None:
    first = split_rows("4", 200, 0.2, seed=1, held_out=False)
    again = split_rows("4", 200, 0.2, seed=1, held_out=False)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other_seed = split_rows("4", 200, 0.2, seed=2, held_out=False)
    other_chunk = split_rows("5", 200, 0.2, seed=1, held_out=False)
    assert not np.array_equal(first[1], other_seed[1])
    assert not np.array_equal(first[1], other_chunk[1])
    # "004" is the same chunk id as "4"
    np.testing.assert_array_equal(split_rows("004", 200, 0.2, 1, False)[1], first[1])


def test_split_rows_no_validation() -> None:
    train, val = split_rows("0", 30, 0.0, seed=0, held_out=False)
    np.testing.assert_array_equal(train, np.arange(30))
    assert val.size == 0
    train, val = split_rows("0", 4, 0.1, seed=0, held_out=False)  # rounds to 0 held out
    np.testing.assert_array_equal(train, np.arange(4))
    assert val.size == 0


def test_split_rows_held_out_chunk() -> None:
    train, val = split_rows("2", 25, 0.1, seed=0, held_out=True)
    assert train.size == 0
    assert train.dtype == np.int64
    np.testing.assert_array_equal(val, np.arange(25))


# --------------------------------------------------------------------------------------------------
# EpochOrder


def test_epoch_order_seeded_per_epoch() -> None:
    indices = [3, 5, 7, 9, 11, 13, 15, 17, 19, 21]
    order = EpochOrder(indices, seed=4)
    assert len(order) == len(indices)
    orders = []
    for epoch in range(4):
        order.set_epoch(epoch)
        listed = list(order)
        assert sorted(listed) == indices
        assert list(order) == listed  # iterating again repeats the epoch
        fresh = EpochOrder(indices, seed=4)
        fresh.set_epoch(epoch)
        assert list(fresh) == listed  # same (seed, epoch), same order
        orders.append(listed)
    assert len({tuple(o) for o in orders}) == len(orders)  # epochs differ
    other = EpochOrder(indices, seed=5)
    assert list(other) != orders[0]


def test_epoch_order_subset_of_chunks() -> None:
    order = EpochOrder([2, 0], seed=0)
    for epoch in range(3):
        order.set_epoch(epoch)
        assert sorted(order) == [0, 2]


@given(st.integers(0, 300), st.integers(1, 40))
def test_balanced_windows_hold_every_item_in_the_fewest_even_windows(n: int, size: int) -> None:
    sizes = balanced_windows(n, size)
    assert sum(sizes) == n and all(1 <= s <= size for s in sizes)
    assert len(sizes) == -(-n // size)  # the fewest windows that fit
    assert not sizes or max(sizes) - min(sizes) <= 1


@given(st.integers(1, 60), st.integers(1, 10), st.integers(1, 4), st.integers(0, 5))
def test_epoch_order_windows_partition_every_ranks_share(
    n_chunks: int, window: int, world_size: int, epoch: int
) -> None:
    indices = list(range(100, 100 + n_chunks))
    orders = [EpochOrder(indices, 3, rank, world_size, window) for rank in range(world_size)]
    seen = []
    for rank, order in enumerate(orders):
        order.set_epoch(epoch)
        windows = order.windows(epoch)
        assert windows == orders[0].windows(epoch, rank)  # every rank agrees on every share
        assert all(1 <= len(w) <= window for w in windows)
        assert [i for w in windows for i in w] == list(order) == order.shares(epoch)[rank]
        seen += list(order)
    assert sorted(seen) == indices  # disjoint shares that cover the epoch


def test_epoch_order_skips_whole_windows() -> None:
    order = EpochOrder(list(range(10)), seed=1, window=3)  # windows of [3, 3, 2, 2]
    order.set_epoch(2)
    windows = order.windows(2)
    assert [len(w) for w in windows] == [3, 3, 2, 2]
    order.set_epoch(2, skip_windows=2)
    assert order.remaining() == windows[2:] and list(order) == windows[2] + windows[3]
    assert len(order) == 4


# --------------------------------------------------------------------------------------------------
# chunk_loader


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ChunkDataset:
    folder = generate(
        tmp_path_factory.mktemp("loader") / "d", SynthConfig(n_cells=300, n_genes=20, n_chunks=3)
    )
    store = DataStore.open(DataConfig(path=folder))
    fields = ["cell_type", "sex"]
    specs = build_field_specs(store.iter_metadata(fields), fields, DEFAULT_NULL_VALUES)
    return ChunkDataset(
        store,
        Vocabularies.from_specs(specs),
        DEFAULT_NULL_VALUES,
        val_chunks=["2"],
        val_fraction=0.2,
        seed=7,
    )


def _signature(chunk: LoadedChunk) -> tuple:
    return (
        chunk.expression.toarray().tobytes(),
        chunk.contexts.tobytes(),
        chunk.train_rows.tobytes(),
        chunk.val_rows.tobytes(),
    )


def test_dataset_items(dataset: ChunkDataset) -> None:
    assert len(dataset) == 3
    for index, meta in enumerate(dataset.store.chunks):
        item = dataset[index]
        assert item.chunk_id == meta.chunk_id
        assert item.expression.shape == (meta.n_cells, 20)
        assert item.contexts.shape == (meta.n_cells, 2)
        assert item.contexts.dtype == np.int64
        expected = split_rows(meta.chunk_id, meta.n_cells, 0.2, 7, held_out=index == 2)
        np.testing.assert_array_equal(item.train_rows, expected[0])
        np.testing.assert_array_equal(item.val_rows, expected[1])
    assert dataset[2].train_rows.size == 0  # chunk 2 is a validation chunk


@pytest.mark.parametrize("num_workers", [0, 1])
def test_chunk_loader_yields_each_chunk_once(dataset: ChunkDataset, num_workers: int) -> None:
    expected = {c.chunk_id: _signature(dataset[i]) for i, c in enumerate(dataset.store.chunks)}
    order = EpochOrder(range(len(dataset)), seed=3)
    loader = chunk_loader(dataset, order, num_workers=num_workers, prefetch_factor=2)
    assert loader.num_workers == num_workers
    for epoch in range(2):
        order.set_epoch(epoch)
        wanted = [dataset.store.chunks[i].chunk_id for i in order]
        seen = [chunk.chunk_id for chunk in loader]
        assert seen == wanted
        assert sorted(seen) == sorted(expected)
    order.set_epoch(0)
    contents = {chunk.chunk_id: _signature(chunk) for chunk in loader}
    assert contents == expected


def test_chunk_loader_fixed_indices(dataset: ChunkDataset) -> None:
    loader = chunk_loader(dataset, [2, 0], num_workers=1, prefetch_factor=1)
    assert [chunk.chunk_id for chunk in loader] == ["2", "0"]
    assert [chunk.chunk_id for chunk in loader] == ["2", "0"]


def test_chunk_loader_caps_workers_at_chunks(dataset: ChunkDataset) -> None:
    assert chunk_loader(dataset, [1], num_workers=4, prefetch_factor=2).num_workers == 1


def test_chunk_loader_reads_no_further_ahead_than_there_are_chunks(dataset: ChunkDataset) -> None:
    # a window of 2**31 chunks would ask torch to queue 2**31 reads: minutes of spinning
    loader = chunk_loader(dataset, [2, 0, 1], num_workers=1, prefetch_factor=2, window=2**31)
    assert loader.prefetch_factor == 3
    assert [chunk.chunk_id for chunk in loader] == ["2", "0", "1"]


# --------------------------------------------------------------------------------------------------
# mini-batches


def _chunk(n_cells: int = 23, n_genes: int = 6) -> LoadedChunk:
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 9, size=(n_cells, n_genes)).astype(np.float32)
    dense[:, 0] += 1
    dense[5] = 0  # an empty cell
    contexts = np.stack([np.arange(n_cells), np.arange(n_cells) % 3], axis=1).astype(np.int64)
    rows = np.arange(n_cells, dtype=np.int64)
    return LoadedChunk("0", sp.csr_matrix(dense), contexts, rows, rows[:0])


def test_iter_batches_sizes_and_coverage() -> None:
    chunk = _chunk()
    rows = np.array([0, 2, 3, 5, 7, 8, 9, 10, 12, 13, 14, 17, 19, 20, 22], dtype=np.int64)
    batches = list(iter_batches([chunk], [rows], 4, CPU, "none"))
    assert [len(b.x) for b in batches] == [4, 4, 4, 3]
    visited = np.concatenate([b.contexts[:, 0].numpy() for b in batches])
    np.testing.assert_array_equal(visited, rows)  # in order without a generator
    dense = chunk.expression.toarray()
    for batch in batches:
        index = batch.contexts[:, 0].numpy()
        assert batch.x.dtype == torch.float32
        assert batch.contexts.dtype == torch.int64
        np.testing.assert_array_equal(batch.x.numpy(), dense[index])
        np.testing.assert_array_equal(batch.contexts.numpy(), chunk.contexts[index])


def test_iter_batches_shuffled_covers_rows_once() -> None:
    chunk = _chunk()
    rows = np.arange(23, dtype=np.int64)
    generator = torch.Generator().manual_seed(0)
    batches = list(iter_batches([chunk], [rows], 5, CPU, "log1p_cp10k", generator))
    assert [len(b.x) for b in batches] == [5, 5, 5, 5, 3]
    visited = np.concatenate([b.contexts[:, 0].numpy() for b in batches])
    assert not np.array_equal(visited, rows)
    np.testing.assert_array_equal(np.sort(visited), rows)
    expected = log1p_cp10k(chunk.expression)
    for batch in batches:
        index = batch.contexts[:, 0].numpy()
        np.testing.assert_allclose(batch.x.numpy(), expected[index], rtol=1e-5, atol=1e-5)


def test_iter_batches_empty_rows() -> None:
    assert list(iter_batches([_chunk()], [np.arange(0, dtype=np.int64)], 4, CPU, "none")) == []


def test_apply_transform_log1p_cp10k() -> None:
    dense = _chunk().expression.toarray()
    out = apply_transform(torch.from_numpy(dense), "log1p_cp10k")
    totals = dense.astype(np.float64).sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.log1p(dense / totals * 1e4)
    expected[5] = 0.0
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[5]) == 0


def test_apply_transform_none_is_identity() -> None:
    x = torch.from_numpy(_chunk().expression.toarray())
    out = apply_transform(x, "none")
    assert torch.equal(out, x)


def test_densify_cpu() -> None:
    block = _chunk().expression[[1, 5, 7]]
    out = densify(block, CPU)
    assert out.dtype == torch.float32
    assert out.device.type == "cpu"
    np.testing.assert_array_equal(out.numpy(), block.toarray())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_densify_cuda() -> None:
    block = _chunk().expression[[1, 5, 7, 22]]
    out = densify(block, torch.device("cuda"))
    assert out.device.type == "cuda"
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.cpu().numpy(), block.toarray())


def test_loader_batches_match_store(dataset: ChunkDataset) -> None:
    loader = chunk_loader(dataset, [0, 1], num_workers=0, prefetch_factor=2)
    for chunk in loader:
        stored = dataset.store.read_expression(dataset.store.chunk(chunk.chunk_id)).toarray()
        rows = np.concatenate([chunk.train_rows, chunk.val_rows])
        got = torch.cat([b.x for b in iter_batches([chunk], [rows], 16, CPU, "none")]).numpy()
        np.testing.assert_array_equal(got, stored[rows])


def _sorted_chunks(n_chunks: int, n_cells: int) -> list[LoadedChunk]:
    """Chunks whose every cell holds its chunk's number in field 0 (data sorted by field 0) and
    its own (chunk, row) code in field 1; expression row = that code."""
    chunks = []
    for k in range(n_chunks):
        code = k * 1000 + np.arange(n_cells)
        dense = np.stack([code, np.ones(n_cells)], axis=1).astype(np.float32)
        contexts = np.stack([np.full(n_cells, k + 1), code], axis=1).astype(np.int64)
        rows = np.arange(n_cells, dtype=np.int64)
        chunks.append(LoadedChunk(str(k), sp.csr_matrix(dense), contexts, rows, rows[:0]))
    return chunks


def test_iter_batches_mix_a_window_and_visit_every_row_once() -> None:
    chunks = _sorted_chunks(4, 50)
    rows = [c.train_rows[c.train_rows % 5 != 0] for c in chunks]  # a subset of each chunk
    generator = torch.Generator().manual_seed(0)
    batches = list(iter_batches(chunks, rows, 32, CPU, "none", generator))
    codes = np.concatenate([b.contexts[:, 1].numpy() for b in batches])
    want = np.concatenate([k * 1000 + r for k, r in enumerate(rows)])
    np.testing.assert_array_equal(np.sort(codes), np.sort(want))  # each row once
    for batch in batches:  # expression and contexts stay row-aligned across chunks
        np.testing.assert_array_equal(batch.x[:, 0].numpy(), batch.contexts[:, 1].numpy())
    full = batches[:-1]
    assert all(len(np.unique(b.contexts[:, 0])) >= 3 for b in full)  # every batch mixes chunks
    assert not single_value_batches(torch.cat([b.contexts for b in full]))[0]


def test_iter_batches_in_order_without_a_generator() -> None:
    chunks = _sorted_chunks(3, 10)
    batches = list(iter_batches(chunks, [c.train_rows for c in chunks], 7, CPU, "none"))
    codes = np.concatenate([b.contexts[:, 1].numpy() for b in batches])
    np.testing.assert_array_equal(codes, [k * 1000 + r for k in range(3) for r in range(10)])


def test_single_value_batches_ignore_unknown_cells() -> None:
    contexts = torch.tensor([[1, 2, 0], [1, 3, 0], [0, 2, 0]])
    np.testing.assert_array_equal(single_value_batches(contexts), [True, False, False])


def test_expected_single_value_fraction() -> None:
    assert expected_single_value_fraction([10], 64) == 1.0
    assert expected_single_value_fraction([50, 50], 2) == pytest.approx(0.5)
    assert expected_single_value_fraction([50, 50], 64) < 1e-15
    assert expected_single_value_fraction([], 64) == 0.0
