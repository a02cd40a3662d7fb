"""Compare per-field contributions of tracked runs in the terminal (``cae runs compare``)."""

from __future__ import annotations

import pandas as pd

from cae.errors import ConfigError

FIELDS_TAG = "cae.fields"
BEST_EPOCH_TAG = "cae.best_epoch"  # the epoch checkpoints/best.pt holds
RUN_ROWS = ("experiment", "epochs", "fields")  # what each run is, above its numbers


def contribution_table(
    tracking_uri: str,
    experiment: str | None = None,
    last: int = 5,
    metric: str = "contrib_share",
) -> pd.DataFrame:
    """The final per-head contribution of the latest runs, one column per run, under three rows
    that say what each run is: its experiment, the epochs it trained and its fields.

    Args:
        tracking_uri: where the runs are (sqlite file, folder or http server).
        experiment: an experiment name; ``None`` looks in every experiment.
        last: how many of the latest CAE runs to show.
        metric: ``contrib_share``, ``contrib_l2`` or ``effect_l2`` (fields only: NaN for base).

    Returns:
        A DataFrame of one column per run labelled ``<run name> (<first 8 of run id>)``, newest
        first. Its rows: ``experiment``, ``epochs`` (the last epoch logged, ``15(best:12)`` when
        the best checkpoint holds another epoch) and ``fields`` (text), then one per head,
        ``base`` first, then the fields (floats; NaN where a run lacks that field).

    Raises:
        ConfigError: the experiment does not exist, or holds no CAE run.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    experiments = {e.experiment_id: e.name for e in mlflow.search_experiments()}
    if experiment is not None:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            names = ", ".join(experiments.values()) or "none"
            raise ConfigError(
                f"no experiment '{experiment}' at {tracking_uri}; experiments there: {names}"
            )
        experiments = {found.experiment_id: found.name}
    runs = mlflow.search_runs(
        experiment_ids=list(experiments),
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    tag = f"tags.{FIELDS_TAG}"
    if runs.empty or tag not in runs.columns or runs[tag].isna().all():
        where = f"experiment '{experiment}'" if experiment else "any experiment"
        raise ConfigError(f"no CAE training runs in {where} at {tracking_uri}; train one first")
    runs = runs[runs[tag].notna()].head(last)
    prefix = f"metrics.{metric}/"
    heads = ["base"]
    for fields in runs[tag]:
        heads += [f for f in fields.split(",") if f not in heads]
    table = pd.DataFrame(index=pd.Index([*RUN_ROWS, *heads], name=metric), dtype=object)
    for _, run in runs.iterrows():
        name = run.get("tags.mlflow.runName") or "run"
        label = f"{name} ({run['run_id'][:8]})"
        about = [experiments[run["experiment_id"]], _epochs(run), run[tag]]
        table[label] = about + [run.get(f"{prefix}{head}", float("nan")) for head in heads]
    return table


def _epochs(run: pd.Series) -> str:
    """The last epoch a run logged, and its best checkpoint's epoch where that differs."""
    last = run.get("metrics.epoch")
    if last is None or pd.isna(last):
        return "-"
    best = run.get(f"tags.{BEST_EPOCH_TAG}")
    if isinstance(best, str) and best != str(int(last)):
        return f"{int(last)}(best:{best})"
    return str(int(last))
