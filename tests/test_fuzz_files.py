"""Fuzzer of malformed data files: chunk files, metadata, gene lists and .h5ad files, spoiled at
random (bytes flipped, overwritten, inserted or cut off) and in the ways writers go wrong (arrays of
another type or length, headers that lie, repeated or nested columns, labels that are not labels,
repeated or missing gene names, missing matrices).

For every spoiled data set, ``cae train``, ``cae preprocess`` and (for an .h5ad) ``cae generate``
with a model trained once per module keep the promise of :mod:`tests.fuzzing`: success, or exit 2
with one line naming what to fix; and a refused command leaves nothing behind (no training folder,
no preprocessed folder, no counterfactual file), while a training that succeeds learnt finite
contributions.
"""

from __future__ import annotations

import math
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cae.data.synth import SynthConfig, generate
from tests.fuzzing import fuzz_settings, run_cae

pytestmark = pytest.mark.fuzz

COUNTS = "synth_counts_0.npz"
PICKLE = "synth_metadata_0.pkl"
PARQUET = "synth_metadata_1.parquet"
H5AD = "synth.h5ad"
FILES = [COUNTS, PICKLE, PARQUET, "genes.txt", H5AD]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 cells x 10 genes in 2 chunks (metadata as .pkl and as .parquet), and the same cells as
    one .h5ad."""
    data = generate(
        tmp_path_factory.mktemp("tiny") / "data",
        SynthConfig(n_cells=60, n_genes=10, n_chunks=2),
        h5ad=True,
    )
    pkl = data / "synth_metadata_1.pkl"
    pd.read_pickle(pkl).to_parquet(data / PARQUET)
    pkl.unlink()
    return data


@pytest.fixture(scope="module")
def model(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained for one epoch on the good .h5ad (what ``cae generate`` loads)."""
    out = tmp_path_factory.mktemp("model") / "run"
    assert _train(tiny / H5AD, out) == 0
    return out


@contextmanager
def _copy(tiny: Path) -> Iterator[Path]:
    """A fresh folder holding ``data/``, a copy of the good data set; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fuzz-files-") as folder:
        shutil.copytree(tiny, Path(folder) / "data")
        yield Path(folder)


# --------------------------------------------------------------------------------------------------
# the commands and what each promises


def _train(data: Path, out: Path) -> int:
    """``cae train`` for one epoch; a refusal leaves no training folder, a success learnt finite
    contributions. Returns the exit status."""
    status, message = run_cae(
        ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--no-tracking",
         "--no-progress", "--num-workers", "0", "--latent-dim", "4", "--batch-size", "32"]
    )  # fmt: skip
    if status == 2:
        assert not out.exists(), f"refused ({message}) but wrote {sorted(out.rglob('*'))}"
    else:
        contributions = pd.read_csv(out / "contributions.csv").select_dtypes("number")
        assert np.isfinite(contributions.to_numpy()).all(), contributions
    return status


def _preprocess(data: Path, out: Path) -> None:
    status, message = run_cae(["preprocess", "--data", str(data), "--out", str(out)])
    if status == 2:
        assert not out.exists(), f"refused ({message}) but wrote {sorted(out.rglob('*'))}"


def _generate(model: Path, data: Path, folder: Path) -> None:
    folder.mkdir()
    out = folder / "cf.h5ad"
    status, message = run_cae(
        ["generate", "--model", str(model), "--input", str(data), "--out", str(out),
         "--set", "sex=female"]
    )  # fmt: skip
    if status == 2:
        assert not any(folder.iterdir()), f"refused ({message}) but wrote {list(folder.iterdir())}"
    else:
        assert np.isfinite(anndata.read_h5ad(out).X).all()


def _every_command(work: Path, file: str, model: Path | None = None) -> None:
    """Train and preprocess on the data set holding ``file``; generate from it when it is the
    .h5ad and a model is given."""
    data = work / "data" / H5AD if file == H5AD else work / "data"
    _train(data, work / "run")
    _preprocess(data, work / "preprocessed")
    if model is not None and file == H5AD:
        _generate(model, data, work / "generated")


# --------------------------------------------------------------------------------------------------
# any file, any bytes


def _corrupt(path: Path, how: str, where: int, payload: bytes) -> None:
    """Cut the file at byte ``where`` (modulo its length), or flip (xor), overwrite or insert
    ``payload`` there."""
    raw = bytearray(path.read_bytes())
    at = where % len(raw)
    if how == "truncate":
        del raw[at:]
    elif how == "insert":
        raw[at:at] = payload
    else:
        for k, byte in enumerate(payload[: len(raw) - at]):
            raw[at + k] = raw[at + k] ^ byte if how == "flip" else byte
    path.write_bytes(bytes(raw))


@fuzz_settings(short=30, long=2000)
@given(
    file=st.sampled_from(FILES),
    how=st.sampled_from(["truncate", "flip", "overwrite", "insert"]),
    where=st.integers(0, 2**20),
    payload=st.binary(min_size=1, max_size=32),
)
def test_any_file_with_corrupt_bytes(
    tiny: Path, model: Path, file: str, how: str, where: int, payload: bytes
) -> None:
    with _copy(tiny) as work:
        _corrupt(work / "data" / file, how, where, payload)
        _every_command(work, file, model)


# --------------------------------------------------------------------------------------------------
# chunk files whose arrays lie


_DTYPES = ["float64", "float16", "int8", "uint64", "bool", "complex64", "<U3", "object"]


def _spoil_npz(path: Path, array: str, how: str, dtype: str, delta: int, value: int) -> None:
    """Rewrite one array of a chunk file: as another dtype, longer or shorter by ``delta``, with
    one entry set to ``value``, or removed."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    item = arrays[array]
    if how == "dtype":
        try:
            arrays[array] = item.astype(dtype)
        except (ValueError, TypeError):  # text that is no number: zeros of that dtype
            arrays[array] = np.zeros(item.shape, dtype)
    elif how == "length":
        arrays[array] = np.resize(item, max(item.size + delta, 0)) if item.ndim else item
    elif how == "value" and item.ndim and item.size:
        with np.errstate(over="ignore"):
            arrays[array][value % item.size] = np.array(value).astype(item.dtype)
    elif how == "drop":
        del arrays[array]
    np.savez(path, **arrays)


@fuzz_settings(short=30, long=2000)
@given(
    array=st.sampled_from(["data", "indices", "indptr", "shape", "format"]),
    how=st.sampled_from(["dtype", "length", "value", "drop"]),
    dtype=st.sampled_from(_DTYPES),
    delta=st.integers(-3, 3),
    value=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-40, 40)),
)
def test_chunk_file_whose_arrays_lie(
    tiny: Path, array: str, how: str, dtype: str, delta: int, value: int
) -> None:
    with _copy(tiny) as work:
        _spoil_npz(work / "data" / COUNTS, array, how, dtype, delta, value)
        _every_command(work, COUNTS)


# --------------------------------------------------------------------------------------------------
# metadata that is not a table of labels


# Cell values a field must refuse or read as labels.
_ODD_VALUES: list[Any] = [
    [1], {"a": 1}, None, math.nan, b"x", (1, 2), 3 + 4j, 10**30, True, "", " ", 7, 7.5,
    pd.Timestamp("2024-01-01"), np.array([1, 2]), "B",
]  # fmt: skip


def _spoil_frame(frame: pd.DataFrame, how: str, values: list[int], n: int) -> Any:
    """The chunk's metadata spoiled one way (``values`` index :data:`_ODD_VALUES`)."""
    if how == "repeated column":
        return pd.concat([frame, frame[["cell_type"]]], axis=1)
    if how == "two column levels":
        frame.columns = pd.MultiIndex.from_tuples([(c, "x") for c in frame.columns])
    elif how == "number column names":
        frame.columns = range(len(frame.columns))
    elif how == "rows":
        return frame.iloc[: max(len(frame) + n, 0)] if n < 0 else pd.concat([frame, frame[:n]])
    elif how == "odd labels":
        cells = [_ODD_VALUES[values[i % len(values)]] for i in range(len(frame))]
        frame["sex"] = pd.Series(cells, dtype=object)
    elif how == "not a frame":
        return frame["cell_type"]
    return frame


@fuzz_settings(short=30, long=2000)
@given(
    file=st.sampled_from([PICKLE, PARQUET]),
    how=st.sampled_from(
        [
            "repeated column",
            "two column levels",
            "number column names",
            "rows",
            "odd labels",
            "not a frame",
            "another pandas",
        ]
    ),
    values=st.lists(st.integers(0, len(_ODD_VALUES) - 1), min_size=1, max_size=4),
    n=st.integers(-3, 3),
)
def test_metadata_that_is_not_a_table_of_labels(
    tiny: Path, file: str, how: str, values: list[int], n: int
) -> None:
    with _copy(tiny) as work:
        path = work / "data" / file
        spoilt = _spoil_frame(pd.read_pickle(tiny / "synth_metadata_0.pkl"), how, values, n)
        if file == PICKLE:
            raw = pickle.dumps(spoilt)
            if how == "another pandas":  # a module this pandas does not have
                raw = raw.replace(b"pandas.core.frame", b"pandas.core.frams")
            path.write_bytes(raw)
        else:
            try:
                spoilt.to_parquet(path)
            except Exception:  # parquet cannot hold it: nothing to read back
                assume(False)
        _every_command(work, file)


# --------------------------------------------------------------------------------------------------
# gene lists


@fuzz_settings(short=30, long=2000)
@given(
    names=st.lists(
        st.one_of(st.sampled_from(["gene_0000", "nan", "NaN", "None", "", " ", "<NA>"]), st.text()),
        min_size=9,
        max_size=11,
    ),
    raw=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_gene_list_of_any_text(tiny: Path, names: list[str], raw: bytes | None) -> None:
    with _copy(tiny) as work:
        genes = work / "data" / "genes.txt"
        if raw is None:
            genes.write_text("\n".join(names), encoding="utf-8", errors="surrogateescape")
        else:
            genes.write_bytes(raw)
        _every_command(work, "genes.txt")


# --------------------------------------------------------------------------------------------------
# .h5ad files whose parts are missing or lie


def _spoil_h5ad(path: Path, how: str, value: int) -> None:
    """Change one part of the .h5ad in place (h5py), or rewrite it (anndata)."""
    if how in ("repeated gene", "no genes", "number gene names", "no cells"):
        adata = anndata.read_h5ad(path)
        if how == "repeated gene":
            names = list(adata.var_names)
            names[value % len(names)] = names[(value + 1) % len(names)]
            adata.var_names = names
        elif how == "number gene names":
            adata.var.index = pd.Index(range(adata.n_vars))
        adata = adata[:, :0] if how == "no genes" else adata[:0] if how == "no cells" else adata
        adata.write_h5ad(path)
        return
    with h5py.File(path, "r+") as file:
        x = file["X"]
        if how == "no X":
            del file["X"]
        elif how == "dense X of text":
            del file["X"]
            dense = file.create_dataset("X", data=np.full((60, 10), b"1"))
            dense.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        elif how in ("indices", "indptr", "data"):
            array = x[how][...]
            array[value % len(array)] = value
            x[how][...] = array
        elif how in ("short indptr", "short data"):
            name = how.split()[1]
            array = x[name][...]
            del x[name]
            x.create_dataset(name, data=array[: -1 - value % 5])
        elif how == "shape":
            x.attrs["shape"] = np.array([60, value])
        elif how == "repeated obs column":
            order = list(file["obs"].attrs["column-order"])
            file["obs"].attrs["column-order"] = np.array([*order, order[0]], dtype=object)
        elif how == "no obs column":
            del file["obs"][file["obs"].attrs["column-order"][value % 3]]


@fuzz_settings(short=30, long=2000)
@given(
    how=st.sampled_from(
        [
            "repeated gene",
            "no genes",
            "number gene names",
            "no cells",
            "no X",
            "dense X of text",
            "indices",
            "indptr",
            "data",
            "short indptr",
            "short data",
            "shape",
            "repeated obs column",
            "no obs column",
        ]
    ),
    value=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-10, 70)),
)
def test_h5ad_whose_parts_are_missing_or_lie(tiny: Path, model: Path, how: str, value: int) -> None:
    with _copy(tiny) as work:
        _spoil_h5ad(work / "data" / H5AD, how, value)
        _every_command(work, H5AD, model)


def test_spoilers_spoil(tiny: Path) -> None:
    """Each structured spoiler changes what it says (a fuzzer of no-ops would pass anything)."""
    spoilers: list[tuple[str, Callable[[Path], None]]] = [
        (COUNTS, lambda p: _spoil_npz(p, "indices", "dtype", "float64", 0, 0)),
        (H5AD, lambda p: _spoil_h5ad(p, "repeated gene", 0)),
        (H5AD, lambda p: _spoil_h5ad(p, "no X", 0)),
    ]
    for file, spoil in spoilers:
        with _copy(tiny) as work:
            before = (work / "data" / file).read_bytes()
            spoil(work / "data" / file)
            assert (work / "data" / file).read_bytes() != before
    with _copy(tiny) as work:
        _spoil_h5ad(work / "data" / H5AD, "repeated gene", 3)
        assert anndata.read_h5ad(work / "data" / H5AD).var_names.duplicated().sum() == 1
