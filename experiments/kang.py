"""The Kang 2018 IFN-β protocol: one fold per cell type, model beside the baselines.

    cae datasets kang --out data/kang
    python experiments/kang.py --data data/kang --config experiments/kang.toml --out runs/kang
    python experiments/kang.py --data data/kang --baselines-only --out runs/kang-baselines

For each cell type c: the stimulated cells of c are held out; counts are normalised to 10,000 per
cell and log1p'd; the 2,000 most variable genes are chosen on the training cells (all but the
held-out ones) by scanpy's ``highly_variable_genes`` (flavour ``seurat``, on log-normalised values,
as scGen's and CPA's Kang preprocessing does); a fold data set of those genes (``transform =
"none"``) is written; the model is trained on it with the held-out cells excluded
(``data.exclude``), moves the control cells of c to stimulated, and is scored by ``cae.evaluate``
beside identity, mean shift and cell-type-averaged mean shift. Development folds: B, CD4+ T cells,
CD8+ T cells, NK cells, T; test folds (never used to choose anything): CD14+ Monocytes, CD16+
Monocytes, DC. Writes ``<out>/results.md`` (the table, test folds apart, with seeds and wall time)
and ``<out>/scores.csv``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cae.config import load_settings
from cae.data.store import DataStore
from cae.evaluate.protocol import Holdout, collect_cells, score_holdout, slug, training_settings
from cae.evaluate.run import evaluate
from cae.train import load_checkpoint, train

DEVELOPMENT = ["B", "CD4+ T cells", "CD8+ T cells", "NK cells", "T"]
TEST = ["CD14+ Monocytes", "CD16+ Monocytes", "DC"]
N_GENES = 2000
METRIC = "r2_mean_top100"


def log_normalise(counts: sp.csr_matrix) -> sp.csr_matrix:
    """log1p of counts per 10,000, per cell (scanpy's ``normalize_total`` and ``log1p``)."""
    import anndata
    import scanpy as sc

    cells = anndata.AnnData(counts.astype(np.float32))
    sc.pp.normalize_total(cells, target_sum=1e4)
    sc.pp.log1p(cells)
    return sp.csr_matrix(cells.X)


def top_variable(x: sp.csr_matrix, n: int) -> np.ndarray:
    """Indices (sorted) of the ``n`` most variable genes of log-normalised cells: scanpy's
    ``highly_variable_genes(flavor="seurat")`` (dispersion normalised within 20 bins of mean)."""
    import anndata
    import scanpy as sc

    cells = anndata.AnnData(x)
    sc.pp.highly_variable_genes(cells, n_top_genes=n, flavor="seurat")
    return np.flatnonzero(cells.var["highly_variable"].to_numpy())


def write_fold(folder: Path, x: sp.csr_matrix, meta: pd.DataFrame, genes: list[str]) -> None:
    """One fold's data set: log-normalised values of its genes, in chunks of 2,000 cells, in the
    file's own order (sorted by condition): the loader's shuffle windows mix the chunks."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "genes.txt").write_text("\n".join(genes) + "\n")
    for index, start in enumerate(range(0, x.shape[0], 2000)):
        sp.save_npz(folder / f"kang_counts_{index}.npz", x[start : start + 2000])
        meta.iloc[start : start + 2000].reset_index(drop=True).to_parquet(
            folder / f"kang_metadata_{index}.parquet"
        )


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a small frame."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/kang"))
    parser.add_argument("--config", type=Path, default=Path("experiments/kang.toml"))
    parser.add_argument("--out", type=Path, default=Path("runs/kang"))
    parser.add_argument("--folds", help="comma-separated cell types (default: all eight)")
    parser.add_argument("--baselines-only", action="store_true", help="score no model")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a setting of the preset, e.g. --set train.epochs=20 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    overrides = dict(item.split("=", 1) for item in args.set)
    settings = load_settings(args.config, {**overrides, "data.path": str(args.data)})
    store = DataStore.open(settings.data)
    counts = sp.vstack([store.read_expression(c) for c in store.chunks]).tocsr()
    meta = pd.concat(
        [store.read_metadata(c, ["condition", "cell_type"]) for c in store.chunks],
        ignore_index=True,
    ).astype(str)
    x = log_normalise(counts)
    folds = args.folds.split(",") if args.folds else DEVELOPMENT + TEST
    rows, started = [], time.time()
    for cell_type in folds:
        fold_started = time.time()
        holdout = Holdout.parse(f"cell_type={cell_type},condition=stimulated", "condition=control")
        training = ~holdout.held_out.mask(meta)
        genes = top_variable(x[np.flatnonzero(training)], N_GENES)
        fold = args.out / "folds" / slug(holdout.name)
        write_fold(fold / "data", x[:, genes], meta, [store.genes[g] for g in genes])
        fold_settings = training_settings(
            load_settings(args.config, {**overrides, "data.path": str(fold / "data")}),
            holdout,
            fold / "model",
        )
        if args.baselines_only:
            cells = collect_cells(
                DataStore.open(fold_settings.data), "none", holdout, ["condition", "cell_type"],
                fold_settings.evaluate,
            )  # fmt: skip
            scores = score_holdout(None, cells, holdout, fold_settings.evaluate)
        else:
            result = train(fold_settings)
            scores = evaluate(
                load_checkpoint(result.checkpoint), fold_settings, holdout, fold
            ).scores
        scores["split"] = "development" if cell_type in DEVELOPMENT else "test"
        scores["seconds"] = round(time.time() - fold_started)
        rows.append(scores)
        print(scores[["context", "method", METRIC, "r2_mean"]].round(3).to_string(index=False))
    table = pd.concat(rows, ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "scores.csv", index=False)
    wide = table.pivot_table(index=["split", "context"], columns="method", values=METRIC)
    preset = "baselines only" if args.baselines_only else " ".join([str(args.config), *args.set])
    lines = [
        f"# Kang 2018, {METRIC} per fold ({preset})",
        "",
        f"seed {settings.train.seed}; {N_GENES} highly variable genes (scanpy, seurat flavour) on "
        f"each fold's training cells; wall time {time.time() - started:.0f} s on this machine.",
        "",
        markdown_table(wide.round(3).reset_index()),
        "",
    ]
    for split in ("development", "test"):
        if split in wide.index.get_level_values(0):
            medians = wide.loc[split].median().round(3).to_dict()
            lines.append(f"median over {split} folds: {medians}")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
