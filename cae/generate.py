"""Counterfactuals (or reconstructions) of every cell of an input, as an AnnData that keeps the
input's cells: ``cae generate`` streams it chunk by chunk into an .h5ad, the Python API
(:mod:`cae.api`) returns it in memory.

The output AnnData:

* ``.X``: the counterfactual expression, or without targets the reconstruction (the cells
  decoded in their own contexts), in model space: log1p counts per 10,000 for the default
  transform ``log1p_cp10k``; or, with sampling (:class:`Sampling`, ``cae generate --sample``),
  whole counts (float32; :meth:`TrainedModel.sample_counts`): under the residual design a
  counterfactual keeps the cell, its own counts moved to the counterfactual's mean with the least
  added noise, while a reconstruction or a decoded counterfactual is drawn around its mean from
  the negative binomial of a model trained with ``model.likelihood = "nb"``;
* ``obs_names`` and ``.obs``: the input's cell names and obs columns (chunk files name their
  cells ``<chunk id>_<row>``, a SOMA experiment by ``soma_joinid``), with ``source_<field>`` and
  ``target_<field>`` added for every field of the model;
* ``var_names`` and ``.var``: the model's genes in the model's order, with the input's var rows
  of those genes (matched by name);
* ``.uns["cae"]``: the model, targets, what ``.X`` holds and in which units (with sampling:
  ``"counts"``, and ``sampling`` the seed and the library size used); ``.uns["log1p"]``
  (``{"base": None}``, scanpy's mark of log1p data) when ``.X`` is log1p counts per 10,000;
* with sampling the layer ``cae_mean`` (the mean in model space, what ``.X`` would be without);
  optionally the layers ``cae_input`` (the input in model space) and ``cae_reconstruction``.

Sampled counts are drawn per chunk, chunk ``i`` with the seed derived from ``(seed, i)``: the same
seed and chunking give the same counts, every chunk its own independent draws. Each cell keeps
its source cell's depth (a residual counterfactual: the typical gene the cell expresses keeps its
count; a decoded cell: drawn with the source cell's total counts), or is drawn with one size given
for every cell (its total counts in mean).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch

from cae import __version__
from cae.config import DataConfig
from cae.data.atomic import atomic_file, check_output_path
from cae.data.soma import is_soma_uri
from cae.data.store import (
    CountsDoubt,
    DataStore,
    check_cell_names,
    gene_positions,
    select_fields,
)
from cae.errors import CheckpointError, ConfigError, DataError, MetadataError
from cae.model.cae import CAEOutput
from cae.train.checkpoint import PreparedCells, TrainedModel, load_checkpoint

if TYPE_CHECKING:
    import anndata

log = logging.getLogger(__name__)

INPUT_LAYER = "cae_input"  # the input in model space
RECONSTRUCTION_LAYER = "cae_reconstruction"  # the cells decoded in their own contexts
MEAN_LAYER = "cae_mean"  # with sampling: the mean the counts in X were drawn for
MAX_SEED = 2**63 - 1  # seeds fit a signed 64-bit integer (MLflow's "long", an .h5ad attribute)
MAX_LIBRARY_SIZE = 1e9  # counts per cell: real cells hold thousands; draws stay far from overflow
SOURCE_LIBRARY = "source cell's depth"
UNITS = {"log1p_cp10k": "log1p counts per 10,000", "none": "as the input (transform none)"}


def load_any_model(model: str) -> TrainedModel:
    """A checkpoint file, a training folder, or an MLflow model URI (``models:/NAME@alias``)."""
    path = Path(model)
    if path.exists():
        return load_checkpoint(path)
    if ":" in model:
        from cae.tracking.pyfunc import load_model

        return load_model(model)
    raise CheckpointError(
        f"no model at {model}: give a checkpoint, a training folder or an MLflow URI "
        "such as models:/NAME@champion"
    )


def open_input(
    path: str | Path, data: DataConfig, obs_filter: str | None = None, layer: str | None = None
) -> DataStore:
    """A store over an .h5ad, a folder of chunks, one ``*_counts_N.npz`` chunk (with its
    metadata ``*_metadata_N.pkl|.parquet`` beside it) or a TileDB-SOMA experiment.

    Args:
        path: the input.
        data: the model's data settings (globs, .h5ad layer, SOMA measurement and layer).
        obs_filter: for a SOMA experiment, the cells to read (every cell when None); its genes
            are all read and matched to the model's by name.
        layer: the .h5ad layer (``X`` for ``.X``) or SOMA X layer to read instead of the one
            the model was trained on.

    Raises:
        DataError: the input does not exist or does not open, or has no such layer.
        ConfigError: ``obs_filter`` or ``layer`` for an input that has none.
    """
    # The training's cell and gene filters chose what it learnt from, not what is moved now.
    data = data.model_copy(update={"soma_obs_filter": None, "soma_var_filter": None})
    if is_soma_uri(str(path)):
        update = {"path": str(path), "soma_obs_filter": obs_filter}
        if layer is not None:
            update["soma_layer"] = layer
        return DataStore.open(data.model_copy(update=update))
    if obs_filter is not None:
        raise ConfigError(f"--obs-filter selects cells of a SOMA experiment; {path} is not one")
    data = data.model_copy(update={"soma_layer": None})
    path = Path(path)
    if layer is not None:
        if path.suffix != ".h5ad":
            raise ConfigError(f"--layer names a layer of an .h5ad or SOMA input; {path} is neither")
        data = data.model_copy(update={"h5ad_layer": None if layer == "X" else layer})
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"input {path} does not exist")
        chunk_id = path.stem.rsplit("_", 1)[-1]
        config = data.model_copy(
            update={"path": path.parent, "expression_glob": path.name,
                    "metadata_glob": f"*_metadata_{chunk_id}.*"}
        )  # fmt: skip
        return DataStore.open(config)
    return DataStore.open(data.model_copy(update={"path": str(path)}))


@dataclass(frozen=True)
class Sampling:
    """Whole counts instead of the model's mean (:meth:`TrainedModel.sample_counts`).

    Args:
        seed: the draws' seed, a whole number from 0 to :data:`MAX_SEED`.
        library_size: the depth (total counts) every cell is given, > 0 and at most
            :data:`MAX_LIBRARY_SIZE`; None: each source cell's depth.

    Raises:
        ConfigError: a seed or library size that is not such a number (the message names it).
    """

    seed: int = 0
    library_size: float | None = None

    def __post_init__(self) -> None:
        seed, size = _checked_sampling(self.seed, self.library_size, str)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "library_size", size)

    def chunk_seed(self, chunk: int) -> int:
        """The seed of chunk ``chunk``'s draws: derived from ``(seed, chunk)``, so chunks draw
        independently and the same seed draws the same counts again."""
        return int(np.random.SeedSequence([self.seed, chunk]).generate_state(1)[0])

    def draw(
        self,
        model: TrainedModel,
        cells: PreparedCells,
        out: CAEOutput,
        chunk: int = 0,
        moved: bool = True,
    ) -> torch.Tensor:
        """A chunk's counts (:meth:`TrainedModel.sample_counts`: a residual counterfactual keeps
        the cells' own counts where the move leaves them, a decoded pass is drawn around its
        mean).

        Args:
            model: a model that draws such counts (:meth:`TrainedModel.sampling_refusal`).
            cells: the chunk, from :meth:`TrainedModel.prepare`.
            out: a pass of it: :meth:`TrainedModel.move`'s counterfactual, or a decoded pass.
            chunk: which chunk (see :meth:`chunk_seed`).
            moved: ``out`` is a counterfactual (False: a decoded pass, e.g. a reconstruction).

        Returns:
            (n, G) float32 whole counts, >= 0 and finite; with :attr:`library_size` about that
            many counts per cell, else at each source cell's depth.

        Raises:
            ConfigError: counts the model cannot draw
                (:meth:`TrainedModel.sampling_refusal`).
            DataError: the draws overflowed (source cells with far more counts than real cells).
        """
        library = None
        if self.library_size is not None:
            library = torch.full((len(out.output), 1), self.library_size, device=out.output.device)
        counts = model.sample_counts(cells, out, self.chunk_seed(chunk), library, moved)
        if not bool(((counts >= 0) & torch.isfinite(counts)).all()):
            raise DataError(
                "drawing counts overflowed: the source cells hold far more counts than real cells "
                f"(at most {MAX_LIBRARY_SIZE:,.0f} is safe); give a library size"
            )
        return counts

    def describe(self) -> dict[str, Any]:
        """What the output's ``uns["cae"]["sampling"]`` says: the seed and the library size."""
        size = SOURCE_LIBRARY if self.library_size is None else self.library_size
        return {"seed": self.seed, "library_size": size}


def requested_sampling(
    sample: bool, seed: object, library_size: object, name: Callable[[str], str] = str
) -> Sampling | None:
    """The sampling a command, call or request asks for.

    Args:
        sample: draw counts.
        seed: the draws' seed (None: 0).
        library_size: the total counts every cell is drawn with (None: the source cell's).
        name: how the asker spells an option (``--library-size`` on the command line).

    Returns:
        The :class:`Sampling`, or None without ``sample``.

    Raises:
        ConfigError: a seed other than 0 or a library size without ``sample``, or one that
            :class:`Sampling` refuses.
    """
    if not sample:
        for key, value in (("seed", seed), ("library_size", library_size)):
            if value is not None and not (key == "seed" and is_whole_number(value) and value == 0):
                raise ConfigError(
                    f"{name(key)} sets how counts are drawn, but counts are drawn only with "
                    f"{name('sample')}: add it, or drop {name(key)}"
                )
        return None
    return Sampling(*_checked_sampling(0 if seed is None else seed, library_size, name))


def _checked_sampling(
    seed: object, library_size: object, name: Callable[[str], str]
) -> tuple[int, float | None]:
    """``(seed, library_size)`` as an int and a float, checked as :class:`Sampling` says.

    Raises:
        ConfigError: naming the option (spelt by ``name``) and its value.
    """
    if not (is_whole_number(seed) and 0 <= cast(int, seed) <= MAX_SEED):
        raise ConfigError(
            f"{name('seed')} is {seed!r}: the seed of sampled counts is a whole number from 0 to "
            "2**63 - 1"
        )
    if library_size is None:
        return int(cast(int, seed)), None
    size = cast(float, library_size)
    number = float(size) if is_number(size) and abs(size) < math.inf else math.nan
    if not 0 < number <= MAX_LIBRARY_SIZE:  # NaN fails it too
        raise ConfigError(
            f"{name('library_size')} is {library_size!r}: the library size of sampled counts is "
            f"the total counts every cell is drawn with, a number > 0 and at most "
            f"{MAX_LIBRARY_SIZE:,.0f} (or none: each source cell's depth)"
        )
    return int(cast(int, seed)), number


def is_whole_number(value: object) -> bool:
    """An integer, and not a boolean (True is an int to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_number(value: object) -> bool:
    """A real number, and not a boolean."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


@dataclass
class Generation:
    """One input's output, planned and checked before any cell is moved: its obs, var and uns,
    and what each chunk needs (the model's gene columns, each chunk's source contexts)."""

    model: TrainedModel
    store: DataStore
    targets: dict[str, str]
    layers: tuple[str, ...]  # of MEAN_LAYER (with sampling), INPUT_LAYER, RECONSTRUCTION_LAYER
    columns: np.ndarray  # (G,) the model's genes among the input's
    sources: list[pd.DataFrame]  # per chunk, the model's metadata columns (fields as text)
    obs: pd.DataFrame
    var: pd.DataFrame
    uns: dict[str, Any]
    sampling: Sampling | None = None  # None: X is the mean


def plan_generation(
    model: TrainedModel,
    store: DataStore,
    targets: Mapping[str, str],
    layers: Sequence[str] = (),
    sample: Sampling | None = None,
) -> Generation:
    """Check an input against the model and build the output's obs, var and uns.

    Args:
        model: the trained model.
        store: the input's cells.
        targets: ``{field: value}`` for the fields to change; empty for reconstructions.
        layers: which of :data:`INPUT_LAYER` and :data:`RECONSTRUCTION_LAYER` to add.
        sample: draw counts into ``.X`` (the mean goes to layer :data:`MEAN_LAYER`); None: ``.X``
            is the mean.

    Raises:
        ConfigError: ``sample`` that the model cannot draw (:meth:`TrainedModel.sampling_refusal`).
        DataError: missing genes, cell names that repeat.
        MetadataError: an unknown field or value (in the input or the targets), or an obs
            column the output would add (``source_<field>``, ``target_<field>``).
    """
    if sample is not None:
        model.check_sampling(moved=bool(targets))
        layers = (MEAN_LAYER, *layers)
    columns = gene_positions(store.genes, model.genes, str(store.path), "the model's")
    if len(store.genes) > len(model.genes):
        log.warning("ignoring %d input genes the model does not use", store.n_genes - len(columns))
    fields = list(model.vocabularies.fields)
    model.encode_targets(torch.ones((1, len(fields)), dtype=torch.long), targets)  # fail early
    frames = [store.read_metadata(c) for c in store.chunks]
    sources = []
    for chunk, frame in zip(store.chunks, frames, strict=True):  # fail early, naming the chunk
        source = select_fields(frame, model.metadata_columns, chunk.metadata_name)
        model.vocabularies.encode(
            source[fields], model.settings.data.null_values, source=chunk.metadata_name
        )
        # the fields as text; a library column (data.library_key) stays numbers
        sources.append(source.astype(dict.fromkeys(fields, str)).reset_index(drop=True))
    obs = _output_obs(store, frames, sources, targets, fields)
    var = store.var.iloc[columns].set_axis(pd.Index(model.genes))
    uns = _output_uns(model, targets, layers, sample)
    return Generation(
        model, store, dict(targets), tuple(layers), columns, sources, obs, var, uns, sample
    )


def _output_obs(
    store: DataStore,
    frames: list[pd.DataFrame],
    sources: list[pd.DataFrame],
    targets: Mapping[str, str],
    fields: list[str],
) -> pd.DataFrame:
    """The input's obs, named by its cells, with ``source_<field>`` and ``target_<field>``."""
    names = pd.Index(np.concatenate([store.cell_names(c) for c in store.chunks]))
    check_cell_names(names, str(store.path))
    obs = pd.concat(frames, ignore_index=True).set_axis(names)
    added = pd.concat(sources, ignore_index=True).set_axis(names)
    for field in fields:
        for column in (f"source_{field}", f"target_{field}"):
            if column in obs.columns:
                raise MetadataError(
                    f"{store.path}: obs already has a column '{column}' (the output of an "
                    "earlier cae generate?); the output adds its own: rename or drop it"
                )
        obs[f"source_{field}"] = added[field]
        obs[f"target_{field}"] = targets[field] if field in targets else added[field]
    return obs


def _output_uns(
    model: TrainedModel,
    targets: Mapping[str, str],
    layers: Sequence[str],
    sample: Sampling | None,
) -> dict[str, Any]:
    """What the output's X and layers hold (``uns["cae"]``), and scanpy's ``uns["log1p"]``."""
    transform, key = model.settings.data.transform, model.settings.data.library_key
    units = UNITS[transform] + ("" if key is None else f" of obs '{key}'")
    mean = "counterfactual: the cells moved to the targets" if targets else (
        "the cells decoded in their own contexts"
    )  # fmt: skip
    what = {
        MEAN_LAYER: f"the mean the counts in X were drawn for, {mean} ({units})",
        INPUT_LAYER: f"the input, in model space ({units})",
        RECONSTRUCTION_LAYER: f"the cells decoded in their own contexts ({units})",
    }
    info: dict[str, Any] = {
        "model": model.origin or "",
        "mode": "counterfactual" if targets else "reconstruction",
        "targets": dict(targets),
        "X": mean if targets else what[RECONSTRUCTION_LAYER],
        "units": units,
        "transform": transform,
        "counterfactual": model.settings.model.counterfactual,
        "layers": {layer: what[layer] for layer in layers},
        "version": __version__,
    }
    if sample is not None:
        kept = bool(targets) and model.settings.model.counterfactual == "residual"
        info["X"] = (
            f"whole counts whose log1p counts per 10,000 average to layer {MEAN_LAYER}"
            if kept and model.settings.model.likelihood == "normal"
            else f"whole counts with the mean of layer {MEAN_LAYER}"
        ) + (
            ": the cells' own counts moved to the counterfactual (the residual design)"
            if kept
            else ": drawn from the model's negative binomial"
        )
        info["units"] = "counts"
        info["sampling"] = sample.describe()
    uns: dict[str, Any] = {"cae": info}
    if transform == "log1p_cp10k" and sample is None:
        uns["log1p"] = {"base": None}  # natural log, as sc.pp.log1p marks its output
    return uns


def generated_blocks(plan: Generation, progress: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Move every chunk of the planned input, in order.

    Yields:
        Per chunk ``{"X": (n, G) output, <layer>: (n, G), ...}``, float32, for the planned layers
        (``X`` the counts drawn for chunk ``i`` with :meth:`Sampling.chunk_seed` of ``i`` when the
        plan samples).

    Raises:
        DataError: a chunk's values are unreadable, negative, not finite or above
            ``serve.max_value``, or its draws overflowed.
    """
    from tqdm.auto import tqdm

    model, store = plan.model, plan.store
    doubts = CountsDoubt(str(store.path), model.settings.data.transform)
    shown = None if progress else True  # None: a bar only on a terminal
    pairs = list(zip(store.chunks, plan.sources, strict=True))
    bar = tqdm(pairs, desc="generating", unit="chunk", disable=shown)
    for index, (chunk, source) in enumerate(bar):
        expression = store.read_expression(chunk)[:, plan.columns]
        doubts.check(expression)
        cells = model.prepare(expression, source)
        block: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            source_index = cells.source_index.to(cells.x_model.device)
            if plan.targets:
                out = model.move(cells.x_model, cells.source_index, plan.targets)
                if RECONSTRUCTION_LAYER in plan.layers:
                    own = model.model(cells.x_model, source_index).output
                    block[RECONSTRUCTION_LAYER] = own
            else:
                out = model.model(cells.x_model, source_index)
                block[RECONSTRUCTION_LAYER] = out.output
        block["X"] = out.output
        if plan.sampling is not None:
            block[MEAN_LAYER] = block["X"]
            block["X"] = plan.sampling.draw(model, cells, out, index, moved=bool(plan.targets))
        block[INPUT_LAYER] = cells.x_model
        yield {key: block[key].cpu().numpy() for key in ("X", *plan.layers)}
    doubts.finish()


def generated_anndata(plan: Generation, progress: bool = False) -> anndata.AnnData:
    """The planned output in memory (see the module's docstring)."""
    import anndata

    blocks = list(generated_blocks(plan, progress))
    layers = {key: np.concatenate([b[key] for b in blocks]) for key in plan.layers}
    x = np.concatenate([b["X"] for b in blocks])
    return anndata.AnnData(x, obs=plan.obs, var=plan.var, uns=plan.uns, layers=layers)


def generate(
    model: TrainedModel,
    input_path: str | Path,
    targets: Mapping[str, str],
    out: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    obs_filter: str | None = None,
    layer: str | None = None,
    layers: Sequence[str] = (),
    sample: Sampling | None = None,
) -> Path:
    """Write the counterfactuals of every cell of ``input_path`` to the .h5ad ``out``, one chunk
    in memory at a time.

    Args:
        model: the trained model.
        input_path: an .h5ad, a folder of chunks, one expression chunk or a SOMA experiment, in
            the units the model was trained on.
        targets: ``{field: value}`` for the fields to change; others keep their source value.
            Empty: ``.X`` is the reconstruction.
        out: the .h5ad to write (atomically: it appears only when complete).
        overwrite: replace an existing ``out``.
        progress: show a progress bar over chunks.
        obs_filter: the cells of a SOMA experiment to move (every cell when None).
        layer: the input's layer to read (see :func:`open_input`).
        layers: which of :data:`INPUT_LAYER` and :data:`RECONSTRUCTION_LAYER` to add.
        sample: draw counts into ``.X``, the mean going to layer :data:`MEAN_LAYER` (None: ``.X``
            is the mean).

    Returns:
        ``out``.

    Raises:
        ConfigError: ``sample`` the model cannot draw (before ``out``
            is started).
        DataError: unreadable input, missing genes, repeated cell names, or ``out`` exists
            without ``overwrite``.
        MetadataError: an unknown field or context value (the message lists the known ones).
    """
    out = check_output_path(Path(out), "--out", folder=False)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it or choose --out")
    store = open_input(input_path, model.settings.data, obs_filter, layer)
    plan = plan_generation(model, store, targets, layers, sample)
    with atomic_file(out) as tmp:
        _write_streamed(tmp, plan, progress)
    return out


def _write_streamed(path: Path, plan: Generation, progress: bool) -> None:
    """Write the planned output to the .h5ad ``path`` with anndata's writer: the skeleton (obs,
    var, uns) first, then X and the layers, written by anndata for the first chunk and grown
    by every later one (one chunk in memory)."""
    import anndata
    import h5py
    from anndata.io import write_elem

    n_cells, n_genes = plan.store.n_cells, len(plan.model.genes)
    shape = {"maxshape": (n_cells, n_genes), "chunks": (min(n_cells, 1024), n_genes)}
    anndata.AnnData(obs=plan.obs, var=plan.var, uns=plan.uns).write_h5ad(path)
    with h5py.File(path, "r+") as file:
        start = 0
        for block in generated_blocks(plan, progress):
            stop = start + len(block["X"])
            for key, values in block.items():
                group, name = (file, key) if key == "X" else (file["layers"], key)
                if start == 0:
                    write_elem(group, name, values, dataset_kwargs=shape)
                else:
                    group[name].resize(stop, axis=0)
                    group[name][start:stop] = values
            start = stop
