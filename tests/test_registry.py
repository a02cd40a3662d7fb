"""Registered models: register, load by alias, predict counterfactuals (pyfunc, `cae generate`,
`cae.load_model`), survive the deletion of their training folders, serve over HTTP, and draw
counts on request (a model trained with the count likelihood)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import anndata
import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

import cae
from cae.cli import main
from cae.data.synth import expected_expression
from cae.errors import DataError
from cae.generate import Sampling
from cae.tracking.pyfunc import (
    MODEL_CODE,
    CounterfactualModel,
    example_input,
    model_signature,
    predict_frame,
    register,
)
from cae.train import TrainResult, train
from cae.train.checkpoint import TrainedModel, load_checkpoint
from tests.conftest import load_cells, quick_settings
from tests.fuzzing import fuzz_settings
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


@pytest.fixture(scope="module")
def served(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow models serve` on 127.0.0.1 for cae-demo@champion (one per module); stopped by its
    pid."""
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
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running(command, env, f"{url}/ping", log):
        yield url


def post(url: str, frame: pd.DataFrame, params: dict, orient: str = "split") -> tuple[int, dict]:
    """POST ``frame`` as JSON (NaN, Infinity and null as Python's json writes them)."""
    body = {f"dataframe_{orient}": frame.to_dict(orient=orient), "params": params}
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


def refusal(answer: dict) -> str:
    """The model's reason in a 400 answer (the scoring server puts the request's data first)."""
    assert (
        answer["error_code"] == "INVALID_PARAMETER_VALUE" and "Traceback" not in answer["message"]
    )
    reason = answer["message"].rsplit("Error: ", 1)[-1]
    assert "\n" not in reason.strip()
    return reason


@pytest.mark.parametrize("orient", ["split", "records"])
def test_http_serving_refuses_values_that_are_not_expression(served, demo_data, orient):
    x, meta = cells_of(demo_data, {"cell_type": "B"})
    genes = cae.load_model("models:/cae-demo@champion").genes
    sent = {
        float("nan"): "holds NaN or null in row 1",
        float("inf"): "holds Infinity in row 1",
        None: "holds NaN or null in row 1",  # a null among numbers arrives as NaN
        -2.0: "holds -2.0 in row 1",
        1e39: "holds 1e+39 in row 1",
    }
    for value, says in sent.items():
        frame = request_frame(x[:3], meta[:3], genes)
        frame["gene_0042"] = frame["gene_0042"].astype(object)
        frame.loc[1, "gene_0042"] = value
        status, answer = post(served, frame, {"targets": "sex=female"}, orient)
        assert status == 400, (value, answer)
        assert f"gene column 'gene_0042' {says}" in refusal(answer)

    frame = request_frame(x[:3], meta[:3], genes)
    status, answer = post(served, frame, {"target": "sex=female"}, orient)
    assert status == 400
    assert 'params lack "targets"' in refusal(answer)


def test_http_serving_draws_counts_and_refuses_hostile_sampling(served, demo_data):
    x, meta = cells_of(demo_data, {"cell_type": "B"})
    frame = request_frame(x[:2], meta[:2], cae.load_model("models:/cae-demo@champion").genes)
    # the demo model (normal likelihood, residual design) gives counterfactual counts
    status, answer = post(served, frame, {"targets": "sex=female", "sample": True, "seed": 1})
    assert status == 200, answer
    assert _whole_counts(pd.DataFrame(answer["predictions"]).to_numpy(dtype=np.float64))
    sent = [
        ({"sample": True, "seed": -3}, '"seed" is -3: the seed of sampled counts'),
        ({"sample": True, "library_size": float("nan")}, '"library_size" is nan'),
        ({"sample": "maybe"}, "maybe"),
        ({"library_size": 500}, '"library_size" sets how counts are drawn'),
    ]
    for params, says in sent:
        status, answer = post(served, frame, {"targets": "sex=female", **params})
        assert status == 400, (params, answer)
        assert says in refusal(answer)


def assert_refused_or_finite(model, frame: pd.DataFrame, params: object, genes: list[str]) -> str:
    """The serving promise: an MlflowException INVALID_PARAMETER_VALUE (HTTP 400) with a one-line
    reason, or one row of finite values per cell with the model's genes as columns. Returns
    which ("refused" or "answered")."""
    try:
        answer = model.predict(frame, params=params)
    except MlflowException as err:
        assert err.error_code == "INVALID_PARAMETER_VALUE", err.message
        assert err.message.strip() and "\n" not in err.message.strip(), err.message
        assert "Traceback" not in err.message
        return "refused"
    assert list(answer.columns[: len(genes)]) == genes and len(answer) == len(frame)
    assert np.isfinite(answer.to_numpy(dtype=np.float64)).all()
    return "answered"


HOSTILE = st.one_of(
    st.floats(allow_subnormal=False),  # the process runs flush-to-zero: no subnormals
    st.integers(-(2**70), 2**70),
    st.none(),
    st.booleans(),
    st.text(max_size=4),
)

VALUES = st.one_of(st.floats(0, 1e9, allow_subnormal=False), st.integers(0, 10**9), HOSTILE)


@st.composite
def hostile_requests(
    draw: st.DrawFn, genes: list[str], known: dict[str, tuple[str, ...]]
) -> tuple[pd.DataFrame, object]:
    """A request to a model of ``genes`` whose fields take the ``known`` values: a few valid
    cells, then hostile edits (values in gene and field columns, dropped, duplicated and extra
    columns, all-zero cells) and hostile params."""
    n = draw(st.integers(0, 4))
    counts = np.random.default_rng(draw(st.integers(0, 99))).poisson(3.0, (n, len(genes)))
    frame = pd.DataFrame(counts.astype(draw(st.sampled_from(["int64", "float64"]))), columns=genes)
    for field, values in known.items():
        frame[field] = draw(st.lists(st.sampled_from(values), min_size=n, max_size=n))
    columns = st.sampled_from([*genes[:3], *known])
    for column, row, value in draw(
        st.lists(st.tuples(columns, st.integers(0, 3), VALUES), max_size=3)
    ):
        if n:
            if not isinstance(value, float) or frame[column].dtype.kind != "f":
                frame[column] = frame[column].astype(object)
            frame.loc[row % n, column] = value
    if n and draw(st.integers(0, 3)) == 0:
        frame.loc[draw(st.integers(0, n - 1)), genes] = 0
    for column in draw(st.lists(columns, max_size=2)):
        action = draw(st.sampled_from(["drop", "twice", "extra"]))
        if action == "drop" and column in frame:
            frame = frame.drop(columns=column)
        elif action == "twice" and column in frame:
            frame = pd.concat([frame, frame[[column]]], axis=1)
        elif action == "extra":
            frame[f"{column}_extra"] = draw(HOSTILE)
    pairs = [f"{field}={value}" for field, values in known.items() for value in values]
    target = st.sampled_from([*pairs, "tissue=lung", "sex=T", "sex=", "sex=<unk>"])
    joined = st.lists(target, max_size=3).map(";".join)
    targets = st.one_of(joined, st.text(max_size=12), st.integers(), st.none())
    good = st.fixed_dictionaries({"targets": joined}, optional={"contributions": st.booleans()})
    hostile = st.one_of(
        st.fixed_dictionaries(
            {"targets": targets},
            optional={
                "contributions": HOSTILE,
                "target": targets,
                "sample": HOSTILE,
                "seed": HOSTILE,
                "library_size": HOSTILE,
            },
        ),
        st.dictionaries(st.text(max_size=12), HOSTILE, max_size=2),
        st.none(),
        st.lists(st.text(max_size=3), max_size=2),
    )
    params = draw(st.one_of(good, hostile))
    return frame, params


@pytest.fixture(scope="module")
def pyfunc(registry: str) -> tuple[mlflow.pyfunc.PyFuncModel, TrainedModel]:
    """cae-demo@champion as the pyfunc that serving runs, and as the torch model."""
    return mlflow.pyfunc.load_model("models:/cae-demo@champion"), cae.load_model(
        "models:/cae-demo@champion"
    )


@pytest.mark.fuzz
@fuzz_settings(short=40)
@given(data=st.data())
def test_any_request_is_refused_in_one_line_or_answered_with_finite_values(pyfunc, data):
    model, trained = pyfunc
    known = {
        field: vocabulary.values for field, vocabulary in trained.vocabularies.by_field.items()
    }
    frame, params = data.draw(hostile_requests(trained.genes, known))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # extra columns are ignored with a warning
        event(assert_refused_or_finite(model, frame, params, trained.genes))


def test_a_model_whose_answer_is_not_finite_refuses_rather_than_serving_nan(demo_run):
    trained = load_checkpoint(demo_run.checkpoint)
    with torch.no_grad():
        next(trained.model.parameters()).fill_(float("nan"))  # as a broken checkpoint would be
    cells = example_input(trained, 3)
    with pytest.raises(DataError, match="the model's answer for row 0 is not finite"):
        predict_frame(trained, cells, {"sex": "female"}, False)


# --- sampled counts (params sample, seed, library_size) -------------------------------------------

SAMPLING = st.one_of(st.booleans(), st.integers(-5, 2**64), st.floats(0, 2e9), HOSTILE)


@pytest.fixture(scope="module")
def nb_pyfunc(
    tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[mlflow.pyfunc.PyFuncModel, CounterfactualModel, TrainedModel, pd.DataFrame]:
    """A tiny model with the count likelihood: saved with the registered model's code and
    signature and loaded back as serving loads it (MLflow checks the params), the pyfunc called
    directly (no MLflow between), the torch model, and a request of every tiny cell."""
    folder = tmp_path_factory.mktemp("nb_pyfunc")
    overrides = {"model.likelihood": "nb", "train.epochs": 1, "data.fields": "cell_type,sex"}
    checkpoint = str(train(quick_settings(tiny, folder / "run", **overrides)).checkpoint)
    trained = load_checkpoint(checkpoint)
    mlflow.pyfunc.save_model(
        str(folder / "model"),
        python_model=str(MODEL_CODE),
        artifacts={"checkpoint": checkpoint},
        signature=model_signature(trained),
        input_example=(example_input(trained), {"targets": ""}),
        pip_requirements=[],  # the test's environment: nothing to infer
    )
    direct = CounterfactualModel()
    direct.load_context(SimpleNamespace(artifacts={"checkpoint": checkpoint}))
    x, meta = load_cells(tiny)
    frame = request_frame(x, meta[["cell_type", "sex"]], trained.genes)
    return mlflow.pyfunc.load_model(str(folder / "model")), direct, trained, frame


def _whole_counts(values: np.ndarray) -> bool:
    return bool(
        np.isfinite(values).all() and (values >= 0).all() and (values == np.round(values)).all()
    )


def test_a_count_model_draws_counts_on_request(nb_pyfunc) -> None:
    served, direct, trained, frame = nb_pyfunc
    schema = served.metadata.get_params_schema()
    assert {p.name: p.default for p in schema.params} == {
        "targets": None, "contributions": False, "sample": False, "seed": 0, "library_size": None
    }  # fmt: skip
    mean = served.predict(frame, params={"targets": "sex=female"})  # defaults: no sampling
    pd.testing.assert_frame_equal(mean, predict_frame(trained, frame, {"sex": "female"}, False))
    params = {"targets": "sex=female", "sample": True, "seed": 7}
    drawn = served.predict(frame, params=params)
    assert list(drawn.columns) == trained.genes and _whole_counts(drawn.to_numpy())
    expected = predict_frame(trained, frame, {"sex": "female"}, False, None, Sampling(7))
    pd.testing.assert_frame_equal(drawn, expected)
    pd.testing.assert_frame_equal(direct.predict(None, frame, params), drawn)
    assert not drawn.equals(served.predict(frame, params={**params, "seed": 8}))
    sized = served.predict(frame, params={**params, "library_size": 1000.0})
    assert sized.to_numpy().sum(axis=1).mean() == pytest.approx(1000, rel=0.15)
    both = served.predict(frame, params={**params, "contributions": True})
    pd.testing.assert_frame_equal(both[trained.genes], drawn)
    heads = [c for c in both.columns if c.startswith("contrib_l2/")]
    assert heads == ["contrib_l2/base", "contrib_l2/cell_type", "contrib_l2/sex"]
    assert np.isfinite(both[heads].to_numpy()).all()


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"sample": True, "library_size": -1.0}, ['"library_size" is -1.0: the library size']),
        ({"sample": True, "library_size": float("nan")}, ['"library_size" is nan: the']),
        ({"sample": True, "library_size": float("inf")}, ['"library_size" is inf: the']),
        ({"sample": True, "library_size": 1e300}, ['"library_size" is 1e+300: the library size']),
        ({"sample": True, "library_size": "abc"}, ["library_size", "abc"]),
        ({"sample": True, "seed": -3}, ['"seed" is -3: the seed of sampled counts']),
        ({"sample": True, "seed": 2**70}, ['"seed" is 1180591620717411303424: the seed']),
        ({"sample": True, "seed": 1.5}, ["seed", "1.5"]),
        ({"sample": "maybe"}, ["sample", "maybe"]),
        ({"sample": "true"}, ["sample", "true"]),
        ({"seed": 4}, ['"seed" sets how counts are drawn', 'only with "sample"']),
        ({"library_size": 500.0}, ['"library_size" sets how counts are drawn']),
        ({"contributions": "yes"}, ["contributions", "yes"]),
    ],
)  # fmt: skip
@pytest.mark.parametrize("route", ["served", "direct"])
def test_hostile_sampling_params_are_refused_in_one_line(nb_pyfunc, route, params, says) -> None:
    served, direct, _, frame = nb_pyfunc
    request = {"targets": "sex=female", **params}
    with pytest.raises(MlflowException) as info:
        if route == "served":
            served.predict(frame, params=request)
        else:
            direct.predict(None, frame, request)
    message = info.value.message
    assert info.value.error_code == "INVALID_PARAMETER_VALUE" and "\n" not in message.strip()
    for part in says:
        assert part in message, message


def test_a_model_of_values_as_stored_refuses_to_draw_counts(tiny: Path, tmp_path: Path) -> None:
    overrides = {
        "model.likelihood": "normal", "data.transform": "none", "train.epochs": 1,
        "data.fields": "cell_type,sex",
    }  # fmt: skip
    checkpoint = str(train(quick_settings(tiny, tmp_path / "run", **overrides)).checkpoint)
    model = CounterfactualModel()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": checkpoint}))
    x, meta = load_cells(tiny)
    frame = request_frame(x[:2], meta[["cell_type", "sex"]][:2], model.trained.genes)
    assert model.predict(None, frame, params={"targets": ""}).shape == (2, len(model.trained.genes))
    says = r"need a model that reads counts \(data.transform=log1p_cp10k\); this one reads values"
    with pytest.raises(MlflowException, match=says):
        model.predict(None, frame, params={"targets": "", "sample": True})


@pytest.mark.fuzz
@fuzz_settings()
@given(data=st.data())
def test_any_sampling_params_are_refused_or_answered_with_whole_counts(nb_pyfunc, data) -> None:
    served, direct, trained, frame = nb_pyfunc
    params = data.draw(
        st.fixed_dictionaries(
            {"targets": st.sampled_from(["", "sex=female"])},
            optional={"sample": SAMPLING, "seed": SAMPLING, "library_size": SAMPLING},
        )
    )
    for model in (
        served,
        SimpleNamespace(predict=lambda f, params: direct.predict(None, f, params)),
    ):
        outcome = assert_refused_or_finite(model, frame[:5], params, trained.genes)
        event(outcome)
        if outcome == "answered" and params.get("sample") is True:
            assert _whole_counts(model.predict(frame[:5], params=params).to_numpy())
