"""Every training is an MLflow run: `cae train`, `mlflow run .`, a real tracking server,
TensorBoard events and `cae runs compare`. Real sqlite stores and a real `mlflow server` on
127.0.0.1, all in temporary folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cae.cli import main
from cae.tracking.callbacks import DEFAULT_TRACKING_URI, tracked, tracking_uri
from cae.train import Callback, train
from tests.conftest import EARLIER_MODEL, quick_settings
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
    assert all(value not in ("", "''") for value in params.values()), "no empty params"
    assert "output.dir" in params and "tracking.run_name" not in params, "unset settings: none"
    tags = run.data.tags
    assert tags["cae.fields"] == ",".join(fields)
    assert 1 <= int(tags["cae.best_epoch"]) <= epochs
    assert len(tags["cae.data_fingerprint"]) == 16
    assert "cae.version" in tags
    artifacts = artifact_paths(client, run_id)
    expected = {
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "settings.json",
        "vocabularies.json",
        "field_specs.json",
        "contributions.json",
        "contributions.csv",
        "history.json",
        "plots/contribution_shares.png",
        "plots/field_effects.png",
        *(f"plots/contributions_{field}.png" for field in fields),
    }
    assert expected <= artifacts, expected - artifacts
    assert any(p.startswith("tensorboard/events.out.tfevents") for p in artifacts)


def test_cae_train_records_an_mlflow_run(small_data: Path, tmp_path: Path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    argv = ["train", "--data", str(small_data), "--epochs", "2", "--out", "run", *SMALL_MODEL]
    assert main([*argv, "--tracking-uri", uri]) == 0
    client, run = only_run(uri, "Default")
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
    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    # as an absolute path: MLflow keeps a relative URI's store in its first folder for good
    assert tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["train", "--data", str(small_data), "--epochs", "1", "--out", "run", *SMALL_MODEL]
    assert main(argv) == 0
    assert (tmp_path / "mlflow.db").is_file()
    only_run(sqlite_uri(tmp_path / "mlflow.db"), "Default")


def test_environment_variable_and_setting_choose_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri(None) == f"sqlite:///{Path('env.db').resolve()}"
    assert tracking_uri("sqlite:////abs/team.db") == "sqlite:////abs/team.db"
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


class _FailAtEpoch(Callback):
    def on_epoch_end(self, trainer, epoch, metrics):
        raise RuntimeError("disk full")


def test_a_training_that_fails_marks_its_run_failed(small_data: Path, tmp_path: Path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    settings = quick_settings(small_data, tmp_path / "run", **{"tracking.uri": uri})
    with pytest.raises(RuntimeError, match="disk full"), tracked(settings) as callbacks:
        train(settings, [*callbacks, _FailAtEpoch()])
    _, run = only_run(uri, "Default")
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
    common = ["train", "--data", str(small_data), "--tracking-uri", uri, *SMALL_MODEL]
    assert main([*common, "--epochs", "1", "--out", "a", "--run-name", "all-fields"]) == 0
    fields = ["--fields", "cell_type,sex", "--run-name", "two-fields", "--experiment", "two"]
    assert main([*common, "--epochs", "2", "--out", "b", *fields]) == 0
    capsys.readouterr()
    assert main(["runs", "compare", "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    header, *rows = printed.strip().splitlines()
    assert header.index("two-fields") < header.index("all-fields"), "newest run first"
    table = {line.split()[0]: line.split()[1:] for line in rows}
    assert [line.split()[0] for line in rows[:4]] == [
        "contrib_share",
        "experiment",
        "epochs",
        "fields",
    ]
    assert table["experiment"] == ["two", "Default"]
    _, two = only_run(uri, "two")
    best = two.data.tags["cae.best_epoch"]
    assert table["epochs"] == ["2" if best == "2" else "2(best:1)", "1"]
    assert table["fields"] == ["cell_type,sex", ",".join(FIELDS)]
    assert set(table) >= {"base", *FIELDS}
    assert table["assay"][0] == "NaN", "the two-field run has no assay head"
    assert main(["runs", "compare", "--tracking-uri", uri, "--experiment", "Default"]) == 0
    header, *_ = capsys.readouterr().out.strip().splitlines()
    assert "all-fields" in header and "two-fields" not in header
    assert main(["runs", "compare", "--tracking-uri", uri, "--metric", "effect_l2"]) == 0
    effects = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert effects["base"] == ["NaN", "NaN"], "the base head has no effect"
    assert all(float(v) >= 0 for v in effects["sex"]), effects
    assert main(["runs", "compare", "--tracking-uri", uri, "--experiment", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["chunks", "soma"])
def test_mlflow_run_entry_point(source: str, small_data: Path, tmp_path: Path, request):
    """`mlflow run . -P fields=assay,sex --env-manager local`, as a user types it; on chunks,
    and on a SOMA experiment with an obs filter. The run holds only the parameters given (no
    empty ones) and lands in the experiment a later `cae train` records into."""
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
    params = run.data.params
    assert params["fields"] == "assay,sex", "the MLproject's own parameter"
    assert params["epochs"] == "2" and params["latent_dim"] == "8", "passed on as --latent_dim"
    assert params["model.latent_dim"] == "8"
    assert "lr" not in params and "seed" not in params, "parameters not given are not logged"
    if source == "soma":
        assert params["data.soma_obs_filter"] == "cell_type != 'NK'"
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    assert len(run.data.tags["cae.git_commit"]) == 40
    assert_training_recorded(client, run, epochs=2, fields=["assay", "sex"])
    if source == "chunks":  # `cae train` without --experiment: the same experiment
        argv = ["train", "--data", str(small_data), "--epochs", "1", "--out", "cae-train"]
        assert main([*argv, *SMALL_MODEL, "--tracking-uri", uri]) == 0
        (experiment,) = [
            e for e in client.search_experiments() if client.search_runs([e.experiment_id])
        ]
        assert experiment.name == "Default"
        sources = {
            r.data.tags.get("mlflow.source.type")
            for r in client.search_runs([experiment.experiment_id])
        }
        assert sources == {"PROJECT", "LOCAL"}


def test_mlflow_experiment_name_chooses_the_experiment(tiny: Path, tmp_path, monkeypatch):
    """MLFLOW_EXPERIMENT_NAME, which `mlflow run` honours too, names cae's default experiment;
    --experiment names another."""
    uri = sqlite_uri(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    argv = ["train", "--data", str(tiny), "--epochs", "1", *SMALL_MODEL, "--tracking-uri", uri]
    assert main([*argv, "--out", "a"]) == 0
    assert main([*argv, "--out", "b", "--experiment", "mine"]) == 0
    only_run(uri, "team")
    only_run(uri, "mine")


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; stopped by its pid."""
    with mlflow_server(sqlite_uri(tmp_path / "server.db"), tmp_path) as url:
        yield url


def test_training_logs_to_a_tracking_server_over_http(small_data, tmp_path, tracking_server):
    argv = ["train", "--data", str(small_data), "--epochs", "2", "--out", "run", *SMALL_MODEL]
    assert main([*argv, "--tracking-uri", tracking_server]) == 0
    client, run = only_run(tracking_server, "Default")
    assert_training_recorded(client, run, epochs=2, fields=FIELDS)
    stored = list((tmp_path / "server-artifacts").rglob("last.pt"))
    assert len(stored) == 1, "the checkpoint went through the server to its artifact store"


def test_register_takes_the_best_or_the_last_checkpoint_with_pinned_requirements(
    tiny: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    """`cae register --checkpoint best` logs best.pt (tagged with the choice and its epoch; on
    this data, with the earlier defaults' model, the first of two), its requirements pinned to
    the installed versions; a run without best.pt says so."""
    import mlflow
    from packaging.version import Version

    for name, value in EARLIER_MODEL.items():
        monkeypatch.setenv("CAE_" + name.upper().replace(".", "__"), str(value))

    uri = sqlite_uri(tmp_path / "mlflow.db")
    argv = ["train", "--data", str(tiny), "--epochs", "2", *SMALL_MODEL, "--tracking-uri", uri]
    assert main([*argv, "--out", "run", "--best-by", "integration"]) == 0
    client, run = only_run(uri, "Default")
    curve = [m.value for m in client.get_metric_history(run.info.run_id, "val/integration")]
    assert curve[0] < curve[1], f"this data's integration loss no longer rises: {curve}"
    assert run.data.tags["cae.best_epoch"] == "1", "best.pt is not last.pt"
    register = ["register", "--run-id", run.info.run_id, "--name", "m-best"]
    assert main([*register, "--checkpoint", "best", "--tracking-uri", uri]) == 0
    assert "(best.pt) as @champion" in capsys.readouterr().out
    version = client.get_model_version_by_alias("m-best", "champion")
    assert version.tags["cae.checkpoint"] == "best" and version.tags["cae.epoch"] == "1"

    mlflow.set_tracking_uri(uri)
    lines = Path(mlflow.pyfunc.get_model_dependencies("models:/m-best@champion")).read_text()
    pinned = dict(line.split("==") for line in lines.split())
    assert pinned["torch"] == Version(torch.__version__).public and "mlflow" in pinned, pinned

    assert main([*argv, "--out", "no-best", "--best-by", "none", "--experiment", "x"]) == 0
    _, plain = only_run(uri, "x")
    register = ["register", "--run-id", plain.info.run_id, "--name", "m", "--checkpoint", "best"]
    assert main([*register, "--tracking-uri", uri]) == 2
    assert "holds no checkpoints/best.pt" in capsys.readouterr().err


def test_experiment_gets_a_saved_view_with_the_effects_first(tiny: Path, tmp_path: Path):
    """MLflow's UI sorts chart sections by name (contrib_* before effect_l2); cae adds a saved
    view (an experiment tag the UI's Views menu reads) whose sections start with effect_l2, and
    leaves a view the user changed as it is."""
    from cae.tracking.views import VIEW_NAME, VIEW_TAG

    uri = sqlite_uri(tmp_path / "mlflow.db")
    argv = ["train", "--data", str(tiny), "--epochs", "1", *SMALL_MODEL, "--tracking-uri", uri]
    assert main([*argv, "--out", "a"]) == 0
    client, run = only_run(uri, "Default")
    view = json.loads(client.get_experiment(run.info.experiment_id).tags[VIEW_TAG])
    assert view["name"] == VIEW_NAME and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    assert state["isAccordionReordered"] is True
    assert state["compareRunSections"][0]["name"] == "effect_l2"

    client.set_experiment_tag(run.info.experiment_id, VIEW_TAG, "changed by the user")
    assert main([*argv, "--out", "b"]) == 0
    assert client.get_experiment(run.info.experiment_id).tags[VIEW_TAG] == "changed by the user"
