"""A reference for the Kang protocol: how far a response that is linear in the cell can go.

    python experiments/kang_linear.py --data data/kang [--folds B,T] [--ridge 10]

For each fold (the same held-out cells, genes and DE genes as ``experiments/kang.py``), every
training cell type t gives its control mean ``m_t`` and its mean response ``d_t`` (stimulated minus
control). A ridge regression ``d = b + A (m - mean m)`` fitted on those seven pairs predicts the
held-out type's response from its control mean alone; the prediction is its control cells plus
that response. This is what the model's condition term can express when it depends linearly on
the cell (``model.nonnegative=base``); it is fitted to the baselines' own inputs (means), not
trained on cells. Prints r2_mean_top100 beside the cell-type-averaged mean shift, and the size
of the held-out type's response (L2 over the fold's genes of its stimulated minus control mean)
with how far the responses of the two types nearest it (by control mean) go along it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from kang import DEVELOPMENT, N_GENES, log_normalise, top_variable

from cae.config import load_settings
from cae.data.store import DataStore
from cae.evaluate.metrics import de_genes, r2_mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/kang"))
    parser.add_argument("--folds", help="comma-separated cell types (default: development folds)")
    parser.add_argument("--ridge", type=float, default=10.0, help="ridge penalty (default 10)")
    args = parser.parse_args()
    store = DataStore.open(load_settings(None, {"data.path": str(args.data)}).data)
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
        centred = control - control.mean(0)
        weights = np.linalg.solve(
            centred @ centred.T + args.ridge * np.eye(len(others)), response - response.mean(0)
        )
        predicted = response.mean(0) + (source.mean(0) - control.mean(0)) @ centred.T @ weights
        print(
            f"{held:16s} group mean shift {r2_mean(source + response.mean(0), real, top):.3f}  "
            f"linear response {r2_mean(source + predicted, real, top):.3f}  "
            f"{neighbours(held, others, control, response, source, real)}"
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
    return f"| response size {np.linalg.norm(shift):.2f}; nearest types' slope along it: {slopes}"


if __name__ == "__main__":
    main()
