"""The Python API (cae.CAE) as a notebook uses it: an AnnData in memory in, AnnData objects out,
an MLflow run recorded in a real sqlite store, no file written but the training folder and the
tracking store."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import anndata
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import cae
from cae.errors import ConfigError, DataError, MetadataError
from cae.generate import load_any_model
from cae.tracking.pyfunc import register
from tests.conftest import scverse_cells

QUICK = {"model.latent_dim": 8, "model.classifier_hidden": 16, "train.batch_size": 64}


def cells(data: Path) -> anndata.AnnData:
    """The synthetic cells as a scverse user holds them (.X log-normalised, counts in a layer)."""
    return scverse_cells(data)


@pytest.fixture
def tracking(isolated: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh sqlite tracking store in the test's folder; MLflow forgets it afterwards."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what cae.load_model reads too
    yield uri
    mlflow.set_tracking_uri(None)


def test_train_predict_save_load_from_an_anndata_in_memory(tiny, tmp_path, tracking, caplog):
    adata = cells(tiny)
    before = adata.copy()

    # --- the notebook ---
    cae.CAE.setup_anndata(adata, fields=["cell_type", "sex"], layer="counts")
    model = cae.CAE(adata, overrides=QUICK)
    with caplog.at_level(logging.INFO, logger="cae"):
        result = model.train(epochs=2, out_dir=tmp_path / "run")
    moved = model.counterfactual(targets={"sex": "female"}, add_input=True)
    same = model.reconstruct()
    latent = model.get_latent_representation()
    everything = model.get_latent_representation(head="all")
    # ---

    assert result.epochs == 2 and "epoch 2/2" in caplog.text
    # The input is read where it lies: only the set-up note is added to it.
    assert set(adata.uns) == {"cae_setup"}
    assert (adata.X == before.X).all() and adata.obs.equals(before.obs)
    # Counterfactuals keep the input's cells, obs and var; source_/target_ columns are added.
    assert list(moved.obs_names) == list(adata.obs_names)
    assert moved.obs[list(adata.obs.columns)].equals(adata.obs)
    assert (moved.obs["target_sex"] == "female").all()
    assert (moved.obs["source_sex"] == adata.obs["sex"].astype(str)).all()
    assert list(moved.obs["target_cell_type"]) == list(adata.obs["cell_type"].astype(str))
    assert moved.var.equals(adata.var)
    assert moved.uns["log1p"] == {"base": None}
    assert moved.uns["cae"]["targets"] == {"sex": "female"}
    assert moved.uns["cae"]["units"] == "log1p counts per 10,000"
    assert moved.uns["cae"]["model"] == str((tmp_path / "run/checkpoints/last.pt").resolve())
    # The model read the counts layer: its input is their log1p per 10,000, which .X holds.
    np.testing.assert_allclose(moved.layers["cae_input"], adata.X, rtol=1e-5, atol=1e-5)
    expected = model.trained.counterfactual(
        adata.layers["counts"], adata.obs[["cell_type", "sex"]].astype(str), {"sex": "female"}
    ).output.numpy()
    np.testing.assert_allclose(moved.X, expected, rtol=1e-5, atol=1e-5)
    assert same.uns["cae"]["mode"] == "reconstruction" and same.uns["cae"]["targets"] == {}
    assert not np.allclose(same.X, moved.X)
    assert latent.shape == (adata.n_obs, 8) and everything.shape == (adata.n_obs, 8 * 3)
    np.testing.assert_array_equal(everything[:, :8], latent)

    # The MLflow run, in the store the test named.
    run = MlflowClient(tracking).get_run(model.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.fields"] == "cell_type,sex"
    assert run.data.params["data.h5ad_layer"] == "counts"
    assert "contrib_share/sex" in run.data.metrics

    # Save and load: a folder, and the registered model by alias.
    saved = model.save(tmp_path / "saved")
    assert saved == tmp_path / "saved/checkpoints/last.pt"
    with pytest.raises(Exception, match="already exists"):
        model.save(tmp_path / "saved")
    again = cae.CAE.load(tmp_path / "saved", adata)
    np.testing.assert_allclose(again.counterfactual(targets={"sex": "female"}).X, moved.X)
    register(model.run_id, "api", "champion", tracking)
    named = cae.CAE.load("models:/api@champion")
    assert named.counterfactual(adata, {"sex": "female"}).uns["cae"]["model"] == (
        "models:/api@champion"
    )

    # Nothing written but the training folder, the saved copy and the tracking store.
    assert {p.name for p in tmp_path.iterdir()} == {"run", "saved", "mlflow.db", "mlruns"}


def test_tracking_is_opt_out(tiny, tmp_path, tracking):
    adata = cells(tiny)
    cae.CAE.setup_anndata(adata, fields="cell_type,sex", layer="counts")
    model = cae.CAE(adata, overrides={**QUICK, "data.num_workers": 0})
    model.train(epochs=1, out_dir=tmp_path / "run", tracking=False, progress=False)
    assert model.run_id is None
    assert {p.name for p in tmp_path.iterdir()} == {"run"}


def test_a_gene_subset_trains_on_those_genes_and_predicts_by_name(tiny, tmp_path, isolated):
    adata = cells(tiny)
    genes = list(adata.var_names[[5, 1, 3]])
    cae.CAE.setup_anndata(adata, fields=["sex"], layer="counts", genes=genes)
    model = cae.CAE(adata, overrides={**QUICK, "data.num_workers": 0})
    model.train(epochs=1, out_dir=tmp_path / "run", tracking=False, progress=False)
    assert model.trained.genes == genes
    moved = model.counterfactual(adata[:, ::-1].copy(), {"sex": "male"})  # other gene order
    assert list(moved.var_names) == genes
    assert moved.var.equals(adata.var.loc[genes])


def test_log_normalised_counts_are_warned_about(tiny, tmp_path, isolated, caplog):
    adata = cells(tiny)
    cae.CAE.setup_anndata(adata, fields=["sex"])  # .X, log-normalised, under log1p_cp10k
    model = cae.CAE(adata, overrides={**QUICK, "data.num_workers": 0})
    with caplog.at_level(logging.WARNING, logger="cae"):
        model.train(epochs=1, out_dir=tmp_path / "run", tracking=False, progress=False)
    assert "not whole numbers" in caplog.text and "normalised twice" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cae"):
        model.reconstruct(layer="counts")
    assert "normalised twice" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="cae"):
        model.reconstruct(layer="X")
    assert "normalised twice" in caplog.text


def _renamed(adata: anndata.AnnData) -> anndata.AnnData:
    adata.obs_names = ["a", "a", *adata.obs_names[2:]]
    return adata


def _with_nan(adata: anndata.AnnData) -> anndata.AnnData:
    adata.layers["counts"] = adata.layers["counts"].toarray()
    adata.layers["counts"][3, 2] = np.nan
    return adata


@pytest.mark.parametrize(
    ("spoil", "setup", "error", "parts"),
    [
        (lambda a: a, {"fields": ["sex", "tissue"]}, MetadataError,
         ["adata.obs: metadata has no field 'tissue'", "cell_type, assay, sex, donor"]),
        (lambda a: a, {"fields": ["sex"], "layer": "raw"}, DataError,
         ["adata has no layer 'raw'", "its layers: counts"]),
        (_renamed, {"fields": ["sex"]}, DataError,
         ["adata names 1 cells more than once (e.g. 'a')", "adata.obs_names_make_unique()"]),
        (lambda a: a, {"fields": ["sex"], "genes": ["gene_0001", "CD4"]}, DataError,
         ["adata lacks 1 of the 2 genes, e.g. CD4"]),
        (lambda a: a[:10], {"fields": ["sex"]}, DataError,
         ["adata is a view", "adata.copy()"]),
    ],
    ids=["missing field", "missing layer", "repeated cell names", "missing genes", "a view"],
)  # fmt: skip
def test_setup_refuses_what_it_cannot_use(tiny, spoil, setup, error, parts):
    adata = spoil(cells(tiny))
    with pytest.raises(error) as info:
        cae.CAE.setup_anndata(adata, **setup)
    for part in parts:
        assert part in str(info.value)
    assert "cae_setup" not in adata.uns


def test_nan_values_stop_training_before_anything_is_written(tiny, tmp_path, isolated):
    adata = _with_nan(cells(tiny))
    cae.CAE.setup_anndata(adata, fields=["sex"], layer="counts")
    model = cae.CAE(adata, overrides={**QUICK, "data.num_workers": 0})
    with pytest.raises(DataError, match=r"AnnData\[0:90\] holds 1 non-finite values"):
        model.train(epochs=1, out_dir=tmp_path / "run", tracking=False, progress=False)
    assert not (tmp_path / "run").exists()


def test_predictions_name_missing_genes_and_an_unset_anndata(tiny, tmp_path, isolated):
    adata = cells(tiny)
    with pytest.raises(ConfigError, match=r"call CAE.setup_anndata\(adata"):
        cae.CAE(adata)
    cae.CAE.setup_anndata(adata, fields=["sex"], layer="counts")
    model = cae.CAE(adata, overrides={**QUICK, "data.num_workers": 0})
    with pytest.raises(ConfigError, match="call train"):
        model.reconstruct()
    model.train(epochs=1, out_dir=tmp_path / "run", tracking=False, progress=False)
    with pytest.raises(DataError, match="AnnData lacks 2 of the model's 12 genes"):
        model.reconstruct(adata[:, 2:].copy())
    with pytest.raises(ConfigError, match="choose 'base', 'all' or a field"):
        model.get_latent_representation(head="cell_type")
    assert load_any_model(str(tmp_path / "run")).genes == list(adata.var_names)


# --- sampled counts (sample=True) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def nb_api(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> cae.CAE:
    """One epoch of a model with the count likelihood, on the tiny cells' counts layer."""
    adata = cells(tiny)
    cae.CAE.setup_anndata(adata, fields=["cell_type", "sex"], layer="counts")
    overrides = {**QUICK, "data.num_workers": 0, "model.likelihood": "nb"}
    model = cae.CAE(adata, overrides=overrides)
    with pytest.MonkeyPatch.context() as env:  # as `isolated`, for the module
        for name in [n for n in os.environ if n.startswith(("CAE_", "MLFLOW_"))]:
            env.delenv(name)
        out = tmp_path_factory.mktemp("nb_api") / "run"
        model.train(epochs=1, out_dir=out, tracking=False, progress=False)
    return model


def _whole_counts(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all() and (x >= 0).all() and (x == np.round(x)).all())


def test_counterfactual_and_reconstruct_draw_counts_on_request(nb_api: cae.CAE) -> None:
    before = nb_api.adata.copy()
    mean = nb_api.counterfactual(targets={"sex": "female"})
    drawn = nb_api.counterfactual(targets={"sex": "female"}, sample=True, seed=2)
    assert drawn.X.dtype == np.float32 and _whole_counts(drawn.X) and drawn.X.sum() > 0
    np.testing.assert_array_equal(drawn.layers["cae_mean"], mean.X)
    assert "log1p" in mean.uns and "log1p" not in drawn.uns
    assert drawn.uns["cae"]["units"] == "counts"
    assert drawn.uns["cae"]["sampling"] == {"seed": 2, "library_size": "source cell's depth"}
    assert list(drawn.obs_names) == list(before.obs_names) and drawn.var.equals(before.var)
    again = nb_api.counterfactual(targets={"sex": "female"}, sample=True, seed=2)
    np.testing.assert_array_equal(again.X, drawn.X)
    other = nb_api.counterfactual(targets={"sex": "female"}, sample=True, seed=3)
    assert not np.array_equal(other.X, drawn.X)
    same = nb_api.reconstruct(sample=True, library_size=2000)
    assert _whole_counts(same.X) and same.uns["cae"]["mode"] == "reconstruction"
    assert same.uns["cae"]["sampling"]["library_size"] == 2000.0
    assert same.X.sum(axis=1).mean() == pytest.approx(2000, rel=0.15)
    np.testing.assert_array_equal(same.layers["cae_mean"], nb_api.reconstruct().X)
    # The AnnData drawn from is left as it was.
    assert (nb_api.adata.layers["counts"] != before.layers["counts"]).nnz == 0
    assert (nb_api.adata.X == before.X).all() and set(nb_api.adata.uns) == {"cae_setup"}


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"seed": 5}, "seed sets how counts are drawn, but counts are drawn only with sample"),
        ({"library_size": 100.0}, "library_size sets how counts are drawn"),
        ({"sample": True, "seed": -3}, "seed is -3: the seed of sampled counts"),
        (
            {"sample": True, "seed": 2**70},
            "seed is 1180591620717411303424: the seed of sampled counts is a whole number",
        ),
        ({"sample": True, "seed": 1.5}, "seed is 1.5: the seed of sampled counts"),
        ({"sample": True, "library_size": float("nan")}, "library_size is nan: the library size"),
        ({"sample": True, "library_size": -1}, "library_size is -1: the library size"),
        ({"sample": True, "library_size": "abc"}, "library_size is 'abc': the library size"),
    ],
)
def test_sampling_options_are_refused_by_name(nb_api: cae.CAE, options: dict, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        nb_api.counterfactual(targets={"sex": "female"}, **options)
    assert says in str(info.value)


def test_a_normal_model_draws_counterfactual_counts_but_not_reconstructions(
    tiny, tmp_path, isolated
):
    adata = cells(tiny)
    cae.CAE.setup_anndata(adata, fields=["sex"], layer="counts")
    normal = {**QUICK, "data.num_workers": 0, "model.likelihood": "normal"}
    model = cae.CAE(adata, overrides=normal)
    model.train(epochs=1, out_dir=tmp_path / "run", tracking=False, progress=False)
    drawn = model.counterfactual(targets={"sex": "female"}, sample=True)
    assert _whole_counts(drawn.X)
    female = (adata.obs["sex"] == "female").to_numpy()
    given = adata.layers["counts"].toarray()
    np.testing.assert_array_equal(drawn.X[female], given[female])  # not moved: kept as given
    with pytest.raises(ConfigError, match=r"trained with model\.likelihood=normal: give targets"):
        model.reconstruct(sample=True)


def test_a_normal_model_of_the_decode_design_draws_no_counts(tiny, tmp_path, isolated):
    """A decoded counterfactual is a new cell: its counts need the count likelihood."""
    adata = cells(tiny)
    cae.CAE.setup_anndata(adata, fields=["sex"], layer="counts")
    decode = {**QUICK, "data.num_workers": 0, "model.likelihood": "normal"}
    model = cae.CAE(adata, overrides={**decode, "model.counterfactual": "decode"})
    model.train(epochs=1, out_dir=tmp_path / "run", tracking=False, progress=False)
    assert model.counterfactual(targets={"sex": "female"}).X.shape == adata.shape
    with pytest.raises(ConfigError, match=r"counterfactual under model\.counterfactual=decode"):
        model.counterfactual(targets={"sex": "female"}, sample=True)
