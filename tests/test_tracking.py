"""Every training is an MLflow run: `cae train`, `mlflow run .`, a real tracking server,
TensorBoard events and `cae runs compare`. Real sqlite stores and a real `mlflow server` on
127.0.0.1, all in temporary folders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cae.cli import main
from cae.tracking.callbacks import DEFAULT_TRACKING_URI, tracked, tracking_uri
from cae.train import Callback, train
from tests.conftest import quick_settings
from tests.servers import mlflow_server

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
FIELDS = ["cell_type", "assay", "sex"]
SMALL_MODEL = ["--latent-dim", "8", "--batch-size", "64", "--no-progress"]


pytestmark = pytest.mark.usefixtures("isolated")


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found.add(item.path)
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
    return found


def assert_training_recorded(client: MlflowClient, run, epochs: int, fields: list[str]) -> None:
    """Params, per-epoch metrics, tags and artifacts of one tracked training."""
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == str(epochs)
    assert params["data.fields"] == ",".join(fields)
    assert "train.weights.target" in params and "model.logit_scale" in params
    for head in ["base", *fields]:
        for metric in (f"contrib_l2/{head}", f"contrib_share/{head}"):
            history = client.get_metric_history(run_id, metric)
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), metric
    for field in fields:
        assert len(client.get_metric_history(run_id, f"val/accuracy/{field}")) == epochs
        assert len(client.get_metric_history(run_id, f"effect_l2/{field}")) == epochs
    for term in ["loss", "reconstruction", "integration", "target", "classifier"]:
        assert len(client.get_metric_history(run_id, f"train/{term}")) == epochs
        assert len(client.get_metric_history(run_id, f"val/{term}")) == epochs
    tags = run.data.tags
    assert tags["cae.fields"] == ",".join(fields)
    assert len(tags["cae.data_fingerprint"]) == 16
    assert "cae.version" in tags
    artifacts = artifact_paths(client, run_id)
    expected = {
        "checkpoints/last.pt",
        "settings.json",
        "vocabularies.json",
        "field_specs.json",
        "contributions.json",
        "contributions.csv",
        "history.json",
        "plots/contribution_shares.png",
        *(f"plots/contributions_{field}.png" for field in fields),
    }
    assert expected <= artifacts, expected - artifacts
    assert any(p.startswith("tensorboard/events.out.tfevents") for p in artifacts)


def test_cae_train_records_an_mlflow_run(small_data: Path, tmp_path: Path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    argv = ["train", "--data", str(small_data), "--epochs", "2", "--out", "run", *SMALL_MODEL]
    assert main([*argv, "--tracking-uri", uri]) == 0
    client, run = only_run(uri, "cae")
    assert_training_recorded(client, run, epochs=2, fields=FIELDS)


def test_tensorboard_holds_the_same_scalars_and_head_histograms(small_data: Path, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = sqlite_uri(tmp_path / "mlflow.db")
    argv = ["train", "--data", str(small_data), "--epochs", "3", "--out", "run", *SMALL_MODEL]
    assert main([*argv, "--tracking-uri", uri]) == 0
    events = EventAccumulator(
        str(tmp_path / "run" / "tensorboard"), size_guidance={"histograms": 0}
    )
    events.Reload()
    scalars = events.Tags()["scalars"]
    for head in ["base", *FIELDS]:
        assert [e.step for e in events.Scalars(f"contrib_share/{head}")] == [1, 2, 3]
    assert "val/reconstruction" in scalars and "train/target" in scalars
    assert {f"head_output/{h}" for h in ["base", *FIELDS]} <= set(events.Tags()["histograms"])


def test_default_store_is_mlflow_db_in_the_working_directory(small_data: Path, tmp_path: Path):
    assert tracking_uri(None) == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    argv = ["train", "--data", str(small_data), "--epochs", "1", "--out", "run", *SMALL_MODEL]
    assert main(argv) == 0
    assert (tmp_path / "mlflow.db").is_file()
    only_run(sqlite_uri(tmp_path / "mlflow.db"), "cae")


def test_environment_variable_and_setting_choose_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri(None) == "sqlite:///env.db"
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


class _FailAtEpoch(Callback):
    def on_epoch_end(self, trainer, epoch, metrics):
        raise RuntimeError("disk full")


def test_a_training_that_fails_marks_its_run_failed(small_data: Path, tmp_path: Path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    settings = quick_settings(small_data, tmp_path / "run", **{"tracking.uri": uri})
    with pytest.raises(RuntimeError, match="disk full"), tracked(settings) as callbacks:
        train(settings, [*callbacks, _FailAtEpoch()])
    _, run = only_run(uri, "cae")
    assert run.info.status == "FAILED"


def test_bad_input_leaves_no_empty_run(tmp_path: Path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    assert main(["train", "--data", str(tmp_path / "missing"), "--tracking-uri", uri]) == 2
    assert not (tmp_path / "mlflow.db").exists()


def test_no_tracking_writes_no_store(small_data: Path, tmp_path: Path):
    argv = ["train", "--data", str(small_data), "--epochs", "1", "--out", "run", *SMALL_MODEL]
    assert main([*argv, "--no-tracking"]) == 0
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_runs_compare_prints_contributions_side_by_side(small_data, tmp_path, capsys):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    common = ["train", "--data", str(small_data), "--epochs", "1", "--tracking-uri", uri]
    assert main([*common, "--out", "a", "--run-name", "all-fields", *SMALL_MODEL]) == 0
    fields = ["--fields", "cell_type,sex", "--run-name", "two-fields"]
    assert main([*common, "--out", "b", *fields, *SMALL_MODEL]) == 0
    capsys.readouterr()
    assert main(["runs", "compare", "--tracking-uri", uri, "--experiment", "cae"]) == 0
    printed = capsys.readouterr().out
    header, *rows = printed.strip().splitlines()
    assert header.index("two-fields") < header.index("all-fields"), "newest run first"
    table = {line.split()[0]: line.split()[1:] for line in rows}
    assert set(table) >= {"base", *FIELDS}
    assert table["assay"][0] == "NaN", "the two-field run has no assay head"
    assert main(["runs", "compare", "--tracking-uri", uri, "--metric", "effect_l2"]) == 0
    effects = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert effects["base"] == ["NaN", "NaN"], "the base head has no effect"
    assert all(float(v) >= 0 for v in effects["sex"]), effects
    assert main(["runs", "compare", "--tracking-uri", uri, "--experiment", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["chunks", "soma"])
def test_mlflow_run_entry_point(source: str, small_data: Path, tmp_path: Path, request):
    """`mlflow run . -P fields=assay,sex --env-manager local`, as a user types it; on chunks,
    and on a SOMA experiment with an obs filter."""
    data = ["-P", f"data={small_data}"]
    if source == "soma":
        experiment = request.getfixturevalue("soma_experiment")
        data = ["-P", f"data={experiment}", "-P", "obs_filter=cell_type != 'NK'"]
    uri = sqlite_uri(tmp_path / "mlflow.db")
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": uri,
        "CAE_OUTPUT__DIR": str(tmp_path / "out"),
        "CAE_TRAIN__PROGRESS": "false",
    }
    command = [
        str(VENV_BIN / "mlflow"), "run", str(REPO), "--env-manager", "local",
        "-P", "fields=assay,sex", *data, "-P", "epochs=2", "-P", "latent_dim=8",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client, run = only_run(uri, "Default")
    assert run.data.params["fields"] == "assay,sex", "the MLproject's own parameter"
    assert run.data.params["model.latent_dim"] == "8"
    if source == "soma":
        assert run.data.params["data.soma_obs_filter"] == "cell_type != 'NK'"
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    assert len(run.data.tags["cae.git_commit"]) == 40
    assert_training_recorded(client, run, epochs=2, fields=["assay", "sex"])


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; stopped by its pid."""
    with mlflow_server(sqlite_uri(tmp_path / "server.db"), tmp_path) as url:
        yield url


def test_training_logs_to_a_tracking_server_over_http(small_data, tmp_path, tracking_server):
    argv = ["train", "--data", str(small_data), "--epochs", "2", "--out", "run", *SMALL_MODEL]
    assert main([*argv, "--tracking-uri", tracking_server]) == 0
    client, run = only_run(tracking_server, "cae")
    assert_training_recorded(client, run, epochs=2, fields=FIELDS)
    stored = list((tmp_path / "server-artifacts").rglob("last.pt"))
    assert len(stored) == 1, "the checkpoint went through the server to its artifact store"
