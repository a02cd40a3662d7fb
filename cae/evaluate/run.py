"""Run an evaluation end to end: load or train models, score, write the report, log to MLflow."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cae.config import EvaluateConfig, Settings
from cae.data.store import DataStore
from cae.data.synth import load_truth
from cae.errors import CheckpointError, ConfigError
from cae.evaluate.embedding import model_umap
from cae.evaluate.protocol import (
    Holdout,
    collect_cells,
    contributions,
    field_ranking,
    loo_holdouts,
    score_holdout,
    slug,
    training_settings,
)
from cae.evaluate.report import (
    ModelViews,
    beats_identity,
    headline_metric,
    overview,
    summarise,
    write_report,
)
from cae.train.checkpoint import Checkpoint, TrainedModel, load_checkpoint

log = logging.getLogger(__name__)

TRUTH_FILE = "truth.json"


@dataclass
class Evaluation:
    """What an evaluation measured; everything is also in :attr:`report`'s folder.

    Attributes:
        scores: one row per held-out context and method (``context``, ``method``, metrics).
        summary: per method, the median and mean of every metric over contexts.
        contributions: per (fold,) field and value, the model's L2 contribution.
        top_genes: per (fold,) field, the genes with the largest term.
        facts: the JSON summary (holdouts, rankings, whether the model beats identity).
        report: path of ``report.html``.
    """

    scores: pd.DataFrame
    summary: pd.DataFrame
    contributions: pd.DataFrame
    top_genes: pd.DataFrame
    facts: dict[str, Any]
    report: Path
    run_ids: list[str] = field(default_factory=list)


def load_evaluated_model(model: str | None, run_id: str | None, settings: Settings) -> TrainedModel:
    """Load the model named by exactly one of ``model`` (a registry URI such as
    ``models:/NAME@champion``, a checkpoint or a training folder) and an MLflow ``run_id``.

    Raises:
        ConfigError: neither or both given.
        CheckpointError: nothing loadable there.
    """
    if bool(model) == bool(run_id):
        raise ConfigError(
            "name the model with exactly one of --model (models:/NAME@alias, a checkpoint or a "
            "training folder) and --run-id ID; or use --protocol leave-one-out to train one "
            "model per group"
        )
    if model:
        from cae.generate import load_any_model

        return load_any_model(model)
    import mlflow

    from cae.tracking.callbacks import tracking_uri
    from cae.tracking.pyfunc import download_run_checkpoint

    mlflow.set_tracking_uri(tracking_uri(settings.tracking.uri))
    with tempfile.TemporaryDirectory() as scratch:
        assert run_id is not None
        return load_checkpoint(download_run_checkpoint(run_id, Path(scratch)))


def read_truth(path: Path | None, data_path: Path) -> dict[str, Any] | None:
    """The synthetic generator's truth: ``path`` if given, else ``truth.json`` beside the data.

    Raises:
        ConfigError: ``path`` is given but does not exist.
        DataError: the file is not a ground truth written by ``cae synth``.
    """
    candidate = path or (data_path / TRUTH_FILE if data_path.is_dir() else None)
    if candidate is None or not candidate.is_file():
        if path is not None:
            raise ConfigError(f"--truth {path} does not exist; `cae synth` writes truth.json")
        return None
    return load_truth(candidate)


@dataclass
class _Scored:
    """One model scored on one held-out context."""

    scores: pd.DataFrame
    per_context: pd.DataFrame
    genes: pd.DataFrame
    facts: dict[str, Any]


def _score_one(
    trained: TrainedModel,
    store: DataStore,
    holdout: Holdout,
    settings: Settings,
    truth: Mapping[str, Any] | None,
    views: ModelViews,
) -> _Scored:
    """Score ``trained`` on ``holdout``; add its loss curves and UMAP to ``views``."""
    if list(store.genes) != list(trained.genes):
        missing = [g for g in trained.genes if g not in set(store.genes)][:5]
        raise ConfigError(
            f"the data at {store.path} has other genes than the model ({store.n_genes} vs "
            f"{len(trained.genes)}; missing e.g. {missing}); evaluate on the data it was "
            "trained on"
        )
    data = trained.settings.data
    cells = collect_cells(
        store, data.transform, holdout, trained.vocabularies.fields, settings.evaluate,
        data.library_key,
    )  # fmt: skip
    scores = score_holdout(trained, cells, holdout, settings.evaluate, truth)
    per_context, genes = contributions(
        trained, cells.sample_raw, cells.sample_meta, settings.evaluate.report_genes
    )
    facts = {
        "holdout": str(holdout.held_out),
        "source": str(holdout.source),
        "n_source_cells": scores.attrs["n_source"],
        "n_real_cells": scores.attrs["n_real"],
        "other_contexts": cells.n_groups,
        "classifier_accuracy_on_real_cells": scores.attrs["classifier_accuracy_real"],
        "field_ranking": field_ranking(per_context),
    }
    views.histories[holdout.name] = list(trained.history)
    embedding = model_umap(trained, cells, holdout, settings.evaluate)
    if embedding is not None:
        views.embeddings[holdout.name] = embedding
        facts["umap_neighbour_mix"] = embedding.attrs["neighbours"]
    return _Scored(scores, per_context, genes, facts)


def _finish(
    out_dir: Path,
    title: str,
    scored: _Scored,
    truth: Mapping[str, Any] | None,
    views: ModelViews,
) -> Evaluation:
    """Add the verdicts to ``scored.facts``, write the report and return the evaluation."""
    scores, per_context, genes = scored.scores, scored.per_context, scored.genes
    metric = headline_metric(scores)
    wins = beats_identity(scores, metric)
    summary = summarise(scores)
    medians = overview(summary, metric)
    facts = {
        **scored.facts,
        "headline_metric": metric,
        "model_beats_identity": wins,
        "model_beats_identity_everywhere": all(wins.values()),
        # per method; NaN (a metric undefined for a method) as null, so the file stays JSON
        "overview": {
            str(m): {k: (float(v) if math.isfinite(v) else None) for k, v in row.items()}
            for m, row in medians.iterrows()
        },
    }
    if truth is not None:
        facts["true_field_ranking"] = list(truth["ranking"])
    notes = [
        "Metrics on log-normalised expression (log1p of counts per 10,000). r2_* are squared "
        "Pearson correlations over genes of per-gene means (variances); top-k genes are the "
        "k most differentially expressed (scanpy's rank_genes_groups, Wilcoxon, ranked by "
        "absolute score; real target vs source cells).",
    ]
    report = write_report(
        out_dir,
        title=title,
        scores=scores,
        per_context=per_context,
        top_genes=genes,
        facts=facts,
        notes=notes,
        models=views,
    )
    return Evaluation(scores, summary, per_context, genes, facts, report)


def evaluate(
    trained: TrainedModel,
    settings: Settings,
    holdout: Holdout,
    out_dir: Path,
    truth: Mapping[str, Any] | None = None,
) -> Evaluation:
    """Score one model on one held-out context beside the baselines and write the report.

    Args:
        trained: the model (trained without the held-out cells).
        settings: ``data`` says where the cells are; ``evaluate`` the metrics' settings.
        holdout: the held-out context.
        out_dir: the report's folder.
        truth: the synthetic generator's truth, to score against true counterfactual means.

    Returns:
        The :class:`Evaluation`.

    Raises:
        CAEError: unreadable data, unknown fields or values, genes that differ from the model's.
    """
    store = DataStore.open(settings.data)
    views = ModelViews()
    scored = _score_one(trained, store, holdout, settings, truth, views)
    facts = scored.facts
    scored.facts = {"contexts": {holdout.name: facts}, "field_ranking": facts["field_ranking"]}
    title = f"Counterfactual evaluation: {holdout.held_out}"
    return _finish(out_dir, title, scored, truth, views)


HOW_IT_RAN = {
    "data": {"path", "num_workers", "prefetch_factor", "validate_values"},
    "train": {
        "epochs", "device", "threads", "progress", "keep_freed_memory", "torch_internals",
        "compile", "context_maps",
    },
}  # fmt: skip
"""Settings that change how a training ran (or where its data lies: the data's fingerprint is
compared instead), not what it learned; :func:`finished_training` reuses a fold whatever they
were."""


def settings_changed(saved: Settings, given: Settings) -> dict[str, tuple[Any, Any]]:
    """The data, model and training settings in which ``given`` differs from a saved training's,
    other than :data:`HOW_IT_RAN`: ``{"train.ema": (saved, given)}``."""
    changed = {}
    for section in ("data", "model", "train"):
        old = getattr(saved, section).model_dump(mode="json")
        new = getattr(given, section).model_dump(mode="json")
        for key in sorted(old.keys() | new.keys()):
            if key not in HOW_IT_RAN.get(section, set()) and old.get(key) != new.get(key):
                changed[f"{section}.{key}"] = (old.get(key), new.get(key))
    return changed


def finished_training(settings: Settings, fingerprint: str) -> bool:
    """Whether ``settings.output.dir`` holds a training of ``settings`` that finished all its
    epochs, so that a rerun of a protocol reuses it instead of training again.

    Args:
        settings: the training's settings (its output folder, data, model and training).
        fingerprint: the data's :meth:`~cae.data.store.DataStore.fingerprint`.

    Returns:
        True for a finished training of these settings on this data; False where there is none,
        or one that stopped early (its epochs are resumed).

    Raises:
        ConfigError: the folder holds a finished training of other settings or other data:
            reusing it would score another model than asked for.
    """
    path = Path(settings.output.dir or ".") / "checkpoints" / "last.pt"
    if not path.is_file():
        return False
    try:
        saved = Checkpoint.read(path)
    except CheckpointError:
        return False
    if saved.partial is not None or saved.epoch < settings.train.epochs:
        return False
    changed = settings_changed(saved.settings, settings)
    if saved.data_fingerprint not in (None, fingerprint):
        changed["data (fingerprint)"] = (saved.data_fingerprint, fingerprint)
    if changed:
        listed = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise ConfigError(
            f"{path} is a finished training of other settings ({listed}); give another output "
            "folder, or remove that one to train again"
        )
    return True


def train_or_reuse(settings: Settings, fingerprint: str) -> tuple[Path, str | None]:
    """Train one fold of a protocol, resume it where it stopped, or reuse it where it finished
    with these settings (:func:`finished_training`).

    Args:
        settings: the fold's settings (``output.dir`` its folder).
        fingerprint: the data's :meth:`~cae.data.store.DataStore.fingerprint`.

    Returns:
        The fold's last checkpoint and its MLflow run id (None when reused or not tracked).

    Raises:
        ConfigError: the folder holds a finished training of other settings.
    """
    from cae.tracking.callbacks import MLflowCallback, tracked
    from cae.train.trainer import train

    out_dir = Path(settings.output.dir or ".")
    checkpoint = out_dir / "checkpoints" / "last.pt"
    if finished_training(settings, fingerprint):
        log.info("%s already trained: reusing it", out_dir)
        return checkpoint, None
    if checkpoint.is_file():
        settings = settings.model_copy(
            update={"output": settings.output.model_copy(update={"resume": True})}
        )
    with tracked(settings) as callbacks:
        train(settings, callbacks)
    runs = [c.run_id for c in callbacks if isinstance(c, MLflowCallback)]
    return checkpoint, runs[0] if runs else None


def leave_one_out(
    settings: Settings, out_dir: Path, truth: Mapping[str, Any] | None = None
) -> Evaluation:
    """The field's protocol: per group, train without its target cells, then score.

    For every group g of ``evaluate.group_by`` (``evaluate.groups``, default all with both
    values), the cells ``group_by=g, field=target`` are kept out of training; the trained model
    moves the cells ``group_by=g, field=source`` to ``field=target`` and is scored against the
    real held-out cells beside the baselines. Each fold trains into ``out_dir/folds/<group>``; a
    rerun reuses finished folds and resumes an interrupted one.

    Args:
        settings: data, model and training settings, and the ``evaluate`` section.
        out_dir: where the folds and the report go.
        truth: the synthetic generator's truth.

    Returns:
        The :class:`Evaluation` over all folds.

    Raises:
        CAEError: incomplete ``evaluate`` settings, unknown groups, bad data.
    """
    store = DataStore.open(settings.data)
    holdouts = list(loo_holdouts(store, settings.evaluate, settings.data.null_values))
    all_scores, all_contexts, all_genes, per_fold, run_ids = [], [], [], {}, []
    views = ModelViews()
    for number, holdout in enumerate(holdouts, 1):
        log.info("fold %d/%d: holding out %s", number, len(holdouts), holdout.held_out)
        fold_dir = out_dir / "folds" / slug(holdout.name)
        checkpoint, run_id = train_or_reuse(
            training_settings(settings, holdout, fold_dir), store.fingerprint()
        )
        trained = load_checkpoint(checkpoint)
        scored = _score_one(trained, store, holdout, settings, truth, views)
        all_scores.append(scored.scores)
        all_contexts.append(scored.per_context.assign(fold=holdout.name))
        all_genes.append(scored.genes.assign(fold=holdout.name))
        per_fold[holdout.name] = scored.facts
        if run_id:
            run_ids.append(run_id)
            _log_fold(settings, run_id, scored.scores)
    evaluate = settings.evaluate
    scored = _Scored(
        pd.concat(all_scores, ignore_index=True),
        pd.concat(all_contexts, ignore_index=True),
        pd.concat(all_genes, ignore_index=True),
        _loo_facts(evaluate, per_fold),
    )
    title = (
        f"Leave-one-out: {evaluate.field} {evaluate.source} -> {evaluate.target}, "
        f"one {evaluate.group_by} held out at a time"
    )
    result = _finish(out_dir, title, scored, truth, views)
    result.run_ids = run_ids
    return result


def _loo_facts(evaluate: EvaluateConfig, per_fold: dict[str, Any]) -> dict[str, Any]:
    """The leave-one-out protocol's facts for evaluation.json: its settings, every fold's facts
    and every fold's field ranking."""
    return {
        "protocol": "leave-one-out",
        "field": evaluate.field,
        "group_by": evaluate.group_by,
        "source": evaluate.source,
        "target": evaluate.target,
        "contexts": per_fold,
        "field_rankings": {name: facts["field_ranking"] for name, facts in per_fold.items()},
    }


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}


def _method_metrics(scores: pd.DataFrame) -> dict[str, float]:
    """``eval/<method>/<metric>`` for a single context's rows."""
    out = {}
    for _, row in scores.iterrows():
        for name, value in row.drop(["context", "method"]).items():
            out[f"eval/{row['method']}/{name}"] = value
    return _finite(out)


def _log_fold(settings: Settings, run_id: str, scores: pd.DataFrame) -> None:
    import mlflow

    from cae.tracking.callbacks import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(settings.tracking.uri))
    mlflow.tracking.MlflowClient().log_batch(
        run_id,
        metrics=[
            mlflow.entities.Metric(k, v, timestamp=0, step=0)
            for k, v in _method_metrics(scores).items()
        ],
    )


def log_evaluation(
    result: Evaluation, settings: Settings, *, run_id: str | None = None, run_name: str = ""
) -> str:
    """Log an evaluation to MLflow: metrics ``eval/<method>/<metric>`` (medians over contexts,
    and per context ``eval/<context>/<method>/<metric>``), tables and the report folder.

    Args:
        result: the evaluation.
        settings: ``tracking`` says where.
        run_id: log into this run (e.g. the evaluated model's training); default a new run.
        run_name: name of a new run.

    Returns:
        The run's id.
    """
    import mlflow

    from cae.tracking.callbacks import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(settings.tracking.uri))
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        context: Any = nullcontext(active)  # already the active run (leave-one-out's parent)
    elif run_id:
        context = mlflow.start_run(run_id=run_id)
    else:
        mlflow.set_experiment(settings.tracking.experiment)
        context = mlflow.start_run(run_name=run_name or None, nested=active is not None)
    with context as run:
        metrics: dict[str, float] = {}
        for method, row in result.summary.iterrows():
            for name, value in row.items():
                if str(name).endswith("_median"):
                    metrics[f"eval/{method}/{str(name).removesuffix('_median')}"] = value
        for context_name, rows in result.scores.groupby("context", sort=False):
            for key, value in _method_metrics(rows).items():
                metrics[key.replace("eval/", f"eval/{slug(str(context_name))}/", 1)] = value
        mlflow.log_metrics(_finite(metrics))
        mlflow.log_table(result.scores, artifact_file="evaluation/scores.json")
        mlflow.log_table(result.contributions, artifact_file="evaluation/contributions.json")
        mlflow.log_table(result.top_genes, artifact_file="evaluation/top_genes.json")
        mlflow.log_artifacts(str(result.report.parent), artifact_path="evaluation")
        mlflow.set_tag("cae.evaluation", result.facts.get("protocol", "holdout"))
        return run.info.run_id


def run_evaluation(
    settings: Settings,
    *,
    out_dir: Path,
    holdout: str | None = None,
    source: str | None = None,
    model: str | None = None,
    run_id: str | None = None,
    protocol: str = "holdout",
    truth_path: Path | None = None,
) -> Evaluation:
    """What ``cae evaluate`` does: one held-out context with a given model, or leave-one-out.

    Raises:
        ConfigError: a mode's required options are missing or contradict each other.
        CAEError: bad data or model.
    """
    truth = read_truth(truth_path, Path(settings.data.path))
    if protocol == "leave-one-out":
        if any((holdout, source, model, run_id)):
            raise ConfigError(
                "--protocol leave-one-out trains its own models: drop --holdout/--source/"
                "--model/--run-id and give --field, --group-by, --source-value and "
                "--target-value"
            )
        tracked = settings.tracking.enabled
        if not tracked:
            return leave_one_out(settings, out_dir, truth)
        import mlflow

        from cae.tracking.callbacks import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(settings.tracking.uri))
        mlflow.set_experiment(settings.tracking.experiment)
        e = settings.evaluate
        with mlflow.start_run(run_name=f"leave-one-out {e.field} by {e.group_by}") as parent:
            mlflow.log_params(settings.flat())
            nested = settings.tracking.model_copy(update={"parent_run_id": parent.info.run_id})
            result = leave_one_out(settings.model_copy(update={"tracking": nested}), out_dir, truth)
            log_evaluation(result, settings, run_id=parent.info.run_id)
        return result
    if protocol != "holdout":
        raise ConfigError(f"unknown --protocol {protocol!r}; use holdout or leave-one-out")
    if not holdout or not source:
        raise ConfigError(
            "give --holdout 'cell_type=B,condition=stimulated' and --source "
            "'condition=control' (or --protocol leave-one-out)"
        )
    held = Holdout.parse(holdout, source)
    trained = load_evaluated_model(model, run_id, settings)
    result = evaluate(trained, settings, held, out_dir, truth)
    if settings.tracking.enabled:
        result.run_ids = [
            log_evaluation(result, settings, run_id=run_id, run_name=f"evaluate {held.held_out}")
        ]
    return result
