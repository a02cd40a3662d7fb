"""`cae generate`: the output keeps the input's cells, obs and var, says what X is, adds layers
on request, reconstructs without --set, reads the layer asked for, warns about input that does
not look like counts, and with --sample writes whole counts (a residual counterfactual keeps the
cell's counts, a decoded pass is drawn from the count likelihood)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cae.cli import main
from cae.data.store import DataStore
from cae.generate import Sampling
from cae.train.checkpoint import TrainedModel, load_checkpoint
from tests.conftest import load_cells, scverse_cells


@pytest.fixture(scope="module")
def cells_h5ad(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cells as an .h5ad a scverse user writes (see :func:`scverse_cells`)."""
    path = tmp_path_factory.mktemp("h5ad") / "cells.h5ad"
    scverse_cells(tiny).write_h5ad(path)
    return path


def _train(data: Path, out: Path) -> Path:
    """One epoch on the counts layer (--layer), untracked."""
    argv = ["train", "--data", str(data), "--layer", "counts", "--fields", "cell_type,sex",
            "--epochs", "1", "--num-workers", "0", "--latent-dim", "8", "--no-tracking",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def model(cells_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch with the normal likelihood (mean squared error; no dispersion to draw with)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CAE_MODEL__LIKELIHOOD", "normal")
        return _train(cells_h5ad, tmp_path_factory.mktemp("model") / "run")


@pytest.fixture(scope="module")
def nb_model(cells_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch with the count likelihood (model.likelihood=nb)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CAE_MODEL__LIKELIHOOD", "nb")
        return _train(cells_h5ad, tmp_path_factory.mktemp("nb") / "run")


@pytest.fixture(scope="module")
def normal_trained(model: Path) -> TrainedModel:
    """The normal-likelihood model, loaded once (hypothesis runs a test many times)."""
    return load_checkpoint(model)


def _generate(model: Path, data: Path, out: Path, *extra: str) -> anndata.AnnData:
    argv = ["generate", "--model", str(model), "--input", str(data), "--out", str(out)]
    assert main([*argv, *extra]) == 0
    return anndata.read_h5ad(out)


def _expected(trained: TrainedModel, data: Path, targets: dict[str, str] | None) -> np.ndarray:
    adata = anndata.read_h5ad(data)
    source = adata.obs[["cell_type", "sex"]].astype(str)
    if targets is None:
        return trained.reconstruct(adata.layers["counts"], source).output.numpy()
    return trained.counterfactual(adata.layers["counts"], source, targets).output.numpy()


def test_output_keeps_the_input_cells_obs_and_var_and_says_what_x_is(
    model: Path, cells_h5ad: Path, tmp_path: Path
) -> None:
    out = _generate(model, cells_h5ad, tmp_path / "cf.h5ad", "--set", "sex=female")
    given = anndata.read_h5ad(cells_h5ad)
    assert list(out.obs_names) == list(given.obs_names)
    assert out.obs[list(given.obs.columns)].equals(given.obs)
    assert (out.obs["target_sex"] == "female").all()
    assert list(out.obs["source_sex"]) == list(given.obs["sex"].astype(str))
    assert out.var.equals(given.var)
    assert out.uns["log1p"] == {"base": None}
    info = out.uns["cae"]
    assert info["targets"] == {"sex": "female"} and info["mode"] == "counterfactual"
    assert info["units"] == "log1p counts per 10,000" and info["transform"] == "log1p_cp10k"
    assert info["model"] == str((model / "checkpoints/last.pt").resolve())
    assert set(out.layers) == set()
    trained = load_checkpoint(model)
    np.testing.assert_allclose(out.X, _expected(trained, cells_h5ad, {"sex": "female"}), atol=1e-5)
    with h5py.File(tmp_path / "cf.h5ad") as file:  # anndata's writer set the encoding
        assert file["X"].attrs["encoding-type"] == "array"


def test_without_set_it_reconstructs_and_adds_layers_on_request(
    model: Path, cells_h5ad: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = ("--with-input", "--with-reconstruction")
    with caplog.at_level(logging.INFO, logger="cae"):
        out = _generate(model, cells_h5ad, tmp_path / "rec.h5ad", *extra)
    assert "no --set given: .X will be the reconstruction" in caplog.text
    assert out.uns["cae"]["mode"] == "reconstruction" and out.uns["cae"]["targets"] == {}
    assert set(out.uns["cae"]["layers"]) == {"cae_input", "cae_reconstruction"}
    trained = load_checkpoint(model)
    np.testing.assert_allclose(out.X, _expected(trained, cells_h5ad, None), atol=1e-5)
    np.testing.assert_array_equal(out.layers["cae_reconstruction"], out.X)
    # The input in model space: the counts layer's log1p per 10,000, which .X of the input holds.
    given = anndata.read_h5ad(cells_h5ad)
    np.testing.assert_allclose(out.layers["cae_input"], given.X, rtol=1e-5, atol=1e-5)


def test_layer_chooses_what_is_read_and_normalised_input_is_warned_about(
    model: Path, cells_h5ad: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cae"):
        _generate(model, cells_h5ad, tmp_path / "counts.h5ad")  # the model's layer: counts
    assert "normalised twice" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="cae"):
        wrong = _generate(model, cells_h5ad, tmp_path / "x.h5ad", "--layer", "X")
    assert "not whole numbers" in caplog.text and "normalised twice" in caplog.text
    right = anndata.read_h5ad(tmp_path / "counts.h5ad")
    assert not np.allclose(wrong.X, right.X)


def test_chunk_files_keep_their_metadata_and_name_cells_by_chunk(
    model: Path, tiny: Path, tmp_path: Path
) -> None:
    out = _generate(model, tiny, tmp_path / "cf.h5ad", "--set", "sex=male")
    _, meta = load_cells(tiny)
    assert list(out.obs_names[:2]) == ["0_0", "0_1"] and out.obs_names.is_unique
    assert out.obs[list(meta.columns)].reset_index(drop=True).astype(str).equals(meta.astype(str))
    assert list(out.var_names) == (tiny / "genes.txt").read_text().split()


# --- sampled counts (--sample) ------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_counts(x: np.ndarray) -> None:
    """Raw counts: float32 whole numbers, >= 0, finite, not all zero."""
    assert x.dtype == np.float32
    assert np.isfinite(x).all() and (x >= 0).all() and (x == np.round(x)).all()
    assert x.sum() > 0


def _source(data: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The h5ad's counts and source contexts."""
    adata = anndata.read_h5ad(data)
    return adata.layers["counts"].toarray(), adata.obs[["cell_type", "sex"]].astype(str)


def test_sampled_counterfactuals_keep_each_cells_counts_where_the_move_leaves_them(
    model: Path, cells_h5ad: Path, tmp_path: Path
) -> None:
    """Under the residual design either likelihood gives counts: the cell's own, moved to the
    counterfactual's mean with the least noise; here the normal likelihood."""
    before = _digest(cells_h5ad)
    argv = ("--set", "sex=female", "--sample", "--seed", "3")
    out = _generate(model, cells_h5ad, tmp_path / "counts.h5ad", *argv)
    assert _digest(cells_h5ad) == before  # the input is read, never written
    _assert_counts(out.X)
    assert "log1p" not in out.uns  # X is not log1p data: scanpy may normalise it
    info = out.uns["cae"]
    assert info["units"] == "counts" and info["mode"] == "counterfactual"
    assert info["X"] == (
        "whole counts whose log1p counts per 10,000 average to layer cae_mean: the cells' own "
        "counts moved to the counterfactual (the residual design)"
    )
    assert info["sampling"] == {"seed": 3, "library_size": "source cell's depth"}
    assert set(out.layers) == {"cae_mean"} and set(info["layers"]) == {"cae_mean"}
    trained = load_checkpoint(model)
    mean = _expected(trained, cells_h5ad, {"sex": "female"})
    np.testing.assert_allclose(out.layers["cae_mean"], mean, atol=1e-5)
    counts, source = _source(cells_h5ad)
    female = (source["sex"] == "female").to_numpy()
    assert 0 < female.sum() < len(female)
    np.testing.assert_array_equal(out.X[female], counts[female])  # no move: the cells as given
    # the moved cells' counts are next to the mean's counts at the source cells' depth (rounded
    # on the log scale: the normal likelihood's mean is one of log-normalised values)
    library = counts.sum(axis=1, keepdims=True)
    expected = np.expm1(mean) * library / 1e4
    assert (np.abs(out.X - expected) < 1 + 1e-3 * expected).all()
    assert not np.array_equal(out.X[~female], counts[~female])
    again = _generate(model, cells_h5ad, tmp_path / "again.h5ad", *argv)
    other = _generate(model, cells_h5ad, tmp_path / "other.h5ad", *argv[:-1], "4")
    np.testing.assert_array_equal(again.X, out.X)
    assert not np.array_equal(other.X, out.X)


@settings(deadline=None, max_examples=40)
@given(data=st.data(), seed=st.integers(0, 2**63 - 1))
def test_cells_not_moved_come_back_as_their_own_counts(
    normal_trained: TrainedModel, data, seed: int
) -> None:
    """Any counts, up to a million per gene: a residual counterfactual that moves nothing gives
    the cells' counts back exactly."""
    trained = normal_trained
    rows = data.draw(st.integers(1, 6))
    shape = (rows, len(trained.genes))
    counts = data.draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 10**6)))
    counts[:, 0] += 1  # a cell with no counts is refused
    source = pd.DataFrame({"cell_type": ["B"] * 6, "sex": ["female", "male"] * 3})[:rows]
    cells = trained.prepare(counts.astype(np.float32), source)
    moved = trained.move(cells.x_model, cells.source_index, {})
    drawn = trained.sample_counts(cells, moved, seed)
    np.testing.assert_array_equal(drawn.numpy(), counts.astype(np.float32))


def test_every_chunk_draws_with_its_own_seed(nb_model: Path, tiny: Path, tmp_path: Path) -> None:
    """Reconstructions are decoded cells: drawn around their mean from the negative binomial."""
    out = _generate(nb_model, tiny, tmp_path / "chunks.h5ad", "--sample", "--seed", "5")
    _assert_counts(out.X)
    assert out.uns["cae"]["mode"] == "reconstruction"
    assert out.uns["cae"]["X"].endswith("drawn from the model's negative binomial")
    trained = load_checkpoint(nb_model)
    store = DataStore.open(trained.settings.data.model_copy(update={"path": str(tiny)}))
    start = 0
    for index, chunk in enumerate(store.chunks):
        rows = slice(start, start + chunk.n_cells)
        meta = store.read_metadata(chunk)[["cell_type", "sex"]].astype(str)
        cells = trained.prepare(store.read_expression(chunk), meta)
        with torch.no_grad():
            decoded = trained.model(cells.x_model, cells.source_index)
        np.testing.assert_array_equal(out.layers["cae_mean"][rows], decoded.output.numpy())
        drawn = Sampling(5).draw(trained, cells, decoded, index, moved=False)
        np.testing.assert_array_equal(out.X[rows], drawn.numpy())
        start = rows.stop
    assert len(store.chunks) == 3 and start == out.n_obs
    assert len({Sampling(5).chunk_seed(i) for i in range(3)} | {Sampling(6).chunk_seed(0)}) == 4


@pytest.mark.parametrize(("which", "moved"), [("model", True), ("nb_model", False)])
def test_library_size_sets_every_cells_total_counts(
    which: str, moved: bool, request: pytest.FixtureRequest, cells_h5ad: Path, tmp_path: Path
) -> None:
    extra = ("--sample", "--library-size", "500", *(("--set", "sex=male") if moved else ()))
    out = _generate(request.getfixturevalue(which), cells_h5ad, tmp_path / "l500.h5ad", *extra)
    _assert_counts(out.X)
    assert out.uns["cae"]["sampling"] == {"seed": 0, "library_size": 500.0}
    assert out.X.sum(axis=1).mean() == pytest.approx(500, rel=0.15)
    given = _source(cells_h5ad)[0].sum(axis=1)
    assert abs(given.mean() - 500) > 0.5 * given.mean()  # so 500 came from --library-size


def test_sampled_reconstructions_of_a_normal_model_are_refused_before_any_file_is_written(
    model: Path, cells_h5ad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", str(model), "--input", str(cells_h5ad), "--sample",
            "--out", str(tmp_path / "counts.h5ad")]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "sampled counts of a decoded pass (a reconstruction" in error
    assert "trained with model.likelihood=normal: give targets" in error
    assert list(tmp_path.iterdir()) == []  # no output, no half-written temporary


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--seed", "4"], "--seed sets how counts are drawn, but counts are drawn only with "
         "--sample: add it, or drop --seed"),
        (["--library-size", "100"], "--library-size sets how counts are drawn"),
        (["--sample", "--seed", "-3"], "--seed is -3: the seed of sampled"),
        (["--sample", "--library-size", "-1"], "--library-size is -1.0: the library"),
        (["--sample", "--library-size", "nan"], "--library-size is nan: the library size"),
        (["--sample", "--library-size", "inf"], "--library-size is inf: the library size"),
        (["--sample", "--library-size", "0"], "a number > 0 and at most 1,000,000,000"),
    ],
)  # fmt: skip
def test_sampling_flags_are_refused_by_name(
    nb_model: Path,
    cells_h5ad: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    says: str,
) -> None:
    argv = ["generate", "--model", str(nb_model), "--input", str(cells_h5ad),
            "--out", str(tmp_path / "counts.h5ad"), *extra]  # fmt: skip
    assert main(argv) == 2
    assert says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
