"""The counterfactual evaluation: held-out contexts, baselines, leave-one-out, report, MLflow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cae.cli import main
from cae.config import load_settings
from cae.data.contexts import Selection
from cae.data.loader import ChunkDataset
from cae.data.store import DataStore
from cae.data.synth import SynthConfig, generate
from cae.data.vocabulary import Vocabularies, build_field_specs
from cae.errors import ConfigError, DataError
from cae.evaluate.protocol import METHODS, Holdout, collect_cells, slug
from cae.evaluate.run import leave_one_out, read_truth, run_evaluation
from cae.train.trainer import Trainer, TrainResult
from tests.conftest import quick_settings
from tests.test_store import write_chunk

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# selections and held-out contexts


def test_selection_parses_and_matches() -> None:
    selection = Selection.parse(" cell_type = CD14+ Monocytes , condition=stim")
    assert selection.as_dict() == {"cell_type": "CD14+ Monocytes", "condition": "stim"}
    assert str(selection) == "cell_type=CD14+ Monocytes,condition=stim"
    frame = pd.DataFrame(
        {"cell_type": ["CD14+ Monocytes", "B", "CD14+ Monocytes"], "condition": ["stim"] * 3}
    )
    assert selection.mask(frame).tolist() == [True, False, True]


@pytest.mark.parametrize(
    ("text", "words"),
    [("cell_type", "field=value"), ("a=1,=2", "field=value"), ("a=1,a=2", "twice")],
)
def test_selection_errors_name_the_text(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as err:
        Selection.parse(text, "--holdout")
    assert repr(text) in str(err.value)


def test_selection_names_a_missing_column() -> None:
    with pytest.raises(ConfigError, match="needs metadata field 'donor'"):
        Selection.parse("donor=1").mask(pd.DataFrame({"sex": ["f"]}))


def test_holdout_parts() -> None:
    holdout = Holdout.parse("cell_type=B,condition=stim", "condition=ctrl")
    assert holdout.targets == {"condition": "stim"}
    assert holdout.source_values == {"condition": "ctrl"}
    assert str(holdout.source) == "cell_type=B,condition=ctrl"
    assert holdout.name == "cell_type=B"
    assert slug("cell_type=CD14+ Monocytes") == "cell_type-CD14_Monocytes"


@pytest.mark.parametrize(
    ("holdout", "source", "words"),
    [
        ("cell_type=B,condition=stim", "sex=female", "not in --holdout"),
        ("cell_type=B,condition=stim", "condition=stim", "equals the held-out value"),
        ("condition=stim", "condition=ctrl", "no field besides the moved"),
    ],
)
def test_holdout_errors(holdout: str, source: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Holdout.parse(holdout, source)


# --------------------------------------------------------------------------------------------------
# data.exclude keeps a context out of training


def test_excluded_cells_are_in_neither_training_nor_validation(small_data: Path) -> None:
    settings = quick_settings(small_data, small_data / "unused", **{"data.exclude": "sex=male"})
    store = DataStore.open(settings.data)
    specs = build_field_specs(store.iter_metadata(["cell_type", "sex"]), ["cell_type", "sex"], [])
    vocabularies = Vocabularies.from_specs(specs)
    dataset = ChunkDataset(
        store, vocabularies, [], val_chunks=[], val_fraction=0.2, seed=0,
        exclude=settings.data.exclusions,
    )  # fmt: skip
    male = vocabularies.by_field["sex"].index_of()["male"]
    kept = 0
    for index in range(len(dataset)):
        chunk = dataset[index]
        for rows in (chunk.train_rows, chunk.val_rows):
            assert (chunk.contexts[rows, 1] != male).all()
            kept += len(rows)
    n_male = sum((frame["sex"] == "male").sum() for _, frame in store.iter_metadata(["sex"]))
    assert n_male > 0 and kept == store.n_cells - n_male


def test_exclusion_that_matches_nothing_is_an_error(small_data: Path, tmp_path: Path) -> None:
    settings = quick_settings(small_data, tmp_path, **{"data.exclude": "cell_type=Nope"})
    with pytest.raises(ConfigError, match="'cell_type=Nope' matches no cell"):
        Trainer(settings)
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# baselines from hand-made data


def test_mean_shift_baselines_by_hand(tmp_path: Path) -> None:
    """Two genes, values constant per group. Other contexts: A (ctrl [1,1] x2, stim [3,1] x2)
    and B (ctrl [1,1] x1, stim [1,5] x3); held out: C stim [9,9], moved: C ctrl [2,2].
    Pooled: stim mean (2 [3,1] + 3 [1,5]) / 5 = [1.8, 3.4] minus ctrl [1, 1] = [0.8, 2.4].
    Group-averaged: mean of A's [2, 0] and B's [0, 4] = [1, 2]."""
    groups = [
        ("A", "ctrl", [1, 1], 2), ("A", "stim", [3, 1], 2), ("B", "ctrl", [1, 1], 1),
        ("B", "stim", [1, 5], 3), ("C", "ctrl", [2, 2], 2), ("C", "stim", [9, 9], 2),
    ]  # fmt: skip
    rows = [(t, c, v) for t, c, v, n in groups for _ in range(n)]
    matrix = sp.csr_matrix(np.array([v for _, _, v in rows], dtype=np.float32))
    meta = pd.DataFrame(
        {"cell_type": [t for t, _, _ in rows], "condition": [c for _, c, _ in rows]}
    )
    write_chunk(tmp_path, "0", matrix[:6], meta.iloc[:6].reset_index(drop=True))
    write_chunk(tmp_path, "1", matrix[6:], meta.iloc[6:].reset_index(drop=True))
    settings = load_settings(None, {"data.path": str(tmp_path), "data.transform": "none"})
    holdout = Holdout.parse("cell_type=C,condition=stim", "condition=ctrl")
    cells = collect_cells(
        DataStore.open(settings.data), "none", holdout, ["cell_type", "condition"],
        settings.evaluate,
    )  # fmt: skip
    np.testing.assert_allclose(cells.shift, [0.8, 2.4])
    np.testing.assert_allclose(cells.group_shift, [1.0, 2.0])
    assert cells.n_groups == 2
    np.testing.assert_array_equal(cells.source, [[2, 2], [2, 2]])
    np.testing.assert_array_equal(cells.real, [[9, 9], [9, 9]])
    assert cells.source_meta["cell_type"].tolist() == ["C", "C"]
    assert set(cells.sample_meta["cell_type"]) == {"A", "B"}  # nothing of the held-out context

    missing = Holdout.parse("cell_type=D,condition=stim", "condition=ctrl")
    with pytest.raises(DataError, match=r"no cell of .* matches cell_type=D,condition=ctrl"):
        collect_cells(
            DataStore.open(settings.data), "none", missing, ["cell_type"], settings.evaluate
        )


# --------------------------------------------------------------------------------------------------
# the protocol on synthetic data, end to end


@pytest.fixture(scope="module")
def loo(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Leave-one-out on synthetic data, tracked: move assay 10x 3' v2 -> Smart-seq2, holding out
    Smart-seq2 cells of one sex at a time (two models)."""
    out = tmp_path_factory.mktemp("loo")
    data = generate(out / "data", SynthConfig(n_cells=3000, n_genes=100, n_chunks=3))
    uri = f"sqlite:///{out / 'mlflow.db'}"
    settings = load_settings(
        Path(__file__).parents[1] / "experiments" / "demo.toml",
        {
            "data.path": str(data),
            "data.num_workers": 0,
            "train.epochs": 6,
            "train.progress": False,
            "tracking.uri": uri,
            "tracking.experiment": "loo",
            "evaluate.field": "assay",
            "evaluate.group_by": "sex",
            "evaluate.source": "10x 3' v2",
            "evaluate.target": "Smart-seq2",
            "evaluate.max_cells": 500,
        },
    )
    result = run_evaluation(settings, out_dir=out / "report", protocol="leave-one-out")
    return settings, result, out, uri


def test_leave_one_out_beats_identity_and_ranks_fields_as_the_truth(loo: tuple) -> None:
    settings, result, _, _ = loo
    truth = json.loads((Path(settings.data.path) / "truth.json").read_text())
    scores = result.scores.set_index(["context", "method"])
    assert sorted(result.scores["context"].unique()) == ["sex=female", "sex=male"]
    for context in ("sex=female", "sex=male"):
        for metric in ("r2_mean_top100", "truth_r2_mean"):
            model, identity = (
                scores.loc[(context, "model"), metric],
                scores.loc[(context, "identity"), metric],
            )
            assert model > identity, (context, metric, model, identity)
        # the independent classifier knows real held-out cells, and that source cells are not them
        assert result.facts["contexts"][context]["classifier_accuracy_on_real_cells"] > 0.9
        assert scores.loc[(context, "identity"), "classifier_accuracy"] < 0.1
        # the two-sample classifier tells unmoved source cells from real held-out ones
        assert scores.loc[(context, "identity"), "auc_two_sample"] > 0.95
        # a shifted copy of the source cells, on additively generated data, is much harder to tell
        assert scores.loc[(context, "mean_shift"), "auc_two_sample"] < 0.8
    assert result.scores["auc_two_sample"].between(0, 1).all()
    medians = result.facts["overview"]
    # sampled counts are scored beside the mean when the model can draw them: it reads counts
    # and either moves cells residually or has the count likelihood
    draws = settings.model.likelihood == "nb" or settings.model.counterfactual == "residual"
    sampled = {"model_sampled"} if settings.data.transform == "log1p_cp10k" and draws else set()
    assert set(medians) == set(METHODS) - {"model_sampled"} | sampled
    assert set(medians["model"]) == {
        "r2_mean_top100_median", "r2_mean_top100_mean", "r2_var_median",
        "energy_distance_median", "auc_two_sample_median",
    }  # fmt: skip
    assert medians["identity"]["auc_two_sample_median"] == pytest.approx(
        result.summary.loc["identity", "auc_two_sample_median"]
    )
    assert result.facts["model_beats_identity_everywhere"]
    for ranking in result.facts["field_rankings"].values():
        assert ranking == truth["ranking"]
    print("\n" + result.summary.round(3).T.to_string())


def test_leave_one_out_report_renders_with_png_figures(loo: tuple) -> None:
    _, result, _, _ = loo
    folder = result.report.parent
    page = result.report.read_text()
    assert "<th>auc_two_sample_median</th>" in page and "0.5 is best" in page
    figures = sorted((folder / "figures").glob("*.png"))
    names = {p.name for p in figures}
    assert {"methods.png", "contributions_assay.png", "top_genes_cell_type.png"} <= names
    for fold in ("sex-female", "sex-male"):  # each fold model's loss curves and UMAP
        assert {f"loss_{fold}.png", f"umap_{fold}.png"} <= names
    for path in figures:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 10_000, path
        image = matplotlib.image.imread(path)
        assert min(image.shape[:2]) > 100 and image.std() > 0.01
        assert f'src="figures/{path.name}"' in page
    for table in ("scores.csv", "summary.csv", "contributions.csv", "top_genes.csv"):
        assert len(pd.read_csv(folder / table)) > 0
    genes = pd.read_csv(folder / "top_genes.csv")
    assert set(genes["field"]) == {"cell_type", "assay", "sex"}
    umap = pd.read_csv(folder / "umap.csv")
    assert set(umap["context"]) == {"sex=female", "sex=male"}
    # the demo model reads counts and moves residually, so its moved cells come as counts too
    kinds = {"real", "reconstructed", "moved", "moved_sampled"}
    assert set(umap["kind"]) == kinds
    assert np.isfinite(umap[["umap_1", "umap_2"]].to_numpy()).all()
    for facts in result.facts["contexts"].values():
        mix = facts["umap_neighbour_mix"]
        assert set(mix) == kinds
        for row in mix.values():
            assert sum(row.values()) == pytest.approx(1.0)
    assert not list(folder.glob(".report.*"))  # no staging folder left behind


def test_leave_one_out_is_logged_to_mlflow(loo: tuple) -> None:
    _, result, _, uri = loo
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["loo"])
    parent = runs[runs["tags.mlflow.runName"].str.startswith("leave-one-out")]
    assert len(parent) == 1
    parent_id = parent["run_id"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent_id]
    assert len(children) == 2 and set(children["status"]) == {"FINISHED"}
    assert parent["metrics.eval/model/r2_mean_top100"].iloc[0] == pytest.approx(
        result.summary.loc["model", "r2_mean_top100_median"]
    )
    assert not np.isnan(parent["metrics.eval/sex-female/identity/r2_mean"].iloc[0])
    assert children["metrics.eval/model/r2_mean_top100"].notna().all()
    artifacts = mlflow.artifacts.list_artifacts(run_id=parent_id, artifact_path="evaluation")
    assert {"evaluation/report.html", "evaluation/scores.json"} <= {a.path for a in artifacts}


def test_a_rerun_reuses_finished_folds(loo: tuple) -> None:
    settings, result, out, _ = loo
    folds = sorted((out / "report" / "folds").glob("*/checkpoints/last.pt"))
    assert len(folds) == 2
    stamps = [os.stat(p).st_mtime_ns for p in folds]
    again = leave_one_out(
        settings.model_copy(
            update={"tracking": settings.tracking.model_copy(update={"enabled": False})}
        ),
        out / "report",
        read_truth(None, Path(settings.data.path)),
    )
    assert [os.stat(p).st_mtime_ns for p in folds] == stamps
    pd.testing.assert_frame_equal(again.scores, result.scores)


def test_a_rerun_with_other_settings_is_refused_not_scored_with_the_old_folds(loo: tuple) -> None:
    """A finished fold of other training settings would score another model than asked for:
    refused naming the setting, and the fold is left as it was."""
    settings, _, out, _ = loo
    folds = sorted((out / "report" / "folds").glob("*/checkpoints/last.pt"))
    stamps = [os.stat(p).st_mtime_ns for p in folds]
    weights = settings.train.weights.model_copy(update={"parsimony": 0.5})
    other = settings.model_copy(
        update={
            "tracking": settings.tracking.model_copy(update={"enabled": False}),
            "train": settings.train.model_copy(update={"weights": weights, "progress": True}),
        }
    )
    with pytest.raises(ConfigError, match=r"other settings \(train\.weights: .*parsimony"):
        leave_one_out(other, out / "report", read_truth(None, Path(settings.data.path)))
    assert [os.stat(p).st_mtime_ns for p in folds] == stamps


# --------------------------------------------------------------------------------------------------
# the command


def test_cae_evaluate_a_checkpoint(
    demo_run: TrainResult, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "evaluate", "--model", str(demo_run.checkpoint), "--data", str(demo_data),
        "--holdout", "cell_type=NK,assay=Smart-seq2", "--source", "assay=10x 3' v2",
        "--no-tracking", "--max-cells", "300", "--out", str(tmp_path / "report"),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "model beats identity on r2_mean_top100 in 1 of 1 contexts" in printed
    assert "true field ranking: cell_type > assay > sex" in printed
    page = (tmp_path / "report" / "report.html").read_text()
    for figure in ("loss_cell_type-NK.png", "umap_cell_type-NK.png"):
        assert (tmp_path / "report" / "figures" / figure).stat().st_size > 10_000
        assert f'src="figures/{figure}"' in page


# fmt: off
@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--holdout", "cell_type", "--source", "assay=x"], "each part must be field=value"),
        (["--holdout", "cell_type=NK,assay=Smart-seq2"], "give --holdout"),
        (
            ["--holdout", "cell_type=NK,assay=Smart-seq2", "--source", "assay=10x 3' v2"],
            "exactly one of --model",
        ),
        (["--protocol", "leave-one-out", "--field", "assay"], "evaluate.group_by"),
        (
            [
                "--protocol",
                "leave-one-out",
                "--field",
                "assay",
                "--group-by",
                "sex",
                "--source-value",
                "10x 3' v2",
                "--target-value",
                "Smart-seq2",
                "--groups",
                "other",
            ],
            "group sex=other has no cells",
        ),
    ],
)
def test_cae_evaluate_bad_input_exits_2(
    flags: list[str], words: str, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "report"
    code = main(["evaluate", "--data", str(demo_data), "--no-tracking", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and "Traceback" not in err
    assert not out.exists()


def test_cae_evaluate_unknown_value_names_it(
    demo_run: TrainResult, demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main([
        "evaluate", "--model", str(demo_run.checkpoint), "--data", str(demo_data), "--no-tracking",
        "--holdout", "cell_type=Nope,assay=Smart-seq2", "--source", "assay=10x 3' v2",
        "--out", str(tmp_path / "report"),
    ])  # fmt: skip
    assert code == 2
    assert "matches cell_type=Nope,assay=10x 3' v2" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
