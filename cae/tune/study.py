"""Optuna studies over latent size, metadata logit scale and learning rate.

One study lives in one storage: an Optuna journal file on a shared filesystem (the default: no
server needed) or an RDB URL (PostgreSQL for teams; killed trials are retried by heartbeat). Workers
(one per SLURM array task) each run ``tune.n_trials`` trials; every trial calls the same
:func:`cae.train.train` as everything else, inside an MLflow run nested under the study's parent
run, and reports the validation objective each epoch so the pruner can stop it.

Preemption with the journal: each trial records the SLURM task that runs it. A requeued task
(``SLURM_RESTART_COUNT`` > 0) first marks its own trials still RUNNING as FAILED and enqueues their
parameters again, then runs only the trials its task still owes: no trial is lost or duplicated.
With an RDB storage, Optuna's heartbeat does the same for a worker that is never requeued: the next
worker to start a trial fails the silent one and runs its parameters again. Either way the retry
ends the MLflow run of the attempt it replaces as KILLED.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

from cae.config import Settings, TuneConfig, deep_merge, settings_from_dict
from cae.data.atomic import check_output_path
from cae.errors import ConfigError
from cae.tracking.callbacks import redact
from cae.train.trainer import Callback, StopTraining, Trainer

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
SETTINGS_ATTR = "settings"
TASK_ATTR = "slurm_task"
RUN_ATTR = "mlflow_run_id"
TARGET_ACCURACY = "val/target_accuracy"


def is_rdb(storage: str) -> bool:
    """Whether ``tune.storage`` is an RDB URL (``postgresql://...``, ``sqlite:///...``) rather than
    a journal file path."""
    return "://" in storage


def open_storage(tune: TuneConfig) -> Any:
    """The Optuna storage for ``tune.storage``.

    Args:
        tune: ``storage`` is an RDB URL or a journal file path; for an RDB URL,
            ``heartbeat_interval``, ``grace_period`` and ``max_retry`` set the heartbeat retry
            of trials whose worker died.

    Returns:
        An ``RDBStorage`` (its tables are created if missing) or a ``JournalStorage`` (the file's
        folder is created).

    Raises:
        ConfigError: the RDB URL's driver is not installed, or its database cannot be reached;
            the message names the URL (without its password) and what to do.
    """
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend
    from sqlalchemy.exc import SQLAlchemyError

    if is_rdb(tune.storage):
        try:
            with warnings.catch_warnings():  # the heartbeat has been "experimental" since 2.8
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(
                    tune.storage,
                    heartbeat_interval=tune.heartbeat_interval,
                    grace_period=tune.grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=tune.max_retry
                    ),
                )
        except ImportError as err:
            raise ConfigError(
                f"tune.storage {redact(tune.storage)}: no database driver ({err}); for "
                "postgresql:// install cae[postgres] (pip install 'cae[postgres]')"
            ) from None
        except SQLAlchemyError as err:
            reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
            raise ConfigError(
                f"tune.storage {redact(tune.storage)} cannot be opened: {reason}; check that the "
                "database server is up and the database exists (`cae doctor` checks it)"
            ) from None
    path = check_output_path(Path(tune.storage), "tune.storage (--storage)", folder=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _directions(tune: TuneConfig) -> list[Literal["minimize", "maximize"]]:
    return ["minimize", "maximize"] if tune.multi_objective else ["minimize"]


def _pruner(tune: TuneConfig) -> Any:
    import optuna

    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def create(settings: Settings) -> str:
    """Create the study and its MLflow parent run, once, before any worker starts.

    Creating both up front avoids racing workers on a new sqlite store or study. The settings are
    saved in the study, so workers need only the storage and the study name.

    Returns:
        The parent MLflow run id.

    Raises:
        ConfigError: a study of that name already exists in the storage.
    """
    import mlflow
    import optuna

    from cae.tracking.callbacks import tracking_uri

    tune = settings.tune
    storage = open_storage(tune)
    try:
        study = optuna.create_study(
            study_name=tune.study, storage=storage, directions=_directions(tune)
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise ConfigError(
            f"study '{tune.study}' already exists in {redact(tune.storage)}; run workers "
            "against it or choose another --study"
        ) from None
    mlflow.set_tracking_uri(tracking_uri(settings.tracking.uri))
    mlflow.set_experiment(settings.tracking.experiment)
    with mlflow.start_run(run_name=f"study {tune.study}") as parent:
        mlflow.set_tags({"cae.study": tune.study, "cae.study_storage": redact(tune.storage)})
        mlflow.log_params({k: v for k, v in settings.flat().items() if k.startswith("tune.")})
    study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)
    study.set_user_attr(SETTINGS_ATTR, settings.model_dump(mode="json"))
    return parent.info.run_id


def load(tune: TuneConfig) -> Any:
    """Load an existing study.

    Raises:
        ConfigError: no such study in the storage (the message says to run ``cae tune create``).
    """
    import optuna

    try:
        return optuna.load_study(study_name=tune.study, storage=open_storage(tune))
    except KeyError:
        raise ConfigError(
            f"no study '{tune.study}' in {redact(tune.storage)}; create it first with "
            "`cae tune create`"
        ) from None


def slurm_task() -> str:
    """``<job>_<array task>`` of this SLURM task, or ``local_<pid>`` outside SLURM."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return f"local_{os.getpid()}"
    return f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"


class _Pruning(Callback):
    """Reports the objective each epoch; stops training when the pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        if len(self.trial.study.directions) > 1:
            return  # Optuna cannot prune multi-objective trials
        self.trial.report(metrics[self.metric], step=epoch)
        if self.trial.should_prune():
            raise StopTraining(f"pruned at epoch {epoch}")


class _RecordRun(Callback):
    """Links the trial to its MLflow run as soon as the run starts, so that a retry of the trial
    can end the run of an attempt whose worker died (:func:`_end_interrupted_run`)."""

    def __init__(self, trial: Any, runs: list[Callback]) -> None:
        self.trial = trial
        self.runs = runs

    def on_train_start(self, trainer: Trainer) -> None:
        from cae.tracking.callbacks import MLflowCallback

        for callback in self.runs:  # the MLflow callback ran first: its run has started
            if isinstance(callback, MLflowCallback) and callback.run_id is not None:
                self.trial.set_user_attr(RUN_ATTR, callback.run_id)


def _end_interrupted_run(trial: Any, settings: Settings) -> None:
    """End the MLflow run of this trial's interrupted attempt as KILLED, if it is still RUNNING.

    A retried trial (heartbeat retry with an RDB storage, or :func:`recover_interrupted`) carries
    the run id of the attempt it replaces; a worker killed with SIGKILL or lost with its node
    could not end that run itself.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from cae.tracking.callbacks import tracking_uri

    run_id = trial.user_attrs.get(RUN_ATTR)
    if run_id is None:
        return
    client = mlflow.MlflowClient(tracking_uri(settings.tracking.uri))
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            log.warning("ended MLflow run %s of an interrupted attempt as KILLED", run_id)
    except MlflowException as err:  # deleted meanwhile, or another store: nothing to end
        log.warning("could not end MLflow run %s of an interrupted attempt: %s", run_id, err)


def trial_settings(base: Settings, trial: Any) -> Settings:
    """The base settings with this trial's sampled values, output folder and nested run."""
    space = base.tune.space
    values = {
        "model.latent_dim": trial.suggest_int(
            "latent_dim", int(space.latent_dim.low), int(space.latent_dim.high),
            log=space.latent_dim.log,
        ),
        "model.logit_scale": trial.suggest_float(
            "logit_scale", space.logit_scale.low, space.logit_scale.high, log=space.logit_scale.log
        ),
        "train.lr": trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log),
        "output.dir": str(base.tune.out_dir / base.tune.study / f"trial_{trial.number:04d}"),
        "output.overwrite": True,  # a retried trial replaces its failed folder
        "tracking.parent_run_id": trial.study.user_attrs[PARENT_RUN_ATTR],
        "tracking.run_name": f"trial {trial.number}",
        "tracking.register_as": None,
    }  # fmt: skip
    for name, options in space.choices.items():
        values[name] = trial.suggest_categorical(name, options)
    merged = deep_merge(base.model_dump(mode="json"), values)
    return settings_from_dict(merged, f"trial {trial.number}")


def objective(trial: Any, base: Settings) -> float | tuple[float, float]:
    """Train once with the trial's values; the objective metric of the last epoch."""
    import mlflow
    import optuna

    from cae.tracking.callbacks import MLflowCallback, tracked
    from cae.train.trainer import train

    settings = trial_settings(base, trial)
    _end_interrupted_run(trial, settings)
    task = slurm_task()
    trial.set_user_attr(TASK_ATTR, task)
    callbacks: list[Callback] = []
    # Preempted (SIGUSR1/SIGTERM) passes through: Optuna leaves the trial RUNNING, the worker
    # exits with 75, and the requeued task fails and re-enqueues it (recover_interrupted).
    try:
        with tracked(settings) as callbacks:
            extra = [_RecordRun(trial, callbacks), _Pruning(trial, base.tune.objective)]
            result = train(settings, [*callbacks, *extra])
    except StopTraining:
        raise optuna.TrialPruned() from None
    finally:  # finished, pruned or failed: link the trial and its run both ways
        run_id = next((c.run_id for c in callbacks if isinstance(c, MLflowCallback)), None)
        if run_id is not None:
            trial.set_user_attr(RUN_ATTR, run_id)
            tags = {"cae.study": base.tune.study, "cae.trial": str(trial.number),
                    "cae.slurm_task": task}  # fmt: skip
            client = mlflow.MlflowClient()
            for key, tag in tags.items():
                client.set_tag(run_id, key, tag)
    value = result.final[base.tune.objective]
    if base.tune.multi_objective:
        accuracies = [v for k, v in result.final.items() if k.startswith(TARGET_ACCURACY)]
        return value, sum(accuracies) / len(accuracies)
    return value


def recover_interrupted(study: Any, task: str) -> int:
    """Mark this task's trials still RUNNING as FAILED and enqueue their parameters again.

    Called by a requeued SLURM task (its previous attempt was killed mid-trial). Returns how many
    trials were recovered.
    """
    import optuna

    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get(TASK_ATTR) == task:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            carried = {RUN_ATTR: trial.user_attrs[RUN_ATTR]} if RUN_ATTR in trial.user_attrs else {}
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **carried})
            recovered += 1
            log.warning(
                "trial %d of %s was interrupted: failed and enqueued again", trial.number, task
            )
    return recovered


def work(tune: TuneConfig, overrides: Mapping[str, Any] | None = None) -> int:
    """Run this worker's share of trials, after recovering interrupted ones.

    Args:
        tune: which study (``tune.study``) in which storage (``tune.storage``).
        overrides: settings that win over the ones saved in the study (``tune.n_trials``,
            ``train.progress``, ...); everything else comes from the study.

    Returns:
        The number of trials this call ran.
    """
    import optuna

    study = load(tune)
    saved = study.user_attrs.get(SETTINGS_ATTR)
    if saved is None:
        raise ConfigError(f"study '{tune.study}' was not created by `cae tune create`")
    given = {**(overrides or {}), "tune.study": tune.study, "tune.storage": tune.storage}
    merged = deep_merge(saved, given)
    base = settings_from_dict(merged, f"study {tune.study}")
    if is_rdb(tune.storage):  # heartbeat settings as the study was created with
        study = load(base.tune)
    task = slurm_task()
    if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        recover_interrupted(study, task)
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = sum(t.user_attrs.get(TASK_ATTR) == task for t in study.get_trials(states=done_states))
    remaining = max(base.tune.n_trials - done, 0)
    study.pruner = _pruner(base.tune)
    # A failing trial (bad values, a NaN loss) is recorded FAILED; the worker goes on.
    study.optimize(lambda trial: objective(trial, base), n_trials=remaining, catch=(Exception,))
    return remaining


def best(tune: TuneConfig) -> list[dict[str, Any]]:
    """The best trial (or the Pareto front of a multi-objective study) with its MLflow run.

    Raises:
        ConfigError: the study has no finished trial yet.
    """
    study = load(tune)
    try:
        trials = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    except ValueError:
        raise ConfigError(f"study '{tune.study}' has no finished trial yet") from None
    return [
        {
            "trial": t.number,
            "values": list(t.values),
            "params": dict(t.params),
            "mlflow_run_id": t.user_attrs.get(RUN_ATTR),
        }
        for t in trials
    ]


def log_study_plots(tune: TuneConfig) -> list[str]:
    """Log Optuna's plots (optimisation history, parameter importances, contour of latent_dim x
    logit_scale) to the study's MLflow parent run; returns the artifact paths written."""
    import warnings

    import matplotlib.pyplot as plt
    import mlflow
    import optuna.visualization.matplotlib as plots
    from matplotlib.figure import Figure
    from optuna.exceptions import ExperimentalWarning

    from cae.tracking.callbacks import tracking_uri

    study = load(tune)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    saved = settings_from_dict(study.user_attrs[SETTINGS_ATTR], f"study {tune.study}")
    # A two-objective study is drawn by its first objective, the reconstruction loss.
    target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
    drawings = {
        "optuna/optimization_history.png": lambda: plots.plot_optimization_history(
            study, target=target
        ),
        "optuna/param_importances.png": lambda: plots.plot_param_importances(study, target=target),
        "optuna/contour_latent_dim_logit_scale.png": lambda: plots.plot_contour(
            study, params=["latent_dim", "logit_scale"], target=target
        ),
    }
    mlflow.set_tracking_uri(tracking_uri(saved.tracking.uri))
    written = []
    with mlflow.start_run(run_id=parent):
        for path, draw in drawings.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    axes = draw()
            except (ValueError, RuntimeError) as err:  # too few trials for that plot
                log.warning("skipping %s: %s", path, err)
                continue
            # optuna draws each plot on a figure of its own (never a subfigure, never none)
            figure = cast(Figure, (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure())
            mlflow.log_figure(figure, path)
            plt.close(figure)
            written.append(path)
    return written
