"""The registered model: an MLflow pyfunc that serves counterfactuals, and registry helpers.

A registered CAE is a "model from code" (``cae/tracking/model_code.py``) whose only artifact is the
training's checkpoint (weights, vocabularies, field specs, settings, gene names) and whose code is
the ``cae`` package itself (``code_paths``). It never needs the training or data folders again.

Input: a DataFrame with one column per gene (any order; extra columns are ignored with a warning)
and one column per model field holding each cell's source context. Params: ``targets``
(``"sex=female;assay=10x 3' v3"``; fields not named keep their source value) and ``contributions``
(add each head's per-cell L2 norm as ``contrib_l2/<head>`` columns). Output: the counterfactual
expression, one column per gene (log1p counts per 10,000 for the default transform). A request
of more than ``serve.max_rows`` cells (default 10,000; ``CAE_SERVE__MAX_ROWS`` in the serving
process overrides the value saved with the model) is refused with a message saying so.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from cae.config import serve_settings
from cae.errors import CAEError, CheckpointError, ConfigError, DataError, MetadataError
from cae.model.cae import contribution_l2
from cae.train.checkpoint import TrainedModel, load_checkpoint

MODEL_NAME_IN_RUN = "counterfactual_model"
MODEL_CODE = Path(__file__).with_name("model_code.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS: dict[str, Any] = {"targets": "", "contributions": False}


def parse_targets(text: str) -> dict[str, str]:
    """Parse ``"sex=female;assay=10x 3' v3"`` into ``{"sex": "female", "assay": "10x 3' v3"}``.

    Raises:
        ConfigError: an entry is not ``field=value``, or names a field twice.
    """
    targets: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        field, sep, value = entry.partition("=")
        field, value = field.strip(), value.strip()
        if not sep or not field or not value:
            raise ConfigError(
                f"target {entry!r} is not field=value; write targets as "
                '"sex=female;assay=10x 3\' v3"'
            )
        if field in targets:
            raise ConfigError(f"target field '{field}' is given twice")
        targets[field] = value
    return targets


def predict_frame(
    trained: TrainedModel,
    cells: pd.DataFrame,
    targets: dict[str, str],
    contributions: bool,
    max_rows: int | None = None,
) -> pd.DataFrame:
    """Counterfactual expression of ``cells`` (gene columns + one source column per field).

    Args:
        trained: the model.
        cells: one row per cell: a column per gene and a source-context column per field.
        targets: ``{field: value}`` for the fields to change.
        contributions: add each head's per-cell L2 norm as ``contrib_l2/<head>`` columns.
        max_rows: refuse inputs with more rows (None: no limit).

    Returns:
        The counterfactual expression, one column per gene, indexed like ``cells``.

    Raises:
        DataError: more rows than ``max_rows``, or gene columns are missing (the message says
            the limit and how to raise it, or lists the genes the model needs).
        MetadataError: a field column is missing, or a source or target value is unknown (the
            message lists the fields or the known values).
    """
    if max_rows is not None and len(cells) > max_rows:
        raise DataError(
            f"the request holds {len(cells):,} cells but this model answers at most "
            f"{max_rows:,} per request (serve.max_rows); send fewer cells per request, or raise "
            "the limit where the model is served (CAE_SERVE__MAX_ROWS=N mlflow models serve ...)"
        )
    genes = trained.genes
    fields = list(trained.vocabularies.fields)
    missing_fields = [f for f in fields if f not in cells.columns]
    if missing_fields:
        raise MetadataError(
            f"input lacks the context column(s) {', '.join(missing_fields)}; the model needs one "
            f"column per field: {', '.join(fields)}"
        )
    present = set(cells.columns)
    missing = [g for g in genes if g not in present]
    if missing:
        raise DataError(
            f"input lacks {len(missing):,} of the model's {len(genes):,} gene columns, e.g. "
            f"{', '.join(missing[:5])}; send every gene in trained.genes (first: "
            f"{', '.join(genes[:5])})"
        )
    extra = present - set(genes) - set(fields)
    if extra:
        warnings.warn(
            f"ignoring {len(extra)} input column(s) the model does not use, e.g. "
            f"{', '.join(sorted(map(str, extra))[:5])}",
            stacklevel=2,
        )
    x = cells[genes].to_numpy(dtype=np.float32)
    out = trained.counterfactual(x, cells[fields].astype(str), targets)
    frame = pd.DataFrame(out.output.cpu().numpy(), columns=genes, index=cells.index)
    if contributions:
        for head, norms in contribution_l2(out).items():
            frame[f"contrib_l2/{head}"] = norms.cpu().numpy()
    return frame


class CounterfactualModel(PythonModel):
    """The pyfunc behind every registered CAE (see the module docstring for its contract)."""

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact (on the CPU) and the serving settings in force."""
        self.trained = load_checkpoint(context.artifacts["checkpoint"])
        self.max_rows = serve_settings(self.trained.settings).max_rows

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Move ``model_input``'s cells to ``params["targets"]``; 400 errors for bad input."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        params = {**DEFAULT_PARAMS, **(params or {})}
        try:
            targets = parse_targets(str(params["targets"]))
            return predict_frame(
                self.trained, model_input, targets, bool(params["contributions"]), self.max_rows
            )
        except CAEError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


def example_input(trained: TrainedModel, n_cells: int = 2) -> pd.DataFrame:
    """A small valid input: unit expression for every gene, the first known value of each field."""
    frame = pd.DataFrame(np.ones((n_cells, len(trained.genes))), columns=trained.genes)
    for field in trained.vocabularies.fields:
        frame[field] = trained.vocabularies.by_field[field].values[0]
    return frame


def pip_requirements() -> list[str]:
    """What an environment needs to load the model (the package travels as code)."""
    from importlib.metadata import requires

    wanted = requires("cae") or []
    return [r for r in wanted if "extra ==" not in r]


def download_run_checkpoint(run_id: str, dst: Path) -> str:
    """Download the checkpoint of a ``cae train`` run (tracking URI already set) into ``dst``.

    Returns:
        The local path of ``last.pt``.

    Raises:
        CheckpointError: no such run, or it holds no ``checkpoints/last.pt``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.tracking.MlflowClient().get_run(run_id)
    except MlflowException:
        raise CheckpointError(
            f"no MLflow run {run_id} at {mlflow.get_tracking_uri()}; `cae runs compare` lists runs"
        ) from None
    try:
        return mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="checkpoints/last.pt", dst_path=str(dst)
        )
    except (MlflowException, OSError):
        raise CheckpointError(
            f"run {run_id} holds no checkpoints/last.pt; was it a cae training with "
            "tracking.log_checkpoint on?"
        ) from None


def check_registry_names(name: str, alias: str | None) -> None:
    """Check a registered model name and alias as the MLflow Model Registry will, before any
    work is done for them.

    Raises:
        ConfigError: the registry would refuse one of them (the message names it and why).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
        _validate_model_name,
    )

    try:
        _validate_model_name(name)
    except MlflowException as err:
        raise ConfigError(f"registered model name {name!r} is refused: {err.message}") from None
    if alias is None:
        return
    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as err:
        raise ConfigError(f"alias {alias!r} is refused: {err.message}") from None


def register(
    run_id: str, name: str, alias: str | None = "champion", tracking_uri: str | None = None
) -> str:
    """Log a training run's checkpoint as a counterfactual pyfunc, register it and set an alias.

    Args:
        run_id: the MLflow run of a ``cae train`` (it holds ``checkpoints/last.pt``).
        name: the registered model's name.
        alias: alias pointing at the new version (None sets none).
        tracking_uri: where the run is (default: the tracking URI in force).

    Returns:
        The new model version (a string, as MLflow numbers them).

    Raises:
        ConfigError: ``name`` or ``alias`` is one the registry refuses.
        CheckpointError: the run does not exist or holds no checkpoint.
    """
    import mlflow
    from mlflow.models import infer_signature

    check_registry_names(name, alias)
    from mlflow.tracking import MlflowClient

    from cae.tracking.callbacks import tracking_uri as resolve_uri

    mlflow.set_tracking_uri(resolve_uri(tracking_uri))
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = download_run_checkpoint(run_id, Path(scratch))
        trained = load_checkpoint(checkpoint)
        example = example_input(trained)
        signature = _optional_inputs(
            infer_signature(
                example, predict_frame(trained, example, {}, False), params=DEFAULT_PARAMS
            )
        )
        ended = client.get_run(run_id).info.status
        mlflow.start_run(run_id=run_id)
        try:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(MODEL_CODE),
                artifacts={"checkpoint": checkpoint},
                code_paths=[str(PACKAGE_DIR)],
                signature=signature,
                input_example=example,
                pip_requirements=pip_requirements(),
                registered_model_name=name,
            )
        finally:  # a refused registration does not change how the training ended
            mlflow.end_run(ended)
    version = str(info.registered_model_version)
    run = client.get_run(run_id)
    for key in ("cae.data_fingerprint", "cae.fields", "cae.version"):
        if key in run.data.tags:
            client.set_model_version_tag(name, version, key, run.data.tags[key])
    client.set_model_version_tag(name, version, "cae.run_id", run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def _optional_inputs(signature: Any) -> Any:
    """The same signature with every input column optional, so that a missing gene or field
    reaches :func:`predict_frame`, whose message lists what the model needs (MLflow's own schema
    error would print the whole request instead)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema(
        [ColSpec(col.type, col.name, required=False) for col in signature.inputs.inputs]
    )
    return ModelSignature(inputs=inputs, outputs=signature.outputs, params=signature.params)


def load_model(model_uri: str) -> TrainedModel:
    """Load a registered (or logged) CAE as a :class:`TrainedModel`, for people who want tensors.

    Args:
        model_uri: ``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/ID/counterfactual_model``, or
            a local model folder.

    Returns:
        The trained model with its vocabularies, field specs, settings and genes.

    Raises:
        CheckpointError: nothing at that URI, or it is not a CAE model.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from cae.tracking.callbacks import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(None))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except (MlflowException, OSError) as err:
        raise CheckpointError(f"cannot load model {model_uri}: {err}") from None
    checkpoints = sorted(local.glob("artifacts/*.pt"))
    if not checkpoints:
        raise CheckpointError(f"{model_uri} is not a CAE model (no checkpoint among its artifacts)")
    return load_checkpoint(checkpoints[0])
