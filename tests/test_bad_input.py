"""Every bad input the platform knows, in one table: through the real ``cae`` command (or, for
serving, the registered pyfunc), each must raise the exact error class with a message naming the
file, field or value and saying what to do; the command exits with status 2 (HTTP 400 when
served) and prints one line, no stack trace; and nothing is written."""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from mlflow.exceptions import MlflowException

from cae.cli import main
from cae.data.contexts import parse_targets
from cae.data.synth import SynthConfig, generate
from cae.errors import CAEError, ConfigError, DataError, MetadataError
from cae.tracking.pyfunc import predict_frame, register
from cae.train import train
from cae.train.checkpoint import TrainedModel, load_checkpoint
from tests.conftest import quick_settings
from tests.servers import free_port

N_GENES = 12
GENES = [f"gene_{i:04d}" for i in range(N_GENES)]


# --------------------------------------------------------------------------------------------------
# ways to spoil a good data set (3 chunks of 30 cells, 12 genes, fields cell_type, assay, sex)


def _counts(data: Path, chunk: int) -> Path:
    return data / f"synth_counts_{chunk}.npz"


def _metadata(data: Path, chunk: int) -> Path:
    return data / f"synth_metadata_{chunk}.pkl"


def _edit_counts(chunk: int, edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def spoil(data: Path) -> None:
        dense = sp.load_npz(_counts(data, chunk)).toarray()
        sp.save_npz(_counts(data, chunk), sp.csr_matrix(edit(dense)))

    return spoil


def _set_value(value: float) -> Callable[[Path], None]:
    def edit(dense: np.ndarray) -> np.ndarray:
        dense[4, 3] = value
        return dense

    return _edit_counts(1, edit)


def _zero_cell(dense: np.ndarray) -> np.ndarray:
    dense[4] = 0
    return dense


def _edit_metadata(
    edit: Callable[[pd.DataFrame, int], pd.DataFrame], chunks: tuple[int, ...] = (0, 1, 2)
) -> Callable[[Path], None]:
    def spoil(data: Path) -> None:
        for chunk in chunks:
            edit(pd.read_pickle(_metadata(data, chunk)), chunk).to_pickle(_metadata(data, chunk))

    return spoil


def _column(
    name: str, values: Callable[[int, int], list]
) -> Callable[[pd.DataFrame, int], pd.DataFrame]:
    """Add column ``name`` holding ``values(chunk, n_rows)``."""

    def edit(frame: pd.DataFrame, chunk: int) -> pd.DataFrame:
        frame[name] = pd.Series(values(chunk, len(frame)), dtype=object)
        return frame

    return edit


def _drop_last_row(frame: pd.DataFrame, chunk: int) -> pd.DataFrame:
    return frame.iloc[:-1]


def _first_cell_type(value: str) -> Callable[[pd.DataFrame, int], pd.DataFrame]:
    def edit(frame: pd.DataFrame, chunk: int) -> pd.DataFrame:
        frame.loc[0, "cell_type"] = value
        return frame

    return edit


def _empty_chunk(data: Path) -> None:
    sp.save_npz(_counts(data, 1), sp.csr_matrix((0, N_GENES), dtype=np.float32))
    pd.read_pickle(_metadata(data, 1)).iloc[:0].to_pickle(_metadata(data, 1))


def _truncate(path: Callable[[Path], Path]) -> Callable[[Path], None]:
    def spoil(data: Path) -> None:
        raw = path(data).read_bytes()
        path(data).write_bytes(raw[: len(raw) // 2])

    return spoil


def _garbage_npz(data: Path) -> None:
    _counts(data, 1).write_bytes(b"this is not a zip archive " * 8)


def _pickled_list(data: Path) -> None:
    _metadata(data, 1).write_bytes(pickle.dumps(list(range(30))))


def _duplicate_id(data: Path) -> None:
    shutil.copy(_counts(data, 1), data / "synth_counts_001.npz")


def _duplicate_id_across_suffixes(data: Path) -> None:
    pd.read_pickle(_metadata(data, 1)).to_parquet(data / "synth_metadata_1.parquet")


def _remove(path: Callable[[Path], Path]) -> Callable[[Path], None]:
    return lambda data: path(data).unlink()


def _rename_genes(data: Path) -> None:
    (data / "genes.txt").write_text("".join(f"other_{g}\n" for g in GENES[:2]) +
                                    "".join(f"{g}\n" for g in GENES[2:]))  # fmt: skip


def _h5ad(edit: Callable[[anndata.AnnData], anndata.AnnData]) -> Callable[[Path], None]:
    """Write the three chunks as ``cells.h5ad``, changed by ``edit``."""

    def spoil(data: Path) -> None:
        x = sp.vstack([sp.load_npz(_counts(data, chunk)) for chunk in range(3)], format="csr")
        obs = pd.concat([pd.read_pickle(_metadata(data, c)) for c in range(3)], ignore_index=True)
        obs.index = obs.index.astype(str)
        edit(anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=GENES))).write_h5ad(
            data / "cells.h5ad"
        )

    return spoil


def _repeat_gene(adata: anndata.AnnData) -> anndata.AnnData:
    adata.var_names = [GENES[0], *GENES[:-1]]  # gene_0000 twice, gene_0011 gone
    return adata


def _repeat_cell_name(adata: anndata.AnnData) -> anndata.AnnData:
    adata.obs_names = ["0", *adata.obs_names[:-1]]  # "0" twice
    return adata


def _with_target_column(adata: anndata.AnnData) -> anndata.AnnData:
    adata.obs["target_sex"] = "female"
    return adata


def _without_x(adata: anndata.AnnData) -> anndata.AnnData:
    adata.X = None
    return adata


def _pickle_of_another_pandas(data: Path) -> None:
    """A DataFrame pickled by a pandas whose module layout differs from the one installed."""
    raw = pickle.dumps(pd.read_pickle(_metadata(data, 1)))
    _metadata(data, 1).write_bytes(raw.replace(b"pandas.core.frame", b"pandas.core.frams"))


def _repeated_column(frame: pd.DataFrame, chunk: int) -> pd.DataFrame:
    return pd.concat([frame, frame[["sex"]]], axis=1)


def _two_column_levels(frame: pd.DataFrame, chunk: int) -> pd.DataFrame:
    frame.columns = pd.MultiIndex.from_tuples([(c, "label") for c in frame.columns])
    return frame


def _text_indices(data: Path) -> None:
    arrays = dict(np.load(_counts(data, 1)))
    np.savez(_counts(data, 1), **arrays | {"indices": arrays["indices"].astype(str)})


def _genes_not_text(data: Path) -> None:
    (data / "genes.txt").write_bytes(b"\xff\xfe" + b"\x00" * 40)


def _existing_output(data: Path) -> None:
    (data.parent / "output" / "shared").mkdir(parents=True)
    (data.parent / "output" / "shared" / "mine.txt").write_text("keep")


def _nothing(data: Path) -> None:
    pass


# --------------------------------------------------------------------------------------------------
# the matrix


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, the command that meets it, and what the error must say.

    ``argv`` is a ``cae`` command line whose ``{data}``, ``{out}``, ``{model}`` and ``{port}`` are
    filled in; for ``serve`` cases it is empty and ``request`` spoils a good request instead.
    ``parts`` name the file, field or value, then what to do.
    """

    spoil: Callable[[Path], None]
    error: type[CAEError]
    parts: tuple[str, ...]
    argv: tuple[str, ...] = ()
    request: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    targets: str = "sex=female"


def _train(*extra: str) -> tuple[str, ...]:
    return ("train", "--data", "{data}", "--out", "{out}", "--epochs", "1", "--no-progress",
            "--latent-dim", "4", *extra)  # fmt: skip


TRAIN = _train("--no-tracking")
TRAIN_H5AD = tuple("{data}/cells.h5ad" if arg == "{data}" else arg for arg in TRAIN)
GENERATE = ("generate", "--model", "{model}", "--input", "{data}", "--out", "{out}/cf.h5ad")
GENERATE_H5AD = tuple("{data}/cells.h5ad" if arg == "{data}" else arg for arg in GENERATE)
CONVERT = ("convert", "--data", "{data}", "--out", "{out}/shared")


def _serve(
    error: type[CAEError],
    parts: tuple[str, ...],
    request: Callable[[pd.DataFrame], pd.DataFrame] = lambda frame: frame,
    targets: str = "sex=female",
) -> Case:
    return Case(_nothing, error, parts, request=request, targets=targets)


def _unseen_source(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[0, "cell_type"] = "astrocyte"
    return frame


def _gene_value(value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """A request whose gene_0003 holds ``value`` in row 1 (a column of Python objects, as JSON
    with a null or a string gives)."""

    def spoil(frame: pd.DataFrame) -> pd.DataFrame:
        frame["gene_0003"] = frame["gene_0003"].astype(object)
        frame.loc[1, "gene_0003"] = value
        return frame

    return spoil


def _zero_row(frame: pd.DataFrame) -> pd.DataFrame:
    frame.loc[1, GENES] = 0
    return frame


CASES = {
    # shapes and files
    "row-count mismatch": Case(
        _edit_metadata(_drop_last_row, chunks=(1,)),
        DataError,
        ("synth_metadata_1.pkl has 29 rows", "synth_counts_1.npz has 30", "write the pair again"),
        TRAIN,
    ),
    "gene-count mismatch between chunks": Case(
        _edit_counts(2, lambda dense: np.hstack([dense, np.ones((len(dense), 1))])),
        DataError,
        (
            "synth_counts_2.npz has 13 genes",
            "synth_counts_0.npz has 12",
            "write synth_counts_2.npz again with the same genes",
        ),
        TRAIN,
    ),
    "negative value": Case(
        _set_value(-1.0),
        DataError,
        ("synth_counts_1.npz holds 1 negative values (e.g. -1.0)", "fix or drop those cells"),
        TRAIN,
    ),
    "NaN value": Case(
        _set_value(np.nan),
        DataError,
        ("synth_counts_1.npz holds 1 non-finite values (e.g. nan)", "fix or drop those cells"),
        TRAIN,
    ),
    "inf value": Case(
        _set_value(np.inf),
        DataError,
        ("synth_counts_1.npz holds 1 non-finite values (e.g. inf)", "fix or drop those cells"),
        TRAIN,
    ),
    "empty chunk": Case(
        _empty_chunk, DataError, ("synth_counts_1.npz holds no cells", "remove the chunk"), TRAIN
    ),
    "cells with zero counts under log1p_cp10k": Case(
        _edit_counts(1, _zero_cell),
        DataError,
        (
            "synth_counts_1.npz has 1 cells with zero total counts (first row 4)",
            "drop those cells",
            "data.transform=none",
        ),
        TRAIN,
    ),
    "truncated npz": Case(
        _truncate(lambda data: _counts(data, 1)),
        DataError,
        ("cannot read", "synth_counts_1.npz", "truncated", "write it again with save_npz"),
        TRAIN,
    ),
    "corrupt npz": Case(
        _garbage_npz,
        DataError,
        ("cannot read", "synth_counts_1.npz", "truncated", "write it again with save_npz"),
        TRAIN,
    ),
    "pkl that is not a DataFrame": Case(
        _pickled_list,
        DataError,
        ("synth_metadata_1.pkl holds a list, not a pandas DataFrame", "DataFrame.to_pickle"),
        TRAIN,
    ),
    "truncated pkl": Case(
        _truncate(lambda data: _metadata(data, 1)),
        DataError,
        ("cannot unpickle", "synth_metadata_1.pkl", "write it again"),
        TRAIN,
    ),
    "duplicate chunk id": Case(
        _duplicate_id,
        DataError,
        (
            "synth_counts_001.npz and synth_counts_1.npz both have chunk id 1",
            "rename or move one of them",
        ),
        TRAIN,
    ),
    "duplicate chunk id, .pkl and .parquet": Case(
        _duplicate_id_across_suffixes,
        DataError,
        (
            "synth_metadata_1.parquet and synth_metadata_1.pkl both have chunk id 1",
            "rename or move one of them",
        ),
        TRAIN,
    ),
    "expression chunk without metadata": Case(
        _remove(lambda data: _metadata(data, 2)),
        DataError,
        ("synth_counts_2.npz has no metadata chunk with id 2", "add it or move the file away"),
        TRAIN,
    ),
    "metadata chunk without expression": Case(
        _remove(lambda data: _counts(data, 2)),
        DataError,
        ("synth_metadata_2.pkl has no expression chunk with id 2", "add it or move the file away"),
        TRAIN,
    ),
    "pkl of another pandas version": Case(
        _pickle_of_another_pandas,
        DataError,
        (
            "cannot unpickle",
            "synth_metadata_1.pkl",
            "ModuleNotFoundError: No module named 'pandas.core.frams'",
            "write it again as parquet",
        ),
        TRAIN,
    ),
    "repeated metadata column": Case(
        _edit_metadata(_repeated_column, chunks=(1,)),
        MetadataError,
        ("synth_metadata_1.pkl", "columns 'sex' appear more than once", "unique name"),
        TRAIN,
    ),
    "metadata columns of two levels": Case(
        _edit_metadata(_two_column_levels, chunks=(1,)),
        MetadataError,
        ("synth_metadata_1.pkl", "columns have 2 levels", "one level of names"),
        TRAIN,
    ),
    "genes.txt that is not text": Case(
        _genes_not_text,
        DataError,
        ("cannot read {data}/genes.txt as text", "one gene name per line in UTF-8"),
        TRAIN,
    ),
    "npz array of text": Case(
        _text_indices,
        DataError,
        ("synth_counts_1.npz: 'indices' holds <U11 values, expected integers", "write the matrix"),
        TRAIN,
    ),
    "h5ad repeating a gene": Case(
        _h5ad(_repeat_gene),
        DataError,
        (
            "cells.h5ad var_names names genes more than once: gene_0000 (2 times)",
            "give every gene one name",
        ),
        TRAIN_H5AD,
    ),
    "h5ad without X": Case(
        _h5ad(_without_x),
        DataError,
        ("cells.h5ad has no X matrix", "write the expression into .X", "data.h5ad_layer"),
        TRAIN_H5AD,
    ),
    "h5ad without genes": Case(
        _h5ad(lambda adata: adata[:, :0].copy()),
        DataError,
        ("cells.h5ad holds no genes", "give one with genes"),
        TRAIN_H5AD,
    ),
    # fields
    "requested field missing": Case(
        _nothing,
        MetadataError,
        (
            "synth_metadata_0.pkl",
            "no field 'tissue'",
            "cell_type, assay, sex",
            "Fix the field name",
        ),
        (*TRAIN, "--fields", "cell_type,tissue"),
    ),
    "label with a line break": Case(
        _edit_metadata(_column("donor", lambda chunk, n: ["d1", f"d{chunk}\r"] * (n // 2))),
        MetadataError,
        ("synth_metadata_0.pkl", "field 'donor'", "'d0\\r'", "control character", "line breaks"),
        (*TRAIN, "--fields", "cell_type,donor"),
    ),
    "field entirely null": Case(
        _edit_metadata(_column("donor", lambda chunk, n: ["unknown", None] * (n // 2))),
        MetadataError,
        (
            "{data}",
            "field 'donor': every value is null (90 cells)",
            "drop donor from data.fields (--fields cell_type)",
        ),
        (*TRAIN, "--fields", "cell_type,donor"),
    ),
    "field with one value": Case(
        _edit_metadata(_column("tissue", lambda chunk, n: ["blood"] * n)),
        MetadataError,
        (
            "{data}",
            "field 'tissue': only one known value ('blood') in 90 cells",
            "drop tissue from data.fields (--fields cell_type)",
        ),
        (*TRAIN, "--fields", "cell_type,tissue"),
    ),
    "mixed-type column": Case(
        _edit_metadata(
            _column("batch", lambda chunk, n: ([1, "1"] if chunk == 1 else ["a", "b"]) * (n // 2))
        ),
        MetadataError,
        (
            "synth_metadata_1.pkl",
            "field 'batch' mixes value types, e.g. 1 (int) and '1' (str)",
            "astype(str)",
        ),
        (*TRAIN, "--fields", "cell_type,batch"),
    ),
    "column typed differently between chunks": Case(
        _edit_metadata(
            _column("batch", lambda chunk, n: ([1, 2] if chunk == 0 else ["a", "b"]) * (n // 2))
        ),
        MetadataError,
        (
            "field 'batch' holds int values in synth_metadata_0.pkl",
            "str values in synth_metadata_1.pkl",
            "Give the column the same type in every",
        ),
        (*TRAIN, "--fields", "cell_type,batch"),
    ),
    # tracking
    "tracking server not answering at the start": Case(
        _nothing,
        ConfigError,
        (
            "MLflow tracking at http://127.0.0.1:{port} does not answer",
            "start the tracking server",
            "--no-tracking",
        ),
        _train("--tracking-uri", "http://127.0.0.1:{port}"),
    ),
    # generation
    "unseen context value at generation": Case(
        _edit_metadata(_first_cell_type("astrocyte"), chunks=(0,)),
        MetadataError,
        (
            "synth_metadata_0.pkl",
            "field 'cell_type'",
            "'astrocyte'",
            "Known values",
            "map these values to known ones",
        ),
        (*GENERATE, "--set", "sex=female"),
    ),
    "unseen target value at generation": Case(
        _nothing,
        MetadataError,
        (
            "target sex='alien' is not a value the model was trained on",
            "pick one of 'female', 'male'",
        ),
        (*GENERATE, "--set", "sex=alien"),
    ),
    "missing gene columns at generation": Case(
        _rename_genes,
        DataError,
        (
            "{data} lacks 2 of the model's 12 genes, e.g. gene_0000, gene_0001",
            "give an input with every one of these genes",
        ),
        (*GENERATE, "--set", "sex=female"),
    ),
    "input h5ad repeating a gene at generation": Case(
        _h5ad(_repeat_gene),
        DataError,
        (
            "cells.h5ad var_names names genes more than once: gene_0000 (2 times)",
            "give every gene one name",
        ),
        (*GENERATE_H5AD, "--set", "sex=female"),
    ),
    "a layer the input h5ad lacks at generation": Case(
        _h5ad(lambda adata: adata),
        DataError,
        ("cells.h5ad has no layer 'counts'", "its layers: none"),
        (*GENERATE_H5AD, "--layer", "counts", "--set", "sex=female"),
    ),
    "a layer of an input that has none at generation": Case(
        _nothing,
        ConfigError,
        ("--layer names a layer of an .h5ad or SOMA input", "{data} is neither"),
        (*GENERATE, "--layer", "counts", "--set", "sex=female"),
    ),
    "input h5ad naming two cells alike at generation": Case(
        _h5ad(_repeat_cell_name),
        DataError,
        ("cells.h5ad names 1 cells more than once (e.g. '0')", "adata.obs_names_make_unique()"),
        (*GENERATE_H5AD, "--set", "sex=female"),
    ),
    "input h5ad whose obs has a column generation adds": Case(
        _h5ad(_with_target_column),
        MetadataError,
        ("obs already has a column 'target_sex'", "rename or drop it"),
        (*GENERATE_H5AD, "--set", "sex=female"),
    ),
    # sharing
    "convert onto its own input": Case(
        _nothing,
        DataError,
        ("--out {data} is the input folder", "choose another folder"),
        ("convert", "--data", "{data}", "--out", "{data}"),
    ),
    "convert over an existing folder": Case(
        _existing_output, DataError, ("{out}/shared", "already exists", "--overwrite"), CONVERT
    ),
    "convert a column parquet cannot hold": Case(
        _edit_metadata(_column("note", lambda chunk, n: [1, "x"] * (n // 2)), chunks=(1,)),
        DataError,
        ("cannot store synth_metadata_1.pkl as parquet", "column note", "astype(str)"),
        CONVERT,
    ),
    # serving (HTTP 400 from `mlflow models serve`)
    "unseen context value at serving": _serve(
        MetadataError,
        ("field 'cell_type'", "'astrocyte'", "Known values", "map these values to known ones"),
        _unseen_source,
    ),
    "unseen target value at serving": _serve(
        MetadataError, ("target sex='alien'", "pick one of 'female', 'male'"), targets="sex=alien"
    ),
    "malformed target at serving": _serve(
        ConfigError,
        ("target 'sex' is not field=value", 'write targets as "sex=female'),
        targets="sex",
    ),
    "missing gene columns at serving": _serve(
        DataError,
        (
            "lacks 1 of the model's 12 gene columns, e.g. gene_0003",
            "send every gene in trained.genes",
        ),
        lambda frame: frame.drop(columns="gene_0003"),
    ),
    "missing context column at serving": _serve(
        MetadataError,
        (
            "input lacks the context column(s) assay",
            "the model needs one column per field: cell_type, assay, sex",
        ),
        lambda frame: frame.drop(columns="assay"),
    ),
    "over-large request at serving": _serve(
        DataError,
        (
            "the request holds 10,001 cells",
            "at most 10,000 per request",
            "send fewer cells",
            "CAE_SERVE__MAX_ROWS",
        ),
        lambda frame: frame.sample(10_001, replace=True, random_state=0),
    ),
    "NaN expression at serving": _serve(
        DataError,
        ("gene column 'gene_0003' holds NaN or null in row 1", "needs a number (0 where nothing"),
        _gene_value(float("nan")),
    ),
    "null expression at serving": _serve(
        DataError,
        ("gene column 'gene_0003' holds null in row 1", "needs a number"),
        _gene_value(None),
    ),
    "infinite expression at serving": _serve(
        DataError,
        ("gene column 'gene_0003' holds Infinity in row 1", "must be finite and at most 1e+09"),
        _gene_value(float("inf")),
    ),
    "negative expression at serving": _serve(
        DataError,
        ("gene column 'gene_0003' holds -1.0 in row 1", "expression must be >= 0"),
        _gene_value(-1.0),
    ),
    "over-large expression at serving": _serve(
        DataError,
        (
            "gene column 'gene_0003' holds 1e+39 in row 1",
            "at most 1e+09 (serve.max_value)",
            "CAE_SERVE__MAX_VALUE",
        ),
        _gene_value(1e39),
    ),
    "text in a gene column at serving": _serve(
        DataError,
        ("gene column 'gene_0003' holds 'many' in row 1", "gene columns take numbers"),
        _gene_value("many"),
    ),
    "boolean in a gene column at serving": _serve(
        DataError,
        ("gene column 'gene_0003' holds True in row 1", "gene columns take numbers"),
        _gene_value(True),
    ),
    "duplicated column at serving": _serve(
        DataError,
        ("the column 'gene_0003' more than once", "send each gene and field once"),
        lambda frame: pd.concat([frame, frame[["gene_0003"]]], axis=1),
    ),
    "cell with zero counts at serving": _serve(
        DataError, ("row 1 has zero total counts", "drop it, or send its counts"), _zero_row
    ),
    "unknown target field at serving": _serve(
        MetadataError,
        ("target field 'tissue'", "its fields: cell_type, assay, sex"),
        targets="tissue=lung",
    ),
}


@pytest.fixture(scope="module")
def good_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(
        tmp_path_factory.mktemp("good") / "data",
        SynthConfig(n_cells=90, n_genes=N_GENES, n_chunks=3),
    )


@pytest.fixture(scope="module")
def model_dir(good_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained for one epoch on the good data (cae generate takes its folder)."""
    out = tmp_path_factory.mktemp("model") / "run"
    train(quick_settings(good_data, out, **{"train.epochs": 1, "tracking.enabled": False}))
    return out


@pytest.fixture(scope="module")
def served(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, TrainedModel]]:
    """The model registered in a sqlite store and loaded back as the pyfunc that serving runs."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("bad-input", artifact_location=str(folder / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(model_dir / "checkpoints" / "last.pt"), artifact_path="checkpoints")
    register(run.info.run_id, "bad-input", "champion", uri)
    yield mlflow.pyfunc.load_model("models:/bad-input@champion"), load_checkpoint(model_dir)
    mlflow.set_tracking_uri(None)  # MLflow keeps the URI in a global and in the environment
    if previous is not None:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture
def offline(isolated: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """:func:`isolated`, and a tracking server that does not answer is told at once (no HTTP
    retries); MLflow forgets the tracking URI a case set."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    yield
    mlflow.set_tracking_uri(None)  # then monkeypatch restores the environment


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


def _message_names(message: str, parts: tuple[str, ...], fill: dict[str, str]) -> None:
    assert "Traceback" not in message
    for part in parts:
        part = part.format(**fill)
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input(
    case: Case,
    good_data: Path,
    tmp_path: Path,
    offline: None,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if case.request is not None:
        _served_case(case, good_data, request)
        return
    data, out = tmp_path / "data", tmp_path / "output"
    shutil.copytree(good_data, data)
    case.spoil(data)
    out.mkdir(exist_ok=True)
    model = request.getfixturevalue("model_dir") if "{model}" in case.argv else ""
    fill = {"data": str(data), "out": str(out), "model": str(model), "port": str(free_port())}
    argv = [arg.format(**fill) for arg in case.argv]
    before = {"data": _listing(data), "out": _listing(out)}

    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"cae {argv[0]}: error: ")
    _message_names(line, case.parts, fill)
    with pytest.raises(CAEError) as info:
        main(["--debug", *argv])
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    assert {"data": _listing(data), "out": _listing(out)} == before, "nothing was written"


def _served_case(case: Case, data: Path, request: pytest.FixtureRequest) -> None:
    """The pyfunc answers MLflow's INVALID_PARAMETER_VALUE (HTTP 400) with the message, and the
    function behind it raises exactly ``case.error``."""
    pyfunc, trained = request.getfixturevalue("served")
    cells = pd.read_pickle(_metadata(data, 0))
    expression = pd.DataFrame(sp.load_npz(_counts(data, 0)).toarray(), columns=GENES)
    frame = case.request(pd.concat([expression, cells], axis=1))  # type: ignore[misc]
    with pytest.raises(MlflowException) as answer:
        pyfunc.predict(frame, params={"targets": case.targets})
    assert answer.value.error_code == "INVALID_PARAMETER_VALUE"
    _message_names(answer.value.message, case.parts, {})
    with pytest.raises(CAEError) as info:
        predict_frame(trained, frame, parse_targets(case.targets), False)
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
