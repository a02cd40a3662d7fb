"""`cae generate`: the output keeps the input's cells, obs and var, says what X is, adds layers
on request, reconstructs without --set, reads the layer asked for and warns about input that
does not look like counts."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest

from cae.cli import main
from cae.train.checkpoint import TrainedModel, load_checkpoint
from tests.conftest import load_cells, scverse_cells


@pytest.fixture(scope="module")
def cells_h5ad(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cells as an .h5ad a scverse user writes (see :func:`scverse_cells`)."""
    path = tmp_path_factory.mktemp("h5ad") / "cells.h5ad"
    scverse_cells(tiny).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def model(cells_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch on the counts layer (--layer), untracked."""
    out = tmp_path_factory.mktemp("model") / "run"
    argv = ["train", "--data", str(cells_h5ad), "--layer", "counts", "--fields", "cell_type,sex",
            "--epochs", "1", "--num-workers", "0", "--latent-dim", "8", "--no-tracking",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


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
