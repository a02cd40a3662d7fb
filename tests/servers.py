"""Real servers for tests: free loopback ports, waiting until up, stopping by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
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


def mlflow_server(folder: Path, port: int) -> tuple[list[str], dict[str, str], str]:
    """The command, environment and health URL of a real ``mlflow server`` on 127.0.0.1:``port``
    whose sqlite store and artifacts live in ``folder`` (a restart on the same folder and port
    finds the same runs)."""
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination", str(folder / "server-artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return command, env, f"http://127.0.0.1:{port}/health"
