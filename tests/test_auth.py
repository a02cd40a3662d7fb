"""A tracking server with a login, as docker/compose.yaml runs it: a real `mlflow server
--app-name basic-auth` on 127.0.0.1 with docker/basic_auth.ini (its users' store moved to a
temporary folder) refuses requests without a login, and `cae` logs in with the credentials MLflow's
client sends (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)."""

from __future__ import annotations

import configparser
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cae.cli import main
from tests.servers import BasicAuth, mlflow_server
from tests.test_tracking import FIELDS, assert_training_recorded, only_run

REPO = Path(__file__).resolve().parents[1]
ADMIN_PASSWORD = "admin-password-for-tests"
TRAIN = ["train", "--epochs", "2", "--latent-dim", "8", "--batch-size", "64", "--no-progress"]

pytestmark = pytest.mark.usefixtures("isolated")


def shipped_auth_config(folder: Path) -> Path:
    """docker/basic_auth.ini with its users' store in ``folder`` instead of the image's /mlauth."""
    config = configparser.ConfigParser()
    config.read(REPO / "docker" / "basic_auth.ini")
    assert config["mlflow"]["database_uri"] == "sqlite:////mlauth/basic_auth.db"
    config["mlflow"]["database_uri"] = f"sqlite:///{folder / 'basic_auth.db'}"
    path = folder / "basic_auth.ini"
    with path.open("w") as out:
        config.write(out)
    return path


def login(monkeypatch: pytest.MonkeyPatch, user: str, password: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def test_a_server_with_a_login_refuses_strangers_and_records_a_team_members_training(
    small_data, tmp_path, monkeypatch, capsys
):
    pytest.importorskip(
        "flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF: pip install -e '.[server]'"
    )
    auth = BasicAuth(shipped_auth_config(tmp_path), ADMIN_PASSWORD)
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path, auth) as url:
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(search, timeout=30)
        assert refused.value.code == 401, "no login, no answer"

        # The doctor says the server wants a login that is not set.
        assert main(["doctor", "--tracking-uri", url]) == 1
        row = next(line for line in capsys.readouterr().out.splitlines() if "tracking" in line)
        assert row.startswith("FAIL") and "HTTP 401" in row and "without credentials" in row

        # The admin makes an account for a team member and the experiment everyone shares.
        login(monkeypatch, "admin", ADMIN_PASSWORD)
        from mlflow.server.auth.client import AuthServiceClient

        AuthServiceClient(url).create_user("alice", "alice-password-12")
        shared = MlflowClient(url).create_experiment("cae")

        # A wrong password: one line naming the server and the variables, before any training.
        login(monkeypatch, "alice", "not-her-password")
        argv = [*TRAIN, "--data", str(small_data), "--tracking-uri", url, "--experiment", "cae"]
        assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and error.startswith("cae train: error: ")
        for part in (url, "refused the password of user 'alice'", "HTTP 401",
                     "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):  # fmt: skip
            assert part in error, (part, error)
        assert not list((tmp_path / "refused").rglob("*.pt")), "nothing trained"

        # Her own password: the training is recorded in the shared experiment, model registered.
        login(monkeypatch, "alice", "alice-password-12")
        out = tmp_path / "trained"
        assert main([*argv, "--out", str(out), "--register", "cae-auth"]) == 0
        client, run = only_run(url, "cae")
        assert run.info.experiment_id == shared and run.info.user_id == "alice"
        assert_training_recorded(client, run, epochs=2, fields=FIELDS)
        assert client.get_model_version_by_alias("cae-auth", "champion").run_id == run.info.run_id
        capsys.readouterr()
        main(["doctor", "--tracking-uri", url])
        row = next(line for line in capsys.readouterr().out.splitlines() if "tracking" in line)
        assert row.startswith("OK"), row
