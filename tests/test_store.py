"""Tests of ``cae.data.store``: chunk discovery, pairing, validation and fingerprinting."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from cae.config import DataConfig
from cae.data.store import DataStore, load_npz
from cae.data.synth import SynthConfig, generate
from cae.errors import CAEError, DataError, MetadataError
from tests.fuzzing import fuzz_settings

N_GENES = 8


def counts(n_cells: int, n_genes: int = N_GENES, seed: int = 0) -> sp.csr_matrix:
    """Random integer counts; every cell has at least one count (column 0)."""
    rng = np.random.default_rng(seed)
    dense = rng.integers(0, 5, size=(n_cells, n_genes)).astype(np.float32)
    dense[:, 0] += 1
    return sp.csr_matrix(dense)


def metadata(n_cells: int, chunk_id: str = "0") -> pd.DataFrame:
    """Per-cell metadata whose rows say which chunk and row they belong to."""
    return pd.DataFrame(
        {
            "cell_type": [("B", "T", "NK")[i % 3] for i in range(n_cells)],
            "chunk": [chunk_id] * n_cells,
            "row": np.arange(n_cells),
        }
    )


def write_chunk(
    folder: Path,
    chunk_id: str,
    matrix: sp.spmatrix | None = None,
    meta: object | None = None,
    *,
    meta_id: str | None = None,
    meta_suffix: str = ".pkl",
) -> tuple[Path, Path]:
    """Write ``x_counts_<id>.npz`` and ``x_metadata_<meta_id or id><suffix>``."""
    folder.mkdir(parents=True, exist_ok=True)
    matrix = counts(20) if matrix is None else matrix
    meta = metadata(matrix.shape[0], str(int(chunk_id))) if meta is None else meta
    expression = folder / f"x_counts_{chunk_id}.npz"
    sp.save_npz(expression, matrix)
    meta_path = folder / f"x_metadata_{meta_id or chunk_id}{meta_suffix}"
    if meta_suffix == ".parquet":
        assert isinstance(meta, pd.DataFrame)
        meta.to_parquet(meta_path)
    elif isinstance(meta, pd.DataFrame):
        meta.to_pickle(meta_path)
    else:
        meta_path.write_bytes(pickle.dumps(meta))
    return expression, meta_path


def open_store(path: Path, **settings: object) -> DataStore:
    return DataStore.open(DataConfig(path=path, **settings))


def check_error(err: BaseException, cls: type[CAEError], *parts: str) -> None:
    """``err`` is exactly ``cls`` and its message names every one of ``parts``."""
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    message = str(err)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def read_all(store: DataStore) -> sp.csr_matrix:
    return sp.vstack([store.read_expression(c) for c in store.chunks], format="csr")


# --------------------------------------------------------------------------------------------------
# a well-formed folder


def test_open_reads_shapes_and_data(tmp_path: Path) -> None:
    matrices = {"0": counts(20, seed=1), "1": counts(17, seed=2)}
    for chunk_id, matrix in matrices.items():
        write_chunk(tmp_path, chunk_id, matrix)
    store = open_store(tmp_path)
    assert store.kind == "chunks"
    assert [c.chunk_id for c in store.chunks] == ["0", "1"]
    assert [c.n_cells for c in store.chunks] == [20, 17]
    assert store.n_cells == 37
    assert store.n_genes == N_GENES
    assert store.genes == [f"gene_{i}" for i in range(N_GENES)]
    for chunk in store.chunks:
        matrix = store.read_expression(chunk)
        assert sp.isspmatrix_csr(matrix)
        assert matrix.dtype == np.float32
        np.testing.assert_array_equal(matrix.toarray(), matrices[chunk.chunk_id].toarray())
        frame = store.read_metadata(chunk)
        pd.testing.assert_frame_equal(frame, metadata(chunk.n_cells, chunk.chunk_id))
    store.check_values("log1p_cp10k")


def test_synthetic_data_opens(tmp_path: Path) -> None:
    folder = generate(tmp_path / "d", SynthConfig(n_cells=300, n_genes=20, n_chunks=3))
    store = open_store(folder)
    assert [c.chunk_id for c in store.chunks] == ["0", "1", "2"]
    assert store.n_cells == 300
    assert store.n_genes == 20
    assert store.genes == (folder / "genes.txt").read_text().split()
    store.check_values("log1p_cp10k")
    names = [name for name, _ in store.iter_metadata(["cell_type"])]
    assert names == [f"synth_metadata_{i}.pkl" for i in range(3)]


def test_read_metadata_selects_the_requested_columns(tmp_path: Path) -> None:
    write_chunk(tmp_path, "0")
    store = open_store(tmp_path)
    frame = store.read_metadata(store.chunks[0], ["cell_type", "row"])
    assert list(frame.columns) == ["cell_type", "row"]
    with pytest.raises(MetadataError) as info:
        store.read_metadata(store.chunks[0], ["row", "absent"])
    check_error(info.value, MetadataError, "x_metadata_0.pkl", "no field 'absent'", "cell_type")


def test_genes_txt_names_the_genes(tmp_path: Path) -> None:
    write_chunk(tmp_path, "0")
    names = [f"g{i}" for i in range(N_GENES)]
    (tmp_path / "genes.txt").write_text("\n".join(names) + "\n")
    assert open_store(tmp_path).genes == names


# --------------------------------------------------------------------------------------------------
# pairing by chunk id


def test_pairs_by_chunk_id_not_sorted_position(tmp_path: Path) -> None:
    # Sorted names disagree between the two kinds: x_counts_10 < x_counts_2 but
    # x_metadata_002 < x_metadata_010. Row counts differ per chunk, so pairing by
    # position would fail the row-count check.
    write_chunk(tmp_path, "2", counts(5, seed=2), meta_id="002")
    write_chunk(tmp_path, "10", counts(7, seed=10), meta_id="010")
    store = open_store(tmp_path)
    assert [c.chunk_id for c in store.chunks] == ["2", "10"]
    assert [(c.expression.name, c.metadata.name) for c in store.chunks if c.metadata] == [
        ("x_counts_2.npz", "x_metadata_002.pkl"),
        ("x_counts_10.npz", "x_metadata_010.pkl"),
    ]
    for chunk in store.chunks:
        frame = store.read_metadata(chunk)
        assert len(frame) == chunk.n_cells == store.read_expression(chunk).shape[0]
        assert set(frame["chunk"]) == {chunk.chunk_id}
    assert store.chunk("010").chunk_id == "10"


def test_unknown_chunk_id_lists_known_ids(tmp_path: Path) -> None:
    write_chunk(tmp_path, "0")
    write_chunk(tmp_path, "3")
    store = open_store(tmp_path)
    with pytest.raises(DataError) as info:
        store.chunk("9")
    check_error(info.value, DataError, "no chunk with id 9", "0, 3")


def test_non_numeric_chunk_id_is_a_data_error(tmp_path: Path) -> None:
    write_chunk(tmp_path, "0")
    store = open_store(tmp_path)
    with pytest.raises(DataError) as info:
        store.chunk("abc")
    check_error(info.value, DataError, "abc")


def test_name_without_chunk_number(tmp_path: Path) -> None:
    write_chunk(tmp_path, "0")
    sp.save_npz(tmp_path / "x_counts_last.npz", counts(20))
    with pytest.raises(DataError) as info:
        open_store(tmp_path)
    check_error(info.value, DataError, "x_counts_last.npz", "chunk number")


# --------------------------------------------------------------------------------------------------
# shapes and files


def test_no_files_match(tmp_path: Path) -> None:
    write_chunk(tmp_path, "0")
    with pytest.raises(DataError) as info:
        open_store(tmp_path, expression_glob="*_expr_*.npz")
    check_error(info.value, DataError, "no expression chunks match '*_expr_*.npz'", str(tmp_path))


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        open_store(tmp_path)
    check_error(info.value, DataError, "'*_counts_*.npz'", str(tmp_path))


def test_missing_data_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        open_store(missing)
    check_error(info.value, DataError, f"data path {missing} does not exist")


def test_file_that_is_not_h5ad(tmp_path: Path) -> None:
    path = tmp_path / "cells.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError) as info:
        open_store(path)
    check_error(info.value, DataError, str(path), "not an .h5ad")


@pytest.mark.parametrize("lines", [N_GENES - 1, N_GENES + 2])
def test_genes_txt_wrong_length(tmp_path: Path, lines: int) -> None:
    write_chunk(tmp_path, "0")
    (tmp_path / "genes.txt").write_text("".join(f"g{i}\n" for i in range(lines)))
    with pytest.raises(DataError) as info:
        open_store(tmp_path)
    check_error(info.value, DataError, "genes.txt", f"names {lines} genes", f"have {N_GENES}")


def test_genes_txt_duplicate_names(tmp_path: Path) -> None:
    write_chunk(tmp_path, "0")
    (tmp_path / "genes.txt").write_text("".join(f"g{min(i, 3)}\n" for i in range(N_GENES)))
    with pytest.raises(DataError) as info:
        open_store(tmp_path)
    check_error(info.value, DataError, "genes.txt", "names genes more than once: g3 (5 times)")


def test_corrupt_parquet(tmp_path: Path) -> None:
    write_chunk(tmp_path, "0", meta_suffix=".parquet")
    (tmp_path / "x_metadata_0.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as info:
        open_store(tmp_path)
    check_error(info.value, DataError, "x_metadata_0.parquet", "as parquet")


def test_npz_deleted_after_open(tmp_path: Path) -> None:
    expression, _ = write_chunk(tmp_path, "0")
    store = open_store(tmp_path)
    expression.unlink()
    with pytest.raises(DataError) as info:
        store.read_expression(store.chunks[0])
    check_error(info.value, DataError, "cannot read", "x_counts_0.npz")


def test_dense_npz_is_rejected(tmp_path: Path) -> None:
    expression, _ = write_chunk(tmp_path, "0")
    np.savez(expression, data=np.ones((20, N_GENES)))
    with pytest.raises(DataError) as info:
        open_store(tmp_path)
    check_error(info.value, DataError, "x_counts_0.npz", "not a sparse matrix file", "save_npz")


def _scramble_member(archive: Path, member: str) -> None:
    """Flip every byte of one deflated member of a zip, keeping the zip's directory intact."""
    with zipfile.ZipFile(archive) as handle:
        info = handle.getinfo(member)
    raw = bytearray(archive.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    for k in range(start, start + info.compress_size):
        raw[k] ^= 0x55
    archive.write_bytes(bytes(raw))


@pytest.mark.parametrize("member", ["shape.npy", "data.npy"])
def test_corrupt_compressed_npz_member(tmp_path: Path, member: str) -> None:
    # shape.npy is read by DataStore.open, data.npy by read_expression
    expression, _ = write_chunk(tmp_path, "0")
    _scramble_member(expression, member)
    with pytest.raises(DataError) as info:
        read_all(open_store(tmp_path))
    check_error(info.value, DataError, "x_counts_0.npz")


def test_npy_named_npz(tmp_path: Path) -> None:
    expression, _ = write_chunk(tmp_path, "0")
    with expression.open("wb") as handle:
        np.save(handle, np.ones((20, N_GENES)))
    with pytest.raises(DataError) as info:
        open_store(tmp_path)
    check_error(info.value, DataError, "x_counts_0.npz")


# --------------------------------------------------------------------------------------------------
# values


def _with_value(value: float) -> sp.csr_matrix:
    dense = counts(20).toarray()
    dense[4, 3] = value
    return sp.csr_matrix(dense)


@pytest.mark.parametrize(
    ("value", "words"),
    [(-1.0, "1 negative values"), (np.nan, "non-finite"), (np.inf, "non-finite")],
    ids=["negative", "nan", "inf"],
)
def test_bad_values(tmp_path: Path, value: float, words: str) -> None:
    write_chunk(tmp_path, "0")
    write_chunk(tmp_path, "1", _with_value(value))
    store = open_store(tmp_path)  # shapes only: opening succeeds
    store.read_expression(store.chunks[0])
    with pytest.raises(DataError) as info:
        store.read_expression(store.chunks[1])
    check_error(info.value, DataError, "x_counts_1.npz", words)
    for transform in ("none", "log1p_cp10k"):
        with pytest.raises(DataError) as info:
            store.check_values(transform)
        check_error(info.value, DataError, "x_counts_1.npz", words)


def test_zero_total_cells(tmp_path: Path) -> None:
    dense = counts(20).toarray()
    dense[[3, 11]] = 0
    write_chunk(tmp_path, "0", sp.csr_matrix(dense))
    store = open_store(tmp_path)
    store.check_values("none")
    with pytest.raises(DataError) as info:
        store.check_values("log1p_cp10k")
    check_error(
        info.value, DataError, "x_counts_0.npz", "2 cells with zero total counts", "first row 3"
    )


# --------------------------------------------------------------------------------------------------
# parquet metadata and .h5ad input


def test_parquet_metadata_like_pickle(tmp_path: Path) -> None:
    matrix = counts(12, seed=4)
    write_chunk(tmp_path / "pkl", "0", matrix)
    write_chunk(tmp_path / "parquet", "0", matrix, meta_suffix=".parquet")
    pkl = open_store(tmp_path / "pkl")
    parquet = open_store(tmp_path / "parquet")
    assert [c.n_cells for c in parquet.chunks] == [c.n_cells for c in pkl.chunks] == [12]
    assert parquet.chunks[0].metadata is not None
    assert parquet.chunks[0].metadata.name == "x_metadata_0.parquet"
    for columns in (None, ["row", "cell_type"]):
        pd.testing.assert_frame_equal(
            parquet.read_metadata(parquet.chunks[0], columns),
            pkl.read_metadata(pkl.chunks[0], columns),
        )


def test_parquet_row_count_mismatch(tmp_path: Path) -> None:
    write_chunk(tmp_path, "0", counts(20), metadata(21), meta_suffix=".parquet")
    with pytest.raises(DataError) as info:
        open_store(tmp_path)
    check_error(info.value, DataError, "x_metadata_0.parquet has 21 rows")


@pytest.fixture
def h5ad_file(tmp_path: Path) -> tuple[Path, sp.csr_matrix, pd.DataFrame]:
    x = counts(23, seed=5)
    obs = pd.DataFrame(
        {"cell_type": [("B", "T")[i % 2] for i in range(23)], "row": np.arange(23)},
        index=[f"cell{i}" for i in range(23)],
    )
    var = pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)])
    path = tmp_path / "cells.h5ad"
    anndata.AnnData(X=x, obs=obs, var=var, layers={"doubled": x * 2}).write_h5ad(path)
    return path, x, obs


def test_h5ad_chunks(h5ad_file: tuple[Path, sp.csr_matrix, pd.DataFrame]) -> None:
    path, x, obs = h5ad_file
    store = open_store(path, h5ad_chunk_size=10)
    assert store.kind == "h5ad"
    assert [c.n_cells for c in store.chunks] == [10, 10, 3]
    assert [c.rows for c in store.chunks] == [(0, 10), (10, 20), (20, 23)]
    assert store.chunks[2].name == "cells.h5ad[20:23]"
    assert store.genes == [f"g{i}" for i in range(N_GENES)]
    np.testing.assert_array_equal(read_all(store).toarray(), x.toarray())
    frames = [store.read_metadata(c) for c in store.chunks]
    assert [len(f) for f in frames] == [10, 10, 3]
    assert all(isinstance(f.index, pd.RangeIndex) for f in frames)
    frame = pd.concat(frames, ignore_index=True)
    assert list(frame.columns) == ["cell_type", "row"]
    assert frame["cell_type"].astype(str).tolist() == obs["cell_type"].tolist()
    assert frame["row"].tolist() == list(range(23))
    assert list(store.read_metadata(store.chunks[1], ["row"])["row"]) == list(range(10, 20))
    store.check_values("log1p_cp10k")
    assert store.fingerprint() != open_store(path, h5ad_chunk_size=7).fingerprint()


def test_h5ad_layer(h5ad_file: tuple[Path, sp.csr_matrix, pd.DataFrame]) -> None:
    path, x, _ = h5ad_file
    store = open_store(path, h5ad_chunk_size=10, h5ad_layer="doubled")
    np.testing.assert_array_equal(read_all(store).toarray(), 2 * x.toarray())


def test_h5ad_missing_layer(h5ad_file: tuple[Path, sp.csr_matrix, pd.DataFrame]) -> None:
    path, _, _ = h5ad_file
    with pytest.raises(DataError) as info:
        open_store(path, h5ad_layer="raw_counts")
    check_error(info.value, DataError, str(path), "no layer 'raw_counts'", "layers: doubled")


def test_anndata_in_memory_is_served_as_the_h5ad_is(
    h5ad_file: tuple[Path, sp.csr_matrix, pd.DataFrame],
) -> None:
    path, x, _ = h5ad_file
    adata = anndata.read_h5ad(path)
    from_file = open_store(path, h5ad_chunk_size=10, h5ad_layer="doubled")
    in_memory = DataStore.from_anndata(adata, "doubled", chunk_size=10)
    assert in_memory.kind == "anndata" and in_memory.chunks[1].name == "AnnData[10:20]"
    assert [c.rows for c in in_memory.chunks] == [c.rows for c in from_file.chunks]
    np.testing.assert_array_equal(read_all(in_memory).toarray(), read_all(from_file).toarray())
    for chunk in in_memory.chunks:
        assert in_memory.read_metadata(chunk).equals(from_file.read_metadata(chunk))
        assert list(in_memory.cell_names(chunk)) == list(from_file.cell_names(chunk))
    in_memory.check_values("log1p_cp10k")
    # Dense X, a subset of the genes in another order: those columns, named.
    adata.X = x.toarray()
    subset = DataStore.from_anndata(adata, genes=["g3", "g0"], chunk_size=10)
    assert subset.genes == ["g3", "g0"] and list(subset.var.index) == ["g3", "g0"]
    np.testing.assert_array_equal(read_all(subset).toarray(), x.toarray()[:, [3, 0]])
    assert subset.fingerprint() != in_memory.fingerprint()
    assert subset.fingerprint() == DataStore.from_anndata(adata, genes=["g3", "g0"]).fingerprint()


def test_anndata_in_memory_refuses_as_the_h5ad_does(
    h5ad_file: tuple[Path, sp.csr_matrix, pd.DataFrame],
) -> None:
    path, x, _ = h5ad_file
    adata = anndata.read_h5ad(path)
    with pytest.raises(DataError) as info:
        DataStore.from_anndata(adata, "raw")
    check_error(info.value, DataError, "adata has no layer 'raw'", "its layers: doubled")
    adata.var_names = ["g0", *adata.var_names[:-1]]
    with pytest.raises(DataError) as info:
        DataStore.from_anndata(adata)
    check_error(info.value, DataError, "adata.var_names names genes more than once: g0 (2 times)")
    adata = anndata.read_h5ad(path)
    adata.X = x.toarray()
    adata.X[3, 1] = -1.0
    store = DataStore.from_anndata(adata, chunk_size=10)
    with pytest.raises(DataError) as info:
        store.check_values("none")
    check_error(info.value, DataError, "AnnData[0:10] holds 1 negative values")
    backed = anndata.read_h5ad(path, backed="r")
    try:
        with pytest.raises(DataError) as info:
            DataStore.from_anndata(backed)
    finally:
        backed.file.close()
    check_error(info.value, DataError, f"adata is backed by {path}", "adata.to_memory()")


def test_values_that_are_not_counts_are_warned_about_once(
    h5ad_file: tuple[Path, sp.csr_matrix, pd.DataFrame], caplog: pytest.LogCaptureFixture
) -> None:
    path, x, _ = h5ad_file
    adata = anndata.read_h5ad(path)
    store = DataStore.from_anndata(adata, chunk_size=10)
    store.check_values("log1p_cp10k")  # integer counts, but none above 20 (at most 5 here)
    assert caplog.text.count("has no value above 20 (the largest is 5)") == 1
    caplog.clear()
    adata.X = x.multiply(1.5).tocsr()
    DataStore.from_anndata(adata, chunk_size=10).check_values("log1p_cp10k")
    assert caplog.text.count("holds values that are not whole numbers (e.g. ") == 1
    assert "normalised twice" in caplog.text
    caplog.clear()
    DataStore.from_anndata(adata, chunk_size=10).check_values("none")
    assert caplog.text == ""


def test_h5ad_bad_values_name_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5ad"
    anndata.AnnData(X=_with_value(-2.0)).write_h5ad(path)
    store = open_store(path, h5ad_chunk_size=3)
    with pytest.raises(DataError) as info:
        store.check_values("none")
    check_error(info.value, DataError, "bad.h5ad[3:6]", "negative")


def test_unreadable_h5ad(tmp_path: Path) -> None:
    path = tmp_path / "broken.h5ad"
    path.write_bytes(b"not hdf5")
    with pytest.raises(DataError) as info:
        open_store(path)
    check_error(info.value, DataError, "cannot read", str(path))


# --------------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    write_chunk(tmp_path, "0", counts(20, seed=1))
    write_chunk(tmp_path, "1", counts(20, seed=2))
    first = open_store(tmp_path).fingerprint()
    assert len(first) == 16
    int(first, 16)
    assert open_store(tmp_path).fingerprint() == first

    before = (tmp_path / "x_counts_1.npz").stat().st_size
    dense = np.zeros((20, N_GENES), dtype=np.float32)
    dense[:, 0] = 1  # same shape, far fewer stored values: a smaller file
    sp.save_npz(tmp_path / "x_counts_1.npz", sp.csr_matrix(dense))
    assert (tmp_path / "x_counts_1.npz").stat().st_size != before
    changed = open_store(tmp_path).fingerprint()
    assert changed != first

    (tmp_path / "genes.txt").write_text("".join(f"g{i}\n" for i in range(N_GENES)))
    assert open_store(tmp_path).fingerprint() not in (first, changed)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
@pytest.mark.parametrize("compressed", [True, False])
def test_load_npz_reads_what_scipy_reads(tmp_path: Path, fmt: str, compressed: bool):
    matrix = sp.random(50, 30, density=0.2, format=fmt, dtype=np.float32, random_state=0)
    path = tmp_path / "m.npz"
    sp.save_npz(path, matrix, compressed=compressed)
    loaded = load_npz(path)
    assert loaded.format == fmt and loaded.shape == (50, 30)
    np.testing.assert_array_equal(loaded.toarray(), matrix.toarray())
    assert loaded.data.flags.writeable, "callers may transform the values in place"


def test_load_npz_checks_each_members_crc(tmp_path: Path):
    """A member whose content does not match the zip directory's CRC is refused, as zipfile
    refuses it (the values are decompressed outside zipfile)."""
    path = tmp_path / "m.npz"
    sp.save_npz(path, sp.random(50, 30, density=0.2, format="csr", random_state=0))
    raw = bytearray(path.read_bytes())
    entry = raw.find(b"PK\x01\x02")
    while raw[entry + 46 : entry + 46 + len(b"data.npy")] != b"data.npy":
        entry = raw.find(b"PK\x01\x02", entry + 1)  # the central directory's entries
        assert entry >= 0
    raw[entry + 16] ^= 0xFF  # its CRC-32 field
    path.write_bytes(bytes(raw))
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        load_npz(path)


# --------------------------------------------------------------------------------------------------
# broken sparse structure: refused before scipy walks it (it trusts pointers and indices)


def _broken(kind: str) -> sp.csr_matrix:
    matrix = counts(20)
    if kind == "index past the end":
        matrix.indices[3] = 10**8
    elif kind == "index = G":
        matrix.indices[3] = N_GENES
    elif kind == "negative index":
        matrix.indices[3] = -5
    elif kind == "decreasing pointers":
        matrix.indptr[5] = matrix.indptr[7]
    return matrix


@pytest.mark.parametrize(
    "kind", ["index past the end", "index = G", "negative index", "decreasing pointers"]
)
def test_broken_sparse_structure_is_a_data_error_naming_the_file(tmp_path: Path, kind: str):
    write_chunk(tmp_path, "0", _broken(kind))
    store = open_store(tmp_path)
    with pytest.raises(DataError) as info:
        store.read_expression(store.chunks[0])
    check_error(info.value, DataError, "x_counts_0.npz", "broken sparse matrix", "save_npz")


def test_cae_train_refuses_an_index_past_the_end_before_training(tmp_path: Path, capsys):
    from cae.cli import main

    write_chunk(tmp_path / "data", "0", _broken("index past the end"))
    status = main(
        ["train", "--data", str(tmp_path / "data"), "--fields", "cell_type", "--out",
         str(tmp_path / "run"), "--no-tracking", "--num-workers", "0"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and "broken sparse matrix" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.fuzz
@fuzz_settings(short=60)
@given(
    st.sampled_from(["indices", "indptr"]),
    st.integers(0, 200),
    st.integers(-(2**31), 2**31 - 1),
)
def test_any_corrupted_pointer_or_index_is_refused_or_read_right(
    tmp_path_factory: pytest.TempPathFactory, array: str, position: int, value: int
):
    folder = tmp_path_factory.mktemp("fuzz")
    matrix = counts(20)
    target = getattr(matrix, array)
    target[position % len(target)] = value
    write_chunk(folder, "0", matrix)
    try:
        store = open_store(folder)
        read = store.read_expression(store.chunks[0])
    except DataError:
        return
    # accepted: then it is a valid matrix of the declared shape
    assert read.shape == (20, N_GENES) and read.indices.min() >= 0
    assert read.indices.max() < N_GENES and np.all(np.diff(read.indptr) >= 0)
