"""Real servers for tests: free loopback ports, waiting until up, stopping by pid; a throwaway
PostgreSQL cluster."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True``: its whole process group, by pid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=15)


@contextlib.contextmanager
def running(
    command: Sequence[str], env: dict[str, str], ready_url: str, log: Path, timeout: float = 120
) -> Iterator[subprocess.Popen]:
    """Start ``command`` in its own session, wait until ``ready_url`` answers 200 (failing the test
    with the server's log if it exits or ``timeout`` seconds pass), yield its process, and always
    stop it."""
    with log.open("w") as output:
        server = subprocess.Popen(
            list(command), env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(ready_url, timeout=2) as answer,
                ):
                    if answer.status == 200:
                        break
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{command[0]} did not start: {log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield server
        finally:
            stop(server)


@dataclass
class BasicAuth:
    """MLflow's basic-auth app as a server runs it: its configuration file (``database_uri``
    names the users' store) and the password it gives its admin user on first start."""

    config: Path
    admin_password: str

    def environment(self) -> dict[str, str]:
        """The variables ``mlflow server --app-name basic-auth`` reads: the configuration, the
        admin's password and a fresh secret for its CSRF tokens."""
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(self.config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }


def mlflow_server_command(
    backend_store_uri: str, folder: Path, port: int, basic_auth: BasicAuth | None = None
) -> tuple[list[str], dict[str, str], str]:
    """The command, environment and health URL of a real ``mlflow server`` on 127.0.0.1:``port``
    over ``backend_store_uri``, serving artifacts from ``folder``/server-artifacts (a restart on
    the same store, folder and port finds the same runs). With ``basic_auth`` it runs MLflow's
    basic-auth app: every request but ``/health`` needs a login."""
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(folder / "server-artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if basic_auth is not None:
        command += ["--app-name", "basic-auth"]
        env.update(basic_auth.environment())
    return command, env, f"http://127.0.0.1:{port}/health"


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str, folder: Path, basic_auth: BasicAuth | None = None
) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 and a free port over ``backend_store_uri``, serving
    artifacts from ``folder``/server-artifacts (log: ``folder``/server.log), with a login when
    ``basic_auth`` is given; yields its URL and stops it by its pid."""
    command, env, health = mlflow_server_command(backend_store_uri, folder, free_port(), basic_auth)
    with running(command, env, health, folder / "server.log"):
        yield health.removesuffix("/health")


# --- PostgreSQL from Debian's packages, started by hand ----------------------------------------


class PostgresUnavailableError(Exception):
    """PostgreSQL cannot be started here; the message says why (the tests skip with it)."""


@dataclass
class Postgres:
    """A PostgreSQL server on 127.0.0.1 with one trusted superuser; stop it with :meth:`stop`."""

    process: subprocess.Popen
    port: int
    user: str
    folder: Path

    def url(self, database: str) -> str:
        """``postgresql://user@127.0.0.1:port/database`` (SQLAlchemy takes psycopg 3 for it)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create the database ``name``; returns its URL."""
        import psycopg

        with psycopg.connect(self._dsn("postgres"), autocommit=True, connect_timeout=10) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster, by pid: clients are disconnected), then
        remove the data folder."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop(self.process)
        shutil.rmtree(self.folder, ignore_errors=True)


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))  # Debian's layout
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path is None:
        raise PostgresUnavailableError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres, no postgres on "
            "PATH); .ci/run installs it with apt-get install postgresql"
        )
    return Path(on_path).resolve().parent


def start_postgres(timeout: float = 60) -> Postgres:
    """initdb a fresh cluster in a temporary folder and start it on 127.0.0.1 and a free port.

    PostgreSQL refuses to run as root: as root it runs as the ``postgres`` user that Debian's
    package creates; otherwise as the current user. Trust authentication, loopback only, no
    fsync (a throwaway cluster).

    Raises:
        PostgresUnavailableError: binaries or the ``postgres`` user are missing, or initdb or the
            server failed or did not answer within ``timeout`` seconds (the log is included).
    """
    import psycopg

    bin_dir = _postgres_bin()
    as_user: dict[str, object] = {}
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailableError(
                "running as root and there is no 'postgres' user to run PostgreSQL as"
            ) from None
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    folder = Path(tempfile.mkdtemp(prefix="cae-postgres-"))  # not under pytest's root-only tmp
    if as_user:
        os.chown(folder, as_user["user"], as_user["group"])  # type: ignore[arg-type]
    user, data, log = "cae", folder / "data", folder / "postgres.log"
    try:
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "--no-sync",
             "-E", "UTF8"],
            capture_output=True, text=True, timeout=timeout, **as_user,  # type: ignore[arg-type]
        )  # fmt: skip
        failure = None if initdb.returncode == 0 else (initdb.stderr or initdb.stdout)[-1500:]
    except (OSError, subprocess.SubprocessError) as err:  # not executable, timed out
        failure = str(err)
    if failure is not None:
        shutil.rmtree(folder, ignore_errors=True)
        raise PostgresUnavailableError(f"initdb failed: {failure}")
    port = free_port()
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={folder}",
             "-c", "fsync=off", "-c", "max_connections=100"],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            **as_user,  # type: ignore[arg-type]
        )  # fmt: skip
    server = Postgres(process, port, user, folder)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(server._dsn("postgres"), connect_timeout=2):
                return server
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text()[-1500:]
                server.stop()
                raise PostgresUnavailableError(f"PostgreSQL did not start: {text}") from None
            time.sleep(0.2)
