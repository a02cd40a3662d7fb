"""Optuna studies: concurrent workers, a killed and requeued worker, and a real SLURM array.

The SLURM test starts a one-node cluster from Debian's packages (munged, slurmctld, slurmd) in a
temporary folder, as `.ci/run` installs them; where they are missing or cannot start, it skips.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from cae.cli import main
from cae.config import TuneConfig, load_settings
from cae.tune.study import PARENT_RUN_ATTR, TASK_ATTR, load, trial_settings
from tests.servers import stop

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def write_config(
    folder: Path,
    data: Path,
    study: str,
    n_trials: int,
    epochs: int = 3,
    tracking_uri: str | None = None,
    storage: str | None = None,
    tune_extra: str = "",
) -> Path:
    """A study's TOML: tiny trials on ``data``; tracking in ``folder``/mlflow.db and the study in
    ``folder``/journal.log unless ``tracking_uri`` or ``storage`` say otherwise; ``tune_extra``
    holds more lines of the ``[tune]`` table."""
    tracking_uri = tracking_uri or f"sqlite:///{folder / 'mlflow.db'}"
    storage = storage or str(folder / "journal.log")
    config = folder / "tune.toml"
    config.write_text(
        f"""
[data]
path = "{data}"
num_workers = 0
[model]
classifier_hidden = 16
[train]
epochs = {epochs}
batch_size = 64
progress = false
[tracking]
uri = "{tracking_uri}"
[tune]
study = "{study}"
storage = "{storage}"
n_trials = {n_trials}
out_dir = "{folder / "trials"}"
{tune_extra}
[tune.space.latent_dim]
low = 4
high = 16
[tune.slurm]
venv = "{VENV_BIN.parent}"
output = "{folder / "slurm-logs"}"
mem = "300M"
time = "00:10:00"
cpus = 1
"""
    )
    return config


def worker_env(
    folder: Path, job: str, task: str, restarts: int = 0, tracking_uri: str | None = None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAE_", "MLFLOW_", "SLURM_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        MLFLOW_TRACKING_URI=tracking_uri or f"sqlite:///{folder / 'mlflow.db'}",
        SLURM_JOB_ID=job,
        SLURM_ARRAY_TASK_ID=task,
        SLURM_RESTART_COUNT=str(restarts),
    )
    return env


def worker(folder: Path, study: str, storage: str | None = None) -> list[str]:
    return [str(VENV_BIN / "cae"), "-q", "tune", "worker", "--study", study,
            "--storage", storage or str(folder / "journal.log"), "--no-progress"]  # fmt: skip


def study_trials(folder: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    return load(TuneConfig(study=study, storage=str(folder / "journal.log"))).get_trials()


def assert_every_trial_has_a_nested_run(folder: Path, trials, study: str) -> None:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    parent = load(TuneConfig(study=study, storage=str(folder / "journal.log"))).user_attrs[
        "mlflow_parent_run_id"
    ]
    parent_run = client.get_run(parent)
    assert parent_run.data.params["tune.study"] == study, "the study's settings, named as set"
    experiment = parent_run.info.experiment_id
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.info.experiment_id == experiment, "nested in the study's experiment"
        assert run.data.tags["cae.trial"] == str(trial.number)
        assert run.data.tags["cae.study"] == study
        expected = "FINISHED" if trial.state == optuna.trial.TrialState.COMPLETE else "KILLED"
        assert run.info.status == expected, (trial.number, trial.state)


def test_concurrent_workers_on_a_new_study_and_store(small_data: Path, tmp_path: Path):
    config = write_config(tmp_path, small_data, "concurrent", n_trials=2, epochs=2)
    assert main(["tune", "create", "--config", str(config)]) == 0
    workers = [
        subprocess.Popen(
            worker(tmp_path, "concurrent"),
            env=worker_env(tmp_path, "11", str(task)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for task in range(3)
    ]
    for process in workers:
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, output[-2000:]
    trials = study_trials(tmp_path, "concurrent")
    assert len(trials) == 6 and all(t.state in DONE for t in trials)
    assert (
        sorted(t.user_attrs[TASK_ATTR] for t in trials)
        == ["11_0"] * 2 + ["11_1"] * 2 + ["11_2"] * 2
    )
    assert_every_trial_has_a_nested_run(tmp_path, trials, "concurrent")

    assert main(["tune", "best", "--config", str(config)]) == 0
    parent = load(TuneConfig(study="concurrent", storage=str(tmp_path / "journal.log")))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    plots = {
        a.path for a in client.list_artifacts(parent.user_attrs["mlflow_parent_run_id"], "optuna")
    }
    assert plots == {
        "optuna/optimization_history.png",
        "optuna/param_importances.png",
        "optuna/contour_latent_dim_logit_scale.png",
    }


def test_multi_objective_study_returns_the_pareto_front(small_data, tmp_path, monkeypatch, capsys):
    from cae.tune.study import work

    config = write_config(tmp_path, small_data, "pareto", n_trials=2, epochs=1)
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "create", "--config", str(config)]) == 0  # single objective...
    text = config.read_text().replace("[tune]", "[tune]\nmulti_objective = true")
    config.write_text(text.replace('study = "pareto"', 'study = "pareto2"'))
    assert main(["tune", "create", "--config", str(config)]) == 0  # ...and a two-objective one
    assert work(TuneConfig(study="pareto2", storage=str(tmp_path / "journal.log"))) == 2
    trials = study_trials(tmp_path, "pareto2")
    assert all(len(t.values) == 2 for t in trials)  # reconstruction, target accuracy
    assert all(0.0 <= t.values[1] <= 1.0 for t in trials)
    capsys.readouterr()
    assert main(["tune", "best", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("trial ")


def test_rendered_scripts_have_named_settings_and_no_edit_me(small_data, tmp_path, capsys):
    config = write_config(tmp_path, small_data, "render", n_trials=3)
    argv = ["tune", "submit", "--config", str(config), "--dry-run"]
    assert main(argv) == 0
    script = capsys.readouterr().out
    assert "EDIT_ME" not in script and "${" not in script.split("\ncd ")[0]
    assert "#SBATCH --requeue" in script and "#SBATCH --mem=300M" in script
    assert "#SBATCH --signal=B:USR1@120" in script and 'if [ "$status" = 75 ]' in script
    assert "#SBATCH --time=00:10:00" in script and f"{tmp_path / 'slurm-logs'}/" in script
    assert f"--storage {tmp_path / 'journal.log'} --n-trials 3" in script
    assert f"source {VENV_BIN.parent}/bin/activate" in script
    assert main(["submit", "--config", str(config), "--dry-run", "--", "--epochs", "5"]) == 0
    script = capsys.readouterr().out
    assert "cae train --epochs 5 --no-progress &" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script


@pytest.mark.parametrize(
    ("stop", "exit_code"), [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGUSR1, 75)]
)
def test_a_killed_worker_loses_and_duplicates_no_trial(small_data, tmp_path, stop, exit_code):
    """SIGKILL (a node lost) or SIGUSR1 (SLURM's warning: checkpoint, exit 75, requeue)."""
    config = write_config(tmp_path, small_data, "killed", n_trials=3, epochs=20)
    assert main(["tune", "create", "--config", str(config), "--pruner", "none"]) == 0
    first = subprocess.Popen(
        worker(tmp_path, "killed"),
        env=worker_env(tmp_path, "21", "0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until the second trial has trained an epoch (19 to go), then stop it
            trials = study_trials(tmp_path, "killed") if (tmp_path / "journal.log").exists() else []
            running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            trial = tmp_path / "trials" / "killed" / f"trial_{running[0] if running else 0:04d}"
            if running and running[0] >= 1 and (trial / "checkpoints" / "last.pt").exists():
                break
            assert time.monotonic() < deadline and first.poll() is None, "no trial started"
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, stop)
        assert first.wait(timeout=60) == exit_code
    interrupted = [t for t in study_trials(tmp_path, "killed") if t.state.name == "RUNNING"]
    assert len(interrupted) == 1

    requeued = subprocess.run(  # SLURM requeues the task: same ids, SLURM_RESTART_COUNT=1
        worker(tmp_path, "killed"),
        env=worker_env(tmp_path, "21", "0", restarts=1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    trials = study_trials(tmp_path, "killed")
    done = [t for t in trials if t.state in DONE]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(done) == 3, "exactly the task's n_trials finished: none lost, none extra"
    assert [t.number for t in failed] == [interrupted[0].number]
    retries = [t for t in done if t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(retries) == 1 and retries[0].params == interrupted[0].params
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


# --- a real one-node SLURM cluster -------------------------------------------------------------

SLURM_BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "sinfo"]


def _wait_for(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """munged + slurmctld + slurmd on this machine, configured in a temporary folder."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing); .ci/run installs "
                    "slurmctld slurmd slurm-client munge from Debian's packages")  # fmt: skip
    if os.geteuid() != 0:
        pytest.skip("starting a SLURM cluster needs root (munged and slurmd run as root here)")
    root = tmp_path_factory.mktemp("slurm")
    node = socket.gethostname().split(".")[0]
    for folder in ("state", "spool", "log", "munge"):
        (root / folder).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=caetest
SlurmctldHost={node}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={root / "munge" / "munge.socket"}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
SlurmctldPort=16817
SlurmdPort=16818
NodeName={node} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    socket_path = root / "munge" / "munge.socket"
    daemons = []
    try:
        daemons.append(subprocess.Popen(
            ["munged", "-F", "--force", f"--key-file={key}", f"--socket={socket_path}",
             f"--pid-file={root / 'munge' / 'munged.pid'}",
             f"--log-file={root / 'log' / 'munged.log'}", f"--seed-file={root / 'munge' / 'seed'}"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        _wait_for(socket_path.exists, 20, "munged did not start")
        for daemon in (["slurmctld", "-D", "-c", "-i"], ["slurmd", "-D"]):
            daemons.append(subprocess.Popen(
                daemon, env=env, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip

        def idle() -> bool:
            done = subprocess.run(["timeout", "3", "sinfo", "-h", "-o", "%t"], env=env,
                                  capture_output=True, text=True)  # fmt: skip
            return done.stdout.strip() in ("idle", "mix")

        try:
            _wait_for(idle, 60, "the SLURM node did not become idle")
        except TimeoutError as err:
            logs = "".join(p.read_text()[-1500:] for p in (root / "log").glob("*.log"))
            pytest.skip(f"SLURM could not start here ({err}): {logs}")
        yield {"SLURM_CONF": str(conf)}
    finally:
        for daemon in reversed(daemons):
            stop(daemon)


def test_tune_submit_runs_a_slurm_array(slurm, small_data: Path, tmp_path: Path, capsys):
    config = write_config(tmp_path, small_data, "array", n_trials=2, epochs=2)
    old = {k: os.environ.get(k) for k in ("SLURM_CONF", "MLFLOW_TRACKING_URI")}
    os.environ.update(slurm)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert main(["tune", "create", "--config", str(config)]) == 0
        argv = ["tune", "submit", "--config", str(config), "--array", "0-1", "--wait"]
        assert main(argv) == 0, capsys.readouterr().err
        job = capsys.readouterr().out.strip().splitlines()[-1]
        assert job.isdigit()
        trials = study_trials(tmp_path, "array")
        logs = "".join(p.read_text() for p in (tmp_path / "slurm-logs").glob("*.out"))
        assert len(trials) == 4 and all(t.state in DONE for t in trials), logs[-3000:]
        assert (
            sorted(t.user_attrs[TASK_ATTR] for t in trials) == [f"{job}_0"] * 2 + [f"{job}_1"] * 2
        )
        assert_every_trial_has_a_nested_run(tmp_path, trials, "array")
        assert main(["tune", "best", "--config", str(config)]) == 0
        assert "MLflow run" in capsys.readouterr().out
    finally:
        os.chdir(cwd)
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_trials_choose_among_listed_settings_and_keep_the_rest(tmp_path: Path) -> None:
    config = tmp_path / "tune.toml"
    config.write_text(
        "[train.weights]\nparsimony = 0.3\n"
        '[tune.space.choices]\n"model.nonnegative" = ["base"]\n'
        '"train.weights.context_means" = [10]\n'
    )
    base = load_settings(config)
    study = optuna.create_study()
    study.set_user_attr(PARENT_RUN_ATTR, "parent")
    settings = trial_settings(base, study.ask())
    assert settings.model.nonnegative == "base"
    assert settings.train.weights.context_means == 10
    assert settings.train.weights.parsimony == 0.3  # a sibling of a chosen setting survives
    assert study.trials[0].params["model.nonnegative"] == "base"


def test_best_prints_chosen_settings_of_any_type(small_data, tmp_path, monkeypatch, capsys):
    from cae.tune.study import work

    choices = (
        '[tune.space.choices]\n"model.nonnegative" = ["base"]\n"model.context_offsets" = [true]'
    )
    config = write_config(tmp_path, small_data, "chosen", n_trials=1, epochs=1, tune_extra=choices)
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "create", "--config", str(config)]) == 0
    assert work(TuneConfig(study="chosen", storage=str(tmp_path / "journal.log"))) == 1
    capsys.readouterr()
    assert main(["tune", "best", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "model.nonnegative=base" in out and "model.context_offsets=True" in out
    assert main(["tune", "best", "--config", str(config), "--register", "a:b"]) == 2
    assert "registered model name 'a:b' is refused" in capsys.readouterr().err


def test_best_with_the_shipped_config_prints_and_registers(
    tiny, isolated, tmp_path, monkeypatch, capsys
):
    """`cae tune create/worker/best --register` as the README and experiments/tune.toml give them:
    the shipped file (its [tune.space.choices] included) unchanged, on tiny data at data/demo."""
    shutil.copytree(tiny, tmp_path / "data" / "demo")
    shipped = str(REPO / "experiments" / "tune.toml")
    quick = {"TRAIN__EPOCHS": "1", "TUNE__N_TRIALS": "1", "DATA__NUM_WORKERS": "0"}
    for name, value in quick.items():
        monkeypatch.setenv(f"CAE_{name}", value)
    assert main(["tune", "create", "--config", shipped]) == 0
    assert main(["tune", "worker", "--study", "demo", "--no-progress"]) == 0
    trials = load(TuneConfig(study="demo", storage="tune/journal.log")).get_trials()
    assert len(trials) == 1 and trials[0].state == optuna.trial.TrialState.COMPLETE
    assert trials[0].params["model.nonnegative"] in {"all", "base"}
    capsys.readouterr()
    assert main(["tune", "best", "--config", shipped, "--register", "cae-tuned"]) == 0
    out = capsys.readouterr().out
    assert "model.nonnegative=" in out and "latent_dim=" in out
    assert "registered cae-tuned version 1 as @champion" in out
    best = MlflowClient("sqlite:///mlflow.db").get_model_version_by_alias("cae-tuned", "champion")
    assert best.run_id in out
