"""The registered model: an MLflow pyfunc that serves counterfactuals, and registry helpers.

A registered CAE is a "model from code" (``cae/tracking/model_code.py``) whose only artifact is the
training's checkpoint (weights, vocabularies, field specs, settings, gene names) and whose code is
the ``cae`` package itself (``code_paths``). It never needs the training or data folders again.

Input: a DataFrame with one column per gene (any order; extra columns are ignored with a warning)
and one column per model field holding each cell's source context. Params: ``targets``
(``"sex=female;assay=10x 3' v3"``; fields not named keep their source value; ``""`` reconstructs
the cells), which every request must give; ``contributions`` (add each head's per-cell L2 norm
as ``contrib_l2/<head>`` columns); and, for a model that reads counts (``data.transform =
"log1p_cp10k"``), ``sample`` (true: whole counts instead of the mean: under the residual design
each cell's own counts moved to its counterfactual, with the decode design counts drawn from the
negative binomial of a model trained with ``model.likelihood = "nb"``), ``seed`` (the draws'
seed, default 0) and ``library_size`` (the total counts every cell is drawn with in mean;
absent: each request cell's depth). Output: the counterfactual expression, one column per gene
(log1p counts per 10,000 for the default transform), or with ``sample`` the drawn counts (whole
numbers); every value finite.

Refused with a one-line reason (``MlflowException`` INVALID_PARAMETER_VALUE, HTTP 400 when
served): a request of more than ``serve.max_rows`` cells (default 10,000); a gene value that is
not a number, or is NaN, null, infinite, negative or above ``serve.max_value`` (default 1e9, which
no count or normalised value reaches); a cell with zero total counts under ``log1p_cp10k``; a
column given twice; missing gene or field columns; unknown target fields or values; params without
``targets``; ``sample`` that the model cannot draw (values used as stored, or the decode design
with the normal likelihood); a ``sample`` or
``contributions`` that is not true or false, a ``seed`` that is not a whole number from 0 to
2**63 - 1, a ``library_size`` that is not a number > 0 and at most 1e9, and ``seed`` or
``library_size`` without ``sample``. ``CAE_SERVE__MAX_ROWS`` / ``CAE_SERVE__MAX_VALUE`` in the
serving process override the values saved with the model. MLflow itself drops param names other
than those (with a warning in the server's log) before the model sees them, and fills in the
declared defaults of those not given, which is why ``targets`` has no default: a misspelt
``target`` is refused rather than answered with the cells unchanged.
"""

from __future__ import annotations

import numbers
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from cae.config import CheckpointChoice, ServeConfig, serve_settings
from cae.data.contexts import parse_targets
from cae.errors import CAEError, CheckpointError, ConfigError, DataError, MetadataError
from cae.generate import Sampling, is_number, requested_sampling
from cae.model.cae import contribution_l2
from cae.train.checkpoint import TrainedModel, load_checkpoint

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

MODEL_NAME_IN_RUN = "counterfactual_model"
MODEL_CODE = Path(__file__).with_name("model_code.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PARAMS = ("targets", "contributions", "sample", "seed", "library_size")


def predict_frame(
    trained: TrainedModel,
    cells: pd.DataFrame,
    targets: dict[str, str],
    contributions: bool,
    limits: ServeConfig | None = None,
    sample: Sampling | None = None,
) -> pd.DataFrame:
    """Counterfactual expression of ``cells`` (gene columns + one source column per field).

    Args:
        trained: the model.
        cells: one row per cell: a column per gene and a source-context column per field.
        targets: ``{field: value}`` for the fields to change.
        contributions: add each head's per-cell L2 norm as ``contrib_l2/<head>`` columns.
        limits: the most rows and the largest value a request may hold (None: the defaults of
            :class:`ServeConfig`).
        sample: whole counts instead of the mean (:meth:`TrainedModel.sample_counts`), at each
            cell's depth unless the sampling gives a library size (None: the mean).

    Returns:
        The counterfactual expression (or the drawn counts), one column per gene, indexed like
        ``cells``; every value finite.

    Raises:
        ConfigError: ``sample`` the model cannot draw (:meth:`TrainedModel.sampling_refusal`).
        DataError: ``cells`` is not a table, holds more rows than ``limits.max_rows``, names a
            column twice, lacks gene columns, or holds a gene value that is not a number >= 0 and
            at most ``limits.max_value`` (or a cell with zero counts under ``log1p_cp10k``); or the
            model's answer is not finite. The message names the column, row and value.
        MetadataError: a field column is missing, or a source or target value is unknown (the
            message lists the fields or the known values).
    """
    limits = limits or ServeConfig()
    _check_request(trained, cells, limits)
    genes, fields = trained.genes, list(trained.vocabularies.fields)
    x = expression_values(cells[genes], limits.max_value, trained.settings.data.transform)
    source = cells[trained.metadata_columns].astype(dict.fromkeys(fields, str))
    prepared = trained.prepare(x, source)
    out = trained.move(prepared.x_model, prepared.source_index, targets)
    values = out.output if sample is None else sample.draw(trained, prepared, out)
    frame = pd.DataFrame(values.cpu().numpy(), columns=genes, index=cells.index)
    if contributions:
        for head, norms in contribution_l2(out).items():
            frame[f"contrib_l2/{head}"] = norms.cpu().numpy()
    finite = np.isfinite(frame.to_numpy()).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise DataError(
            f"the model's answer for row {row} is not finite; its input lies far outside what "
            "the model was trained on, or the model's weights are broken (retrain it)"
        )
    return frame


def _check_request(trained: TrainedModel, cells: object, limits: ServeConfig) -> None:
    """Refuse a request that is not a table of the model's genes and fields within ``limits``
    (:func:`predict_frame` says what); warn about columns the model does not use."""
    if not isinstance(cells, pd.DataFrame):
        raise DataError(
            f"the input is a {type(cells).__name__}, not a table; send a DataFrame "
            '(served: "dataframe_split" or "dataframe_records") with one column per gene and '
            "per field"
        )
    if len(cells) > limits.max_rows:
        raise DataError(
            f"the request holds {len(cells):,} cells but this model answers at most "
            f"{limits.max_rows:,} per request (serve.max_rows); send fewer cells per request, or "
            "raise the limit where the model is served (CAE_SERVE__MAX_ROWS=N mlflow models serve "
            "...)"
        )
    twice = cells.columns[cells.columns.duplicated()]
    if len(twice):
        raise DataError(
            f"input has the column {twice[0]!r} more than once; send each gene and field once"
        )
    genes = trained.genes
    fields = trained.metadata_columns
    missing_fields = [f for f in fields if f not in cells.columns]
    if missing_fields:
        raise MetadataError(
            f"input lacks the context column(s) {', '.join(missing_fields)}; the model needs one "
            f"column per field: {', '.join(fields)}"
            + _library_note(trained.settings.data.library_key)
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
            stacklevel=3,  # the caller of predict_frame,
        )


def expression_values(genes: pd.DataFrame, max_value: float, transform: str) -> np.ndarray:
    """The gene columns of a request as a float32 matrix, checked value by value.

    Args:
        genes: (n, G) one column per gene, in the model's order (column names unique).
        max_value: the largest value allowed.
        transform: the model's input transform; ``log1p_cp10k`` also refuses all-zero cells.

    Returns:
        (n, G) float32.

    Raises:
        DataError: naming the first column, row and value that is not a number (a string, a
            boolean), is null, NaN, infinite, negative or above ``max_value``; or the first cell
            with zero total counts under ``log1p_cp10k``. Rows count from 0.
    """
    for gene, dtype in genes.dtypes.items():
        if dtype.kind not in "iuf":  # object columns (JSON with nulls, strings, huge integers)
            for row, value in enumerate(genes[gene].tolist()):
                if value is not None and value is not pd.NA and not is_number(value):
                    raise DataError(
                        f"gene column {gene!r} holds {value!r} in row {row}; gene columns take "
                        "numbers (counts, or the normalised values the model was trained on)"
                    )
    with np.errstate(over="ignore"):  # a value past float32's range becomes inf, refused below
        try:
            x = genes.to_numpy(dtype=np.float32, na_value=np.nan)
        except OverflowError:  # an integer past float64's range
            x = np.array([[_as_float(v) for v in row] for row in genes.itertuples(index=False)])
            x = x.astype(np.float32)
    allowed = (x >= 0) & (x <= max_value)  # NaN fails both comparisons
    if not allowed.all():
        row, column = divmod(int(np.argmin(allowed)), x.shape[1])
        value = genes.iat[row, column]
        bad = allowed.size - int(np.count_nonzero(allowed))
        more = f" (and {bad - 1:,} more such values)" if bad > 1 else ""
        raise DataError(
            f"gene column {genes.columns[column]!r} holds {_shown(value)} in row {row}{more}; "
            f"{_why_refused(value, max_value)}"
        )
    if transform == "log1p_cp10k":
        empty = np.flatnonzero(x.sum(axis=1) <= 0)
        if empty.size:
            more = f" (and {empty.size - 1:,} more cells)" if empty.size > 1 else ""
            raise DataError(
                f"row {empty[0]} has zero total counts{more}; transform log1p_cp10k cannot "
                "normalise a cell with no counts: drop it, or send its counts"
            )
    return x


def _as_float(value: object) -> float:
    """``value`` as a float; None and integers past float64's range as NaN and infinity."""
    if value is None or value is pd.NA:
        return float("nan")
    number = cast(numbers.Real, value)  # a number here: the callers checked is_number
    try:
        return float(number)
    except OverflowError:
        return float("-inf") if number < 0 else float("inf")


def _shown(value: object) -> str:
    """A gene value as the request spelled it (JSON names for the special floats)."""
    number = _as_float(value)
    if value is None or value is pd.NA:
        return "null"
    if np.isnan(number):  # a JSON null in a column of numbers arrives as NaN
        return "NaN or null"
    if np.isinf(number) and not isinstance(value, numbers.Integral):
        return "Infinity" if number > 0 else "-Infinity"
    text = str(value) if isinstance(value, np.generic) else repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def _why_refused(value: object, max_value: float) -> str:
    """Why a gene value that is a number is refused, and what to send instead."""
    number = _as_float(value)
    if np.isnan(number):
        return "every gene of every cell needs a number (0 where nothing was counted)"
    if number < 0:
        return "expression must be >= 0 (counts, or the normalised values the model was trained on)"
    return (
        f"expression must be finite and at most {max_value:g} (serve.max_value), more than any "
        "count or normalised value reaches; send counts or the normalised values the model was "
        "trained on, or raise the bound where the model is served (CAE_SERVE__MAX_VALUE=X mlflow "
        "models serve ...)"
    )


class CounterfactualModel(PythonModel):
    """The pyfunc behind every registered CAE (see the module docstring for its contract)."""

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact (on the CPU) and the serving settings in force."""
        self.trained = load_checkpoint(context.artifacts["checkpoint"])
        self.limits = serve_settings(self.trained.settings)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Move ``model_input``'s cells to ``params["targets"]`` (see the module docstring for
        every param); 400 errors for bad input."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        params = params or {}
        try:
            if params.get("targets") is None:
                raise ConfigError(
                    'the request\'s params lack "targets"; name the counterfactual, e.g. '
                    '{"targets": "sex=female"} ("" reconstructs the cells). MLflow drops param '
                    f"names other than {' and '.join(PARAMS)}: check their spelling"
                )
            targets = parse_targets(str(params["targets"]))
            contributions = _flag(params, "contributions")
            sample = requested_sampling(
                _flag(params, "sample"), params.get("seed"), params.get("library_size"), _quoted
            )
            return predict_frame(
                self.trained, model_input, targets, contributions, self.limits, sample
            )
        except CAEError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


def _flag(params: dict[str, Any], name: str) -> bool:
    """A true-or-false param (absent or null: false).

    Raises:
        ConfigError: anything else, a string "true" included (JSON's true is a boolean).
    """
    value = params.get(name)
    if value is None:
        return False
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f'"{name}" is {value!r}; give true or false')
    return bool(value)


def _quoted(name: str) -> str:
    """A param's name as a request spells it."""
    return f'"{name}"'


def example_input(trained: TrainedModel, n_cells: int = 2) -> pd.DataFrame:
    """A small valid input: unit expression for every gene, the first known value of each field
    and, with ``data.library_key``, a total of twice the genes' sum."""
    frame = pd.DataFrame(np.ones((n_cells, len(trained.genes))), columns=trained.genes)
    for field in trained.vocabularies.fields:
        frame[field] = trained.vocabularies.by_field[field].values[0]
    if (key := trained.settings.data.library_key) is not None:
        frame[key] = 2.0 * len(trained.genes)
    return frame


def _library_note(key: str | None) -> str:
    """What a request's library column is, for a message (empty without one)."""
    if key is None:
        return ""
    return f" ('{key}' is each cell's total counts over all its genes, data.library_key)"


def pip_requirements() -> list[str]:
    """What an environment needs to load the model (the package travels as code): cae's runtime
    dependencies, each pinned to the version installed here (``torch==2.13.0``), so that a
    serving environment built later gets the versions the model was logged with. A local version
    label (``+cpu``, ``+cu128``) is dropped: ``torch==2.13.0`` matches every build of 2.13.0, and
    PyPI knows no ``+cpu``."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    pinned = []
    for text in requires("cae") or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra's, or another platform's
        installed = Version(version(requirement.name)).public
        pinned.append(f"{requirement.name}=={installed}")
    return pinned


def download_run_checkpoint(run_id: str, dst: Path, which: CheckpointChoice = "last") -> str:
    """Download a checkpoint of a ``cae train`` run (tracking URI already set) into ``dst``.

    Args:
        run_id: the run.
        dst: a folder to download into.
        which: ``last`` (the final epoch) or ``best`` (the epoch ``output.best_by`` chose).

    Returns:
        The local path of ``last.pt`` or ``best.pt``.

    Raises:
        CheckpointError: no such run, or it holds no such checkpoint.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.tracking.MlflowClient().get_run(run_id)
    except MlflowException:
        raise CheckpointError(
            f"no MLflow run {run_id} at {mlflow.get_tracking_uri()}; `cae runs compare` lists runs"
        ) from None
    path = f"checkpoints/{which}.pt"
    try:
        return mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=str(dst)
        )
    except (MlflowException, OSError):
        hint = (
            "was it trained with output.best_by = 'none', or before best checkpoints were kept? "
            "use the last checkpoint (--checkpoint last)"
            if which == "best"
            else "was it a cae training with tracking.log_checkpoint on?"
        )
        raise CheckpointError(f"run {run_id} holds no {path}; {hint}") from None


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
    run_id: str,
    name: str,
    alias: str | None = "champion",
    tracking_uri: str | None = None,
    checkpoint: CheckpointChoice = "last",
) -> str:
    """Log a training run's checkpoint as a counterfactual pyfunc, register it and set an alias.
    The run's experiment is then this process's active MLflow experiment.

    Args:
        run_id: the MLflow run of a ``cae train`` (it holds ``checkpoints/last.pt``, and
            ``best.pt`` unless it was trained with ``output.best_by = "none"``).
        name: the registered model's name.
        alias: alias pointing at the new version (None sets none).
        tracking_uri: where the run is (default: the tracking URI in force).
        checkpoint: ``last`` (the final epoch) or ``best``; the version is tagged
            ``cae.checkpoint`` with the choice and ``cae.epoch`` with the epoch it holds.

    Returns:
        The new model version (a string, as MLflow numbers them).

    Raises:
        ConfigError: ``name`` or ``alias`` is one the registry refuses.
        CheckpointError: the run does not exist or holds no checkpoint.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from cae.tracking.callbacks import tracking_uri as resolve_uri

    check_registry_names(name, alias)
    mlflow.set_tracking_uri(resolve_uri(tracking_uri))
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as scratch:
        local = download_run_checkpoint(run_id, Path(scratch), checkpoint)
        trained = load_checkpoint(local)
        version = _log_and_register(client, run_id, local, trained, name)
    about = {"cae.checkpoint": checkpoint, "cae.epoch": str(trained.epoch)}
    _tag_version(client, name, version, run_id, about)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def _log_and_register(
    client: MlflowClient, run_id: str, local: str, trained: TrainedModel, name: str
) -> str:
    """Log the checkpoint ``local`` (of ``trained``) into run ``run_id`` as the pyfunc, register
    it as ``name``, and give the run back the status it had; returns the new version."""
    import mlflow

    example = example_input(trained)
    signature = model_signature(trained)
    run = client.get_run(run_id)
    # The run's own experiment is made the active one: starting a run of another experiment
    # than the active one (a training earlier in this process) is refused.
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    mlflow.start_run(run_id=run_id)
    try:
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(MODEL_CODE),
            artifacts={"checkpoint": local},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=(example, {"targets": ""}),
            pip_requirements=pip_requirements(),
            registered_model_name=name,
        )
    finally:  # a refused registration does not change how the training ended
        mlflow.end_run(run.info.status)
    return str(info.registered_model_version)


def _tag_version(
    client: MlflowClient, name: str, version: str, run_id: str, about: dict[str, str]
) -> None:
    """Tag a registered version with its run (id, data fingerprint, fields, cae version) and
    ``about`` (which checkpoint, of which epoch)."""
    run_tags = client.get_run(run_id).data.tags
    tags = {k: run_tags[k] for k in ("cae.data_fingerprint", "cae.fields", "cae.version")
            if k in run_tags}  # fmt: skip
    for key, value in (tags | {"cae.run_id": run_id} | about).items():
        client.set_model_version_tag(name, version, key, value)


def model_signature(trained: TrainedModel) -> Any:
    """The registered model's signature: its output columns (those of :func:`predict_frame`'s
    answer to :func:`example_input`) and its params (:data:`PARAMS`),
    ``targets`` and ``library_size`` without a default (see the module docstring). It declares no
    input schema: MLflow would check the input against one before :func:`predict_frame` sees it,
    and its refusals print the whole request and schema (megabytes for 60,000 genes) without
    naming the value to fix; ``input_example`` shows the input's columns instead."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ParamSchema, ParamSpec

    params = ParamSchema(
        [
            ParamSpec("targets", "string", None),
            ParamSpec("contributions", "boolean", False),
            ParamSpec("sample", "boolean", False),
            ParamSpec("seed", "long", 0),
            ParamSpec("library_size", "double", None),
        ]
    )
    output = predict_frame(trained, example_input(trained), {}, False)
    return ModelSignature(outputs=infer_signature(output).inputs, params=params)


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
    trained = load_checkpoint(checkpoints[0])
    trained.origin = model_uri
    return trained
