"""Compare per-field contributions of tracked runs in the terminal (``cae runs compare``)."""

from __future__ import annotations

import pandas as pd

from cae.errors import ConfigError

FIELDS_TAG = "cae.fields"


def contribution_table(
    tracking_uri: str,
    experiment: str | None = None,
    last: int = 5,
    metric: str = "contrib_share",
) -> pd.DataFrame:
    """The final per-head contribution of the latest runs, one column per run.

    Args:
        tracking_uri: where the runs are (sqlite file, folder or http server).
        experiment: an experiment name; ``None`` looks in every experiment.
        last: how many of the latest CAE runs to show.
        metric: ``contrib_share``, ``contrib_l2`` or ``effect_l2`` (fields only: NaN for base).

    Returns:
        A DataFrame indexed by head (``base`` first, then fields), one column per run labelled
        ``<run name> (<first 8 of run id>)``, newest first; NaN where a run lacks that field.

    Raises:
        ConfigError: the experiment does not exist, or holds no CAE run.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if experiment is None:
        experiment_ids = [e.experiment_id for e in mlflow.search_experiments()]
    else:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            names = ", ".join(e.name for e in mlflow.search_experiments()) or "none"
            raise ConfigError(
                f"no experiment '{experiment}' at {tracking_uri}; experiments there: {names}"
            )
        experiment_ids = [found.experiment_id]
    runs = mlflow.search_runs(
        experiment_ids=experiment_ids, order_by=["attributes.start_time DESC"], max_results=1000
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
    table = pd.DataFrame(index=pd.Index(heads, name=metric))
    for _, run in runs.iterrows():
        name = run.get("tags.mlflow.runName") or "run"
        label = f"{name} ({run['run_id'][:8]})"
        table[label] = [run.get(f"{prefix}{head}", float("nan")) for head in heads]
    return table
