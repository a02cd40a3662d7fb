"""Tracking that survives an unreachable MLflow store: what did not reach it is kept and sent later.

Everything a training sends to its MLflow run (params, tags, per-epoch metrics, artifacts, the
contribution table, the final status) is a small JSON-able *record*, applied by :func:`apply`.
An :class:`Outbox` sends records in order; when the store fails (a tracking server that died, a
network outage) it keeps the records that did not arrive in ``<out>/tracking/pending-<run>.json``
and tries again later, with a growing delay. Artifacts are referred to by their path inside the
training's output folder, which holds them anyway, so nothing is lost. ``cae runs sync`` sends what
is still pending once the store answers again (:func:`sync`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from mlflow.exceptions import MlflowException

from cae.data.atomic import atomic_write
from cae.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PENDING_DIR = "tracking"
MAX_RETRY_SECONDS = 600.0
# What the MLflow client raises when its store does not answer (after its own HTTP retries).
TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError)
# While the store is known to be down, one quick attempt replaces MLflow's retry ladder (with its
# defaults, 7 retries with exponential backoff: minutes per request), so training never waits long.
_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

Record = dict[str, Any]


@contextmanager
def one_quick_attempt() -> Iterator[None]:
    """Within this block, MLflow's HTTP requests make one attempt with a timeout of at most 10 s.

    MLflow reads these settings from the environment at every request, so the block sets them
    there and restores the previous values afterwards.
    """
    saved = {name: os.environ.get(name) for name in _QUICK}
    timeout = int(saved["MLFLOW_HTTP_REQUEST_TIMEOUT"] or 120)
    os.environ.update(_QUICK)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(min(timeout, 10))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def apply(client: MlflowClient, run_id: str, out_dir: Path, record: Record) -> None:
    """Send one record to the run ``run_id``.

    Raises:
        CheckpointError: an artifact's file is gone from ``out_dir``, or the record is of an
            unknown kind (written by a newer version).
        MlflowException, requests.RequestException, OSError: the store did not take it.
    """
    from mlflow.entities import Metric, Param, RunTag

    kind = record["kind"]
    if kind in ("artifact", "artifacts"):
        path = out_dir / record["path"]
        if not path.exists():
            raise CheckpointError(
                f"{path} is gone, so it cannot be uploaded to MLflow run {run_id}; restore it, "
                f"or delete {out_dir / PENDING_DIR} to give up on what is still pending"
            )
        if kind == "artifact":
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
        else:
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in record["values"].items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["values"].items()])
    elif kind == "metrics":
        stamp, step = record["timestamp"], record["step"]
        metrics = [Metric(k, v, stamp, step) for k, v in record["values"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif kind == "table":
        client.log_table(run_id, data=record["data"], artifact_file=record["artifact_file"])
    elif kind == "end":
        client.set_terminated(run_id, record["status"])
    else:
        raise CheckpointError(
            f"unknown tracking record kind {kind!r} for run {run_id} in {out_dir / PENDING_DIR}; "
            "sync it with the cae version that wrote it"
        )


def deliver(client: MlflowClient, run_id: str, out_dir: Path, records: list[Record]) -> None:
    """Send ``records`` in order, removing each from the list once the store took it (so on an
    error the list holds exactly what did not arrive).

    Raises:
        what :func:`apply` raises.
    """
    while records:
        apply(client, run_id, out_dir, records[0])
        records.pop(0)


def write_pending(path: Path, run_id: str, tracking_uri: str, records: list[Record]) -> None:
    """Keep the records a run still lacks in ``path`` (atomically; :func:`sync` reads it)."""
    payload = {"run_id": run_id, "tracking_uri": tracking_uri, "records": records}
    with atomic_write(path) as file:
        file.write((json.dumps(payload, indent=1) + "\n").encode())


def first_line(err: BaseException) -> str:
    """The first line of an error message (at most 300 characters), for one-line reports."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


class Outbox:
    """Records on their way to one MLflow run; those the store did not take wait in a file.

    Args:
        client: a client of the run's tracking store.
        run_id: the run.
        out_dir: the training's output folder (artifact paths are relative to it).
        retry_seconds: after a failure, wait this long before trying again; the wait doubles after
            every failed try, up to :data:`MAX_RETRY_SECONDS`.
    """

    def __init__(
        self, client: MlflowClient, run_id: str, out_dir: Path, retry_seconds: float
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.out_dir = out_dir
        self.retry_seconds = retry_seconds
        self.pending: list[Record] = []
        self.failures = 0
        self.retry_at = 0.0
        self.path = out_dir / PENDING_DIR / f"pending-{run_id}.json"

    def send(self, *records: Record, now: bool = False) -> None:
        """Send ``records`` after those still pending, unless the store failed recently (then,
        and when it fails now, they are kept in :attr:`path` for a later try).

        Args:
            records: what to send.
            now: try at once even if the next try is not due (the end of a training).
        """
        self.pending.extend(records)
        if not self.pending:
            return
        if self.failures and not now and time.monotonic() < self.retry_at:
            self._save()
            return
        try:
            with one_quick_attempt() if self.failures else nullcontext():
                deliver(self.client, self.run_id, self.out_dir, self.pending)
        except TRACKING_ERRORS as err:
            self._failed(err)
            return
        if self.failures:
            log.warning(
                "MLflow tracking at %s answers again: what was pending is uploaded to run %s",
                self.client.tracking_uri,
                self.run_id,
            )
            self.failures = 0
            self.path.unlink(missing_ok=True)

    def _failed(self, err: BaseException) -> None:
        wait = min(self.retry_seconds * 2**self.failures, MAX_RETRY_SECONDS)
        self.failures += 1
        self.retry_at = time.monotonic() + wait
        self._save()
        report = log.warning if self.failures == 1 else log.info
        report(
            "MLflow tracking at %s failed (%s); training goes on: %d record(s) for run %s are "
            "kept in %s, next try in %.0f s",
            self.client.tracking_uri,
            first_line(err),
            len(self.pending),
            self.run_id,
            self.path,
            wait,
        )

    def _save(self) -> None:
        write_pending(self.path, self.run_id, self.client.tracking_uri, self.pending)

    def describe(self) -> str:
        """What is pending, in words: ``metrics of epochs 2-3, 9 artifacts, the final status``."""
        steps = sorted(r["step"] for r in self.pending if r["kind"] == "metrics")
        parts = []
        if steps:
            parts.append(f"metrics of epoch{'s' if len(steps) > 1 else ''} "
                         f"{steps[0]}{f'-{steps[-1]}' if len(steps) > 1 else ''}")  # fmt: skip
        files = sum(r["kind"] in ("artifact", "artifacts", "table") for r in self.pending)
        if files:
            parts.append(f"{files} artifact(s)")
        if any(r["kind"] in ("params", "tags") for r in self.pending):
            parts.append("params and tags")
        if any(r["kind"] == "end" for r in self.pending):
            parts.append("the final status")
        return ", ".join(parts) or "nothing"


def sync(out_dir: Path, tracking_uri: str | None = None) -> list[tuple[str, str, int]]:
    """Upload what trainings in ``out_dir`` could not send to their MLflow runs.

    Args:
        out_dir: a training's output folder.
        tracking_uri: the store to send to (default: the one each run was recorded in).

    Returns:
        ``(run id, tracking URI, records sent)`` per run that had pending records.

    Raises:
        CheckpointError: ``out_dir`` is not a folder, or a pending artifact's file is gone.
        ConfigError: the store still does not answer (what is left stays pending).
    """
    from mlflow.tracking import MlflowClient

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise CheckpointError(f"no training folder at {out_dir}; pass the --out of a training")
    done = []
    for path in sorted((out_dir / PENDING_DIR).glob("pending-*.json")):
        try:
            payload = json.loads(path.read_text())
            run_id, records = payload["run_id"], payload["records"]
            uri = tracking_uri or payload["tracking_uri"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"cannot read {path} ({first_line(err)}); it was not written by cae"
            ) from None
        remaining = list(records)
        try:
            with one_quick_attempt():
                deliver(MlflowClient(uri), run_id, out_dir, remaining)
        except TRACKING_ERRORS as err:
            write_pending(path, run_id, uri, remaining)
            raise ConfigError(
                f"MLflow tracking at {uri} does not answer ({first_line(err)}); "
                f"{len(remaining)} record(s) of run {run_id} stay in {path}: start the server, "
                "or give another store with --tracking-uri, and sync again"
            ) from None
        path.unlink()
        done.append((run_id, uri, len(records)))
    return done
