"""Train a preset on synthetic data and score it against the generator's truth.

    python experiments/synthetic_check.py --config experiments/demo.toml
    python experiments/synthetic_check.py --config experiments/seed.toml
    python experiments/synthetic_check.py --seeds 0,1,2 --set model.nonnegative=base ...

Prints, per epoch, validation reconstruction; at the end the per-field effects (``effect_l2``,
the model's counterpart of the truth's effect size) and contributions beside the true effect
sizes, the target-consistency accuracy, and for a few context moves the R² of the counterfactual
mean expression against the true target mean (`expected_expression`), beside the R² of the
unchanged cells. With ``--seeds`` it trains once per seed and prints, per seed, whether the
effects (and the contributions) rank the fields as the truth does.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cae.config import load_settings
from cae.data.store import DataStore
from cae.data.synth import expected_expression, generate
from cae.train import load_checkpoint, train

MOVES = [
    ("cell_type", "B", "T"),
    ("cell_type", "NK", "monocyte"),
    ("assay", "10x 3' v2", "Smart-seq2"),
    ("sex", "female", "male"),
]
BASE_CONTEXT = {"cell_type": "T", "assay": "10x 3' v3", "sex": "female"}


def r2(predicted: np.ndarray, truth: np.ndarray) -> float:
    """R² of a mean expression profile against the true one, over genes."""
    return float(1 - ((predicted - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("experiments/demo.toml"))
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/synthetic_check"))
    parser.add_argument("--seeds", help="comma-separated train.seed values: the ranking per seed")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a setting of the preset, e.g. --set train.epochs=20 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (args.data / "truth.json").exists():
        generate(args.data)
    truth = json.loads((args.data / "truth.json").read_text())
    overrides = {
        **dict(item.split("=", 1) for item in args.set),
        "data.path": str(args.data),
        "output.dir": str(args.out),
        "output.overwrite": True,
        "train.progress": False,
    }
    if args.seeds:
        for seed in args.seeds.split(","):
            final = train(load_settings(args.config, {**overrides, "train.seed": seed})).final
            for metric in ("effect_l2", "contrib_l2"):
                sizes = {f: round(final[f"{metric}/{f}"], 2) for f in truth["ranking"]}
                ranked = sorted(sizes, key=lambda f: -sizes[f]) == truth["ranking"]
                print(f"seed {seed}: {metric} {sizes}, ranked as the truth: {ranked}", flush=True)
        return
    settings = load_settings(args.config, overrides)
    result = train(settings)
    final = result.final
    print(f"preset {args.config} {' '.join(args.set)}")
    print(
        "val reconstruction by epoch:", [round(e["val/reconstruction"], 3) for e in result.history]
    )
    for field in truth["ranking"]:
        print(
            f"  {field:<10} effect_l2 {final[f'effect_l2/{field}']:6.2f} "
            f"contrib_l2 {final[f'contrib_l2/{field}']:6.2f} "
            f"(true effect size {truth['effect_size'][field]:5.2f})  "
            f"target accuracy {final[f'val/target_accuracy/{field}']:.2f}"
        )
    trained = load_checkpoint(result.checkpoint)
    store = DataStore.open(settings.data)
    x = sp.vstack([store.read_expression(c) for c in store.chunks]).toarray()
    meta = pd.concat([store.read_metadata(c) for c in store.chunks], ignore_index=True)
    for field, source, target in MOVES:
        context = {**BASE_CONTEXT, field: source}
        rows = np.logical_and.reduce([(meta[k] == v).to_numpy() for k, v in context.items()])
        true_mean = expected_expression(truth, {**context, field: target}, n_cells=2000)
        moved = trained.counterfactual(x[rows], meta[rows], {field: target}).output.mean(0)
        unchanged = np.log1p(x[rows] / x[rows].sum(1, keepdims=True) * 1e4).mean(0)
        print(
            f"  {field} {source} -> {target} ({rows.sum()} cells): R² model "
            f"{r2(moved.numpy(), true_mean):.3f}, unchanged {r2(unchanged, true_mean):.3f}"
        )


if __name__ == "__main__":
    main()
