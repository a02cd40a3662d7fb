"""`cae convert`: a folder of chunks with pickled metadata becomes one with parquet metadata, the
same chunk ids and the same values, ready to share (bad inputs are rows of test_bad_input.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cae.cli import main
from cae.config import DataConfig
from cae.data.store import DataStore
from cae.data.synth import SynthConfig, generate


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Two synthetic chunks whose metadata also holds awkward columns parquet must keep."""
    folder = generate(tmp_path / "data", SynthConfig(n_cells=40, n_genes=10, n_chunks=2))
    for path in sorted(folder.glob("*.pkl")):
        frame = pd.read_pickle(path)
        n = len(frame)
        frame["tissue"] = pd.Categorical(["lung", None] * (n // 2), categories=["lung", "blood"])
        frame["donor"] = ["Ünïcødé 细胞", "unknown"] * (n // 2)
        frame["plate"] = pd.array([7, None] * (n // 2), dtype="Int64")
        frame.to_pickle(path)
    return folder


def test_convert_writes_parquet_with_the_same_chunks_and_values(data, tmp_path, capsys):
    out = tmp_path / "shared"
    assert main(["convert", "--data", str(data), "--out", str(out)]) == 0
    assert f"wrote 2 metadata chunks as parquet, with the expression chunks, to {out}" in (
        capsys.readouterr().out
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "genes.txt",
        "synth_counts_0.npz",
        "synth_counts_1.npz",
        "synth_metadata_0.parquet",
        "synth_metadata_1.parquet",
    ]
    before, after = DataStore.open(DataConfig(path=data)), DataStore.open(DataConfig(path=out))
    assert [c.chunk_id for c in after.chunks] == [c.chunk_id for c in before.chunks]
    assert after.genes == before.genes
    for old, new in zip(before.chunks, after.chunks, strict=True):
        pd.testing.assert_frame_equal(after.read_metadata(new), before.read_metadata(old))
        assert new.expression.read_bytes() == old.expression.read_bytes()
    assert sorted(p.name for p in data.glob("*.pkl")) == [
        "synth_metadata_0.pkl",
        "synth_metadata_1.pkl",
    ], "the input stays as it was"


def test_convert_replaces_only_with_overwrite_and_copies_parquet_as_is(data, tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "old.txt").write_text("old")
    parquet = pd.read_pickle(data / "synth_metadata_1.pkl")
    (data / "synth_metadata_1.pkl").unlink()
    parquet.to_parquet(data / "synth_metadata_1.parquet")
    args = ["convert", "--data", str(data), "--out", str(out)]
    assert main(args) == 2
    assert (out / "old.txt").read_text() == "old"
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "old.txt").exists()
    copied = out / "synth_metadata_1.parquet"
    assert copied.read_bytes() == (data / "synth_metadata_1.parquet").read_bytes()
    assert not list(tmp_path.glob(".shared.*")), "no temporary folder is left behind"


def test_converted_data_trains_like_the_original(data, tmp_path):
    out = tmp_path / "shared"
    assert main(["convert", "--data", str(data), "--out", str(out)]) == 0
    shutil.rmtree(data)  # the parquet folder stands on its own
    args = ["train", "--data", str(out), "--out", str(tmp_path / "run"), "--epochs", "1"]
    assert main([*args, "--no-tracking", "--no-progress", "--latent-dim", "4"]) == 0
    history = pd.read_json(tmp_path / "run" / "history.json")
    assert np.isfinite(history["train/loss"]).all()
