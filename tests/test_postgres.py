"""Team scale on real components: PostgreSQL from Debian's packages (`.ci/run` installs it), an
MLflow tracking server on it, and Optuna studies in another database of the same PostgreSQL, run
by concurrent `cae tune worker` processes. Everything listens on 127.0.0.1 only and is stopped by
its pid; the tests skip, saying why, only where PostgreSQL cannot start."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback

from cae.cli import main
from cae.config import TuneConfig
from cae.tune.study import RUN_ATTR, TASK_ATTR, load
from tests.servers import Postgres, mlflow_server
from tests.test_tune import worker, worker_env, write_config

WORKERS = 3
TRIALS_PER_WORKER = 2
COMPLETE = optuna.trial.TrialState.COMPLETE


@pytest.fixture(scope="module")
def tracking_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with its backend store in PostgreSQL (database ``mlflow``) and artifacts
    served from a temporary folder."""
    backend = postgres.create_database("mlflow")
    with mlflow_server(backend, tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(scope="module")
def optuna_storage(postgres: Postgres) -> str:
    """The studies' RDB storage: database ``optuna`` of the same PostgreSQL."""
    return postgres.create_database("optuna")


def test_concurrent_workers_on_postgres_lose_no_trial_and_log_every_run(
    small_data: Path, tmp_path: Path, tracking_server: str, optuna_storage: str
):
    config = write_config(tmp_path, small_data, "sweep", TRIALS_PER_WORKER, epochs=1,
                          tracking_uri=tracking_server, storage=optuna_storage,
                          tune_extra='pruner = "none"')  # fmt: skip
    assert main(["tune", "create", "--config", str(config)]) == 0
    workers = [
        subprocess.Popen(
            worker(tmp_path, "sweep", storage=optuna_storage),
            env=worker_env(tmp_path, "51", str(task), tracking_uri=tracking_server),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for task in range(WORKERS)
    ]
    for process in workers:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]

    study = load(TuneConfig(study="sweep", storage=optuna_storage))
    trials = study.get_trials()
    total = WORKERS * TRIALS_PER_WORKER
    assert [t.number for t in trials] == list(range(total)), "none lost, none duplicated"
    assert [t.state for t in trials] == [COMPLETE] * total
    tasks = sorted(t.user_attrs[TASK_ATTR] for t in trials)
    assert tasks == sorted(f"51_{n}" for n in range(WORKERS) for _ in range(TRIALS_PER_WORKER))

    client = MlflowClient(tracking_server)
    experiment = client.get_experiment_by_name("Default")
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = client.search_runs(  # trials are nested in the study's experiment
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs[RUN_ATTR] for t in trials)
    for trial in trials:
        run = client.get_run(trial.user_attrs[RUN_ATTR])
        assert run.info.status == "FINISHED"
        assert run.data.tags["cae.trial"] == str(trial.number)
        assert run.data.tags["cae.study"] == "sweep"
        assert run.data.params["model.latent_dim"] == str(trial.params["latent_dim"])
        history = client.get_metric_history(run.info.run_id, "val/reconstruction")
        assert [m.step for m in history] == [1]
        assert history[0].value == pytest.approx(trial.value)
        checkpoints = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert checkpoints == {"checkpoints/last.pt", "checkpoints/best.pt"}  # through the server


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_dead_worker_s_trial_is_retried_by_heartbeat(
    small_data: Path, tmp_path: Path, tracking_server: str, optuna_storage: str
):
    """A worker killed mid-trial (a lost node: no requeue) stops its heartbeat; the next worker
    fails that trial, runs its parameters again and ends the dead attempt's MLflow run."""
    grace = 2
    config = write_config(tmp_path, small_data, "heartbeat", n_trials=1, epochs=5,
                          tracking_uri=tracking_server, storage=optuna_storage,
                          tune_extra=f'pruner = "none"\nheartbeat_interval = 1\n'
                                     f"grace_period = {grace}")  # fmt: skip
    assert main(["tune", "create", "--config", str(config)]) == 0
    study = load(TuneConfig(study="heartbeat", storage=optuna_storage))
    first = subprocess.Popen(
        worker(tmp_path, "heartbeat", storage=optuna_storage),
        env=worker_env(tmp_path, "61", "0", tracking_uri=tracking_server),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # until the trial's MLflow run has started: its heartbeat is being recorded
            running_trials = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            if running_trials and RUN_ATTR in running_trials[0].user_attrs:
                break
            assert time.monotonic() < deadline and first.poll() is None, "no trial started"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    [dead] = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    time.sleep(grace + 1)  # no heartbeat for longer than the grace period: the trial is stale

    second = subprocess.run(
        worker(tmp_path, "heartbeat", storage=optuna_storage),
        env=worker_env(tmp_path, "61", "1", tracking_uri=tracking_server),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, COMPLETE]
    retry = trials[1]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == dead.number
    assert retry.params == dead.params
    assert retry.user_attrs[TASK_ATTR] == "61_1"
    client = MlflowClient(tracking_server)
    assert client.get_run(dead.user_attrs[RUN_ATTR]).info.status == "KILLED"
    assert retry.user_attrs[RUN_ATTR] != dead.user_attrs[RUN_ATTR]
    assert client.get_run(retry.user_attrs[RUN_ATTR]).info.status == "FINISHED"


def test_doctor_reaches_the_server_and_the_database(tracking_server, optuna_storage, capsys):
    argv = ["doctor", "--tracking-uri", tracking_server, "--storage", optuna_storage]
    status = main([*argv, "--timeout", "10"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"^OK +tracking store +http://127\.0\.0\.1:\d+ .*: /health answered 200$",
                     out, re.M)  # fmt: skip
    assert re.search(r"^OK +study storage +postgresql://.*: connected$", out, re.M)
