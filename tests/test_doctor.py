"""`cae doctor`: one OK/WARN/FAIL row per check, what to do for each problem, exit status 1 on any
FAIL. Real stores only: a sqlite folder, a closed loopback port (refused at once, and every network
check is bounded by --timeout anyway)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cae.cli import main
from tests.servers import free_port

pytestmark = pytest.mark.usefixtures("isolated")
REPO = Path(__file__).resolve().parents[1]


def row(out: str, name: str) -> tuple[str, str]:
    """(status, detail) of the row named ``name``."""
    found = re.search(rf"^(OK|WARN|FAIL) +{name}  +(.*)$", out, re.M)
    assert found, f"no row {name!r} in:\n{out}"
    return found.group(1), found.group(2)


def test_a_good_sqlite_setup_passes(tmp_path: Path, capsys):
    config = tmp_path / "team.toml"
    config.write_text(
        f'[tracking]\nuri = "sqlite:///{tmp_path / "mlflow.db"}"\n'
        f'[tune]\nstorage = "{tmp_path / "tune" / "journal.log"}"\n'
    )
    assert main(["doctor", "--config", str(config), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "mlflow", "optuna", "device", "tracking store"):
        assert row(out, name)[0] == "OK", name
    assert row(out, "study storage") == (
        "OK",
        f"{tmp_path / 'tune' / 'journal.log'} (tune.storage): journal file: "
        f"{tmp_path / 'tune'} will be created",
    )
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in row(out, "tracking store")[1]
    assert row(out, "slurm")[0] in ("OK", "WARN")  # optional: never a failure
    assert row(out, "mlflow run env")[0] in ("OK", "WARN")  # `--env-manager local` needs none
    assert re.search(r"^\d+ checks: 0 FAIL, [012] WARN$", out, re.M)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "tune").exists(), "no writes"


def test_an_unreachable_tracking_server_fails_with_what_to_do(monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # resolved as training resolves it
    assert main(["doctor", "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    status, detail = row(out, "tracking store")
    assert status == "FAIL"
    assert detail.startswith(f"{url} (from MLFLOW_TRACKING_URI): cannot reach {url}/health")
    assert re.search(r"^FAIL +tracking store .*\n +-> start the team services", out, re.M)
    assert re.search(r"^\d+ checks: 1 FAIL", out, re.M)


def test_an_unreachable_postgres_storage_fails_in_doctor_and_in_tune_create(tmp_path, capsys):
    storage = f"postgresql://cae:secret@127.0.0.1:{free_port()}/optuna"
    assert main(["doctor", "--storage", storage, "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    status, detail = row(out, "study storage")
    assert status == "FAIL" and "cannot connect" in detail
    assert "secret" not in out and "cae:***@" in detail  # passwords are never printed

    assert main(["tune", "create", "--storage", storage, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "secret" not in err
    assert err.startswith("cae tune: error: tune.storage postgresql://cae:***@127.0.0.1:")
    assert "cannot be opened" in err and "cae doctor" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_asking_for_cuda_without_one_fails(capsys):
    assert main(["doctor", "--device", "cuda", "--timeout", "2"]) == 1
    status, detail = row(capsys.readouterr().out, "device")
    assert status == "FAIL" and "no CUDA device is available" in detail


PYENV = shutil.which("pyenv")
PYTHON = yaml.safe_load((REPO / "mlproject" / "python_env.yaml").read_text())["python"]


def test_mlflow_run_environment_without_pyenv_warns_with_what_to_do(monkeypatch, capsys):
    """A plain `mlflow run .` (MLflow's virtualenv manager) runs `pyenv install`: no pyenv on
    PATH is a WARN naming the MLproject's Python and the way around it."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python and cae, no pyenv
    assert main(["doctor", "--device", "cpu", "--timeout", "2"]) in (0, 1)
    out = capsys.readouterr().out
    status, detail = row(out, "mlflow run env")
    assert (
        status == "WARN" and f"builds Python {PYTHON}" in detail and "pyenv not on PATH" in detail
    )
    assert re.search(
        r"^WARN +mlflow run env .*\n +-> install pyenv .*--env-manager local", out, re.M
    )


@pytest.mark.skipif(PYENV is None, reason="pyenv is not on PATH")
def test_mlflow_run_environment_with_pyenv(tmp_path, monkeypatch, capsys):
    """With the real pyenv: OK when it has the MLproject's Python; WARN, saying the first run
    compiles it, when it does not (an empty PYENV_ROOT)."""
    versions = subprocess.run([PYENV, "versions", "--bare"], capture_output=True, text=True)
    if PYTHON in versions.stdout.split():
        main(["doctor", "--device", "cpu", "--timeout", "2"])
        assert row(capsys.readouterr().out, "mlflow run env")[0] == "OK"
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "empty-pyenv"))
    main(["doctor", "--device", "cpu", "--timeout", "2"])
    status, detail = row(capsys.readouterr().out, "mlflow run env")
    assert status == "WARN" and f"pyenv has no Python {PYTHON}" in detail
