"""Shared fixtures: synthetic data sets with known truth, and one trained model per session."""

from __future__ import annotations

import os
from collections.abc import Iterator

# The suite shares its 2 CPU cores with other work. With torch's default of one spinning thread
# per core in every process (pytest and the trainings it starts), epochs ran ten times slower
# there (0.5 s against 5.4 s for 2,000 cells); one thread each keeps them steady. Set before
# torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cae.config import DataConfig, Settings, load_settings
from cae.data.store import DataStore
from cae.data.synth import SynthConfig, generate
from cae.train.trainer import TrainResult, train
from tests.servers import Postgres, PostgresUnavailableError, start_postgres

# The model of the earlier defaults (non-negative heads at the seed's logit scale, latent 64,
# decoded counterfactuals, no context-means term): tests of training mechanics whose curves or
# effects must behave alike from run to run pin it, since the defaults' signed heads at logit
# scale 1 move the validation curves and a small field's effect between runs (sex 1.5 against 2.6
# on the demo data).
EARLIER_MODEL: dict[str, Any] = {
    "model.nonnegative": "all", "model.logit_scale": 0.0159, "model.counterfactual": "decode",
    "model.likelihood": "normal", "model.latent_dim": 64, "train.weights.context_means": 0.0,
}  # fmt: skip


def quick_settings(data: Path, out: Path, **overrides: Any) -> Settings:
    """Settings for a fast, quiet training on ``data`` writing to ``out``."""
    values = {
        "data.path": str(data),
        "data.num_workers": 0,
        "output.dir": str(out),
        "train.progress": False,
        "train.epochs": 2,
        "train.batch_size": 64,
        "model.latent_dim": 8,
        "model.classifier_hidden": 16,
    }
    values.update(overrides)
    return load_settings(None, values)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in a temporary folder with no inherited CAE_* or MLFLOW_* settings."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("CAE_", "MLFLOW_")):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 cells x 12 genes in 3 chunks: a one-epoch training takes about a second."""
    return generate(
        tmp_path_factory.mktemp("tiny") / "data", SynthConfig(n_cells=90, n_genes=12, n_chunks=3)
    )


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 cells x 30 genes in 3 chunks: for behaviour, not learning."""
    return generate(
        tmp_path_factory.mktemp("small") / "data", SynthConfig(n_cells=600, n_genes=30, n_chunks=3)
    )


def store_cells(store: DataStore) -> tuple[np.ndarray, pd.DataFrame]:
    """Every cell of a store: expression dense, and metadata."""
    x = sp.vstack([store.read_expression(c) for c in store.chunks]).toarray()
    meta = pd.concat([store.read_metadata(c) for c in store.chunks], ignore_index=True)
    return x, meta


def load_cells(data: Path | str) -> tuple[np.ndarray, pd.DataFrame]:
    """Every cell of the data set at ``data`` (chunks, .h5ad or SOMA experiment)."""
    return store_cells(DataStore.open(DataConfig(path=str(data))))


def scverse_cells(data: Path) -> Any:
    """The cells of ``data`` as an AnnData a scverse user holds: named cells (``cell-<i>``),
    log1p counts per 10,000 in ``.X``, the counts in layer ``counts``, and an obs (``donor``)
    and a var (``symbol``) column the model does not use."""
    import anndata
    import torch

    from cae.data.loader import apply_transform

    x, meta = load_cells(data)
    genes = (data / "genes.txt").read_text().split()
    obs = meta.astype("category").set_axis([f"cell-{i}" for i in range(len(meta))])
    obs["donor"] = [f"d{i % 4}" for i in range(len(obs))]
    var = pd.DataFrame({"symbol": [g.upper() for g in genes]}, index=genes)
    normalised = apply_transform(torch.from_numpy(x.astype(np.float32)), "log1p_cp10k").numpy()
    layers = {"counts": sp.csr_matrix(x, dtype=np.float32)}
    return anndata.AnnData(normalised, obs=obs, var=var, layers=layers)


@pytest.fixture(scope="session")
def soma_experiment(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small_data`` as a TileDB-SOMA experiment (measurement RNA, X layer "counts"), written by
    ``tiledbsoma.io.from_anndata`` as a Census export is laid out. Skips without tiledbsoma."""
    pytest.importorskip("tiledbsoma")
    import anndata
    import tiledbsoma.io

    x, meta = load_cells(small_data)
    obs = meta.astype(str).astype("category")
    obs.index = [f"cell{i}" for i in range(len(obs))]
    genes = (small_data / "genes.txt").read_text().split()
    adata = anndata.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
    uri = tmp_path_factory.mktemp("soma") / "experiment"
    tiledbsoma.io.from_anndata(str(uri), adata, measurement_name="RNA", X_layer_name="counts")
    return uri


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo data set (the defaults of `cae synth`): 6,000 cells x 200 genes in 6 chunks."""
    return generate(tmp_path_factory.mktemp("demo") / "data", SynthConfig())


def demo_settings(data: Path, out: Path, **overrides: Any) -> Settings:
    """The demo preset (experiments/demo.toml) on ``data``, writing to ``out``, quiet."""
    values = {"data.path": str(data), "output.dir": str(out), "train.progress": False}
    return load_settings(
        Path(__file__).parents[1] / "experiments" / "demo.toml", values | overrides
    )


@pytest.fixture(scope="session")
def demo_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """One training on the demo data with the demo preset (experiments/demo.toml)."""
    return train(demo_settings(demo_data, tmp_path_factory.mktemp("demo_run")))


# --- PostgreSQL (tests/test_postgres.py) ---------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 for the whole session, stopped by its pid.

    Skips, saying why, only where PostgreSQL cannot start (not installed, no ``postgres`` user).
    """
    try:
        server = start_postgres()
    except PostgresUnavailableError as err:
        pytest.skip(f"PostgreSQL cannot start here: {err}")
    try:
        yield server
    finally:
        server.stop()
