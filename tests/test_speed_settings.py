"""The speed settings change how a training runs, not what it learns: context-map methods agree,
bf16 autocast trains, checkpoints of the previous format are refused clearly, and chunks
travel between processes intact."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cae.errors import CheckpointError
from cae.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from cae.train.trainer import train
from tests.conftest import quick_settings


def test_context_map_methods_train_the_same_model(small_data: Path, tmp_path: Path):
    models = {}
    for method in ("grouped", "gather"):
        result = train(
            quick_settings(small_data, tmp_path / method, **{"train.context_maps": method})
        )
        models[method] = read_checkpoint(result.checkpoint)["model"]
    for name, tensor in models["grouped"].items():
        torch.testing.assert_close(models["gather"][name], tensor, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains(small_data: Path, tmp_path: Path):
    result = train(quick_settings(small_data, tmp_path / "bf16", **{"train.precision": "bf16"}))
    assert np.isfinite(result.final["val/loss"])
    weights = read_checkpoint(result.checkpoint)["model"]
    assert all(t.dtype == torch.float32 for t in weights.values())  # weights stay float32


def test_a_checkpoint_of_the_previous_format_is_refused_with_a_clear_error(
    small_data: Path, tmp_path: Path
):
    result = train(quick_settings(small_data, tmp_path / "run", **{"train.epochs": 1}))
    payload = read_checkpoint(result.checkpoint)
    save_checkpoint(result.checkpoint, {**payload, "format": 1})
    with pytest.raises(CheckpointError, match=r"older cae .*format 1.*train the model again"):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match="older cae"):
        train(
            quick_settings(
                small_data, tmp_path / "run", **{"train.epochs": 2, "output.resume": True}
            )
        )


def test_saved_settings_with_the_retired_shared_weight_load(small_data: Path, tmp_path: Path):
    """Checkpoints and registered models of this version carry ``train.weights.shared``."""
    result = train(quick_settings(small_data, tmp_path / "run", **{"train.epochs": 1}))
    payload = read_checkpoint(result.checkpoint)
    payload["settings"]["train"]["weights"]["shared"] = 0.0
    save_checkpoint(result.checkpoint, payload)
    assert load_checkpoint(tmp_path / "run").epoch == 1
    resumed = quick_settings(
        small_data, tmp_path / "run", **{"train.epochs": 2, "output.resume": True}
    )
    assert train(resumed).epochs == 2


def test_a_chunk_pickles_through_tensors_and_back(small_data: Path):
    from cae.config import DataConfig
    from cae.data.loader import ChunkDataset
    from cae.data.store import DataStore
    from cae.data.vocabulary import DEFAULT_NULL_VALUES, Vocabularies, build_field_specs

    store = DataStore.open(DataConfig(path=small_data))
    specs = build_field_specs(store.iter_metadata(["sex"]), ["sex"], DEFAULT_NULL_VALUES)
    dataset = ChunkDataset(
        store, Vocabularies.from_specs(specs), DEFAULT_NULL_VALUES,
        val_chunks=[], val_fraction=0.2, seed=0,
    )  # fmt: skip
    chunk = dataset[0]
    *arrays, library = chunk.__reduce__()[1][2:]
    assert all(isinstance(a, torch.Tensor) for a in arrays)  # shared memory in workers
    assert library is None and pickle.loads(pickle.dumps(chunk)).library is None
    chunk.library = np.arange(1.0, chunk.expression.shape[0] + 1)  # data.library_key's totals
    assert isinstance(chunk.__reduce__()[1][-1], torch.Tensor)
    copy = pickle.loads(pickle.dumps(chunk))
    assert copy.chunk_id == chunk.chunk_id
    assert (copy.expression != chunk.expression).nnz == 0
    for name in ("contexts", "train_rows", "val_rows", "library"):
        np.testing.assert_array_equal(getattr(copy, name), getattr(chunk, name))
