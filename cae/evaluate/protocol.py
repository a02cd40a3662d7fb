"""The field's counterfactual protocol: hold out one context, move source cells into it, compare.

A :class:`Holdout` names the real held-out cells (``cell_type=B,condition=stimulated``) and the
cells that are moved there (``condition=control`` of the same cell type). :func:`collect_cells`
reads them in one pass over the chunks, with the means of the *other* contexts that the baselines
need and a sample of training cells for the independent classifier. :func:`score_holdout` scores
the model beside the baselines:

* ``identity``: the source cells unchanged;
* ``mean_shift``: source + (mean of target cells - mean of source cells) over all other contexts;
* ``group_mean_shift``: source + the average, over the other contexts (e.g. each other cell type),
  of that context's target-minus-source mean.

:func:`leave_one_out` trains one model per held-out group (reusing :func:`cae.train.train`) and
scores each.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cae.config import EvaluateConfig, Settings
from cae.data.contexts import Selection
from cae.data.loader import cell_totals, transform_with_library
from cae.data.store import DataStore
from cae.data.synth import expected_expression
from cae.data.vocabulary import UNK
from cae.errors import ConfigError, DataError
from cae.evaluate.metrics import (
    accuracy,
    de_genes,
    delta_pearson,
    energy_distance,
    fit_classifier,
    fit_pca,
    r2_mean,
    r2_var,
    response_slope,
    two_sample_auc,
)
from cae.model.cae import contribution_l2
from cae.model.contributions import ContextTable, GeneContributions, field_means
from cae.train.checkpoint import TrainedModel

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

log = logging.getLogger(__name__)

METHODS = ("model", "model_sampled", "identity", "mean_shift", "group_mean_shift")
"""The predictions scored for every held-out context, the model first."""

_BLOCK = 4096  # rows densified at a time


@dataclass(frozen=True)
class Holdout:
    """One held-out context combination and the cells moved into it.

    Attributes:
        held_out: the real cells of the held-out combination (``cell_type=B,condition=stim``).
        source: the cells moved there: the held-out combination with the moved fields at their
            source values (``cell_type=B,condition=ctrl``).
    """

    held_out: Selection
    source: Selection

    @classmethod
    def parse(cls, holdout: str, source: str) -> Holdout:
        """Build from ``--holdout "cell_type=B,condition=stim" --source "condition=ctrl"``.

        Raises:
            ConfigError: malformed text, a source field not in the holdout, a source value equal
                to the held-out one, or no field left to name the context.
        """
        held_out = Selection.parse(holdout, "--holdout")
        moved = Selection.parse(source, "--source")
        values = held_out.as_dict()
        for name, value in moved.values:
            if name not in values:
                raise ConfigError(
                    f"--source field '{name}' is not in --holdout {held_out}; the source names "
                    "the held-out fields the model changes, e.g. --source condition=control"
                )
            if values[name] == value:
                raise ConfigError(
                    f"--source {name}={value} equals the held-out value; the cells moved must "
                    "come from another value"
                )
        if len(moved.values) == len(held_out.values):
            raise ConfigError(
                f"--holdout {held_out} has no field besides the moved one(s); add the context "
                "that is held out, e.g. --holdout cell_type=B,condition=stimulated"
            )
        return cls(held_out, held_out.replace(moved.as_dict()))

    @property
    def targets(self) -> dict[str, str]:
        """The moved fields and their target (held-out) values."""
        source = self.source.as_dict()
        return {k: v for k, v in self.held_out.values if source[k] != v}

    @property
    def source_values(self) -> dict[str, str]:
        """The moved fields and their source values."""
        targets = self.targets
        return {k: v for k, v in self.source.values if k in targets}

    @property
    def context(self) -> Selection:
        """The held-out fields that are not moved (``cell_type=B``): the context's name."""
        targets = self.targets
        return Selection(tuple((k, v) for k, v in self.held_out.values if k not in targets))

    @property
    def name(self) -> str:
        """A short label: the context (``cell_type=B``)."""
        return str(self.context)


@dataclass
class EvalCells:
    """What scoring one held-out context needs, read from the data in one pass.

    Attributes:
        source_raw: (n, G) the moved cells as stored (the model's input).
        source_meta: their metadata (the model's fields, the holdout's and the library
            column).
        source: (n, G) the moved cells, log-normalised (model space).
        real: (m, G) the real held-out cells, model space.
        shift: (G,) pooled target-minus-source mean over all other contexts.
        group_shift: (G,) average over other contexts of each one's target-minus-source mean.
        n_groups: other contexts with both source and target cells.
        sample_raw: a sample of the cells outside the held-out context (no cell of the
            context's source or target), as stored: the classifier learns the moved field from
            other contexts only.
        sample_meta: their metadata.
        sample: the same cells, model space.
    """

    source_raw: sp.csr_matrix
    source_meta: pd.DataFrame
    source: np.ndarray
    real: np.ndarray
    shift: np.ndarray
    group_shift: np.ndarray
    n_groups: int
    sample_raw: sp.csr_matrix
    sample_meta: pd.DataFrame
    sample: np.ndarray


def _model_space(
    matrix: sp.csr_matrix, transform: str, meta: pd.DataFrame, library_key: str | None
) -> np.ndarray:
    """Densify rows in blocks and apply the input transform, normalising by ``meta``'s column
    ``library_key`` when there is one: (n, G) float32 model space."""
    totals = None
    if library_key is not None:
        row_sums = np.asarray(matrix.sum(axis=1)).ravel()
        source = f"metadata column '{library_key}' (data.library_key)"
        totals = torch.from_numpy(cell_totals(meta[library_key].to_numpy(), row_sums, source))
    out = np.empty(matrix.shape, dtype=np.float32)
    for start in range(0, matrix.shape[0], _BLOCK):
        block = torch.from_numpy(matrix[start : start + _BLOCK].toarray())
        library = None if totals is None else totals[start : start + _BLOCK, None]
        out[start : start + _BLOCK] = transform_with_library(block, transform, library)[0].numpy()
    return out


@dataclass
class _Sums:
    """Per other-context key: summed model-space expression and cell count, per side."""

    n_genes: int
    sums: dict[tuple[str, tuple[str, ...]], np.ndarray] = field(default_factory=dict)
    counts: dict[tuple[str, tuple[str, ...]], int] = field(default_factory=dict)

    def add(self, side: str, keys: np.ndarray, x: np.ndarray) -> None:
        for key in {tuple(k) for k in keys}:
            rows = np.all(keys == np.asarray(key, dtype=object), axis=1)
            slot = (side, key)
            self.sums[slot] = self.sums.get(slot, np.zeros(self.n_genes)) + x[rows].sum(axis=0)
            self.counts[slot] = self.counts.get(slot, 0) + int(rows.sum())

    def shifts(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(pooled shift, group-averaged shift, number of groups with both sides)."""
        totals = {side: np.zeros(self.n_genes) for side in ("source", "target")}
        counts = dict.fromkeys(totals, 0)
        per_group = []
        for (side, key), value in self.sums.items():
            totals[side] += value
            counts[side] += self.counts[(side, key)]
            other = "target" if side == "source" else "source"
            if side == "target" and (other, key) in self.sums:
                per_group.append(
                    value / self.counts[(side, key)]
                    - self.sums[(other, key)] / self.counts[(other, key)]
                )
        if not per_group:
            raise DataError(
                "no other context has both source and target cells, so the mean-shift baselines "
                "cannot be computed; hold out a context whose field values occur elsewhere"
            )
        pooled = totals["target"] / counts["target"] - totals["source"] / counts["source"]
        return pooled, np.mean(per_group, axis=0), len(per_group)


def collect_cells(
    store: DataStore,
    transform: str,
    holdout: Holdout,
    fields: Sequence[str],
    config: EvaluateConfig,
    library_key: str | None = None,
) -> EvalCells:
    """Read the cells one held-out context needs, in one pass over the chunks.

    Args:
        store: the data.
        transform: the model's input transform (``log1p_cp10k`` or ``none``).
        holdout: what is held out and moved.
        fields: the model's fields (their metadata goes with the cells).
        config: the evaluation settings (``max_cells``, ``seed``).
        library_key: the metadata column of each cell's total counts that ``log1p_cp10k``
            normalises by (the model's ``data.library_key``; None: the sum over the genes).

    Returns:
        The :class:`EvalCells`.

    Raises:
        DataError: no source or no real held-out cells, or no other context to compute the
            baselines from.
        MetadataError: a field is missing from the metadata.
    """
    key = [] if library_key is None else [library_key]
    columns = list(dict.fromkeys([*fields, *holdout.held_out.fields, *key]))
    context_fields = holdout.context.fields
    rng = np.random.default_rng([config.seed, 11])
    sample_rate = min(1.0, 2 * config.max_cells / max(store.n_cells, 1))
    sums = _Sums(store.n_genes)
    parts: dict[str, list[Any]] = {k: [] for k in ("source", "source_meta", "real", "sample")}
    parts["sample_meta"] = []
    for chunk in store.chunks:
        meta = store.read_metadata(chunk, columns)
        text = meta.astype(str)
        in_source = holdout.source.mask(meta)
        in_real = holdout.held_out.mask(meta)
        in_context = holdout.context.mask(meta)
        is_source, is_target = _side_masks(text, holdout, in_context)
        sampled = ~in_context & (rng.random(len(meta)) < sample_rate)
        wanted = in_source | in_real | is_source | is_target | sampled
        if not wanted.any():
            continue
        matrix = store.read_expression(chunk)
        keys = text[context_fields].to_numpy(dtype=object)
        for side, rows in (("source", is_source), ("target", is_target)):
            for start in range(0, int(rows.sum()), _BLOCK):
                index = np.flatnonzero(rows)[start : start + _BLOCK]
                x = _model_space(matrix[index], transform, meta.iloc[index], library_key)
                sums.add(side, keys[index], x)
        if in_source.any():
            parts["source"].append(matrix[np.flatnonzero(in_source)])
            parts["source_meta"].append(meta[in_source])
        if in_real.any():
            real = np.flatnonzero(in_real)
            x = _model_space(matrix[real], transform, meta.iloc[real], library_key)
            parts["real"].append(x)
        if sampled.any():
            parts["sample"].append(matrix[np.flatnonzero(sampled)])
            parts["sample_meta"].append(meta[sampled])
    return _assemble(store, transform, library_key, holdout, config, parts, sums, rng)


def _side_masks(
    text: pd.DataFrame, holdout: Holdout, in_context: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows outside the held-out context whose moved fields hold their source / target values."""
    moved = list(holdout.targets)
    source_key = np.asarray([holdout.source_values[f] for f in moved], dtype=object)
    target_key = np.asarray([holdout.targets[f] for f in moved], dtype=object)
    values = text[moved].to_numpy(dtype=object)
    is_source = np.all(values == source_key, axis=1) & ~in_context
    is_target = np.all(values == target_key, axis=1) & ~in_context
    return is_source, is_target


def _assemble(
    store: DataStore,
    transform: str,
    library_key: str | None,
    holdout: Holdout,
    config: EvaluateConfig,
    parts: Mapping[str, list[Any]],
    sums: _Sums,
    rng: np.random.Generator,
) -> EvalCells:
    """The :class:`EvalCells` from the collected parts, the classifier's sample cut to size."""
    for name, what in (("source", holdout.source), ("real", holdout.held_out)):
        if not parts[name]:
            raise DataError(f"no cell of {store.path} matches {what}; check the fields and values")
    shift, group_shift, n_groups = sums.shifts()
    source_raw = sp.vstack(parts["source"]).tocsr()
    sample_raw = sp.vstack(parts["sample"]).tocsr()
    sample_meta = pd.concat(parts["sample_meta"], ignore_index=True)
    if sample_raw.shape[0] > 2 * config.max_cells:
        keep = np.sort(rng.choice(sample_raw.shape[0], 2 * config.max_cells, replace=False))
        sample_raw, sample_meta = sample_raw[keep], sample_meta.iloc[keep].reset_index(drop=True)
    source_meta = pd.concat(parts["source_meta"], ignore_index=True)
    return EvalCells(
        source_raw=source_raw,
        source_meta=source_meta,
        source=_model_space(source_raw, transform, source_meta, library_key),
        real=np.concatenate(parts["real"]),
        shift=shift,
        group_shift=group_shift,
        n_groups=n_groups,
        sample_raw=sample_raw,
        sample_meta=sample_meta,
        sample=_model_space(sample_raw, transform, sample_meta, library_key),
    )


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[rng.choice(len(x), n, replace=False)]


def moved_cells(
    trained: TrainedModel,
    raw: sp.csr_matrix,
    meta: pd.DataFrame,
    targets: Mapping[str, str],
    seed: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Cells moved to ``targets`` in model space: the model's mean and, for a model that draws
    counts (:meth:`TrainedModel.sampling_refusal`), its counts log-normalised (each cell at its
    source cell's depth, :meth:`TrainedModel.sample_counts`; None otherwise).

    Args:
        trained: the model.
        raw: (n, G) the source cells as stored.
        meta: their metadata (:attr:`TrainedModel.metadata_columns` at least).
        targets: ``{field: value}``; empty reconstructs.
        seed: the draws' seed.

    Raises:
        ConfigError: a moved field is not one of the model's fields.
    """
    for name in targets:
        if name not in trained.vocabularies.fields:
            raise ConfigError(
                f"the model cannot move '{name}': it was trained on "
                f"{', '.join(trained.vocabularies.fields)}"
            )
    cells = trained.prepare(raw, meta[trained.metadata_columns])
    moved = trained.move(cells.x_model, cells.source_index, targets)
    mean = moved.output.cpu().numpy()
    if trained.sampling_refusal() is not None:
        return mean, None
    counts = trained.sample_counts(cells, moved, seed)
    # with a library column, at the source cell's total (the cell's other genes kept)
    kept = cells.library if trained.settings.data.library_key is not None else None
    return mean, transform_with_library(counts, "log1p_cp10k", kept)[0].cpu().numpy()


def predictions(
    trained: TrainedModel | None, cells: EvalCells, holdout: Holdout, seed: int = 0
) -> dict[str, np.ndarray]:
    """Every method's predicted cells in model space, ``{method: (n, G)}`` in :data:`METHODS`
    order: the model's mean (``model``), for a model that draws counts its counts with ``seed``
    (``model_sampled``, log-normalised; :func:`moved_cells`), then the baselines (alone when
    ``trained`` is None).

    Raises:
        ConfigError: a moved field is not one of the model's fields.
    """
    out = {}
    if trained is not None:
        mean, sampled = moved_cells(
            trained, cells.source_raw, cells.source_meta, holdout.targets, seed
        )
        out["model"] = mean
        if sampled is not None:
            out["model_sampled"] = sampled
    out["identity"] = cells.source
    out["mean_shift"] = cells.source + cells.shift.astype(np.float32)
    out["group_mean_shift"] = cells.source + cells.group_shift.astype(np.float32)
    return out


def true_counterfactual_mean(
    truth: Mapping[str, Any], source_meta: pd.DataFrame, targets: Mapping[str, str]
) -> np.ndarray:
    """The generator's true mean expression of the source cells moved to ``targets``.

    Each combination of the source cells' known field values is simulated with the targets
    applied (``expected_expression``), weighted by its number of cells.
    """
    fields = [f for f in truth["fields"] if f in source_meta.columns]
    frame = source_meta[fields].astype(str).assign(**dict(targets.items()))
    total = np.zeros(len(truth["genes"]))
    for combo, group in frame.groupby(fields, sort=True):
        contexts = dict(zip(fields, combo if isinstance(combo, tuple) else (combo,), strict=True))
        total += len(group) * expected_expression(truth, contexts, n_cells=2000)
    return total / len(frame)


def score_holdout(
    trained: TrainedModel | None,
    cells: EvalCells,
    holdout: Holdout,
    config: EvaluateConfig,
    truth: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Score the model and the baselines on one held-out context.

    Args:
        trained: the model; None scores the baselines alone.
        cells: from :func:`collect_cells`.
        holdout: the held-out context.
        config: ``top_k``, ``n_pcs``, ``max_cells``, ``seed``.
        truth: the synthetic generator's truth, to also score against the true counterfactual.

    Returns:
        One row per method (:data:`METHODS`) with columns ``context``, ``method``, ``r2_mean``,
        ``r2_mean_top{k}``, ``r2_var``, ``r2_var_top{K}``, ``delta_pearson_top{k}``,
        ``response_slope``, ``energy_distance``, ``auc_two_sample``, ``classifier_accuracy``
        and, with ``truth``, ``truth_r2_mean``. K is the largest k. Every metric is a function
        of one method's predicted cells and the real ones, whatever produced them.
    """
    rng = np.random.default_rng([config.seed, 13])
    predicted = predictions(trained, cells, holdout, config.seed)
    ks = sorted(set(config.top_k))
    ranked = de_genes(cells.real, cells.source, max(ks))
    top = {k: ranked[:k] for k in ks}
    real = _subsample(cells.real, config.max_cells, rng)
    source = _subsample(cells.source, config.max_cells, rng)
    pca = fit_pca(np.concatenate([real, source]), config.n_pcs)
    real_pcs = pca.transform(real)
    classifiers = _classifiers(cells, holdout, config)
    true_mean = (
        None
        if truth is None
        else true_counterfactual_mean(truth, cells.source_meta, holdout.targets)
    )
    rows = []
    for method, x in predicted.items():
        row: dict[str, Any] = {"context": holdout.name, "method": method}
        row["r2_mean"] = r2_mean(x, cells.real)
        for k in ks:
            row[f"r2_mean_top{k}"] = r2_mean(x, cells.real, top[k])
        row["r2_var"] = r2_var(x, cells.real)
        row[f"r2_var_top{ks[-1]}"] = r2_var(x, cells.real, top[ks[-1]])
        for k in ks:
            row[f"delta_pearson_top{k}"] = delta_pearson(x, cells.source, cells.real, top[k])
        row["response_slope"] = response_slope(x, cells.source, cells.real)
        sample = _subsample(x, config.max_cells, rng)
        row["energy_distance"] = energy_distance(pca.transform(sample), real_pcs)
        row["auc_two_sample"] = two_sample_auc(sample, real, config.seed, config.n_pcs)
        row["classifier_accuracy"] = _accuracy(classifiers, x, holdout)
        if true_mean is not None:
            row["truth_r2_mean"] = r2_mean(x, true_mean[None, :])
        rows.append(row)
    return _scores_frame(rows, cells, holdout, classifiers)


def _accuracy(classifiers: Mapping[str, Pipeline], x: np.ndarray, holdout: Holdout) -> float:
    """How often, on average over the moved fields, the classifiers call ``x`` held-out."""
    return float(np.mean([accuracy(c, x, holdout.targets[f]) for f, c in classifiers.items()]))


def _scores_frame(
    rows: list[dict[str, Any]],
    cells: EvalCells,
    holdout: Holdout,
    classifiers: Mapping[str, Pipeline],
) -> pd.DataFrame:
    """The rows as a frame, with the real cells' classifier accuracy and cell counts as attrs."""
    reference = _accuracy(classifiers, cells.real, holdout)
    log.info(
        "%s: the classifier calls %.0f%% of the real held-out cells right",
        holdout.held_out, 100 * reference,
    )  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.attrs["classifier_accuracy_real"] = reference
    frame.attrs["n_source"], frame.attrs["n_real"] = len(cells.source), len(cells.real)
    return frame


def _classifiers(cells: EvalCells, holdout: Holdout, config: EvaluateConfig) -> dict[str, Pipeline]:
    """One classifier per moved field, trained on the sampled real cells with a known value."""
    classifiers = {}
    for name in holdout.targets:
        labels = cells.sample_meta[name].astype(str).to_numpy()
        known = np.flatnonzero(np.isin(labels, [UNK, "nan", "None"], invert=True))
        known = known[: config.max_cells]
        if len(set(labels[known])) < 2:
            raise DataError(
                f"too few sampled cells with two values of '{name}' to train the evaluation "
                "classifier; raise evaluate.max_cells"
            )
        classifiers[name] = fit_classifier(
            cells.sample[known], labels[known], config.n_pcs, config.seed
        )
    return classifiers


@torch.no_grad()
def contributions(
    trained: TrainedModel, x: sp.csr_matrix, meta: pd.DataFrame, report_genes: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The model's decomposition of real cells (each reconstructed in its own contexts).

    Args:
        trained: the model.
        x: (n, G) cells as stored.
        meta: their metadata (:attr:`TrainedModel.metadata_columns`).
        report_genes: genes per field in the top-genes table.

    Returns:
        ``(per_context, top_genes)``: the per field and value L2 contribution
        (:class:`~cae.model.contributions.ContextTable`) and per field the genes with the largest
        term (:meth:`~cae.model.contributions.GeneContributions.top_genes`).
    """
    device = next(trained.model.parameters()).device
    table = ContextTable(trained.vocabularies, len(trained.genes), device)
    genes = GeneContributions(trained.vocabularies, trained.genes, device)
    for start in range(0, x.shape[0], _BLOCK):
        block = meta.iloc[start : start + _BLOCK][trained.metadata_columns]
        out = trained.counterfactual(x[start : start + _BLOCK], block, {})
        contexts = trained.encode_contexts(block, len(block)).to(device)
        table.add(contexts, contribution_l2(out), trained.model.field_effects(out))
        genes.add(contexts, out)
    return table.frame(), genes.top_genes(report_genes)


def field_ranking(per_context: pd.DataFrame) -> list[str]:
    """Fields by their cell-weighted mean effect (``effect_l2``), largest first."""
    effects = field_means(per_context, "effect_l2")
    return sorted(effects, key=lambda field: -effects[field])


def slug(text: str) -> str:
    """A file- and MLflow-safe name: ``cell_type=CD14+ Mono`` -> ``cell_type-CD14_Mono``."""
    return re.sub(r"[^\w.\-]+", "_", text.replace("=", "-").replace(",", "_")).strip("_")


def loo_holdouts(
    store: DataStore, config: EvaluateConfig, null_values: Sequence[str]
) -> Iterator[Holdout]:
    """The held-out contexts of the leave-one-out protocol, one per group.

    Raises:
        ConfigError: ``field``, ``group_by``, ``source`` or ``target`` is missing, a named group
            does not exist, or a group has no source or target cells.
    """
    missing = [k for k in ("field", "group_by", "source", "target") if getattr(config, k) is None]
    if missing:
        raise ConfigError(
            "the leave-one-out protocol needs evaluate." + ", evaluate.".join(missing)
            + " (e.g. --field condition --group-by cell_type --source control "
            "--target stimulated)"
        )  # fmt: skip
    assert config.field and config.group_by and config.source and config.target
    counts: dict[tuple[str, str], int] = {}
    for _, frame in store.iter_metadata([config.group_by, config.field]):
        pairs = frame.astype(str).value_counts()
        for (group, value), n in pairs.items():
            counts[(group, value)] = counts.get((group, value), 0) + int(n)
    nulls = {v.lower() for v in null_values} | {UNK.lower(), "nan", "none"}
    complete = sorted(
        g
        for g, v in counts
        if v == config.target and (g, config.source) in counts and g.strip().lower() not in nulls
    )
    if not complete:
        raise ConfigError(
            f"no {config.group_by} has cells with both {config.field}={config.source} and "
            f"{config.field}={config.target}; check the values"
        )
    for group in config.groups or complete:
        if group not in complete:
            raise ConfigError(
                f"group {config.group_by}={group} has no cells with both {config.field} values "
                f"'{config.source}' and '{config.target}'; groups that do: {', '.join(complete)}"
            )
        yield Holdout.parse(
            f"{config.group_by}={group},{config.field}={config.target}",
            f"{config.field}={config.source}",
        )


def training_settings(settings: Settings, holdout: Holdout, out_dir: Path) -> Settings:
    """The settings of the fold that holds ``holdout`` out: the held-out cells are added to
    ``data.exclude``, the output goes to ``out_dir``."""
    data = settings.data.model_copy(
        update={"exclude": [*settings.data.exclude, str(holdout.held_out)]}
    )
    output = settings.output.model_copy(update={"dir": out_dir})
    return settings.model_copy(update={"data": data, "output": output})
