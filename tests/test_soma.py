"""TileDB-SOMA experiments as data: the same cells as chunk files, filters, and bad input.

The experiment (``soma_experiment`` in conftest) is written with ``tiledbsoma.io.from_anndata``
from the synthetic data, as a Census export is laid out (measurement RNA, obs as categoricals).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cae.cli import main
from cae.config import DataConfig
from cae.data.soma import SomaQuery
from cae.data.store import DataStore
from cae.errors import DataError
from cae.train import load_checkpoint, train
from tests.conftest import load_cells, quick_settings, store_cells

pytest.importorskip("tiledbsoma")


@pytest.fixture
def experiment(soma_experiment: Path) -> Path:
    return soma_experiment


def test_soma_store_serves_the_same_cells_as_the_chunks(small_data: Path, experiment: Path):
    chunks = DataStore.open(DataConfig(path=str(small_data)))
    store = DataStore.open(DataConfig(path=str(experiment), h5ad_chunk_size=200))
    assert store.kind == "soma" and store.genes == chunks.genes
    assert [c.n_cells for c in store.chunks] == [c.n_cells for c in chunks.chunks]
    x, meta = store_cells(chunks)
    y, soma_meta = store_cells(store)
    np.testing.assert_array_equal(y, x)
    assert soma_meta[meta.columns].astype(str).equals(meta.astype(str))
    assert store.fingerprint() != chunks.fingerprint()
    first = store.read_expression(store.chunks[0])  # shared with the trainer as tensors: writable
    assert first.data.flags.writeable and first.indices.flags.writeable


def test_soma_filters_choose_cells_and_genes(small_data: Path, experiment: Path):
    x, meta = load_cells(small_data)
    chunks = DataStore.open(DataConfig(path=str(small_data)))
    wanted = chunks.genes[3:9:2]
    config = DataConfig(
        path=str(experiment),
        soma_obs_filter="sex == 'female' and assay != 'Smart-seq2'",
        soma_var_filter=f"var_id in {wanted}",
        h5ad_chunk_size=64,
    )
    store = DataStore.open(config)
    rows = ((meta["sex"] == "female") & (meta["assay"] != "Smart-seq2")).to_numpy()
    y, soma_meta = store_cells(store)
    assert store.genes == wanted
    np.testing.assert_array_equal(y, x[rows][:, [chunks.genes.index(g) for g in wanted]])
    assert (soma_meta["sex"] == "female").all() and len(soma_meta) == rows.sum()
    assert all(c.n_cells <= 64 for c in store.chunks)


def test_training_on_soma_matches_training_on_the_same_chunks(
    small_data: Path, experiment: Path, tmp_path: Path
):
    """Same cells, same chunk sizes: the same training, so the same per-field effects."""
    from_chunks = train(quick_settings(small_data, tmp_path / "chunks"))
    from_soma = train(
        quick_settings(experiment, tmp_path / "soma", **{"data.h5ad_chunk_size": 200})
    )
    for field in ("cell_type", "assay", "sex"):
        want = from_chunks.final[f"effect_l2/{field}"]
        assert from_soma.final[f"effect_l2/{field}"] == pytest.approx(want, rel=0.05)


def test_cae_train_generate_evaluate_on_soma_with_a_filter(
    experiment: Path, small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    common = ["--data", str(experiment), "--obs-filter", "cell_type != 'NK'", "--fields",
              "assay,sex", "--no-tracking", "--no-progress"]  # fmt: skip
    held_out = "assay=Smart-seq2,sex=female"
    status = main(
        ["train", *common, "--exclude", held_out, "--num-workers", "1", "--epochs", "2",
         "--latent-dim", "8", "--out", str(out)]
    )  # fmt: skip
    assert status in (None, 0), capsys.readouterr().err
    trained = load_checkpoint(out)
    assert trained.settings.data.soma_obs_filter == "cell_type != 'NK'"
    moved = tmp_path / "moved.h5ad"
    status = main(
        ["generate", "--model", str(out), "--input", str(experiment), "--obs-filter",
         "sex == 'male'", "--set", "sex=female", "--out", str(moved)]
    )  # fmt: skip
    assert status in (None, 0), capsys.readouterr().err
    import anndata

    adata = anndata.read_h5ad(moved)
    assert (adata.obs["source_sex"] == "male").all() and (adata.obs["target_sex"] == "female").all()
    assert np.isfinite(adata.X).all() and adata.n_vars == len(trained.genes)
    # The SOMA-trained model moves cells of chunk files too (its obs filter stays with training).
    status = main(
        ["generate", "--model", str(out), "--input", str(small_data), "--set", "sex=female",
         "--out", str(tmp_path / "from_chunks.h5ad")]
    )  # fmt: skip
    assert status in (None, 0), capsys.readouterr().err
    status = main(
        ["evaluate", "--model", str(out), *common, "--holdout", held_out, "--source",
         "sex=male", "--out", str(tmp_path / "eval"), "--max-cells", "100"]
    )  # fmt: skip
    assert status in (None, 0), capsys.readouterr().err
    scores = pd.read_csv(next((tmp_path / "eval").rglob("scores.csv")))
    assert set(scores["method"]) >= {"model", "mean_shift"}
    assert np.isfinite(scores["r2_mean"]).all()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--soma-measurement", "ATAC"], "has no measurement 'ATAC'; its measurements: RNA"),
        (["--soma-layer", "raw"], "has no X layer 'raw'; its layers: counts"),
        (["--obs-filter", "sex ==== 'x'"], "does not parse"),
        (["--obs-filter", "tissue == 'blood'"], "does not parse or names a column obs lacks"),
        (["--obs-filter", "sex == 'none'"], "selects no cells"),
        (["--var-filter", "var_id == 'no_such_gene'"], "selects no genes"),
        (["--fields", "tissue"], "obs has no column 'tissue'"),
    ],
)
def test_bad_soma_input_is_one_line_and_exit_2(
    experiment: Path, tmp_path: Path, flags: list[str], message: str, capsys
):
    status = main(
        ["train", "--data", str(experiment), *flags, "--out", str(tmp_path / "run"),
         "--no-tracking", "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_folder_that_is_no_soma_experiment(tmp_path: Path, capsys):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "__tiledb_group.tdb").write_text("")
    status = main(["train", "--data", str(fake), "--no-tracking", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "cannot open" in err and str(fake) in err


def test_preprocess_and_convert_leave_the_experiment_alone(
    experiment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in experiment.iterdir())
    assert main(["preprocess", "--data", str(experiment), "--fields", "assay,sex"]) in (None, 0)
    assert (tmp_path / "preprocessed" / "vocabularies.json").is_file()
    assert main(["convert", "--data", str(experiment), "--out", str(tmp_path / "c")]) == 2
    assert "needs no conversion" in capsys.readouterr().err
    assert sorted(p.name for p in experiment.iterdir()) == before
    assert not (tmp_path / "c").exists()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.text(max_size=30),
        st.builds(
            lambda column, op, value: f"{column} {op} {value}",
            st.sampled_from(["sex", "assay", "cell_type", "soma_joinid", "nope", "obs_id"]),
            st.sampled_from(["==", "!=", "<", ">=", "in", "===", "and"]),
            st.one_of(st.text(max_size=8).map(repr), st.integers().map(str), st.just("[]")),
        ),
    )
)
def test_any_obs_filter_selects_cells_or_is_one_data_error(experiment: Path, text: str):
    try:
        query = SomaQuery.open(str(experiment), "RNA", None, text, None)
    except DataError as err:
        assert str(experiment) in str(err) and "\n" not in str(err).strip()
    else:
        assert query.n_cells > 0 and np.all(np.diff(query.obs_ids) > 0)


@pytest.mark.parametrize("flag", ["--obs-filter", "--var-filter", "--soma-layer"])
def test_soma_settings_on_chunk_files_are_refused(small_data: Path, tmp_path: Path, flag, capsys):
    """Ignoring a filter would silently train on cells the user did not choose."""
    status = main(
        ["train", "--data", str(small_data), flag, "sex == 'female'", "--out",
         str(tmp_path / "run"), "--no-tracking"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and "is not one" in err and str(small_data) in err
    assert len(err.splitlines()) == 1
