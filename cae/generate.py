"""``cae generate``: counterfactuals for a whole data set, streamed chunk by chunk into an .h5ad.

The output AnnData holds the counterfactual expression in ``.X`` (model space: log1p counts per
10,000 for the default transform), the model's genes as ``var_names``, and in ``.obs`` both the
source context (``source_<field>``) and the target context (``target_<field>``) of every cell.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cae.config import DataConfig
from cae.data.atomic import atomic_file, check_output_path
from cae.data.soma import is_soma_uri
from cae.data.store import DataStore
from cae.errors import CheckpointError, ConfigError, DataError
from cae.train.checkpoint import TrainedModel, load_checkpoint

log = logging.getLogger(__name__)


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


def open_input(path: str | Path, data: DataConfig, obs_filter: str | None = None) -> DataStore:
    """A store over an .h5ad, a folder of chunks, one ``*_counts_N.npz`` chunk (with its
    metadata ``*_metadata_N.pkl|.parquet`` beside it) or a TileDB-SOMA experiment.

    Args:
        path: the input.
        data: the model's data settings (globs, .h5ad layer, SOMA measurement and layer).
        obs_filter: for a SOMA experiment, the cells to read (every cell when None); its genes
            are all read and matched to the model's by name.

    Raises:
        DataError: the input does not exist or does not open.
    """
    # The training's cell and gene filters chose what it learnt from, not what is moved now.
    data = data.model_copy(update={"soma_obs_filter": None, "soma_var_filter": None})
    if is_soma_uri(str(path)):
        update = {"path": str(path), "soma_obs_filter": obs_filter}
        return DataStore.open(data.model_copy(update=update))
    if obs_filter is not None:
        raise ConfigError(f"--obs-filter selects cells of a SOMA experiment; {path} is not one")
    data = data.model_copy(update={"soma_layer": None})
    path = Path(path)
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


def _gene_columns(store: DataStore, genes: list[str]) -> np.ndarray:
    """Positions of the model's genes among the input's, in the model's order."""
    where = {gene: i for i, gene in enumerate(store.genes)}
    missing = [g for g in genes if g not in where]
    if missing:
        raise DataError(
            f"{store.path} lacks {len(missing):,} of the model's {len(genes):,} genes, e.g. "
            f"{', '.join(missing[:5])}; give an input with every gene the model was trained on "
            "(its genes.txt or var_names must name them; trained.genes lists them)"
        )
    extra = len(store.genes) - len(genes)
    if extra:
        log.warning("ignoring %d input genes the model does not use", extra)
    return np.array([where[g] for g in genes])


def generate(
    model: TrainedModel,
    input_path: str | Path,
    targets: Mapping[str, str],
    out: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    obs_filter: str | None = None,
) -> Path:
    """Write the counterfactuals of every cell of ``input_path`` to the .h5ad ``out``.

    Args:
        model: the trained model.
        input_path: an .h5ad, a folder of chunks, one expression chunk or a SOMA experiment, in
            the units the model was trained on.
        targets: ``{field: value}`` for the fields to change; others keep their source value.
        out: the .h5ad to write (atomically: it appears only when complete).
        overwrite: replace an existing ``out``.
        progress: show a progress bar over chunks.
        obs_filter: the cells of a SOMA experiment to move (every cell when None).

    Returns:
        ``out``.

    Raises:
        DataError: unreadable input, missing genes, or ``out`` exists without ``overwrite``.
        MetadataError: an unknown field or context value (the message lists the known ones).
    """
    import anndata

    out = check_output_path(Path(out), "--out", folder=False)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it or choose --out")
    store = open_input(input_path, model.settings.data, obs_filter)
    columns = _gene_columns(store, model.genes)
    sources = _read_sources(model, store, targets)
    obs = pd.concat(sources, ignore_index=True).add_prefix("source_")
    for field in model.vocabularies.fields:
        obs[f"target_{field}"] = targets[field] if field in targets else obs[f"source_{field}"]
    obs.index = [f"{c.chunk_id}_{i}" for c in store.chunks for i in range(c.n_cells)]
    with atomic_file(out) as tmp:
        # The skeleton (obs, var) first, then .X filled chunk by chunk: one chunk in memory.
        anndata.AnnData(obs=obs, var=pd.DataFrame(index=model.genes)).write_h5ad(tmp)
        _fill_expression(tmp, model, store, columns, sources, targets, progress=progress)
    return out


def _read_sources(
    model: TrainedModel, store: DataStore, targets: Mapping[str, str]
) -> list[pd.DataFrame]:
    """Each chunk's values of the model's fields as text, checked to encode (targets too)."""
    fields = list(model.vocabularies.fields)
    model.encode_targets(torch.ones((1, len(fields)), dtype=torch.long), targets)  # fail early
    sources = [store.read_metadata(c, fields) for c in store.chunks]
    for chunk, source in zip(store.chunks, sources, strict=True):  # fail early, naming the file
        model.vocabularies.encode(
            source, model.settings.data.null_values, source=chunk.metadata_name
        )
    return [source.astype(str) for source in sources]


def _fill_expression(
    tmp: Path,
    model: TrainedModel,
    store: DataStore,
    columns: np.ndarray,
    sources: list[pd.DataFrame],
    targets: Mapping[str, str],
    *,
    progress: bool,
) -> None:
    """Write the counterfactuals of every chunk into ``.X`` of the skeleton .h5ad ``tmp``."""
    import h5py
    from tqdm.auto import tqdm

    n_cells = sum(len(source) for source in sources)
    with h5py.File(tmp, "r+") as file:
        x = file.create_dataset(
            "X", shape=(n_cells, len(model.genes)), dtype="float32",
            chunks=(min(n_cells, 1024), len(model.genes)),
        )  # fmt: skip
        x.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        start = 0
        shown = None if progress else True  # None: a bar only on a terminal
        for chunk, source in tqdm(
            list(zip(store.chunks, sources, strict=True)), desc="generating", unit="chunk",
            disable=shown,
        ):  # fmt: skip
            expression = store.read_expression(chunk)[:, columns]
            moved = model.counterfactual(expression, source.reset_index(drop=True), targets)
            x[start : start + chunk.n_cells] = moved.output.cpu().numpy()
            start += chunk.n_cells
