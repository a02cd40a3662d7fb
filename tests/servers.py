"""Real servers for tests: free loopback ports, waiting until up, stopping by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
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
) -> Iterator[None]:
    """Start ``command`` in its own session, wait until ``ready_url`` answers 200 (failing the test
    with the server's log if it exits or ``timeout`` seconds pass), and always stop it."""
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
            yield
        finally:
            stop(server)
