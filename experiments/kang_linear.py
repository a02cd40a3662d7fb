"""A reference for the Kang protocol: how far a response that is linear in the cell can go.

    python experiments/kang_linear.py --data data/kang [--folds B,T] [--ridge 10,100,1000]

For each fold (the same held-out cells, genes and DE genes as ``experiments/kang.py``), every
training cell type t gives its control mean ``m_t`` and its mean response ``d_t`` (stimulated minus
control). A ridge regression ``d = b + A (m - mean m)`` fitted on those seven pairs predicts the
held-out type's response from its control mean alone; the prediction is its control cells plus
that response, clamped at 0 as expression is (the model's residual counterfactuals are too). This
is what the model's condition term can express when it depends linearly on the cell
(``model.nonnegative=base``); it is fitted to the baselines' own inputs (means), not trained on
cells. A larger penalty shrinks ``A`` and so moves the prediction toward the average response of
the other types (the cell-type-averaged mean shift, penalty infinite).

Prints, per fold, for mean shift (pooled over the other types' cells, ``cae.evaluate``'s
baseline) and for the ridge at each penalty: r2_mean_top100, ``response_slope`` (how far along the
held-out type's real response the prediction goes) and the energy distance to the real held-out
cells (``docs/evaluation.md``; sampled with ``experiments/kang.toml``'s ``[evaluate]`` settings,
but in its own order, so mean shift's value can differ a little from ``experiments/kang.py``'s);
then the size of the held-out type's response (L2 over the fold's genes of its stimulated minus
control mean) with how far the responses of the two types nearest it (by control mean) go along
it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from kang import DEVELOPMENT, N_GENES, exit_status, log_normalise, top_variable

from cae.config import EvaluateConfig, load_settings
from cae.data.store import DataStore
from cae.evaluate.metrics import de_genes, energy_distance, fit_pca, r2_mean, response_slope

PRESET = Path(__file__).with_name("kang.toml")
"""``experiments/kang.py``'s preset, whose ``[evaluate]`` settings (cells a side, PCA components,
seed) the scores here take."""


def main() -> int:
    """Parse the command line and print the report (:func:`report`); exit status 2 with an error
    in the input, printed as one line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/kang"))
    parser.add_argument("--folds", help="comma-separated cell types (default: development folds)")
    parser.add_argument(
        "--ridge",
        type=penalty_list,
        default=[10.0, 100.0, 1000.0],
        help="comma-separated ridge penalties, each > 0 (default 10,100,1000)",
    )
    return exit_status("kang_linear.py", report, parser.parse_args())


def report(args: argparse.Namespace) -> None:
    """Per fold of ``args.folds``: mean shift and the ridge at each penalty, scored."""
    settings = load_settings(PRESET, {"data.path": str(args.data)})
    store = DataStore.open(settings.data)
    x = log_normalise(sp.vstack([store.read_expression(c) for c in store.chunks]).tocsr())
    meta = pd.concat(
        [store.read_metadata(c, ["condition", "cell_type"]) for c in store.chunks],
        ignore_index=True,
    ).astype(str)
    types = sorted(meta["cell_type"].unique())
    stimulated = (meta["condition"] == "stimulated").to_numpy()
    for held in args.folds.split(",") if args.folds else DEVELOPMENT:
        of_type = (meta["cell_type"] == held).to_numpy()
        genes = top_variable(x[np.flatnonzero(~(of_type & stimulated))], N_GENES)
        dense = x[:, genes].toarray()
        source, real = dense[of_type & ~stimulated], dense[of_type & stimulated]
        top = de_genes(real, source, 100)
        others = [t for t in types if t != held]
        control = np.stack([dense[(meta["cell_type"] == t).to_numpy() & ~stimulated].mean(0)
                            for t in others])  # fmt: skip
        response = np.stack([dense[(meta["cell_type"] == t).to_numpy() & stimulated].mean(0)
                             for t in others]) - control  # fmt: skip
        pooled = dense[~of_type & stimulated].mean(0) - dense[~of_type & ~stimulated].mean(0)
        score = Scorer(source, real, top, settings.evaluate)
        print(f"{held}: {neighbours(held, others, control, response, source, real)}")
        print(f"  {'mean shift':16s} {score(source + pooled)}")
        centred = control - control.mean(0)
        for penalty in args.ridge:
            weights = np.linalg.solve(
                centred @ centred.T + penalty * np.eye(len(others)), response - response.mean(0)
            )
            predicted = response.mean(0) + (source.mean(0) - control.mean(0)) @ centred.T @ weights
            print(f"  {f'ridge {penalty:g}':16s} {score(np.clip(source + predicted, 0, None))}")
        averaged = np.clip(source + response.mean(0), 0, None)  # the infinite penalty's limit
        print(f"  {'types averaged':16s} {score(averaged)}")


def penalty_list(text: str) -> list[float]:
    """``--ridge``'s value: comma-separated penalties, each a number > 0."""
    try:
        values = [float(value) for value in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < value < np.inf for value in values):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of penalties > 0, e.g. 10,100,1000"
        )
    return values


class Scorer:
    """The metrics of predicted cells against one fold's real held-out cells: r2_mean_top100,
    ``response_slope`` and the energy distance in the PCA space of (at most ``max_cells`` of)
    the real and source cells, each method's cells sampled from one seeded stream in turn as
    ``cae.evaluate.protocol.score_holdout`` does with ``config``."""

    def __init__(
        self, source: np.ndarray, real: np.ndarray, top: np.ndarray, config: EvaluateConfig
    ) -> None:
        self.source, self.real, self.top, self.max_cells = source, real, top, config.max_cells
        self.rng = np.random.default_rng([config.seed, 13])
        real_sample = self.sample(real)
        self.pca = fit_pca(np.concatenate([real_sample, self.sample(source)]), config.n_pcs)
        self.real_pcs = self.pca.transform(real_sample)

    def sample(self, x: np.ndarray) -> np.ndarray:
        """At most ``max_cells`` rows of ``x``, drawn without replacement."""
        n = self.max_cells
        return x if len(x) <= n else x[self.rng.choice(len(x), n, replace=False)]

    def __call__(self, predicted: np.ndarray) -> str:
        energy = energy_distance(self.pca.transform(self.sample(predicted)), self.real_pcs)
        return (
            f"r2_mean_top100 {r2_mean(predicted, self.real, self.top):.3f}  "
            f"slope {response_slope(predicted, self.source, self.real):.2f}  energy {energy:.3f}"
        )


def neighbours(
    held: str,
    others: list[str],
    control: np.ndarray,
    response: np.ndarray,
    source: np.ndarray,
    real: np.ndarray,
) -> str:
    """How far the responses of the two cell types whose control means are nearest the held-out
    type's go along its real response (the slope of :func:`cae.evaluate.metrics.response_slope`:
    below 1, a model that takes the response from its neighbours falls short), and its size."""
    shift = real.mean(0) - source.mean(0)
    nearest = np.argsort(np.linalg.norm(control - source.mean(0), axis=1))[:2]
    slopes = ", ".join(f"{others[t]} {response[t] @ shift / (shift @ shift):.2f}" for t in nearest)
    return f"response size {np.linalg.norm(shift):.2f}; nearest types' slope along it: {slopes}"


if __name__ == "__main__":
    sys.exit(main())
