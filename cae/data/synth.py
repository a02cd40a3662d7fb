"""Synthetic single-cell counts with a known ground truth.

This is the platform's demo data set and test fixture. The generative model is additive in log-rate
space, which mirrors the decomposition the model learns (a base term plus one term per metadata
field), so tests can check both the ranking of per-field effect sizes and counterfactual predictions
against the truth.

Generative model (everything is deterministic given ``SynthConfig.seed``):

* fields ``cell_type`` (5 values), ``assay`` (3 values) and ``sex`` (2 values), drawn independently
  per cell; a fraction ``unknown_fraction[field]`` of cells get the value ``"unknown"`` (the Census
  spelling of a missing value), which carries no effect;
* per-gene base log rate ``base_g ~ N(0, 1)``;
* per field and known value, an effect vector that is nonzero on a random ``affected_fraction`` of
  the genes with entries ``N(0, effect_sd[field])``, then centred across the field's values so each
  field is a pure contrast;
* ``n_programs`` gene programs ``program_k ~ N(0, program_sd)`` with per-cell weights ``N(0, 1)``;
* ``log_rate = base + sum of field effects + sum_k z_k * program_k``, ``p = softmax(log_rate)``,
  library size ``~ LogNormal(log(library_size), library_log_sd)``,
  counts ``~ Poisson(library * p)``.

``make_truth`` returns the ground truth as a JSON-able dict, ``simulate`` turns contexts into
counts, ``expected_expression`` gives the true mean log1p-cp10k expression of a context and
``generate`` writes a chunked data set to disk.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise, product
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cae.data.atomic import atomic_folder
from cae.errors import ConfigError, DataError, describe_invalid

TRUTH_VERSION = 1
NULL_VALUE = "unknown"
"""The value of a field whose value is missing (Census spelling); it carries no effect."""

FIELD_VALUES: dict[str, tuple[str, ...]] = {
    "cell_type": ("B", "T", "NK", "monocyte", "dendritic"),
    "assay": ("10x 3' v2", "10x 3' v3", "Smart-seq2"),
    "sex": ("female", "male"),
}
"""The known values of each synthetic metadata field, in a fixed order."""

FIELD_PROBABILITIES: dict[str, tuple[float, ...]] = {
    "cell_type": (0.30, 0.25, 0.15, 0.20, 0.10),
    "assay": (0.35, 0.35, 0.30),
    "sex": (0.50, 0.50),
}
"""The probability of each known value among cells whose value is not ``"unknown"``."""

DEFAULT_EFFECT_SD: dict[str, float] = {"cell_type": 1.0, "assay": 0.5, "sex": 0.25}
DEFAULT_UNKNOWN_FRACTION: dict[str, float] = {"cell_type": 0.0, "assay": 0.0, "sex": 0.05}

EFFECT_SIZE_CELLS = 250
"""Cells simulated per context combination and replicate for ``make_truth``'s effect sizes."""

EFFECT_SIZE_DEFINITION = (
    "Monte Carlo through expected_expression, in the model's units (log1p of counts per 10,000): "
    "the mean over cells, i.e. the sum over all context combinations weighted by their "
    "probability, of the L2 norm over genes of expected_expression(context) minus "
    "expected_expression(same context with the field set to 'unknown', i.e. its effect removed). "
    "Cells whose value is already 'unknown' contribute 0. Each difference d is estimated twice "
    f"from independent simulations of {EFFECT_SIZE_CELLS} cells (d1, d2; both sides of a "
    "difference share their random numbers) and the norm is sqrt(max(d1 . d2, 0)), whose square "
    "is unbiased, so Monte Carlo noise does not inflate small effects."
)

_COUNTS_FILE = "synth_counts_{i}.npz"
_METADATA_FILE = "synth_metadata_{i}.pkl"


@dataclass(frozen=True)
class SynthConfig:
    """Settings of the synthetic data set.

    Attributes:
        n_cells: number of cells to generate (>= n_chunks).
        n_genes: number of genes (>= 10).
        n_chunks: number of ``synth_counts_{i}.npz`` / ``synth_metadata_{i}.pkl`` pairs (>= 1).
        seed: seed of every random draw; the same config always gives the same data.
        effect_sd: per field, the standard deviation of its nonzero effect entries (>= 0). Fields
            left out keep their default (cell_type 1.0, assay 0.5, sex 0.25).
        unknown_fraction: per field, the fraction of cells whose value is ``"unknown"``, in [0, 1).
            Fields left out keep their default (sex 0.05, others 0).
        n_programs: number of gene programs giving cell-level noise (>= 0).
        program_sd: standard deviation of the program loadings (>= 0).
        affected_fraction: fraction of genes with a nonzero effect, drawn per value, in [0, 1].
        library_size: median library size (> 0).
        library_log_sd: standard deviation of the log library size (>= 0).
        sort_by: a field whose values order the cells before they are cut into chunks, as an
            atlas export sorted by dataset is: the same cells as without it, in another order
            (None: cells in the order drawn, i.e. shuffled).

    Raises:
        ConfigError: a setting is out of range, of the wrong type, or names an unknown field.
    """

    n_cells: int = 6000
    n_genes: int = 200
    n_chunks: int = 6
    seed: int = 0
    effect_sd: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_EFFECT_SD))
    unknown_fraction: Mapping[str, float] = field(
        default_factory=lambda: dict(DEFAULT_UNKNOWN_FRACTION)
    )
    n_programs: int = 3
    program_sd: float = 0.5
    affected_fraction: float = 0.3
    library_size: float = 5000.0
    library_log_sd: float = 0.3
    sort_by: str | None = None

    def __post_init__(self) -> None:
        for name in ("n_cells", "n_genes", "n_chunks", "seed", "n_programs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ConfigError(
                    f"synthetic data setting {name} must be an integer, got {value!r}"
                )
        if self.n_chunks < 1:
            raise ConfigError(f"synthetic data setting n_chunks must be >= 1, got {self.n_chunks}")
        if self.n_cells < self.n_chunks:
            raise ConfigError(
                f"synthetic data setting n_cells must be >= n_chunks ({self.n_chunks}), "
                f"got {self.n_cells}"
            )
        if self.n_genes < 10:
            raise ConfigError(f"synthetic data setting n_genes must be >= 10, got {self.n_genes}")
        if self.seed < 0:
            raise ConfigError(f"synthetic data setting seed must be >= 0, got {self.seed}")
        if self.n_programs < 0:
            raise ConfigError(
                f"synthetic data setting n_programs must be >= 0, got {self.n_programs}"
            )
        _check_real("program_sd", self.program_sd, low=0.0)
        _check_real("affected_fraction", self.affected_fraction, low=0.0, high=1.0)
        _check_real("library_size", self.library_size, low=0.0, low_open=True)
        _check_real("library_log_sd", self.library_log_sd, low=0.0)
        if self.sort_by is not None and self.sort_by not in FIELD_VALUES:
            raise ConfigError(
                f"synthetic data setting sort_by must be one of {list(FIELD_VALUES)}, "
                f"got {self.sort_by!r}"
            )
        sds = _merge_fields("effect_sd", self.effect_sd, DEFAULT_EFFECT_SD)
        for name, sd in sds.items():
            _check_real(f"effect_sd[{name!r}]", sd, low=0.0)
        fractions = _merge_fields(
            "unknown_fraction", self.unknown_fraction, DEFAULT_UNKNOWN_FRACTION
        )
        for name, fraction in fractions.items():
            _check_real(f"unknown_fraction[{name!r}]", fraction, low=0.0, high=1.0, high_open=True)
        object.__setattr__(self, "effect_sd", {k: float(v) for k, v in sds.items()})
        object.__setattr__(self, "unknown_fraction", {k: float(v) for k, v in fractions.items()})


def _check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ConfigError unless ``value`` is a finite real number within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"synthetic data setting {name} must be a number, got {value!r}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        interval = (
            f"{lo}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{hi}"
        )
        raise ConfigError(f"synthetic data setting {name} must be in {interval}, got {value!r}")


def _merge_fields(name: str, given: Any, defaults: Mapping[str, float]) -> dict[str, Any]:
    """Return ``defaults`` updated by ``given``; raise ConfigError for an unknown field."""
    if not isinstance(given, Mapping):
        raise ConfigError(
            f"synthetic data setting {name} must map field names to numbers, got {given!r}"
        )
    unknown = sorted(set(given) - set(FIELD_VALUES))
    if unknown:
        raise ConfigError(
            f"synthetic data setting {name} names unknown field(s) {unknown}; "
            f"the fields are {list(FIELD_VALUES)}"
        )
    return {f: given.get(f, defaults[f]) for f in FIELD_VALUES}


# --------------------------------------------------------------------------------------------------
# ground truth


def make_truth(config: SynthConfig | None = None) -> dict[str, Any]:
    """Draw the ground truth of a synthetic data set.

    Args:
        config: the settings; ``SynthConfig()`` when None.

    Returns:
        A JSON-able dict with keys ``version``, ``seed``, ``n_cells``, ``n_genes``, ``n_chunks``,
        ``n_programs``, ``affected_fraction``, ``genes``, ``fields`` (per field its ``values``,
        ``probabilities`` and ``effect_sd``), ``base_log_rate`` [G], ``effects`` (field -> value ->
        [G], centred over values), ``programs`` [K][G], ``program_sd``, ``library_size``
        (``log_mean``, ``log_sd``), ``unknown_fraction``, ``null_value``, ``effect_size`` (field ->
        float, see ``EFFECT_SIZE_DEFINITION``), ``effect_size_definition`` and ``ranking``
        (fields by effect size, largest first).

    Raises:
        ConfigError: ``config`` is not a SynthConfig.
    """
    config = SynthConfig() if config is None else config
    if not isinstance(config, SynthConfig):
        raise ConfigError(f"make_truth needs a SynthConfig, got {type(config).__name__}")
    rng = np.random.default_rng([config.seed, 0])
    n_genes = config.n_genes
    n_affected = round(config.affected_fraction * n_genes)

    base = rng.normal(0.0, 1.0, size=n_genes)
    effects = _draw_effects(rng, config, n_affected)
    programs = rng.normal(0.0, config.program_sd, size=(config.n_programs, n_genes))

    truth: dict[str, Any] = {
        "version": TRUTH_VERSION,
        "seed": int(config.seed),
        "n_cells": int(config.n_cells),
        "n_genes": int(n_genes),
        "n_chunks": int(config.n_chunks),
        "n_programs": int(config.n_programs),
        "affected_fraction": float(config.affected_fraction),
        "genes": [f"gene_{g:04d}" for g in range(n_genes)],
        "fields": _field_specs(config),
        "base_log_rate": base.tolist(),
        "effects": effects,
        "programs": programs.tolist(),
        "program_sd": float(config.program_sd),
        "library_size": {
            "log_mean": math.log(config.library_size),
            "log_sd": float(config.library_log_sd),
        },
        "unknown_fraction": dict(config.unknown_fraction),
        "null_value": NULL_VALUE,
    }
    sizes = _effect_sizes(truth, n_cells=EFFECT_SIZE_CELLS, seed=config.seed)
    truth["effect_size"] = sizes
    truth["effect_size_definition"] = EFFECT_SIZE_DEFINITION
    truth["ranking"] = sorted(sizes, key=lambda f: -sizes[f])
    return truth


def _field_specs(config: SynthConfig) -> dict[str, dict[str, Any]]:
    """Each field's values, their probabilities and its effect size (sd), for truth.json."""
    return {
        name: {
            "values": list(values),
            "probabilities": list(FIELD_PROBABILITIES[name]),
            "effect_sd": float(config.effect_sd[name]),
        }
        for name, values in FIELD_VALUES.items()
    }


def _draw_effects(
    rng: np.random.Generator, config: SynthConfig, n_affected: int
) -> dict[str, dict[str, list[float]]]:
    """Each field value's effect on log rates: ``n_affected`` random genes get a normal effect
    (sd ``config.effect_sd[field]``), then every gene is centred over the field's values."""
    effects: dict[str, dict[str, list[float]]] = {}
    for name, values in FIELD_VALUES.items():
        raw = np.zeros((len(values), config.n_genes))
        for row in raw:
            genes = rng.choice(config.n_genes, size=n_affected, replace=False)
            row[genes] = rng.normal(0.0, config.effect_sd[name], size=n_affected)
        raw -= raw.mean(axis=0, keepdims=True)
        effects[name] = {v: raw[i].tolist() for i, v in enumerate(values)}
    return effects


def _value_probabilities(truth: Mapping[str, Any], name: str) -> dict[str, float]:
    """Probability of each value of a field, ``"unknown"`` included (when it can occur)."""
    spec = truth["fields"][name]
    unknown = float(truth["unknown_fraction"].get(name, 0.0))
    probs = {
        v: (1.0 - unknown) * float(p)
        for v, p in zip(spec["values"], spec["probabilities"], strict=True)
    }
    if unknown > 0:
        probs[truth["null_value"]] = unknown
    return probs


def _effect_sizes(truth: Mapping[str, Any], n_cells: int, seed: int) -> dict[str, float]:
    """The true effect size of each field; see ``EFFECT_SIZE_DEFINITION``."""
    names = list(truth["fields"])
    null = truth["null_value"]
    marginals = [_value_probabilities(truth, name) for name in names]
    seeds = (2 * seed, 2 * seed + 1)
    cache: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

    def expected(combo: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        if combo not in cache:
            context = dict(zip(names, combo, strict=True))
            first, second = (expected_expression(truth, context, n_cells, s) for s in seeds)
            cache[combo] = (first, second)
        return cache[combo]

    sizes = dict.fromkeys(names, 0.0)
    for combo in product(*(list(m) for m in marginals)):
        weight = math.prod(m[v] for m, v in zip(marginals, combo, strict=True))
        for i, name in enumerate(names):
            if combo[i] == null:
                continue  # no effect to remove
            removed = (*combo[:i], null, *combo[i + 1 :])
            (a1, a2), (b1, b2) = expected(combo), expected(removed)
            sizes[name] += weight * math.sqrt(max(float((a1 - b1) @ (a2 - b2)), 0.0))
    return sizes


# --------------------------------------------------------------------------------------------------
# simulation


class _FieldTruth(BaseModel):
    values: list[str] = Field(min_length=1)
    probabilities: list[float]
    effect_sd: float


class _LibrarySize(BaseModel):
    log_mean: float
    log_sd: float


class _TruthFile(BaseModel):
    """The parts of ``truth.json`` that evaluation and simulation read; other keys pass through."""

    model_config = ConfigDict(strict=True, extra="allow")

    genes: list[str] = Field(min_length=1)
    fields: dict[str, _FieldTruth] = Field(min_length=1)
    base_log_rate: list[float]
    effects: dict[str, dict[str, list[float]]]
    programs: list[list[float]]
    library_size: _LibrarySize
    unknown_fraction: dict[str, float]
    null_value: str
    ranking: list[str]

    @model_validator(mode="after")
    def _shapes_agree(self) -> _TruthFile:
        n_genes = len(self.genes)
        if len(self.base_log_rate) != n_genes:
            raise ValueError(f"base_log_rate has {len(self.base_log_rate)} genes, not {n_genes}")
        for name, spec in self.fields.items():
            if len(spec.probabilities) != len(spec.values):
                raise ValueError(f"field {name!r} has not one probability per value")
            effects = self.effects.get(name, {})
            for value in spec.values:
                if len(effects.get(value, ())) != n_genes:
                    raise ValueError(f"effects[{name!r}][{value!r}] is not {n_genes} numbers")
        if any(len(row) != n_genes for row in self.programs):
            raise ValueError(f"a row of programs is not {n_genes} numbers")
        unknown = sorted(set(self.unknown_fraction) - set(self.fields))
        if unknown:
            raise ValueError(f"unknown_fraction names fields {unknown} that fields lacks")
        return self


def load_truth(path: Path) -> dict[str, Any]:
    """Read the ground truth :func:`generate` wrote to ``truth.json``.

    Returns:
        The dict :func:`make_truth` made.

    Raises:
        DataError: the file cannot be read, is not JSON, or is not a ground truth (the message
            names the file and what is wrong).
    """
    redo = "write the data again with `cae synth`, or give the right --truth"
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} cannot be read as JSON ({err}); {redo}") from None
    try:
        return _TruthFile.model_validate(raw).model_dump()
    except ValidationError as err:
        raise DataError(
            f"{path} is not a synthetic ground truth: {describe_invalid(err)}; {redo}"
        ) from None


def _check_truth(truth: Any) -> None:
    required = ("fields", "base_log_rate", "effects", "programs", "library_size", "null_value")
    if not isinstance(truth, Mapping) or any(k not in truth for k in required):
        raise ConfigError(
            "not a synthetic ground truth: expected the dict made by make_truth (or read from "
            f"truth.json) with keys {list(required)}"
        )


def _check_value(truth: Mapping[str, Any], name: str, value: Any) -> None:
    allowed = [*truth["fields"][name]["values"], truth["null_value"]]
    if value not in allowed:
        raise ConfigError(f"unknown value {value!r} of field {name!r}; allowed values: {allowed}")


def draw_contexts(
    truth: Mapping[str, Any],
    n_cells: int,
    rng: np.random.Generator | int | None,
    fixed: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Draw the metadata of ``n_cells`` cells from the truth's field distributions.

    Args:
        truth: the dict made by ``make_truth``.
        n_cells: number of cells (>= 0).
        rng: a numpy Generator or a seed.
        fixed: fields whose value is the same for every cell instead of being drawn.

    Returns:
        A DataFrame with one object-dtype column per field (values may be ``"unknown"``) and a
        RangeIndex.

    Raises:
        ConfigError: ``fixed`` names an unknown field or value, or ``n_cells`` is negative.
    """
    _check_truth(truth)
    if n_cells < 0:
        raise ConfigError(f"n_cells must be >= 0, got {n_cells}")
    rng = np.random.default_rng(rng)
    fixed = dict(fixed or {})
    for name, value in fixed.items():
        if name not in truth["fields"]:
            raise ConfigError(f"unknown field {name!r}; allowed fields: {list(truth['fields'])}")
        _check_value(truth, name, value)
    columns: dict[str, np.ndarray] = {}
    for name in truth["fields"]:
        if name in fixed:
            column = np.empty(n_cells, dtype=object)
            column[:] = fixed[name]
        else:
            probs = _value_probabilities(truth, name)
            values = np.array(list(probs), dtype=object)
            p = np.array(list(probs.values()))
            column = values[rng.choice(len(values), size=n_cells, p=p / p.sum())]
        columns[name] = column
    return pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in columns.items()})


def simulate(
    truth: Mapping[str, Any], contexts: pd.DataFrame, rng: np.random.Generator | int | None
) -> sp.csr_matrix:
    """Simulate raw counts for cells of given contexts.

    This is the single code path behind both ``generate`` and ``expected_expression``. For a fixed
    ``rng`` state the program weights and library sizes are drawn before the counts, so calls with
    the same seed share them (common random numbers).

    Args:
        truth: the dict made by ``make_truth`` (or read from ``truth.json``).
        contexts: one row per cell and one column per field of the truth; values are the field's
            known values or ``"unknown"`` (no effect). Other columns are ignored.
        rng: a numpy Generator (advanced in place) or a seed.

    Returns:
        A float32 CSR matrix of integer counts, cells x genes.

    Raises:
        ConfigError: ``truth`` is not a ground truth, a field column is missing, or a value is not
            one of the field's values.
    """
    return sp.csr_matrix(_simulate_dense(truth, contexts, rng))


def _simulate_dense(
    truth: Mapping[str, Any], contexts: pd.DataFrame, rng: np.random.Generator | int | None
) -> np.ndarray:
    """``simulate`` as a dense float32 array (what ``expected_expression`` uses)."""
    _check_truth(truth)
    if not isinstance(contexts, pd.DataFrame):
        raise ConfigError(f"contexts must be a pandas DataFrame, got {type(contexts).__name__}")
    missing = [name for name in truth["fields"] if name not in contexts.columns]
    if missing:
        raise ConfigError(
            f"contexts lack the field column(s) {missing}; they need one column per field: "
            f"{list(truth['fields'])}"
        )
    rng = np.random.default_rng(rng)
    n_cells = len(contexts)
    base = np.asarray(truth["base_log_rate"], dtype=np.float64)
    log_rate = np.broadcast_to(base, (n_cells, base.size)).copy()
    null = truth["null_value"]
    for name, spec in truth["fields"].items():
        values = list(spec["values"])
        table = np.vstack(
            [np.asarray(truth["effects"][name][v], dtype=np.float64) for v in values]
            + [np.zeros(base.size)]
        )
        lookup = {v: i for i, v in enumerate(values)} | {null: len(values)}
        uniques, inverse = np.unique(contexts[name].to_numpy().astype(str), return_inverse=True)
        codes = np.empty(len(uniques), dtype=np.int64)
        for j, value in enumerate(uniques):
            if value not in lookup:
                _check_value(truth, name, value)
            codes[j] = lookup[value]
        log_rate += table[codes[inverse.reshape(-1)]]
    programs = np.asarray(truth["programs"], dtype=np.float64).reshape(-1, base.size)
    weights = rng.normal(0.0, 1.0, size=(n_cells, programs.shape[0]))
    library = rng.lognormal(
        truth["library_size"]["log_mean"], truth["library_size"]["log_sd"], size=n_cells
    )
    log_rate += weights @ programs
    log_rate -= log_rate.max(axis=1, keepdims=True)
    rate = np.exp(log_rate)
    rate *= (library / rate.sum(axis=1))[:, None]
    return rng.poisson(rate).astype(np.float32)


def log1p_cp10k(counts: sp.spmatrix | np.ndarray) -> np.ndarray:
    """``log1p(counts / total * 1e4)`` per cell as a dense float64 array (empty cells give 0)."""
    # (scipy has no types, so issparse does not narrow counts for the checker)
    dense = cast(Any, counts).toarray() if sp.issparse(counts) else np.asarray(counts)
    dense = dense.astype(np.float64)
    totals = dense.sum(axis=1, keepdims=True)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(dense * scale)


def expected_expression(
    truth: Mapping[str, Any], contexts: Mapping[str, str], n_cells: int = 2000, seed: int = 0
) -> np.ndarray:
    """The true mean log-normalised expression of cells of a context combination.

    Simulates ``n_cells`` cells through ``simulate`` and averages ``log1p(counts / total * 1e4)``.
    Calls with the same ``seed`` share program weights and library sizes, so differences between
    contexts have little Monte Carlo noise.

    Args:
        truth: the dict made by ``make_truth``.
        contexts: field -> value (a known value or ``"unknown"``); fields left out are drawn from
            their distribution for each cell.
        n_cells: number of simulated cells (>= 1).
        seed: seed of the simulation.

    Returns:
        A float64 array of shape (n_genes,).

    Raises:
        ConfigError: an unknown field or value (the message lists the allowed ones), or n_cells < 1.
    """
    _check_truth(truth)
    if not isinstance(contexts, Mapping):
        raise ConfigError(f"contexts must map field names to values, got {contexts!r}")
    for name, value in contexts.items():
        if name not in truth["fields"]:
            raise ConfigError(f"unknown field {name!r}; allowed fields: {list(truth['fields'])}")
        _check_value(truth, name, value)
    if isinstance(n_cells, bool) or not isinstance(n_cells, int | np.integer) or n_cells < 1:
        raise ConfigError(f"n_cells must be a positive integer, got {n_cells!r}")
    frame = draw_contexts(truth, n_cells, np.random.default_rng([seed, 1]), fixed=contexts)
    counts = _simulate_dense(truth, frame, np.random.default_rng([seed, 2]))
    return log1p_cp10k(counts).mean(axis=0)


# --------------------------------------------------------------------------------------------------
# writing a data set


def _chunk_bounds(n_cells: int, n_chunks: int) -> list[tuple[int, int]]:
    """Split ``range(n_cells)`` into ``n_chunks`` contiguous pieces whose sizes differ by <= 1."""
    edges = [(i * n_cells) // n_chunks for i in range(n_chunks + 1)]
    return list(pairwise(edges))


def _progress(items: Iterable[Any], enabled: bool, total: int) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return items
    return tqdm(items, total=total, desc="synthetic chunks", unit="chunk")


def generate(
    out_dir: str | os.PathLike[str],
    config: SynthConfig | None = None,
    *,
    h5ad: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic data set with its ground truth.

    Writes ``synth_counts_{i}.npz`` (float32 CSR raw counts) and ``synth_metadata_{i}.pkl`` (a
    DataFrame with object columns ``cell_type``, ``assay``, ``sex``, index 0..n-1, rows aligned with
    the npz) for each chunk i, ``genes.txt``, ``truth.json`` and, with ``h5ad=True``,
    ``synth.h5ad``. Everything is built in a temporary sibling folder and renamed into place, so
    an interrupted run leaves no partial data set (and, with ``overwrite=True``, the old folder
    intact).

    Args:
        out_dir: the folder to create.
        config: the settings; ``SynthConfig()`` when None.
        h5ad: also write all cells as one AnnData file.
        overwrite: replace ``out_dir`` if it exists and is not empty.
        progress: show a progress bar over chunks (needs tqdm).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: ``config`` is not a SynthConfig.
        DataError: ``out_dir`` exists and is not an empty folder, and ``overwrite`` is False.
    """
    config = SynthConfig() if config is None else config
    if not isinstance(config, SynthConfig):
        raise ConfigError(f"generate needs a SynthConfig, got {type(config).__name__}")
    out = Path(out_dir)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        _write_dataset(tmp, config, h5ad=h5ad, progress=progress)
    return out


def _write_dataset(folder: Path, config: SynthConfig, *, h5ad: bool, progress: bool) -> None:
    truth = make_truth(config)
    metadata = draw_contexts(truth, config.n_cells, np.random.default_rng([config.seed, 3]))
    rng = np.random.default_rng([config.seed, 4])
    bounds = _chunk_bounds(config.n_cells, config.n_chunks)
    pieces: Iterable[tuple[pd.DataFrame, sp.csr_matrix]] = (
        (meta, simulate(truth, meta, rng))
        for meta in (metadata.iloc[a:b].reset_index(drop=True) for a, b in bounds)
    )
    if config.sort_by is not None:  # the same cells as unsorted, re-ordered (all in memory)
        every = sp.vstack([c for _, c in pieces], format="csr")
        order = np.argsort(metadata[config.sort_by].to_numpy(dtype=str), kind="stable")
        metadata, every = metadata.iloc[order].reset_index(drop=True), every[order]
        pieces = ((metadata.iloc[a:b].reset_index(drop=True), every[a:b]) for a, b in bounds)
    chunks: list[sp.csr_matrix] = []
    for i, (meta, counts) in enumerate(_progress(pieces, progress, len(bounds))):
        sp.save_npz(folder / _COUNTS_FILE.format(i=i), counts)
        meta.to_pickle(folder / _METADATA_FILE.format(i=i))
        if h5ad:
            chunks.append(counts)
    (folder / "genes.txt").write_text("".join(f"{g}\n" for g in truth["genes"]))
    with open(folder / "truth.json", "w") as handle:
        json.dump(truth, handle, indent=1)
    if h5ad:
        import anndata

        obs = metadata.copy()
        obs.index = obs.index.astype(str)
        adata = anndata.AnnData(
            X=sp.vstack(chunks, format="csr"), obs=obs, var=pd.DataFrame(index=truth["genes"])
        )
        adata.write_h5ad(folder / "synth.h5ad")
