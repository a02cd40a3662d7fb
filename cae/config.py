"""Settings: one object that travels through data loading, the model, training and output.

Sources, highest precedence first: command-line flags (passed as keyword overrides), environment
variables with the ``CAE_`` prefix (nested with ``__``: ``CAE_TRAIN__EPOCHS=5``,
``CAE_DATA__FIELDS=assay,sex``), a TOML file (``--config experiments/demo.toml``), then the defaults
below. No code is edited to configure a run.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from cae.data.contexts import Selection
from cae.data.vocabulary import DEFAULT_NULL_VALUES
from cae.errors import ConfigError, describe_invalid
from cae.types import ContextMapMethod, Likelihood, LRSchedule, Nonnegative

Transform = Literal["log1p_cp10k", "none"]
ValidationMode = Literal["full", "headers"]
Precision = Literal["fp32", "bf16"]
# An evaluation loss term (cae.train.cycle.GeneratorLosses.terms) that picks the best checkpoint.
BestBy = Literal[
    "loss", "reconstruction", "integration", "target", "self_reconstruction", "parsimony",
    "context_means", "below_zero", "none",
]  # fmt: skip
CheckpointChoice = Literal["last", "best"]
DEFAULT_EXPERIMENT = "Default"  # MLflow's own default experiment (id 0 in every store)


def default_experiment() -> str:
    """The experiment a run goes to when none is named: ``MLFLOW_EXPERIMENT_NAME``, else MLflow's
    ``Default``, which is also where a plain ``mlflow run .`` records."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _split_on(value: Any, separator: str) -> Any:
    """A list setting written as text: a JSON list, or items joined by ``separator``."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(separator) if part.strip()]
    return value


def _split_commas(value: Any) -> Any:
    """Let list settings be written ``a,b,c`` on the command line and in environment variables."""
    return _split_on(value, ",")


def _split_semicolons(value: Any) -> Any:
    """``"a=1,b=2;a=3"`` -> ``["a=1,b=2", "a=3"]``: selections hold commas themselves."""
    return _split_on(value, ";")


CommaList = Annotated[list[str], NoDecode]
SelectionList = Annotated[list[str], NoDecode, BeforeValidator(_split_semicolons)]


# A seed every generator takes (numpy's need non-negative ones; torch's end at 2**64).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# Metadata field names end up in MLflow metric keys (contrib_l2/<field>), file names
# (plots/contributions_<field>.png) and field=value settings: letters, digits, _ . - and spaces.
FIELD_NAME = re.compile(r"[\w.\- ]+")
# What torch.device takes for the devices cae trains on.
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_field_name(name: str, source: str) -> str:
    """``name`` if a metadata field may be called so.

    Raises:
        ValueError: it holds a character MLflow keys, file names or ``field=value`` settings
            cannot hold (the message names it and says to rename the column).
    """
    if not FIELD_NAME.fullmatch(name) or name.strip(".") == "" or name != name.strip():
        bad = " ".join(sorted({c for c in name if not FIELD_NAME.fullmatch(c)})) or repr(name)
        raise ValueError(
            f"{source} {name!r}: field names become MLflow metric keys, file names and "
            "field=value settings, so they hold letters, digits, _ . - and inner spaces only, "
            f"not {bad}; rename the column (e.g. obs.rename(columns=...))"
        )
    return name


class _Section(BaseModel):
    # Every number must be finite: an infinite learning rate or scale passes ranges like gt=0.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where the cells are and how to read them."""

    path: str = Field(
        "data/demo",
        description="A folder of chunks (*_counts_N.npz + *_metadata_N.pkl|.parquet), an .h5ad "
        "file, or a TileDB-SOMA experiment (a local folder or a URI such as the Census's).",
    )
    expression_glob: str = Field("*_counts_*.npz", description="Pattern of expression chunks.")
    metadata_glob: str = Field(
        "*_metadata_*", description="Pattern of metadata chunks (.pkl or .parquet)."
    )
    fields: CommaList = Field(
        ["cell_type", "assay", "sex"], description="Metadata fields that condition the model."
    )
    null_values: CommaList = Field(
        list(DEFAULT_NULL_VALUES),
        description="Spellings of a missing value (case-insensitive); they map to <unk>.",
    )
    transform: Transform = Field(
        "log1p_cp10k",
        description="log1p_cp10k: raw counts in, normalised to 10,000 per cell then log1p; "
        "none: values are used as stored (already normalised, like Census chunks).",
    )
    library_key: str | None = Field(
        None,
        description="Obs column of each cell's total counts over all its genes (the Census's "
        "raw_sum, scanpy's total_counts): log1p_cp10k divides by it instead of the sum over the "
        "genes read, so a subset of genes is normalised as the whole cell was (scVI's "
        "size_factor_key). Needs raw counts (transform log1p_cp10k) and the normal likelihood; "
        "every cell sent to the model then carries it.",
    )
    h5ad_layer: str | None = Field(None, description="Layer of an .h5ad to read instead of .X.")
    h5ad_chunk_size: int = Field(
        20_000, ge=1, description="Rows per chunk when reading an .h5ad or a SOMA experiment."
    )
    soma_measurement: str = Field("RNA", description="SOMA measurement whose X and var are read.")
    soma_layer: str | None = Field(
        None, description="SOMA X layer (default: 'raw' when present, else the only layer)."
    )
    soma_obs_filter: str | None = Field(
        None,
        description='SOMA obs value filter choosing the cells, e.g. "is_primary_data == True '
        "and tissue_general == 'blood'\" (default: every cell).",
    )
    soma_tiledb_config: CommaList = Field(
        [],
        description="TileDB settings for opening a SOMA URI, as key=value, e.g. the Census's "
        "vfs.s3.region=us-west-2,vfs.s3.no_sign_request=true.",
    )
    soma_var_filter: str | None = Field(
        None,
        description="SOMA var value filter choosing the genes, e.g. \"feature_name in ['CD4', "
        "'CD8A']\" (default: every gene).",
    )
    val_chunks: CommaList = Field(
        [], description="Chunk ids held out for validation (all their cells)."
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Fraction of each training chunk's cells held out."
    )
    validate_values: ValidationMode = Field(
        "full",
        description="full: read every chunk before training to check values; headers: shapes only.",
    )
    exclude: SelectionList = Field(
        [],
        description="Context combinations kept out of training and validation, e.g. "
        "['cell_type=B,condition=stimulated'] (a string separates them with ';').",
    )
    shuffle_chunks: int = Field(
        8,
        ge=1,
        description="Chunks pooled into one shuffle window: every mini-batch is drawn across "
        "them, so data sorted by dataset (atlas exports) still mix in each batch. Memory holds "
        "two windows (this one and the next, read ahead); 1 = batches from one chunk at a time.",
    )
    num_workers: int = Field(
        1, ge=0, le=64, description="Background processes prefetching chunks (at most 64)."
    )
    prefetch_factor: int = Field(
        2, ge=1, le=64, description="Chunks each worker keeps ready (at most 64)."
    )

    _split = field_validator(
        "fields", "null_values", "val_chunks", "soma_tiledb_config", mode="before"
    )(_split_commas)

    @field_validator("soma_tiledb_config")
    @classmethod
    def _settings_have_values(cls, items: list[str]) -> list[str]:
        for item in items:
            if "=" not in item or not item.split("=", 1)[0].strip():
                raise ValueError(f"{item!r} is not key=value (e.g. vfs.s3.region=us-west-2)")
        return items

    @field_validator("path", mode="before")
    @classmethod
    def _path_as_text(cls, path: object) -> object:
        """A Path is taken as its text (a SOMA URI stays text: a Path would fold its "//")."""
        return os.fspath(path) if isinstance(path, os.PathLike) else path

    @field_validator("val_chunks")
    @classmethod
    def _chunk_ids_are_numbers(cls, ids: list[str]) -> list[str]:
        for chunk_id in ids:
            if not chunk_id.isdigit():
                raise ValueError(f"chunk id {chunk_id!r} is not a number (human_counts_7 has id 7)")
        return ids

    @field_validator("exclude")
    @classmethod
    def _selections_parse(cls, selections: list[str]) -> list[str]:
        try:
            return [str(Selection.parse(text, "data.exclude")) for text in selections]
        except ConfigError as err:
            raise ValueError(str(err)) from None

    @property
    def exclusions(self) -> list[Selection]:
        """:attr:`exclude` parsed."""
        return [Selection.parse(text) for text in self.exclude]

    @field_validator("fields")
    @classmethod
    def _fields_unique(cls, fields: list[str]) -> list[str]:
        if not fields:
            raise ValueError("name at least one metadata field, e.g. fields=cell_type,sex")
        repeated = sorted({f for f in fields if fields.count(f) > 1})
        if repeated:
            raise ValueError(f"field(s) listed twice: {', '.join(repeated)}")
        return [check_field_name(field, "field") for field in fields]

    @model_validator(mode="after")
    def _library_is_not_a_field(self) -> DataConfig:
        if self.library_key is not None:
            check_field_name(self.library_key, "library_key")
            if self.library_key in self.fields:
                raise ValueError(
                    f"library_key '{self.library_key}' is also a field; the column of total "
                    "counts is a number per cell, not a context: drop it from fields"
                )
        return self


class ModelConfig(_Section):
    """Shape of the cycle autoencoder and its context classifier."""

    latent_dim: int = Field(
        128, ge=1, le=16_384, description="Latent size L of every head (at most 16,384)."
    )
    logit_scale: float = Field(
        1.0, gt=0.0, description="Scale s of every field head's output (the seed's: 0.0159)."
    )
    context_offsets: bool = Field(
        True,
        description="Per-context gene-space offsets in every field head "
        "(False = the seed's design).",
    )
    nonnegative: Nonnegative = Field(
        "base",
        description="Parameters kept >= 0: all (the seed's design) or base (the base head only; "
        "field heads take either sign, so a field's change can depend on the cell both ways).",
    )
    classifier_hidden: int = Field(
        128, ge=1, le=65_536, description="Hidden width of the context classifier."
    )
    likelihood: Likelihood = Field(
        "normal",
        description="normal: mean squared error of the log-normalised values (the seed's, and the "
        "better means on Kang: docs/results/kang.md); nb: a negative binomial of the raw counts "
        "whose log mean is the heads' sum (library size observed, dispersion per gene; needs "
        "data.transform=log1p_cp10k), whose counterfactuals can also be drawn as counts.",
    )
    counterfactual: Literal["decode", "residual"] = Field(
        "residual",
        description="decode: a counterfactual is the model's output in the target contexts (the "
        "seed's design); residual: the cell plus the change of the moved fields' terms.",
    )


class LossWeights(_Section):
    """Weights of the generator's loss terms and of the classifier's own loss."""

    reconstruction: float = Field(1.0, ge=0.0, description="Cycle-2 output vs the input cell.")
    integration: float = Field(1.0, ge=0.0, description="Hidden states of cycle 1 vs cycle 2.")
    target: float = Field(1.0, ge=0.0, description="Frozen classifier on cycle 1 vs the targets.")
    self_reconstruction: float = Field(
        1.0,
        ge=0.0,
        description="Direct source-to-source reconstruction (0 = the seed's design exactly).",
    )
    parsimony: float = Field(
        0.1,
        ge=0.0,
        description="Penalty on the field heads' squared output (0 = the seed's design exactly).",
    )
    context_means: float = Field(
        30.0,
        ge=0.0,
        description="Mean of cells moved to a context combination vs the real cells there "
        "(ties the size of a shift to real cells; 0 = off, the seed's design).",
    )
    below_zero: float = Field(
        0.3,
        ge=0.0,
        description="Mean square of the negative part of the decoded counterfactual passes "
        "(expression is never negative; 0 = off, the seed's design).",
    )
    classifier: float = Field(1.0, ge=0.0, description="Classifier's supervised loss.")


class TrainConfig(_Section):
    """Optimisation and the training loop."""

    epochs: int = Field(10, ge=1, description="Total epochs (a resumed run continues up to this).")
    batch_size: int = Field(256, ge=1, description="Cells per mini-batch.")
    lr: float = Field(3e-3, gt=0.0, description="Learning rate of the autoencoder (Adam).")
    classifier_lr: float = Field(1e-3, gt=0.0, description="Learning rate of the classifier.")
    lr_schedule: LRSchedule = Field(
        "constant",
        description="constant: train.lr and train.classifier_lr throughout (the seed's); cosine: "
        "both decay along a half cosine over the epochs, full in the first and near 0 in the "
        "last, which keeps long trainings steady (Kang's preset diverged in epoch 18 of 20 at a "
        "constant rate, not with cosine: docs/decisions.md).",
    )
    ema: float = Field(
        0.99,
        ge=0.0,
        lt=1.0,
        description="Decay of an exponential moving average of the autoencoder's weights, "
        "updated every step; the average is what is evaluated, saved for inference and served "
        "(0 = off, the seed's design: the last step's weights; 0.99 averages over about the last "
        "100 steps, and over about the last tenth of a shorter training).",
    )
    weights: LossWeights = LossWeights()
    context_means_reference: Literal["auto", "batch", "data"] = Field(
        "auto",
        description="What the context-means term compares moved cells with: the mean of the real "
        "cells of each context combination over all training cells (data: computed once before "
        "training, exact; a table of every combination of the fields' categories x genes, one "
        "training process), among the batch's cells (batch: a few cells per combination, "
        "noisy), or auto: data where its table fits in 2 GiB and one process trains, else batch.",
    )
    seed: Seed = Field(0, description="Seed of initialisation, shuffling and target sampling.")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N or mps.")
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for torch (default: torch's)."
    )
    progress: bool = Field(True, description="Show progress bars.")
    # --- speed (measured by bench/) ---
    context_maps: ContextMapMethod = Field(
        "auto",
        description="How context maps are applied: grouped (cells sorted by category, one batched "
        "matmul, gradients and optimiser updates only for the categories a batch has: the CPU "
        "default), gather (every cell's map gathered, no host sync: the accelerator default) or "
        "auto.",
    )
    precision: Precision = Field(
        "fp32",
        description="bf16: autocast the forward passes to bfloat16 (GPUs with bf16; a CPU only "
        "if it has bf16 instructions). Weights, gradients and optimiser state stay float32.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the autoencoder (slow first steps; pair with "
        "context_maps=gather, which has static shapes and no host sync).",
    )
    keep_freed_memory: bool = Field(
        True,
        description="CPU training on Linux (glibc): keep freed memory for reuse instead of "
        "returning it to the system, so that large per-step buffers stop page-faulting anew.",
    )
    torch_internals: bool = Field(
        False,
        description="Use torch internals where the public API costs a copy: the optimiser reads "
        "the context maps' sparse gradient without coalescing it (cae/train/torch_internals.py; "
        "tested on the torch releases CI runs). Off: public torch APIs only.",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not DEVICE.fullmatch(device):
            raise ValueError("not a device; use auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps")
        return device

    @model_validator(mode="after")
    def _compile_traces_the_maps(self) -> TrainConfig:
        if self.compile and self.context_maps == "grouped":
            raise ValueError(
                "train.compile=true cannot trace train.context_maps=grouped (it sorts the "
                "categories on the host); set train.context_maps=gather, or auto (which picks "
                "gather when compiling)"
            )
        return self


class OutputConfig(_Section):
    """Where a training writes its checkpoints, settings and metrics."""

    dir: Path | None = Field(None, description="Output folder (default runs/<time>-<fields>).")
    resume: bool = Field(False, description="Continue from dir/checkpoints/last.pt.")
    overwrite: bool = Field(False, description="Replace a folder that already holds a training.")
    best_by: BestBy = Field(
        "loss",
        description="Beside checkpoints/last.pt, keep checkpoints/best.pt: the epoch with the "
        "lowest value of this evaluation loss term (val/<term>, or eval/<term> when no cells are "
        "held out); rewritten atomically whenever the term improves. 'none' keeps last.pt only.",
    )


class TrackingConfig(_Section):
    """Where ``cae train`` records its MLflow run and TensorBoard events."""

    enabled: bool = Field(True, description="Record the training as an MLflow run.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
        "in the working directory); an http:// tracking server works too.",
    )
    experiment: str = Field(
        default_factory=default_experiment,
        description="MLflow experiment of the runs cae starts (default: MLFLOW_EXPERIMENT_NAME, "
        "else MLflow's 'Default', where a plain `mlflow run .` records too, so that both land "
        "in one experiment). Inside `mlflow run` the run it created is joined, wherever it is.",
    )
    run_name: str | None = Field(None, description="Name of the MLflow run (default: MLflow's).")
    tensorboard: bool = Field(
        True, description="Also write TensorBoard events to <out>/tensorboard."
    )
    log_checkpoint: bool = Field(
        True, description="Upload the final checkpoints (last.pt, and best.pt) as artifacts."
    )
    parent_run_id: str | None = Field(
        None, description="Start the run nested under this MLflow run (tuning trials)."
    )
    register_as: str | None = Field(
        None, description="After training, register the model under this name (cae register)."
    )
    alias: str = Field("champion", description="Alias the registered version gets.")
    register_checkpoint: CheckpointChoice = Field(
        "last",
        description="Which checkpoint --register (and cae register's default) puts in the model: "
        "'last' (the final epoch) or 'best' (output.best_by's best epoch).",
    )
    retry_seconds: float = Field(
        30.0,
        ge=0.0,
        description="When the tracking store stops answering mid-run, training goes on and "
        "retries after this many seconds, doubling up to 10 minutes (see cae runs sync).",
    )


class ServeConfig(_Section):
    """How a registered model answers requests (``mlflow models serve``, ``model.predict``)."""

    max_rows: int = Field(
        10_000,
        ge=1,
        description="Most cells one request may hold; a larger one is refused (HTTP 400). Saved "
        "with the model; CAE_SERVE__MAX_ROWS in the serving process overrides it.",
    )
    max_value: float = Field(
        1e9,
        gt=0,
        le=1e30,  # so that a cell's total over 60,000 genes stays finite in float32
        description="Largest expression value a request may hold: no count of one gene in one "
        "cell, nor a normalised value, comes near 1e9, so a larger one is a unit or encoding "
        "mistake and is refused (HTTP 400), as are negative, NaN, null and infinite values. "
        "Saved with the model; CAE_SERVE__MAX_VALUE in the serving process overrides it.",
    )


class Range(_Section):
    """A searched range; ``log`` samples uniformly in log space."""

    low: float
    high: float
    log: bool = True


class SearchSpace(_Section):
    """What a study tunes: latent size, metadata logit scale (the seed's 0.0159 by hand) and lr,
    plus any other settings as lists of choices (the model options, loss weights)."""

    latent_dim: Range = Range(low=32, high=512)
    logit_scale: Range = Range(low=1e-3, high=1.0)
    lr: Range = Range(low=1e-4, high=1e-2)
    choices: dict[str, list[bool | int | float | str]] = Field(
        default_factory=dict,
        description='Dotted setting -> values to choose from, e.g. {"model.nonnegative": '
        '["all", "base"], "train.weights.context_means": [0, 10]}; each is an Optuna '
        "categorical parameter named by its setting.",
    )


class SlurmConfig(_Section):
    """Named settings of the rendered SLURM scripts (experiments/slurm/*.sbatch)."""

    partition: str | None = Field(None, description="Partition (default: the cluster's).")
    time: str = Field("04:00:00", description="Wall time of one task.")
    cpus: int = Field(2, ge=1, description="CPUs per task.")
    mem: str = Field("8G", description="Memory per task.")
    gpus: int = Field(0, ge=0, description="GPUs per task.")
    venv: Path = Field(Path(".venv"), description="Virtual environment to activate.")
    output: Path = Field(Path("slurm-logs"), description="Folder of the tasks' log files.")
    signal_seconds: int = Field(120, ge=0, description="USR1 this long before the time limit.")


class TuneConfig(_Section):
    """An Optuna study over the search space, its storage, pruner and objective."""

    study: str = Field("cae", description="Study name.")
    storage: str = Field(
        "tune/journal.log",
        description="A journal file on a shared filesystem (no server), or an RDB URL such as "
        "postgresql://user@host/db (heartbeat retry of killed trials).",
    )
    objective: str = Field("val/reconstruction", description="Metric minimised.")
    multi_objective: bool = Field(
        False,
        description="Also maximise the mean target-consistency accuracy (val/target_accuracy/*).",
    )
    pruner: Literal["median", "hyperband", "none"] = Field("median", description="Pruner.")
    n_trials: int = Field(4, ge=1, description="Trials each worker (SLURM array task) runs.")
    space: SearchSpace = SearchSpace()
    out_dir: Path = Field(Path("tune"), description="Trials' training folders: <out>/<study>/.")
    slurm: SlurmConfig = SlurmConfig()

    # RDB storage (PostgreSQL) only: a worker that dies mid-trial stops its trial's heartbeat; the
    # next worker to start a trial fails it and runs its parameters again. Saved with the study,
    # so every worker of one study uses the values the study was created with.
    heartbeat_interval: int = Field(
        60, ge=1, description="RDB storage: seconds between a running trial's heartbeats."
    )
    grace_period: int = Field(
        120,
        ge=1,
        description="RDB storage: a RUNNING trial without a heartbeat for this many seconds is "
        "failed and retried by the next worker that starts a trial.",
    )
    max_retry: int = Field(
        2, ge=0, description="RDB storage: how many times a trial whose worker died is retried."
    )

    @model_validator(mode="after")
    def _grace_outlasts_heartbeat(self) -> TuneConfig:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"tune.grace_period ({self.grace_period} s) must be longer than "
                f"tune.heartbeat_interval ({self.heartbeat_interval} s), or live trials are "
                "failed between two heartbeats; raise grace_period (e.g. twice the interval)"
            )
        return self


class EvaluateConfig(_Section):
    """The counterfactual evaluation (``cae evaluate``): which context is held out, and metrics.

    Leave-one-out: for every value g of ``group_by``, the cells with ``group_by=g`` and
    ``field=target`` are kept out of training; the model moves the cells with ``group_by=g`` and
    ``field=source`` to ``field=target`` and is scored against the real held-out cells.
    """

    field: str | None = Field(None, description="Field whose value the model changes (condition).")
    group_by: str | None = Field(None, description="Field of the held-out groups (cell_type).")
    source: str | None = Field(None, description="Value the moved cells have (control).")
    target: str | None = Field(None, description="Value they are moved to (stimulated).")
    groups: CommaList = Field(
        [], description="Groups held out one at a time (default: every group with both values)."
    )
    top_k: list[int] = Field([20, 50, 100], description="Sizes of the DE gene sets scored.")
    n_pcs: int = Field(50, ge=2, description="PCA components of the energy distance/classifier.")
    max_cells: int = Field(
        2000, ge=10, description="Cells per set for the energy distance and classifier (sampled)."
    )
    report_genes: int = Field(20, ge=1, description="Genes per field in the top-genes table.")
    umap_cells: int = Field(
        500,
        ge=0,
        description="Cells of each kind (real, reconstructed, moved) on the report's UMAP "
        "(sampled); 0 draws no UMAP.",
    )
    seed: Seed = Field(0, description="Seed of the cell samples, the classifier and the UMAP.")

    _split = field_validator("groups", mode="before")(_split_commas)

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k(cls, value: Any) -> Any:
        value = _split_commas(value)
        if isinstance(value, list) and not value:
            raise ValueError("name at least one DE gene set size, e.g. top_k=20,50,100")
        return value


_TOML_FILE: ContextVar[Path | None] = ContextVar("cae_toml_file", default=None)
# Off while rebuilding saved settings: a checkpoint's settings must not pick up CAE_* variables.
_READ_ENVIRONMENT: ContextVar[bool] = ContextVar("cae_read_environment", default=True)


class Settings(BaseSettings):
    """Every knob of a training, grouped by layer. Build one with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="CAE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    serve: ServeConfig = ServeConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if not _READ_ENVIRONMENT.get():
            return (init_settings,)
        toml_file = _TOML_FILE.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _check_choices(self) -> Settings:
        """Every ``tune.space.choices`` entry names a setting, and each of its values is valid
        there (checked by assigning it to a copy of the setting's section)."""
        for name, options in self.tune.space.choices.items():
            *path, leaf = name.split(".")
            section: Any = self.model_copy(deep=True)
            for part in path:
                section = getattr(section, part, None)
            if not isinstance(section, BaseModel) or leaf not in type(section).model_fields:
                raise ValueError(
                    f"tune.space.choices names '{name}', which is not a setting; use a dotted "
                    "setting name such as model.nonnegative or train.weights.context_means"
                )
            if not options:
                raise ValueError(f"tune.space.choices['{name}'] is empty; list at least one value")
            for option in options:
                try:
                    setattr(section, leaf, option)
                except ValidationError as err:
                    raise ValueError(
                        f"tune.space.choices['{name}'] lists {option!r}: {err.errors()[0]['msg']}"
                    ) from None
        return self

    @model_validator(mode="after")
    def _counts_for_counts(self) -> Settings:
        """The count likelihood and a library column (``data.library_key``) read raw counts
        (``data.transform = log1p_cp10k``); the count likelihood normalises by its own genes."""
        if self.model.likelihood == "nb" and self.data.transform != "log1p_cp10k":
            raise ValueError(
                f"model.likelihood = 'nb' scores raw counts, but data.transform = "
                f"'{self.data.transform}' reads values that are already normalised; give the raw "
                "counts with data.transform=log1p_cp10k, or use model.likelihood=normal"
            )
        key = self.data.library_key
        if key is not None and self.data.transform != "log1p_cp10k":
            raise ValueError(
                f"data.library_key = '{key}' gives the totals that raw counts are normalised by, "
                f"but data.transform = '{self.data.transform}' reads values already normalised; "
                "give the raw counts with data.transform=log1p_cp10k, or drop data.library_key"
            )
        if key is not None and self.model.likelihood == "nb":
            raise ValueError(
                f"data.library_key = '{key}' normalises by each cell's total over all its genes, "
                "but model.likelihood = 'nb' shares the counts of the genes it reads among them; "
                "use model.likelihood=normal, or drop data.library_key"
            )
        return self

    def flat(self) -> dict[str, str]:
        """Return every setting as ``{"section.name": "value"}`` strings (MLflow params).

        Lists are joined with commas (an empty one is ``[]``); nested sections use dotted names
        (``train.weights.target``). Settings left unset (None: "none", or decided later, like
        ``output.dir``) are left out, so that no param reads as an empty value; ``settings.json``
        holds every setting.
        """
        return {k: v for k, v in _flatten(self.model_dump(mode="json")) if v is not None}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str | None]]:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")
        elif isinstance(value, list):  # an empty list as JSON: "[]" loads back, "" reads as blank
            yield name, ",".join(str(v) for v in value) if value else "[]"
        else:
            yield name, None if value is None else str(value)


@contextmanager
def _toml_source(path: Path | None) -> Iterator[None]:
    token = _TOML_FILE.set(path)
    try:
        yield
    finally:
        _TOML_FILE.reset(token)


def load_settings(
    config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build the settings from a TOML file, ``CAE_`` environment variables and overrides.

    Args:
        config_file: optional TOML file with ``[data]``, ``[model]``, ``[train]``, ``[output]``
            tables.
        overrides: nested ``{"train": {"epochs": 3}}`` or dotted ``{"train.epochs": 3}`` values that
            win over every other source (the command line passes its flags here).

    Returns:
        The validated :class:`Settings`.

    Raises:
        ConfigError: the file is missing or not valid TOML, or a value is invalid; the message names
            the setting, the value and the source to fix.
    """
    path = None
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; check the path given to --config"
            )
        try:
            with path.open("rb") as file:  # as pydantic-settings reads it (no newline folding)
                tomllib.load(file)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
    nested = nest(overrides or {})
    with _toml_source(path):
        try:
            return Settings(**nested)
        except ValidationError as err:
            where = f" (sources: flags, CAE_* environment, {path})" if path else ""
            raise ConfigError(describe_validation_error(err) + where) from None
        except SettingsError as err:  # e.g. CAE_TRAIN='{bad json'
            raise ConfigError(
                f"cannot read settings: {err}; a whole-section CAE_* variable must be JSON, or set "
                "single values with CAE_SECTION__NAME"
            ) from None


def settings_from_dict(values: Mapping[str, Any], source: str) -> Settings:
    """Rebuild settings saved with a checkpoint or a model (``Settings.model_dump(mode="json")``).

    Raises:
        ConfigError: the saved settings do not validate (written by an incompatible version).
    """
    token = _READ_ENVIRONMENT.set(False)
    try:
        return Settings(**_without_retired(values))
    except ValidationError as err:
        raise ConfigError(
            f"settings saved in {source} are invalid: {describe_validation_error(err)}"
        ) from None
    finally:
        _READ_ENVIRONMENT.reset(token)


# Settings that saved settings may carry but this version does not have: dropped on reading, so
# that checkpoints and registered models that carry them load.
_RETIRED = (("train", "weights", "shared"),)


def _without_retired(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of saved settings ``values`` without the :data:`_RETIRED` settings."""
    out = copy.deepcopy(dict(values))
    for *parents, leaf in _RETIRED:
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def serve_settings(saved: Settings) -> ServeConfig:
    """The serving settings in force: those saved with a model, with any ``CAE_SERVE__*``
    environment variable of the serving process on top.

    Raises:
        ConfigError: a ``CAE_*`` variable is invalid (the message names it).
    """
    current = load_settings().serve
    return saved.serve.model_copy(
        update={name: getattr(current, name) for name in current.model_fields_set}
    )


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Turn ``{"train.epochs": 3}`` into ``{"train": {"epochs": 3}}``, merging nested dicts at any
    depth. Only the top-level keys are split at dots: keys inside a mapping value are taken as they
    are (``tune.space.choices`` is keyed by dotted setting names). The input is not changed."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        _merge_into(node, leaf, value)
    return out


def deep_merge(base: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested ``base`` with the nested or dotted ``updates`` merged in at any depth
    (:func:`nest`)."""
    out = nest(base)
    for key, value in nest(updates).items():
        _merge_into(out, key, value)
    return out


def _merge_into(node: dict[str, Any], key: str, value: Any) -> None:
    """``node[key] = value``, merging a mapping into a dict already there (copies, recursively)."""
    if not isinstance(value, Mapping):
        node[key] = value
        return
    if not isinstance(node.get(key), dict):
        node[key] = {}
    for inner, item in value.items():
        _merge_into(node[key], inner, item)


def describe_validation_error(err: ValidationError) -> str:
    """One clause per invalid setting: ``train.epochs = 0: Input should be greater than ...``."""
    return "invalid settings: " + describe_invalid(err)
