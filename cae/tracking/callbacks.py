"""Trainer callbacks that record a training in MLflow and TensorBoard.

``cae.train`` knows nothing of either: it emits events, and these callbacks turn them into an MLflow
run (params, per-epoch metrics, tags, tables, plots, artifacts) and TensorBoard event files. Use
:func:`tracked` to get both for a training::

    with tracked(settings) as callbacks:
        train(settings, callbacks)
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import matplotlib.pyplot as plt

from cae import __version__
from cae.config import Settings
from cae.tracking.plots import context_contributions_figure, contribution_shares_figure
from cae.train.trainer import Callback, Preempted, StopTraining, Trainer, TrainResult

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(uri: str | None) -> str:
    """The tracking URI in force: ``uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def redact(url: str) -> str:
    """``url`` with its password, if any, shown as ``***`` (for messages, tags and reports)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


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

    def on_train_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(trainer.out_dir / "tensorboard"))

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        assert self.writer is not None
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
    """Records a training in the active MLflow run (:func:`tracked` starts it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_id: str | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        import mlflow

        self.run_id = start_run(self.settings)
        mlflow.log_params(self.settings.flat())
        fields = ",".join(trainer.vocabularies.fields)
        tags = {
            "cae.version": __version__,
            "cae.data_fingerprint": trainer.fingerprint,
            "cae.fields": fields,
            "cae.output_dir": str(trainer.out_dir.resolve()),
            "cae.start_epoch": str(trainer.start_epoch),
        }
        commit = git_commit()
        if commit:
            tags["cae.git_commit"] = commit
        mlflow.set_tags(tags)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=epoch)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        import mlflow

        out = result.out_dir
        for name in [
            "settings.json",
            "vocabularies.json",
            "field_specs.json",
            "history.json",
            "contributions.csv",
            "genes.txt",
        ]:
            mlflow.log_artifact(str(out / name))
        mlflow.log_table(data=result.contributions, artifact_file="contributions.json")
        heads = ["base", *result.vocabularies.fields]
        figures = {
            "plots/contribution_shares.png": contribution_shares_figure(result.history, heads)
        }
        for field in result.vocabularies.fields:
            figures[f"plots/contributions_{field}.png"] = context_contributions_figure(
                result.contributions, field
            )
        for path, figure in figures.items():
            mlflow.log_figure(figure, path)
            plt.close(figure)
        if self.settings.tracking.log_checkpoint:
            mlflow.log_artifact(str(result.checkpoint), artifact_path="checkpoints")
        tensorboard = out / "tensorboard"
        if tensorboard.is_dir():
            mlflow.log_artifacts(str(tensorboard), artifact_path="tensorboard")


def start_run(settings: Settings) -> str:
    """Start the training's MLflow run: nested under ``tracking.parent_run_id`` in the parent's
    experiment (a tuning trial), else inside ``mlflow run`` (``MLFLOW_RUN_ID`` set) join that
    run, otherwise start one in ``tracking.experiment`` at the tracking URI in force. Returns the
    run's id."""
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
    return run.info.run_id


@contextmanager
def tracked(settings: Settings) -> Iterator[list[Callback]]:
    """Yield the callbacks that record one training, and end its MLflow run afterwards.

    The run starts when training starts (after the data and settings were validated, so a typo
    leaves no empty run behind); see :func:`start_run`. It ends FINISHED; KILLED on Ctrl-C, on
    SIGTERM/SIGUSR1 (:class:`Preempted`) or when a callback stopped training on purpose
    (:class:`StopTraining`, e.g. a pruned trial); FAILED if the training raised anything else.
    With ``tracking.enabled`` false it yields no callbacks and touches nothing.

    Args:
        settings: the settings (``tracking`` section).

    Yields:
        The callbacks to pass to ``train``.
    """
    if not settings.tracking.enabled:
        yield []
        return
    import mlflow

    tensorboard = TensorBoardCallback() if settings.tracking.tensorboard else None
    callbacks: list[Callback] = [tensorboard] if tensorboard else []
    callbacks.append(MLflowCallback(settings))  # after TensorBoard: its files are closed first
    try:
        yield callbacks
    except (KeyboardInterrupt, StopTraining, Preempted):
        if mlflow.active_run() is not None:
            mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        if mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")
        raise
    finally:
        if tensorboard is not None:
            tensorboard.close()
    mlflow.end_run()
