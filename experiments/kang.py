"""The Kang 2018 IFN-β protocol: one fold per cell type, model beside the baselines.

    cae datasets kang --out data/kang
    python experiments/kang.py --data data/kang --config experiments/kang.toml --out runs/kang
    python experiments/kang.py --data data/kang --baselines-only --out runs/kang-baselines

For each cell type c: the stimulated cells of c are held out; the 2,000 most variable genes are
chosen on the training cells (all but the held-out ones) by scanpy's ``highly_variable_genes``
(flavour ``seurat``, on counts normalised to 10,000 per cell and log1p'd, as scGen's and CPA's Kang
preprocessing does); a fold data set of those genes is written: their raw counts and each cell's
total over all genes (obs ``total_counts``). The normal likelihood normalises them by that total
(``data.library_key = "total_counts"``: as the genes were chosen, and the model's moved cells can
be given as counts); the count likelihood (``model.likelihood = "nb"``) by their sum over the
fold's genes (scVI's library size). The baselines are scored in the model's space. The
model is trained on it with the held-out cells excluded
(``data.exclude``), moves the control cells of c to stimulated, and is scored by ``cae.evaluate``
beside identity, mean shift and cell-type-averaged mean shift. Development folds: B, CD4+ T cells,
CD8+ T cells, NK cells, T; test folds (never used to choose anything): CD14+ Monocytes, CD16+
Monocytes, DC. Writes ``<out>/results.md`` (per fold the headline metric and the distribution
metrics r2_var, energy_distance and auc_two_sample, test folds apart, with seeds and wall time)
and ``<out>/scores.csv`` (one row per fold, seed and method).

With ``--seeds 0,1,2`` every fold is trained and scored once per training seed (``train.seed``;
the evaluation's own sampling, ``evaluate.seed``, stays fixed, so the baselines score the same for
every seed and the spread is the training's). ``results.md`` then gives per fold and method the
mean over seeds, the standard deviation and the range, and ``<out>/seeds.csv`` the same in long
form; the median over development folds is taken of the per-fold means: the number to choose a
preset on.

A rerun with the same ``--out`` scores every model that finished with the same settings again,
without training it (after a change to the evaluation), and resumes one that was interrupted, as
``cae evaluate --protocol leave-one-out`` does (``cae.evaluate.run.train_or_reuse``); a model of
other settings there is refused, naming them.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cae.config import load_settings
from cae.data.store import DataStore
from cae.errors import CAEError
from cae.evaluate.protocol import Holdout, collect_cells, score_holdout, slug, training_settings
from cae.evaluate.run import evaluate, train_or_reuse
from cae.train import load_checkpoint

DEVELOPMENT = ["B", "CD4+ T cells", "CD8+ T cells", "NK cells", "T"]
TEST = ["CD14+ Monocytes", "CD16+ Monocytes", "DC"]
N_GENES = 2000
METRIC = "r2_mean_top100"
LIBRARY = "total_counts"
"""The fold's obs column of each cell's total counts over all of Kang's genes."""
REPORTED = [METRIC, "r2_var", "energy_distance", "auc_two_sample"]
"""The metrics results.md tabulates: the headline (means) first, then the distribution ones."""


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
    """One fold's data set: the counts of its genes and the cells' metadata, in chunks of 2,000
    cells, in the file's own order (sorted by condition): the loader's shuffle windows mix the
    chunks."""
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


def parse_arguments() -> argparse.Namespace:
    """The command line; ``seeds`` comes back as a list of ints (empty: the preset's seed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/kang"))
    parser.add_argument("--config", type=Path, default=Path("experiments/kang.toml"))
    parser.add_argument("--out", type=Path, default=Path("runs/kang"))
    parser.add_argument("--folds", help="comma-separated cell types (default: all eight)")
    parser.add_argument("--baselines-only", action="store_true", help="score no model")
    parser.add_argument(
        "--seeds", default="",
        help="comma-separated training seeds, e.g. 0,1,2: every fold is trained and scored once "
        "per seed, and results.md gives the mean and spread over seeds (default: the preset's "
        "train.seed, once)",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a setting of the preset, e.g. --set train.epochs=20 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    try:
        args.seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1,2")
    if len(set(args.seeds)) != len(args.seeds) or any(v < 0 for v in args.seeds):
        parser.error(f"--seeds {args.seeds}: give distinct non-negative seeds")
    if args.seeds and any(item.startswith("train.seed=") for item in args.set):
        parser.error("--seeds and --set train.seed=... both set the seed; give one of them")
    malformed = [item for item in args.set if not item.split("=", 1)[0] or "=" not in item]
    if malformed:
        parser.error(f"--set {malformed[0]!r}: give KEY=VALUE, e.g. --set train.epochs=20")
    if len(args.seeds) > 1 and args.baselines_only:
        parser.error("--baselines-only trains no model, so --seeds has nothing to vary; drop it")
    return args


def score_fold(
    args: argparse.Namespace,
    overrides: dict[str, str],
    holdout: Holdout,
    fold: Path,
    seed: int,
) -> pd.DataFrame:
    """Train the fold's model with ``seed`` (none with --baselines-only) and score it; with several
    seeds each seed's model and report go to ``<fold>/seed-<seed>/``, with one to ``<fold>/``."""
    out = fold / f"seed-{seed}" if len(args.seeds) > 1 else fold
    fold_settings = training_settings(
        load_settings(
            args.config,
            {**overrides, "data.path": str(fold / "data"), "train.seed": str(seed)},
        ),
        holdout,
        out / "model",
    )
    if args.baselines_only:
        cells = collect_cells(
            DataStore.open(fold_settings.data), fold_settings.data.transform, holdout,
            ["condition", "cell_type"],
            fold_settings.evaluate, fold_settings.data.library_key,
        )  # fmt: skip
        return score_holdout(None, cells, holdout, fold_settings.evaluate)
    fingerprint = DataStore.open(fold_settings.data).fingerprint()
    checkpoint, _ = train_or_reuse(fold_settings, fingerprint)
    return evaluate(load_checkpoint(checkpoint), fold_settings, holdout, out).scores


def over_seeds(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per split, fold, method and metric: the mean over seeds, the standard deviation (ddof 1;
    NaN for one seed), the minimum, the maximum and the number of seeds with a value.

    Args:
        table: rows ``split, context, method, seed, <metrics>`` (scores.csv's).
        metrics: the metric columns to summarise.

    Returns:
        Long form: columns ``split, context, method, metric, mean, std, min, max, seeds``.
    """
    long = table.melt(
        id_vars=["split", "context", "method", "seed"], value_vars=metrics, var_name="metric"
    )
    grouped = long.groupby(["split", "context", "method", "metric"], sort=False)["value"]
    frame = grouped.agg(["mean", "std", "min", "max", "count"]).rename(columns={"count": "seeds"})
    return frame.reset_index()


def metric_section(summary: pd.DataFrame, metric: str, n_seeds: int) -> list[str]:
    """results.md's lines for one metric: per fold and method the value (one seed) or ``mean ±
    std [min, max]`` over seeds, then per split the median over folds of the per-fold means."""
    rows = summary[summary["metric"] == metric]
    if n_seeds > 1:
        cells = rows.assign(
            text=[
                f"{m:.3f} ± {s:.3f} [{lo:.3f}, {hi:.3f}]"
                for m, s, lo, hi in rows[["mean", "std", "min", "max"]].itertuples(index=False)
            ]
        )
    else:
        cells = rows.assign(text=rows["mean"].round(3))
    wide = cells.pivot(index=["split", "context"], columns="method", values="text")
    means = rows.pivot(index=["split", "context"], columns="method", values="mean")
    lines = [markdown_table(wide.reset_index()), ""]
    of = "the mean over seeds" if n_seeds > 1 else "the value"
    for split in ("development", "test"):
        if split in means.index.get_level_values(0):
            medians = means.loc[split].median().round(3).to_dict()
            lines.append(f"median over {split} folds of {of}: {medians}")
    return lines


def write_results(args: argparse.Namespace, table: pd.DataFrame, seconds: float) -> list[str]:
    """Write scores.csv, seeds.csv (several seeds) and results.md; return results.md's lines."""
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "scores.csv", index=False)
    seeds = sorted(table["seed"].unique())
    summary = over_seeds(table, REPORTED)
    if len(seeds) > 1:
        summary.to_csv(args.out / "seeds.csv", index=False)
    preset = "baselines only" if args.baselines_only else " ".join([str(args.config), *args.set])
    spread = " (mean ± std [min, max] over seeds)" if len(seeds) > 1 else ""
    lines = [
        f"# Kang 2018, {METRIC} per fold ({preset})",
        "",
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; {N_GENES} highly "
        "variable genes (scanpy, seurat flavour) on each fold's training cells; wall time "
        f"{seconds:.0f} s on this machine.",
        "",
    ]
    for metric in REPORTED:
        if metric != METRIC:
            lines += [f"## {metric}{spread}", ""]
        lines += [*metric_section(summary, metric, len(seeds)), ""]
    (args.out / "results.md").write_text("\n".join(lines))
    return lines


def main() -> int:
    """Run the protocol (:func:`run`); the exit status as :func:`exit_status` says."""
    return exit_status("kang.py", run, parse_arguments())


def exit_status(
    program: str, command: Callable[[argparse.Namespace], None], args: argparse.Namespace
) -> int:
    """Run ``command(args)``: 0 when it ends, or 2 with an error in the user's input or settings
    (:class:`cae.errors.CAEError`) printed as one line without a traceback, as ``cae`` does."""
    try:
        command(args)
    except CAEError as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    """Write each fold, train or reuse its model per seed, score it, and write the results."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    overrides = dict(item.split("=", 1) for item in args.set)
    settings = load_settings(args.config, {**overrides, "data.path": str(args.data)})
    seeds = args.seeds or [settings.train.seed]
    store = DataStore.open(settings.data)
    counts = sp.vstack([store.read_expression(c) for c in store.chunks]).tocsr()
    meta = pd.concat(
        [store.read_metadata(c, ["condition", "cell_type"]) for c in store.chunks],
        ignore_index=True,
    ).astype(str)
    x = log_normalise(counts)
    # every fold holds raw counts and each cell's total over all genes (scanpy's total_counts);
    # the normal likelihood normalises by that total, the count likelihood by its own genes
    meta[LIBRARY] = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    overrides["data.transform"] = "log1p_cp10k"
    if settings.model.likelihood == "normal":
        overrides.setdefault("data.library_key", LIBRARY)
    folds = args.folds.split(",") if args.folds else DEVELOPMENT + TEST
    rows, started = [], time.time()
    for cell_type in folds:
        holdout = Holdout.parse(f"cell_type={cell_type},condition=stimulated", "condition=control")
        training = ~holdout.held_out.mask(meta)
        genes = top_variable(x[np.flatnonzero(training)], N_GENES)
        fold = args.out / "folds" / slug(holdout.name)
        write_fold(fold / "data", counts[:, genes], meta, [store.genes[g] for g in genes])
        for seed in seeds:
            seed_started = time.time()
            scores = score_fold(args, overrides, holdout, fold, seed)
            scores["split"] = "development" if cell_type in DEVELOPMENT else "test"
            scores["seed"] = seed
            scores["seconds"] = round(time.time() - seed_started)
            rows.append(scores)
            shown = ["context", "method", "seed", *REPORTED]
            print(scores[shown].round(3).to_string(index=False))
    table = pd.concat(rows, ignore_index=True)
    print("\n".join(write_results(args, table, time.time() - started)))


if __name__ == "__main__":
    sys.exit(main())
