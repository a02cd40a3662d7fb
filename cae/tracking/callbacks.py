"""Trainer callbacks that record a training in MLflow and TensorBoard.

``cae.train`` knows nothing of either: it emits events, and these callbacks turn them into an MLflow
run (params, per-epoch metrics, tags, tables, plots, artifacts) and TensorBoard event files. Use
:func:`tracked` to get both for a training::

    with tracked(settings) as callbacks:
        train(settings, callbacks)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import matplotlib.pyplot as plt
from mlflow.exceptions import MlflowException

from cae import __version__
from cae.config import Settings
from cae.data.atomic import atomic_write
from cae.errors import ConfigError
from cae.tracking.compare import BEST_EPOCH_TAG
from cae.tracking.outbox import (
    PENDING_DIR,
    TRACKING_ERRORS,
    Outbox,
    Record,
    first_line,
    one_quick_attempt,
)
from cae.tracking.plots import (
    context_contributions_figure,
    contribution_shares_figure,
    field_effects_figure,
)
from cae.tracking.views import add_effects_view
from cae.train.trainer import Callback, Preempted, StopTraining, Trainer, TrainResult

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_RECORD = "run.json"  # in <out>/tracking: the training's MLflow run, and whether it ended


def tracking_uri(uri: str | None) -> str:
    """The tracking URI in force: ``uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``.

    A sqlite file named relative to the working folder (``sqlite:///mlflow.db``) is given as its
    absolute path: MLflow keeps one store per URI for the life of a process, so a relative URI
    would keep writing to the folder where it was first used after a ``chdir``.
    """
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    path, _, query = chosen.removeprefix(prefix).partition("?")
    if not chosen.startswith(prefix) or path.startswith("/") or path in ("", ":memory:"):
        return chosen
    return f"{prefix}{Path(path).resolve()}" + (f"?{query}" if query else "")


def redact(url: str) -> str:
    """``url`` with its password, if any, shown as ``***`` (for messages, tags and reports)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def access_refused(status: int) -> tuple[str, str] | None:
    """What an MLflow tracking server meant by refusing this client with HTTP ``status``, and
    what to do: for 401 (no login, or a wrong one) and 403 (logged in, not allowed); None for any
    other status. The credentials are those MLflow's client sends: ``MLFLOW_TRACKING_USERNAME``
    and ``MLFLOW_TRACKING_PASSWORD``, else ``~/.mlflow/credentials``.

    Returns:
        ``(what happened, what to do)``, each a phrase to put after the server's URI, or None.
    """
    from mlflow.utils.credentials import read_mlflow_creds

    user = read_mlflow_creds().username
    login = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    if status == 401:
        who = f"the password of user {user!r}" if user else "a request without credentials"
        return (
            f"asks for a login and refused {who} (HTTP 401)",
            f"set {login} to your account on that server (its admin creates it)",
        )
    if status == 403:
        return (
            f"lets user {user!r} in but not do this (HTTP 403)",
            f"ask the server's admin for permission on the experiment, or set {login} to "
            "another account",
        )
    return None


def git_commit(directory: Path | None = None) -> str | None:
    """The commit checked out in ``directory`` (default: the working directory), if it is a repo."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


class TensorBoardCallback(Callback):
    """Writes each epoch's scalars and histograms of every head's output to <out>/tensorboard."""

    def __init__(self) -> None:
        self.writer: SummaryWriter | None = None

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        if self.writer is None:  # opened at the first epoch: a failed start leaves no files
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(trainer.out_dir / "tensorboard"))
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=epoch)
        for head, values in trainer.head_samples.items():
            self.writer.add_histogram(f"head_output/{head}", values, global_step=epoch)
        self.writer.flush()

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the event file (safe to call twice)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowCallback(Callback):
    """Records a training in an MLflow run (:func:`tracked` ends it with :meth:`finish`).

    If the tracking store stops answering mid-run (a tracking server that died, a network
    outage), training goes on: what did not reach the run is kept beside the training's files and
    retried later (see :class:`cae.tracking.outbox.Outbox`); what is still missing at the end is
    named in a warning, with the ``cae runs sync`` command that uploads it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_id: str | None = None
        self.outbox: Outbox | None = None
        self.record = Path()  # <out>/tracking/run.json, once the run started

    def on_train_start(self, trainer: Trainer) -> None:
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(self.settings.tracking.uri)
        try:
            previous = close_abandoned_run(trainer.out_dir)
            self.run_id, experiment_id = start_run(trainer.settings)
        except TRACKING_ERRORS as err:
            status = err.get_http_status_code() if isinstance(err, MlflowException) else 0
            refused = access_refused(status)
            if refused:
                what, fix = refused
                raise ConfigError(
                    f"MLflow tracking at {redact(uri)} {what}: {fix}; or train with --no-tracking"
                ) from None
            raise ConfigError(
                f"MLflow tracking at {uri} does not answer ({first_line(err)}); "
                "start the tracking server or fix the URI (--tracking-uri, MLFLOW_TRACKING_URI), "
                "or train with --no-tracking"
            ) from None
        self.record = trainer.out_dir / PENDING_DIR / RUN_RECORD
        write_run_record(self.record, self.run_id, uri, ended=False)
        retry = self.settings.tracking.retry_seconds
        client = MlflowClient(uri)
        self.outbox = Outbox(client, self.run_id, trainer.out_dir, retry)
        add_effects_view(client, experiment_id)
        tags = {
            "cae.version": __version__,
            "cae.data_fingerprint": trainer.fingerprint,
            "cae.fields": ",".join(trainer.vocabularies.fields),
            "cae.output_dir": str(trainer.out_dir.resolve()),
            "cae.start_epoch": str(trainer.start_epoch),
        }
        commit = git_commit()
        if commit:
            tags["cae.git_commit"] = commit
        if previous and trainer.settings.output.resume:
            tags["cae.resumed_from_run"] = previous
        self.outbox.send(
            {"kind": "params", "values": trainer.settings.flat()},
            {"kind": "tags", "values": tags},
        )

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        assert self.outbox is not None
        stamp = int(time.time() * 1000)
        self.outbox.send({"kind": "metrics", "step": epoch, "timestamp": stamp, "values": metrics})

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        assert self.outbox is not None
        out = result.out_dir
        names = ["settings.json", "vocabularies.json", "field_specs.json", "history.json",
                 "contributions.csv", "genes.txt"]  # fmt: skip
        records: list[Record] = [{"kind": "artifact", "path": name} for name in names]
        table = result.contributions.to_dict(orient="list")
        records.append({"kind": "table", "data": table, "artifact_file": "contributions.json"})
        heads = ["base", *result.vocabularies.fields]
        figures = {
            "field_effects": field_effects_figure(result.final, result.vocabularies.fields),
            "contribution_shares": contribution_shares_figure(result.history, heads),
        }
        for field in result.vocabularies.fields:
            figures[f"contributions_{field}"] = context_contributions_figure(
                result.contributions, field
            )
        (out / "plots").mkdir(exist_ok=True)
        for name, figure in figures.items():  # kept in the output folder too
            figure.savefig(out / "plots" / f"{name}.png")
            plt.close(figure)
            records.append(
                {"kind": "artifact", "path": f"plots/{name}.png", "artifact_path": "plots"}
            )
        if self.settings.tracking.log_checkpoint:
            for checkpoint in filter(None, (result.checkpoint, result.best_checkpoint)):
                path = checkpoint.relative_to(out).as_posix()
                records.append({"kind": "artifact", "path": path, "artifact_path": "checkpoints"})
        if result.best_epoch is not None:
            records.append({"kind": "tags", "values": {BEST_EPOCH_TAG: str(result.best_epoch)}})
        if (out / "tensorboard").is_dir():
            records.append(
                {"kind": "artifacts", "path": "tensorboard", "artifact_path": "tensorboard"}
            )
        self.outbox.send(*records)

    def finish(self, status: str) -> None:
        """End the run with ``status`` (FINISHED, KILLED or FAILED). When the store still does
        not answer, warn where the missing records are kept and how to upload them."""
        import mlflow

        if self.outbox is None:
            return
        self.outbox.send({"kind": "end", "status": status}, now=True)
        if self.record.parent.is_dir():  # gone when a failed training's folder was removed
            write_run_record(self.record, self.outbox.run_id, self.outbox.client.tracking_uri,
                             ended=True)  # fmt: skip
        # start_run made the run MLflow's active run: end_run takes it off that stack first,
        # then tells the store (once more; one quick attempt when the store is down).
        with (
            one_quick_attempt() if self.outbox.pending else nullcontext(),
            suppress(*TRACKING_ERRORS),
        ):
            mlflow.end_run(status)
        if self.outbox.pending:
            log.warning(
                "MLflow run %s at %s lacks %s: kept in %s (with the files of %s); upload them "
                "with `cae runs sync --out %s` once the tracking server answers",
                self.run_id,
                self.outbox.client.tracking_uri,
                self.outbox.describe(),
                self.outbox.path,
                self.outbox.out_dir,
                self.outbox.out_dir,
            )


def write_run_record(path: Path, run_id: str, uri: str, *, ended: bool) -> None:
    """Note in a training's folder which MLflow run records it, and whether that run was ended
    (a training killed outright cannot end its run: :func:`close_abandoned_run` does)."""
    record = {"run_id": run_id, "tracking_uri": uri, "ended": ended}
    with atomic_write(path) as file:
        file.write((json.dumps(record) + "\n").encode())


def close_abandoned_run(out_dir: Path) -> str | None:
    """End, as KILLED, the MLflow run that a training killed outright in ``out_dir`` left
    RUNNING (the folder's lock is held: no live training records into it).

    Returns:
        The id of the folder's last run, if it noted one (ended or not).
    """
    from mlflow.tracking import MlflowClient

    path = out_dir / PENDING_DIR / RUN_RECORD
    try:
        record = json.loads(path.read_text())
        run_id, uri, ended = record["run_id"], record["tracking_uri"], record["ended"]
    except (OSError, ValueError, KeyError, TypeError):  # none, or not one we wrote
        return None
    if not ended:
        client = MlflowClient(uri)
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
                log.warning("MLflow run %s of %s was left RUNNING by a killed training: ended "
                            "as KILLED", run_id, out_dir)  # fmt: skip
        except TRACKING_ERRORS as err:  # deleted, or its store is gone: nothing to end there
            log.warning("could not end MLflow run %s (left by a killed training in %s) at %s: "
                        "%s", run_id, out_dir, redact(uri), first_line(err))  # fmt: skip
    return run_id


def start_run(settings: Settings) -> tuple[str, str]:
    """Start the training's MLflow run: nested under ``tracking.parent_run_id`` in the parent's
    experiment (a tuning trial), else inside ``mlflow run`` (``MLFLOW_RUN_ID`` set) join that
    run, otherwise start one in ``tracking.experiment`` (by default MLflow's own default,
    where a plain ``mlflow run .`` records too) at the tracking URI in force.

    Returns:
        The run's id and its experiment's id.
    """
    import mlflow

    uri = tracking_uri(settings.tracking.uri)
    mlflow.set_tracking_uri(uri)
    if settings.tracking.parent_run_id:
        parent = mlflow.MlflowClient().get_run(settings.tracking.parent_run_id)
        run = mlflow.start_run(
            run_name=settings.tracking.run_name,
            parent_run_id=settings.tracking.parent_run_id,
            nested=True,
            experiment_id=parent.info.experiment_id,  # else MLflow's default experiment
        )
    elif os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()  # the MLproject's run
    else:
        mlflow.set_experiment(settings.tracking.experiment)
        run = mlflow.start_run(run_name=settings.tracking.run_name)
    log.info("MLflow run %s in %s", run.info.run_id, uri)
    return run.info.run_id, run.info.experiment_id


def run_id_of(callbacks: Sequence[Callback]) -> str | None:
    """The MLflow run that the callbacks of :func:`tracked` record into (None untracked)."""
    return next((c.run_id for c in callbacks if isinstance(c, MLflowCallback)), None)


@contextmanager
def tracked(settings: Settings) -> Iterator[list[Callback]]:
    """Yield the callbacks that record one training, and end its MLflow run afterwards.

    The run starts when training starts (after the data and settings were validated, so a typo
    leaves no empty run behind); see :func:`start_run`. It ends FINISHED; KILLED on Ctrl-C, on
    SIGTERM/SIGUSR1 (:class:`Preempted`) or when a callback stopped training on purpose
    (:class:`StopTraining`, e.g. a pruned trial); FAILED if the training raised anything else.
    A tracking store that stops answering mid-run does not stop training (see
    :class:`MLflowCallback`). With ``tracking.enabled`` false it yields no callbacks and touches
    nothing.

    Args:
        settings: the settings (``tracking`` section).

    Yields:
        The callbacks to pass to ``train``.
    """
    if not settings.tracking.enabled:
        yield []
        return
    tensorboard = TensorBoardCallback() if settings.tracking.tensorboard else None
    callbacks: list[Callback] = [tensorboard] if tensorboard else []
    recorder = MLflowCallback(settings)
    callbacks.append(recorder)  # after TensorBoard: its files are closed first
    try:
        yield callbacks
    except (KeyboardInterrupt, StopTraining, Preempted):
        recorder.finish("KILLED")
        raise
    except BaseException:
        recorder.finish("FAILED")
        raise
    finally:
        if tensorboard is not None:
            tensorboard.close()
    recorder.finish("FINISHED")
