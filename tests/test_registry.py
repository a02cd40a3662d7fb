"""Registered models: register, load by alias, predict counterfactuals (pyfunc, `cae generate`,
`cae.load_model`), survive the deletion of their training folders, and serve over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anndata
import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cae
from cae.cli import main
from cae.data.synth import expected_expression
from cae.tracking.pyfunc import register
from cae.train import TrainResult
from tests.conftest import load_cells
from tests.servers import free_port, running
from tests.test_train import r2

VENV_BIN = Path(sys.executable).parent
SMALL = ["--latent-dim", "8", "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, demo_run: TrainResult) -> Iterator[str]:
    """A sqlite store holding the demo training's checkpoint, registered as cae-demo@champion."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("cae", artifact_location=str(folder / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(demo_run.checkpoint), artifact_path="checkpoints")
    assert register(run.info.run_id, "cae-demo", "champion") == "1"
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def cells_of(data: Path, context: dict[str, str]) -> tuple[np.ndarray, pd.DataFrame]:
    x, meta = load_cells(data)
    rows = np.logical_and.reduce([(meta[k] == v).to_numpy() for k, v in context.items()])
    return x[rows], meta[rows].reset_index(drop=True)


def request_frame(x: np.ndarray, meta: pd.DataFrame, genes: list[str]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame(x, columns=genes), meta], axis=1)


def test_registered_model_moves_cells_toward_the_true_target(registry: str, demo_data: Path):
    model = mlflow.pyfunc.load_model("models:/cae-demo@champion")
    truth = json.loads((demo_data / "truth.json").read_text())
    source = {"cell_type": "NK", "assay": "10x 3' v2", "sex": "male"}
    x, meta = cells_of(demo_data, source)
    genes = truth["genes"]
    frame = request_frame(x, meta, genes)[::-1]  # any column order will do
    frame = frame[list(frame.columns[::-1])]
    predicted = model.predict(frame, params={"targets": "cell_type=monocyte"})
    assert list(predicted.columns) == genes and len(predicted) == len(x)
    true_target = expected_expression(truth, {**source, "cell_type": "monocyte"}, n_cells=2000)
    unchanged = np.log1p(x / x.sum(1, keepdims=True) * 1e4).mean(0)
    r2_model = r2(predicted.to_numpy().mean(0), true_target)
    r2_identity = r2(unchanged, true_target)
    print(f"registered model: R² {r2_model:.3f} vs unchanged {r2_identity:.3f}")
    assert r2_model > r2_identity + 0.2

    with_heads = model.predict(frame[:3], params={"targets": "", "contributions": True})
    assert {"contrib_l2/base", "contrib_l2/cell_type"} <= set(with_heads.columns)
    version = mlflow.MlflowClient().get_model_version_by_alias("cae-demo", "champion")
    assert version.tags["cae.run_id"]


def test_load_model_gives_the_torch_model_with_its_vocabularies(registry: str, demo_run):
    trained = cae.load_model("models:/cae-demo@champion")
    assert trained.vocabularies.fields == ("cell_type", "assay", "sex")
    assert trained.epoch == demo_run.epochs
    assert "female" in trained.vocabularies.by_field["sex"].values


def test_model_survives_deleting_its_training_folders(small_data, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # MLflow copies the URI in force into MLFLOW_TRACKING_URI: restore it after this test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # ./mlruns lands here
    argv = ["train", "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main([*argv, "--register", "small", "--alias", "prod", *SMALL]) == 0
    x, meta = load_cells(data)
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(data)
    model = mlflow.pyfunc.load_model("models:/small@prod")
    genes = [f"gene_{i:04d}" for i in range(x.shape[1])]
    predicted = model.predict(request_frame(x[:5], meta[:5], genes), params={"targets": "sex=male"})
    assert predicted.shape == (5, x.shape[1]) and np.isfinite(predicted.to_numpy()).all()


def test_cae_generate_writes_counterfactuals_with_both_contexts(registry, demo_data, tmp_path):
    out = tmp_path / "cf.h5ad"
    one_chunk = demo_data / "synth_counts_1.npz"
    argv = ["generate", "--model", "models:/cae-demo@champion", "--input", str(one_chunk)]
    assert main([*argv, "--set", "sex=female", "--set", "assay=Smart-seq2", "--out", str(out)]) == 0
    result = anndata.read_h5ad(out)
    source = pd.read_pickle(demo_data / "synth_metadata_1.pkl")
    counts = sp.load_npz(one_chunk)
    assert result.shape == counts.shape
    assert list(result.obs["source_cell_type"]) == list(source["cell_type"])
    assert list(result.obs["source_sex"]) == list(source["sex"])
    assert set(result.obs["target_sex"]) == {"female"}
    assert set(result.obs["target_assay"]) == {"Smart-seq2"}
    assert list(result.obs["target_cell_type"]) == list(source["cell_type"])
    trained = cae.load_model("models:/cae-demo@champion")
    expected = trained.counterfactual(
        counts[:10], source[:10], {"sex": "female", "assay": "Smart-seq2"}
    ).output
    np.testing.assert_allclose(result.X[:10], expected.numpy(), rtol=1e-5, atol=1e-5)
    before = out.read_bytes()
    assert main([*argv, "--set", "sex=male", "--out", str(out)]) == 2, "never overwrites"
    assert out.read_bytes() == before
    assert main([*argv, "--set", "sex=alien", "--out", str(tmp_path / "x.h5ad")]) == 2
    assert not (tmp_path / "x.h5ad").exists()


def test_register_names_a_missing_run(registry: str, capsys):
    assert main(["register", "--run-id", "0123abcd", "--name", "x"]) == 2
    assert "no MLflow run 0123abcd" in capsys.readouterr().err


@pytest.fixture
def served(registry: str, tmp_path: Path) -> Iterator[str]:
    """`mlflow models serve` on 127.0.0.1 for cae-demo@champion; stopped by its pid."""
    port = free_port()
    command = [
        str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/cae-demo@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # it runs `uvicorn`
        "CAE_SERVE__MAX_ROWS": "3",  # the serving process's limit beats the model's 10,000
    }
    url = f"http://127.0.0.1:{port}"
    with running(command, env, f"{url}/ping", tmp_path / "serve.log"):
        yield url


def post(url: str, frame: pd.DataFrame, params: dict) -> tuple[int, dict]:
    body = {"dataframe_split": frame.to_dict(orient="split"), "params": params}
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_serving_answers_counterfactuals_and_rejects_bad_requests(served, demo_data):
    x, meta = cells_of(demo_data, {"cell_type": "B"})
    genes = cae.load_model("models:/cae-demo@champion").genes
    frame = request_frame(x[:3], meta[:3], genes)

    status, answer = post(served, frame, {"targets": "cell_type=T;sex=female"})
    assert status == 200
    predictions = pd.DataFrame(answer["predictions"])
    assert predictions.shape == (3, len(genes))

    status, answer = post(served, frame, {"targets": "sex=unicorn"})
    assert status == 400
    assert "'unicorn'" in answer["message"] and "'female', 'male'" in answer["message"]
    assert "Traceback" not in json.dumps(answer)

    status, answer = post(served, frame.drop(columns=["gene_0042"]), {"targets": "sex=female"})
    assert status == 400
    assert "gene_0042" in answer["message"]
    assert "Traceback" not in json.dumps(answer)

    four = request_frame(x[:4], meta[:4], genes)
    status, answer = post(served, four, {"targets": "sex=female"})
    assert status == 400
    assert "holds 4 cells" in answer["message"] and "at most 3" in answer["message"]
