"""``cae doctor``: is this environment ready to train, track, tune and serve?

Each check is one row, OK, WARN or FAIL, with what was found and, for WARN and FAIL, what to do:
Python and the versions of torch, MLflow and Optuna; the training device; the tracking store
(resolved as training resolves it; a server must also let in the login MLflow's client sends);
the study storage; the PostgreSQL driver where a ``postgresql://`` URL is configured; what a plain
``mlflow run .`` needs (pyenv and the MLproject's Python); SLURM.
Every network check is bounded by a timeout, and no check writes anything: a sqlite file or a
journal is only checked for a writable folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from cae.config import Settings
from cae.errors import ConfigError
from cae.tracking.callbacks import access_refused, redact, tracking_uri

Status = Literal["OK", "WARN", "FAIL"]

SERVER_HINT = (
    "start the team services (`docker compose -f docker/compose.yaml up -d`, README: Team scale)"
)
DRIVER_HINT = "install the PostgreSQL driver: pip install 'cae[postgres]' (psycopg 3)"
DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "oracle")


@dataclass(frozen=True)
class Check:
    """One row of the report: what was checked, its status, what was found and how to fix it."""

    name: str
    status: Status
    detail: str
    fix: str = ""


def diagnose(settings: Settings, timeout: float = 5.0) -> list[Check]:
    """Run every check against ``settings`` (tracking URI, study storage, training device).

    Args:
        settings: the settings training and tuning would use (flags, ``CAE_*``, ``--config``).
        timeout: seconds each network check may take (tracking server, database); ``sinfo`` gets
            at most 3.

    Returns:
        The checks in report order. None raises: a failure is a FAIL row.
    """
    uri = tracking_uri(settings.tracking.uri)
    if settings.tracking.uri:
        source = "--tracking-uri, CAE_TRACKING__URI or --config"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        source = "MLFLOW_TRACKING_URI"
    else:
        source = "the default"
    return [
        Check("python", "OK", f"{sys.version.split()[0]} ({sys.executable})"),
        *(_version(package) for package in ("torch", "mlflow", "optuna")),
        _postgres_driver([uri, settings.tune.storage]),
        _device(settings.train.device),
        _tracking_store(uri, source, timeout),
        _study_storage(settings.tune.storage, timeout),
        _mlflow_run_environment(min(timeout, 3.0)),
        _slurm(min(timeout, 3.0)),
    ]


def report(checks: list[Check]) -> str:
    """The checks as a table, each WARN and FAIL followed by what to do, and a summary line."""
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.status:<5} {check.name:<{width}}  {check.detail}")
        if check.fix and check.status != "OK":
            lines.append(f"{'':<5} {'':<{width}}  -> {check.fix}")
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "WARN" for c in checks)
    lines.append(f"{len(checks)} checks: {failed} FAIL, {warned} WARN")
    return "\n".join(lines)


def _version(package: str) -> Check:
    try:
        return Check(package, "OK", metadata.version(package))
    except metadata.PackageNotFoundError:
        return Check(package, "FAIL", "not installed", "pip install -e . (or `make install`)")


def _scheme(url: str) -> str:
    """``postgresql`` for ``postgresql+psycopg://...``; ``""`` for a plain path."""
    return urlsplit(url).scheme.split("+")[0].lower() if "://" in url else ""


def _postgres_driver(urls: list[str]) -> Check:
    needed = [redact(u) for u in urls if _scheme(u) in ("postgresql", "postgres")]
    for module in ("psycopg", "psycopg2"):
        try:
            return Check("postgres driver", "OK", f"{module} {metadata.version(module)}")
        except metadata.PackageNotFoundError:
            continue
    if needed:
        return Check(
            "postgres driver", "FAIL", f"neither psycopg nor psycopg2, for {needed[0]}", DRIVER_HINT
        )
    return Check("postgres driver", "OK", "not installed (no postgresql:// URL configured)")


def _device(name: str) -> Check:
    import torch

    from cae.train.trainer import resolve_device

    try:
        device = resolve_device(name)
    except (ConfigError, RuntimeError) as err:
        return Check(
            "device",
            "FAIL",
            str(err),
            "set train.device = 'cpu' (--device cpu), or install a CUDA build of torch",
        )
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            return Check(
                "device",
                "FAIL",
                f"train.device = {name!r} but only {torch.cuda.device_count()} CUDA device(s)",
                "choose an existing device, e.g. --device cuda:0",
            )
        return Check("device", "OK", f"{device} ({torch.cuda.get_device_name(index)})")
    cuda = "no CUDA device visible" if not torch.cuda.is_available() else "CUDA not asked for"
    return Check("device", "OK", f"{device} (train.device = {name!r}; {cuda})")


def _tracking_store(uri: str, source: str, timeout: float) -> Check:
    name = "tracking store"
    shown = f"{redact(uri)} (from {source})"
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        health = f"{uri.rstrip('/')}/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout) as answer:
                status = answer.status
        except urllib.error.HTTPError as err:
            return Check(
                name,
                "FAIL",
                f"{shown}: /health answered HTTP {err.code}",
                "a proxy or the server's --allowed-hosts refuses this host; check the server's "
                "log and its --allowed-hosts",
            )
        except (OSError, ValueError) as err:  # refused, unknown host, timed out
            reason = getattr(err, "reason", err)
            return Check(
                name,
                "FAIL",
                f"{shown}: cannot reach {redact(health)} within {timeout:g} s: {reason}",
                f"{SERVER_HINT}, or point MLFLOW_TRACKING_URI (or --tracking-uri) at a running "
                "tracking server",
            )
        refused = _login_refused(uri, timeout)
        if refused:
            what, fix = refused
            return Check(name, "FAIL", f"{shown}: answers, but {what}", fix)
        return Check(name, "OK", f"{shown}: /health answered {status}")
    if scheme == "sqlite":
        return _sqlite(name, uri, shown, "--tracking-uri or MLFLOW_TRACKING_URI")
    if scheme in DATABASE_SCHEMES:
        return _database(name, uri, shown, timeout)
    if scheme in ("", "file"):
        folder = Path(urlsplit(uri).path if scheme else uri)
        return _writable(name, folder, shown, "--tracking-uri or MLFLOW_TRACKING_URI")
    return Check(name, "WARN", f"{shown}: a {scheme}:// store is not checked here")


def _login_refused(uri: str, timeout: float) -> tuple[str, str] | None:
    """Ask the tracking server's API for one experiment with the credentials MLflow's client
    sends (``/health`` needs none, so it cannot tell): what a 401 or 403 means and what to do,
    or None when the server lets this client in (or fails otherwise: left to training)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        answer = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            max_retries=0,
            timeout=timeout,
            params={"max_results": 1},
        )
    except (OSError, MlflowException):  # the server went away since /health: not a login matter
        return None
    return access_refused(answer.status_code)


def _study_storage(storage: str, timeout: float) -> Check:
    name = "study storage"
    shown = f"{redact(storage)} (tune.storage)"
    scheme = _scheme(storage)
    if scheme == "sqlite":
        return _sqlite(name, storage, shown, "--storage or CAE_TUNE__STORAGE")
    if scheme:
        return _database(name, storage, shown, timeout)
    path = Path(storage)
    if path.exists() and not path.is_file():
        return Check(name, "FAIL", f"{shown}: exists but is not a file", "choose another --storage")
    setting = "--storage or CAE_TUNE__STORAGE"
    return _writable(name, path.parent, f"{shown}: journal file", setting, created=True)


def _sqlite(name: str, uri: str, shown: str, setting: str) -> Check:
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    if path in ("", ":memory:"):
        return Check(name, "OK", f"{shown}: in memory")
    return _writable(name, Path(path).parent, shown, setting)


def _writable(name: str, folder: Path, shown: str, setting: str, created: bool = False) -> Check:
    """OK if ``folder`` is a writable folder; with ``created`` (the journal's folder is made
    when the study is), the nearest folder above it that exists must be."""
    folder = folder.resolve()
    existing = folder
    while created and not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.exists():
        return Check(
            name, "FAIL", f"{shown}: folder {folder} does not exist", f"create it or fix {setting}"
        )
    if not existing.is_dir():
        return Check(name, "FAIL", f"{shown}: {existing} is not a folder", f"fix {setting}")
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check(
            name,
            "FAIL",
            f"{shown}: folder {existing} is not writable",
            f"make it writable or point {setting} elsewhere",
        )
    where = "folder writable" if existing == folder else f"{folder} will be created"
    return Check(name, "OK", f"{shown}: {where}")


def _database(name: str, url: str, shown: str, timeout: float) -> Check:
    """Connect once with SQLAlchemy (``SELECT 1``), bounded by ``timeout``; creates nothing."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    scheme = _scheme(url)
    connect_args = {"connect_timeout": max(1, round(timeout))} if scheme != "mssql" else {}
    try:
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    except (ImportError, NoSuchModuleError) as err:
        fix = DRIVER_HINT if scheme in ("postgresql", "postgres") else f"install a {scheme} driver"
        return Check(name, "FAIL", f"{shown}: no driver ({err})", fix)
    except ArgumentError as err:
        return Check(name, "FAIL", f"{shown}: not a database URL ({err})", "fix the URL")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        return Check(
            name,
            "FAIL",
            f"{shown}: cannot connect: {reason}",
            f"{SERVER_HINT}, or check host, port, user, password and that the database exists "
            "(createdb NAME)",
        )
    finally:
        engine.dispose()
    return Check(name, "OK", f"{shown}: connected")


def _project_python() -> tuple[Path, str] | None:
    """The MLproject's environment file (``mlproject/python_env.yaml`` of the project in the
    working directory, else of the checkout cae runs from) and the Python version it names."""
    import yaml  # type: ignore[import-untyped]  # PyYAML, an MLflow dependency; no stubs here

    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "mlproject" / "python_env.yaml"
        if (root / "MLproject").is_file() and path.is_file():
            try:
                return path, str(yaml.safe_load(path.read_text())["python"])
            except (OSError, yaml.YAMLError, KeyError, TypeError):
                return None
    return None


def _mlflow_run_environment(timeout: float) -> Check:
    """What a plain ``mlflow run .`` needs: MLflow's virtualenv environment manager (the default
    for a ``python_env`` project) always runs ``pyenv install --skip-existing <python>`` and then
    that Python's own ``venv``, so pyenv must be on PATH, and without the version installed the
    first run builds Python from source."""
    name = "mlflow run env"
    local = "or skip MLflow's environment: `mlflow run . --env-manager local` in this one"
    found = _project_python()
    if found is None:
        return Check(name, "OK", "no MLproject here or in cae's checkout: nothing to check")
    path, python = found
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return Check(
            name,
            "WARN",
            f"pyenv not on PATH: a plain `mlflow run .` builds Python {python} ({path}) with it",
            f"install pyenv (https://github.com/pyenv/pyenv#installation), {local}",
        )
    try:
        done = subprocess.run(
            [pyenv, "versions", "--bare"], capture_output=True, text=True, timeout=timeout
        )
        versions = done.stdout.split()
    except (OSError, subprocess.TimeoutExpired) as err:
        return Check(name, "WARN", f"{pyenv} versions failed: {err}", f"check pyenv, {local}")
    if python not in versions:
        return Check(
            name,
            "WARN",
            f"pyenv has no Python {python} ({path}): the first `mlflow run .` compiles it "
            "(minutes; needs the network and a C compiler)",
            f"run `pyenv install {python}` once, {local}",
        )
    return Check(name, "OK", f"pyenv ({pyenv}) has Python {python}, as {path} asks")


def _slurm(timeout: float) -> Check:
    missing = [b for b in ("sbatch", "sinfo") if shutil.which(b) is None]
    hint = (
        "SLURM is needed only for `cae tune submit` and `cae submit`: run those on a login node; "
        "`cae tune worker` runs anywhere"
    )
    if missing:
        return Check("slurm", "WARN", f"{' and '.join(missing)} not on PATH", hint)
    try:
        done = subprocess.run(
            ["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        late = f"sinfo did not answer within {timeout:g} s"
        return Check("slurm", "WARN", late, f"is slurmctld up? {hint}")
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no message"]
        return Check("slurm", "WARN", f"sinfo failed: {reason[0]}", f"is slurmctld up? {hint}")
    partitions = ", ".join(done.stdout.split()) or "none"
    return Check("slurm", "OK", f"sinfo answers; partitions: {partitions}")
