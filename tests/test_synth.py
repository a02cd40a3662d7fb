"""Tests of the synthetic data generator ``cae.data.synth``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cae.data import synth
from cae.data.synth import (
    SynthConfig,
    expected_expression,
    generate,
    load_truth,
    log1p_cp10k,
    make_truth,
    simulate,
)
from cae.errors import ConfigError, DataError

FIELDS = ["cell_type", "assay", "sex"]
SMALL = SynthConfig(n_cells=900, n_genes=60, n_chunks=4, seed=3)


@pytest.fixture(scope="module")
def default_truth() -> dict:
    return make_truth(SynthConfig())


@pytest.fixture(scope="module")
def default_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("default") / "synth", h5ad=True)


def load(folder: Path) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """All chunks of a generated data set, concatenated."""
    n_chunks = json.loads((folder / "truth.json").read_text())["n_chunks"]
    counts = [sp.load_npz(folder / f"synth_counts_{i}.npz") for i in range(n_chunks)]
    metadata = [pd.read_pickle(folder / f"synth_metadata_{i}.pkl") for i in range(n_chunks)]
    return sp.vstack(counts, format="csr"), pd.concat(metadata, ignore_index=True)


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def test_files_written_and_aligned(default_data: Path) -> None:
    config = SynthConfig()
    names = sorted(p.name for p in default_data.iterdir())
    expected = sorted(
        [f"synth_counts_{i}.npz" for i in range(6)]
        + [f"synth_metadata_{i}.pkl" for i in range(6)]
        + ["genes.txt", "truth.json", "synth.h5ad"]
    )
    assert names == expected
    sizes = []
    for i in range(config.n_chunks):
        counts = sp.load_npz(default_data / f"synth_counts_{i}.npz")
        meta = pd.read_pickle(default_data / f"synth_metadata_{i}.pkl")
        assert sp.isspmatrix_csr(counts) or isinstance(counts, sp.csr_array)
        assert counts.dtype == np.float32
        assert counts.shape == (len(meta), config.n_genes)
        assert np.array_equal(counts.data, np.round(counts.data)) and counts.data.min() > 0
        assert list(meta.columns) == FIELDS
        assert all(meta[c].dtype == object for c in FIELDS)
        assert meta.index.equals(pd.RangeIndex(len(meta)))
        sizes.append(len(meta))
    assert sum(sizes) == config.n_cells and max(sizes) - min(sizes) <= 1
    genes = (default_data / "genes.txt").read_text().splitlines()
    assert genes == [f"gene_{g:04d}" for g in range(config.n_genes)]
    truth = json.loads((default_data / "truth.json").read_text())
    assert truth["genes"] == genes and truth["n_cells"] == config.n_cells


def test_truth_keys_and_shapes(default_truth: dict) -> None:
    keys = {"version", "seed", "n_cells", "n_genes", "genes", "fields", "base_log_rate"}
    keys |= {"effects", "programs", "program_sd", "library_size", "unknown_fraction"}
    keys |= {"null_value", "effect_size", "ranking"}
    assert keys <= set(default_truth)
    json.dumps(default_truth)  # JSON-able
    n_genes = default_truth["n_genes"]
    assert default_truth["null_value"] == "unknown"
    assert len(default_truth["base_log_rate"]) == n_genes
    assert np.asarray(default_truth["programs"]).shape == (3, n_genes)
    for name in FIELDS:
        spec = default_truth["fields"][name]
        assert min(spec["probabilities"]) >= 0.1
        assert sum(spec["probabilities"]) == pytest.approx(1.0)
        effects = np.array([default_truth["effects"][name][v] for v in spec["values"]])
        assert effects.shape == (len(spec["values"]), n_genes)
        np.testing.assert_allclose(effects.mean(axis=0), 0.0, atol=1e-12)  # centred
        assert np.abs(effects).max() > 0


def test_truth_json_reads_back_and_a_broken_one_is_refused(
    default_truth: dict, tmp_path: Path
) -> None:
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(default_truth))
    assert load_truth(path) == json.loads(json.dumps(default_truth))
    path.write_text(json.dumps({**default_truth, "genes": default_truth["genes"][:5]}))
    with pytest.raises(DataError, match=r"truth\.json is not a synthetic ground truth.*base_log"):
        load_truth(path)
    path.write_text("{")
    with pytest.raises(DataError, match=r"truth\.json cannot be read as JSON"):
        load_truth(path)


def test_truth_ranking_defaults(default_truth: dict) -> None:
    sizes = default_truth["effect_size"]
    assert default_truth["ranking"] == ["cell_type", "assay", "sex"]
    assert sizes["cell_type"] > 1.5 * sizes["assay"] > 1.5 * 1.5 * sizes["sex"] > 0


def test_effect_size_follows_effect_sd() -> None:
    truth = make_truth(
        SynthConfig(n_genes=40, effect_sd={"cell_type": 0.1, "assay": 0.0, "sex": 1.0})
    )
    assert truth["ranking"] == ["sex", "cell_type", "assay"]
    assert truth["effect_size"]["assay"] < 0.05


def test_deterministic_given_seed(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", SMALL)
    second = generate(tmp_path / "b", SMALL)
    other = generate(tmp_path / "c", SynthConfig(n_cells=900, n_genes=60, n_chunks=4, seed=4))
    counts_a, meta_a = load(first)
    counts_b, meta_b = load(second)
    counts_c, meta_c = load(other)
    assert (counts_a != counts_b).nnz == 0
    pd.testing.assert_frame_equal(meta_a, meta_b)
    assert (first / "truth.json").read_text() == (second / "truth.json").read_text()
    assert (counts_a != counts_c).nnz > 0
    assert not meta_a.equals(meta_c)
    assert make_truth(SMALL)["base_log_rate"] != make_truth(other_seed(SMALL))["base_log_rate"]


def other_seed(config: SynthConfig) -> SynthConfig:
    return SynthConfig(n_cells=config.n_cells, n_genes=config.n_genes, seed=config.seed + 1)


def test_cell_types_differ_more_than_sexes(default_truth: dict) -> None:
    fixed = {"assay": "10x 3' v3"}
    b = expected_expression(default_truth, {**fixed, "cell_type": "B", "sex": "female"})
    nk = expected_expression(default_truth, {**fixed, "cell_type": "NK", "sex": "female"})
    male = expected_expression(default_truth, {**fixed, "cell_type": "B", "sex": "male"})
    assert b.shape == (default_truth["n_genes"],) and b.dtype == np.float64
    assert np.linalg.norm(b - nk) > 3 * np.linalg.norm(b - male) > 0


def test_unknown_sex_has_no_effect(default_truth: dict) -> None:
    fixed = {"cell_type": "T", "assay": "Smart-seq2"}
    female = expected_expression(default_truth, {**fixed, "sex": "female"})
    male = expected_expression(default_truth, {**fixed, "sex": "male"})
    unknown = expected_expression(default_truth, {**fixed, "sex": "unknown"})
    middle = np.linalg.norm(unknown - (female + male) / 2)
    assert middle < 0.2 * min(np.linalg.norm(unknown - female), np.linalg.norm(unknown - male))


def test_generated_cells_match_expected_expression(default_truth: dict, default_data: Path) -> None:
    counts, meta = load(default_data)
    context = {"cell_type": "B", "assay": "10x 3' v3", "sex": "female"}
    rows = np.flatnonzero((meta[list(context)] == pd.Series(context)).all(axis=1).to_numpy())
    assert len(rows) > 100
    observed = log1p_cp10k(counts[rows]).mean(axis=0)
    truth = expected_expression(default_truth, context)
    assert np.corrcoef(observed, truth)[0, 1] > 0.95
    # closer to its own context than to any other cell type's
    error = np.linalg.norm(observed - truth)
    for cell_type in default_truth["fields"]["cell_type"]["values"]:
        if cell_type != "B":
            other = expected_expression(default_truth, {**context, "cell_type": cell_type})
            assert error < 0.5 * np.linalg.norm(observed - other)


def test_missing_fields_are_drawn(default_truth: dict) -> None:
    partial = expected_expression(default_truth, {"cell_type": "monocyte"}, n_cells=500, seed=1)
    again = expected_expression(default_truth, {"cell_type": "monocyte"}, n_cells=500, seed=1)
    full = expected_expression(
        default_truth, {"cell_type": "monocyte", "assay": "10x 3' v2", "sex": "male"}, 500, 1
    )
    assert np.isfinite(partial).all()
    np.testing.assert_array_equal(partial, again)
    assert not np.allclose(partial, full)


def test_simulate_counts(default_truth: dict) -> None:
    contexts = pd.DataFrame({"cell_type": ["B", "T"] * 50, "assay": "Smart-seq2", "sex": "unknown"})
    counts = simulate(default_truth, contexts, np.random.default_rng(0))
    assert isinstance(counts, sp.csr_matrix) and counts.dtype == np.float32
    assert counts.shape == (100, default_truth["n_genes"])
    totals = np.asarray(counts.sum(axis=1)).ravel()
    assert 2000 < np.median(totals) < 12000
    again = simulate(default_truth, contexts, np.random.default_rng(0))
    assert (counts != again).nnz == 0


def test_unknown_fraction_as_configured(tmp_path: Path, default_data: Path) -> None:
    _, meta = load(default_data)
    assert (meta["sex"] == "unknown").mean() == pytest.approx(0.05, abs=0.015)
    assert not (meta[["cell_type", "assay"]] == "unknown").any().any()
    config = SynthConfig(
        n_cells=4000, n_genes=20, n_chunks=2, unknown_fraction={"sex": 0.3, "assay": 0.1}
    )
    _, meta = load(generate(tmp_path / "u", config))
    assert (meta["sex"] == "unknown").mean() == pytest.approx(0.3, abs=0.03)
    assert (meta["assay"] == "unknown").mean() == pytest.approx(0.1, abs=0.02)
    assert (meta["cell_type"] == "unknown").sum() == 0
    shares = meta["cell_type"].value_counts(normalize=True)
    assert shares.min() > 0.07 and set(shares.index) == set(synth.FIELD_VALUES["cell_type"])


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="overwrite") as info:
        generate(out, SMALL)
    assert str(out) in str(info.value)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert siblings(out) == ["data"]


def test_existing_empty_folder_is_used(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    generate(out, SMALL)
    assert (out / "truth.json").exists()
    assert siblings(out) == ["empty"]


def test_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert generate(out, SMALL, overwrite=True) == out
    assert not (out / "old.txt").exists()
    assert (out / "truth.json").exists() and (out / "synth_counts_3.npz").exists()
    assert siblings(out) == ["data"]


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_save(path: Path, matrix: sp.csr_matrix) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        sp.save_npz(path, matrix)

    monkeypatch.setattr(synth.sp, "save_npz", failing_save, raising=True)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        generate(fresh, SMALL)
    assert not fresh.exists() and siblings(fresh) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "old.txt").write_text("old")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        generate(old, SMALL, overwrite=True)
    assert [p.name for p in old.iterdir()] == ["old.txt"]
    assert siblings(old) == ["old"]


def test_h5ad_round_trip(default_data: Path) -> None:
    anndata = pytest.importorskip("anndata")
    adata = anndata.read_h5ad(default_data / "synth.h5ad")
    counts, meta = load(default_data)
    assert adata.shape == counts.shape
    assert sp.issparse(adata.X) and (sp.csr_matrix(adata.X) != counts).nnz == 0
    assert list(adata.var_names) == (default_data / "genes.txt").read_text().splitlines()
    assert list(adata.obs_names) == [str(i) for i in range(len(meta))]
    for name in FIELDS:
        assert list(adata.obs[name].astype(str)) == list(meta[name])


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    generate(tmp_path / "p", SMALL, progress=True)
    assert "4/4" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"n_chunks": 0}, "n_chunks"),
        ({"n_cells": 3, "n_chunks": 4}, "n_cells"),
        ({"n_genes": 5}, "n_genes"),
        ({"n_cells": 10.5}, "n_cells"),
        ({"effect_sd": {"sex": -0.1}}, "effect_sd['sex']"),
        ({"effect_sd": {"tissue": 1.0}}, "tissue"),
        ({"unknown_fraction": {"sex": 1.0}}, "unknown_fraction['sex']"),
        ({"unknown_fraction": {"assay": -0.1}}, "unknown_fraction['assay']"),
        ({"affected_fraction": 1.5}, "affected_fraction"),
        ({"program_sd": float("nan")}, "program_sd"),
    ],
)
def test_bad_config(settings: dict, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        SynthConfig(**settings)
    assert name in str(info.value)


def test_partial_settings_keep_defaults() -> None:
    config = SynthConfig(effect_sd={"sex": 2.0}, unknown_fraction={"assay": 0.2})
    assert config.effect_sd == {"cell_type": 1.0, "assay": 0.5, "sex": 2.0}
    assert config.unknown_fraction == {"cell_type": 0.0, "assay": 0.2, "sex": 0.05}


def test_expected_expression_rejects_unknown_field_and_value(default_truth: dict) -> None:
    with pytest.raises(ConfigError, match="tissue") as info:
        expected_expression(default_truth, {"tissue": "blood"})
    assert "cell_type" in str(info.value)
    with pytest.raises(ConfigError, match="platelet") as info:
        expected_expression(default_truth, {"cell_type": "platelet"})
    assert "monocyte" in str(info.value) and "unknown" in str(info.value)
    bad = pd.DataFrame({"cell_type": ["B"], "assay": ["10x 3' v2"], "sex": ["other"]})
    with pytest.raises(ConfigError, match="other"):
        simulate(default_truth, bad, 0)
    with pytest.raises(ConfigError, match="sex"):
        simulate(default_truth, bad.drop(columns="sex"), 0)
