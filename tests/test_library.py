"""A column of each cell's total counts (``data.library_key``, the Census's ``raw_sum``): a subset
of genes is normalised by the whole cell's total in training, predictions, counts and evaluation,
and a column that cannot be such a total is refused, naming the row and value."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cae.cli import main
from cae.config import DataConfig, load_settings
from cae.data.loader import ChunkDataset, cell_totals, iter_batches
from cae.data.store import DataStore
from cae.data.vocabulary import DEFAULT_NULL_VALUES, Vocabularies, build_field_specs
from cae.errors import ConfigError, DataError, MetadataError
from cae.evaluate.protocol import Holdout, collect_cells, moved_cells
from cae.tracking.pyfunc import example_input, predict_frame
from cae.train.checkpoint import TrainedModel, load_checkpoint
from tests.conftest import scverse_cells

KEY = "total_counts"
FIELDS = ["cell_type", "sex"]


def _expected(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """log1p of counts per 10,000 of each cell's total."""
    return np.log1p(counts / totals[:, None] * 1e4).astype(np.float32)


@pytest.fixture(scope="module")
def subset_h5ad(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cells' counts as a subset of genes: each cell's total over all its genes is 1 to
    4 times its sum over these (obs ``total_counts``)."""
    adata = scverse_cells(tiny)
    sums = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
    adata.obs[KEY] = sums * np.random.default_rng(0).uniform(1.0, 4.0, len(sums))
    path = tmp_path_factory.mktemp("library") / "subset.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def library_model(subset_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("library_model") / "run"
    argv = ["train", "--data", str(subset_h5ad), "--layer", "counts", "--library-key", KEY,
            "--fields", ",".join(FIELDS), "--epochs", "1", "--num-workers", "0",
            "--latent-dim", "8", "--no-tracking", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def _cells(path: Path) -> tuple[np.ndarray, pd.DataFrame]:
    adata = anndata.read_h5ad(path)
    obs = adata.obs[FIELDS].astype(str).assign(**{KEY: adata.obs[KEY].to_numpy()})
    return adata.layers["counts"].toarray(), obs


@pytest.mark.parametrize(
    ("values", "row", "shown"),
    [
        (["12", "x"], 0, "not numbers"),
        ([12.0, float("nan")], 1, "nan"),
        ([12.0, float("inf")], 1, "inf"),
        ([0.0, 12.0], 0, "holds 0"),
        ([12.0, -3.0], 1, "holds -3"),
        ([12.0, 9.5], 1, "holds 9.5 but the cell's counts of the genes read sum to 10"),
    ],
)
def test_a_column_that_cannot_be_each_cells_total_is_refused(values, row, shown) -> None:
    with pytest.raises(DataError) as caught:
        cell_totals(np.asarray(values, dtype=object), np.array([10.0, 10.0]), "f.h5ad column 't'")
    message = str(caught.value)
    assert message.startswith("f.h5ad column 't'") and shown in message
    assert "not numbers" in message or f"row {row} " in message


@settings(deadline=None, max_examples=50)
@given(
    sums=st.lists(st.floats(0, 1e7), min_size=1, max_size=5),
    factor=st.floats(1.0, 1e3),
)
def test_any_total_at_least_the_genes_sum_is_taken(sums, factor) -> None:
    row_sums = np.asarray(sums)
    totals = cell_totals(row_sums * factor + 1.0, row_sums, "column 't'")
    assert totals.dtype == np.float64
    np.testing.assert_array_equal(totals, row_sums * factor + 1.0)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"data.transform": "none"}, "reads values already normalised"),
        ({"model.likelihood": "nb"}, "model.likelihood = 'nb' shares the counts"),
        ({"data.fields": "cell_type,total_counts"}, "is also a field"),
        ({"data.library_key": "total/counts"}, "field names become MLflow metric keys"),
    ],
)
def test_settings_refuse_a_library_column_where_it_cannot_work(values, says) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(None, {"data.library_key": KEY, **values})


def test_training_batches_are_normalised_by_the_column(subset_h5ad: Path) -> None:
    store = DataStore.open(DataConfig(path=str(subset_h5ad), h5ad_layer="counts"))
    specs = build_field_specs(store.iter_metadata(FIELDS), FIELDS, DEFAULT_NULL_VALUES)
    dataset = ChunkDataset(
        store, Vocabularies.from_specs(specs), DEFAULT_NULL_VALUES,
        val_chunks=[], val_fraction=0.0, seed=0, library_key=KEY,
    )  # fmt: skip
    chunk = dataset[0]
    counts, obs = _cells(subset_h5ad)
    np.testing.assert_array_equal(chunk.library, obs[KEY].to_numpy()[: chunk.library.size])
    rebuilt = chunk.__reduce__()[0](*chunk.__reduce__()[1])  # as a loader worker sends it
    np.testing.assert_array_equal(rebuilt.library, chunk.library)
    rows = [np.arange(chunk.expression.shape[0])]
    (batch,) = iter_batches([chunk], rows, 1_000, torch.device("cpu"), "log1p_cp10k")
    expected = _expected(counts[rows[0]], obs[KEY].to_numpy()[rows[0]])
    np.testing.assert_allclose(batch.x.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert batch.library is not None
    np.testing.assert_allclose(batch.library[:, 0].numpy(), obs[KEY].to_numpy()[rows[0]])


def test_predictions_need_and_use_each_cells_total(library_model: Path, subset_h5ad: Path):
    trained = load_checkpoint(library_model)
    assert trained.metadata_columns == [*FIELDS, KEY]
    counts, obs = _cells(subset_h5ad)
    cells = trained.prepare(counts, obs)
    expected = _expected(counts, obs[KEY].to_numpy())
    np.testing.assert_allclose(cells.x_model.numpy(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(MetadataError, match="no column 'total_counts' in the source cells"):
        trained.prepare(counts, obs[FIELDS])
    with pytest.raises(MetadataError, match="has 2 values for 90 cells"):
        trained.prepare(counts, {**obs[FIELDS].to_dict("list"), KEY: [1e6, 1e6]})
    with pytest.raises(DataError, match=r"column 'total_counts' row 0 holds 1 but"):
        trained.prepare(counts, obs.assign(**{KEY: 1.0}))
    # served: the column travels with the request, as a number
    frame = pd.concat(
        [pd.DataFrame(counts, columns=trained.genes), obs.reset_index(drop=True)], axis=1
    )
    served = predict_frame(trained, frame, {"sex": "female"}, contributions=False)
    moved = trained.counterfactual(counts, obs, {"sex": "female"}).output.numpy()
    np.testing.assert_allclose(served.to_numpy(), moved, rtol=1e-5, atol=1e-5)
    with pytest.raises(MetadataError, match=r"lacks the context column\(s\) total_counts"):
        predict_frame(trained, frame.drop(columns=KEY), {}, contributions=False)
    predict_frame(trained, example_input(trained), {}, contributions=False)


def test_counts_keep_each_cell_and_are_scored_at_its_total(
    library_model: Path, subset_h5ad: Path, tmp_path: Path
) -> None:
    trained: TrainedModel = load_checkpoint(library_model)
    counts, obs = _cells(subset_h5ad)
    cells = trained.prepare(counts, obs)
    unmoved = trained.move(cells.x_model, cells.source_index, {})
    np.testing.assert_array_equal(trained.sample_counts(cells, unmoved, 3).numpy(), counts)
    argv = ["generate", "--model", str(library_model), "--input", str(subset_h5ad),
            "--out", str(tmp_path / "cf.h5ad"), "--set", "sex=female", "--sample"]  # fmt: skip
    assert main(argv) == 0
    out = anndata.read_h5ad(tmp_path / "cf.h5ad")
    female = (obs["sex"] == "female").to_numpy()
    np.testing.assert_array_equal(out.X[female], counts[female])
    assert out.uns["cae"]["transform"] == "log1p_cp10k"
    np.testing.assert_array_equal(out.obs[KEY].to_numpy(), obs[KEY].to_numpy())
    # the evaluation normalises by the column, the moved cells' counts by their source's total
    store = DataStore.open(trained.settings.data.model_copy(update={"path": str(subset_h5ad)}))
    holdout = Holdout.parse("cell_type=B,sex=female", "sex=male")
    evaluated = collect_cells(store, "log1p_cp10k", holdout, FIELDS, trained.settings.evaluate, KEY)
    source = ((obs["cell_type"] == "B") & (obs["sex"] == "male")).to_numpy()
    expected = _expected(counts[source], obs[KEY].to_numpy()[source])
    np.testing.assert_allclose(evaluated.source, expected, rtol=1e-6, atol=1e-6)
    raw = sp.csr_matrix(counts[source])
    mean, sampled = moved_cells(trained, raw, obs[source], {}, seed=0)
    assert sampled is not None
    np.testing.assert_allclose(sampled, expected, rtol=1e-6, atol=1e-6)  # nothing moved
    np.testing.assert_allclose(mean, expected, rtol=1e-6, atol=1e-6)


def test_setup_anndata_registers_the_column(subset_h5ad: Path) -> None:
    from cae.api import CAE

    adata = anndata.read_h5ad(subset_h5ad)
    CAE.setup_anndata(adata, fields=FIELDS, layer="counts", library_key=KEY)
    assert CAE(adata).settings().data.library_key == KEY
    with pytest.raises(MetadataError, match="raw_sum"):
        CAE.setup_anndata(adata, fields=FIELDS, layer="counts", library_key="raw_sum")
