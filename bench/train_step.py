"""Full cycle training step, cells/s: ours versus the same step built the seed's way, and as a
fraction of a roofline measured in the same run.

    python bench/train_step.py [--quick] [--threads 2]

Census-like shapes: genes 2,000 and 8,000; fields cell_type (790 values), assay (26), sex (3),
each with its <unk> index; latent 128; batch 1,024. One step is what the trainer does per batch
(``cae.train.cycle.training_step``, with the trainer's optimisers from
``cae.train.optim.build_optimizers``): targets drawn, cycle 1, cycle 2 and the self pass, the
autoencoder's update and projection, the classifier's update. The seed's way is the same step with
the seed's context maps (a loop over per-category ``nn.Linear`` modules), plain Adam and a clamp of
every parameter. The roofline is one dense matmul of the step's FLOPs (counted by torch's
FlopCounterMode on the seed's step, which pads nothing), timed in the same rounds. The same step
with cell_type cut to 3 values is timed beside them: its fraction of the roofline is what the
step's matmuls reach without the memory-bound work of 790 context maps (each application reads
the whole (K, L, L) table; their gradient, Adam state and projection are as large). Prints one
line per case and writes bench/results/train_step.json.
"""

from __future__ import annotations

import copy
import statistics

import torch
from measure import arguments, interleaved_rounds, setup, write_result
from seed_reference import seed_way
from torch.utils.flop_counter import FlopCounterMode

from cae.config import LossWeights
from cae.model.cae import CAE
from cae.model.classifier import ContextClassifier
from cae.train.cycle import sample_targets, training_step
from cae.train.optim import build_optimizers

LR = 1e-3


def census_like_batch(
    batch: int, genes: int, sizes: dict[str, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """log1p expression with about 10% non-zero genes, and uniformly drawn contexts."""
    generator = torch.Generator().manual_seed(genes)
    counts = torch.rand(batch, genes, generator=generator) < 0.1
    x = torch.log1p(counts * torch.rand(batch, genes, generator=generator) * 20)
    source = torch.stack(
        [torch.randint(1, k, (batch,), generator=generator) for k in sizes.values()], dim=1
    )
    return x.to(device), source


def step_cases(
    genes: int, latent: int, batch: int, sizes: dict[str, int], device: torch.device
) -> tuple[dict[str, object], float]:
    """Ours and the seed's step as calls, and the FLOPs of one step."""
    torch.manual_seed(0)
    model = CAE(genes, latent, sizes, logit_scale=0.0159, context_offsets=False)
    classifier = ContextClassifier(genes, 128, sizes)
    seed_model, seed_classifier = seed_way(model).to(device), copy.deepcopy(classifier).to(device)
    model.to(device)
    classifier.to(device)
    model.configure_context_maps("auto", sparse_grad=True)  # as the trainer does, one process
    x, host_source = census_like_batch(batch, genes, sizes, device)
    source = host_source.to(device)
    counts = torch.tensor(list(sizes.values()))
    weights = LossWeights()

    def make(net, clf, optimizer, classifier_optimizer) -> object:
        generator = torch.Generator().manual_seed(1)

        def step() -> None:
            target = sample_targets(host_source, counts, generator).to(device)
            training_step(net, clf, optimizer, classifier_optimizer, x, source, target, weights)

        return step

    ours = make(model, classifier, *build_optimizers(model, classifier, LR, LR))
    seed = make(
        seed_model,
        seed_classifier,
        torch.optim.Adam(seed_model.parameters(), lr=LR),
        torch.optim.Adam(seed_classifier.parameters(), lr=LR),
    )
    with FlopCounterMode(display=False) as counter:
        seed()
    return {"ours": ours, "seed": seed}, float(counter.get_total_flops())


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0]).parse_args()
    device = setup(args.threads)
    if args.quick:
        shapes, latent, batch = [200], 16, 64
        sizes = {"cell_type": 21, "assay": 6, "sex": 4}
    else:
        shapes, latent, batch = [2000, 8000], 128, 1024
        sizes = {"cell_type": 791, "assay": 27, "sex": 4}  # known values + <unk>
    rounds = 2 if args.quick else 5
    # The same step with cell_type cut to 3 values: what the step's matmuls reach without the
    # memory-bound work of hundreds of context maps (their reads, gradients and Adam state).
    few = {**sizes, "cell_type": 4}
    results = []
    for genes in shapes:
        cases, flops = step_cases(genes, latent, batch, sizes, device)
        few_cases, few_flops = step_cases(genes, latent, batch, few, device)
        cases["ours_few"] = few_cases["ours"]
        side = max(1, round((flops / 2) ** (1 / 3)))  # one n x n matmul: 2 n^3 FLOPs
        a = torch.rand(side, side, device=device)
        b = torch.rand(side, side, device=device)
        cases["roofline"] = lambda a=a, b=b: a @ b
        per_round = interleaved_rounds(cases, rounds, warmup=1, device=device)
        times = {name: statistics.median(values) for name, values in per_round.items()}
        roofline = times["roofline"] * flops / (2 * side**3)  # scaled to the step's exact FLOPs
        few_roofline = times["roofline"] * few_flops / (2 * side**3)
        # Each round's fraction (the step and the matmul timed side by side): the run's spread.
        fractions = [
            matmul * flops / (2 * side**3) / step
            for step, matmul in zip(per_round["ours"], per_round["roofline"], strict=True)
        ]
        row = {
            "genes": genes,
            "latent": latent,
            "batch": batch,
            "fields": sizes,
            "step_gflop": flops / 1e9,
            "ours_s": times["ours"],
            "seed_s": times["seed"],
            "roofline_s": roofline,
            "ours_cells_per_s": batch / times["ours"],
            "seed_cells_per_s": batch / times["seed"],
            "speedup": times["seed"] / times["ours"],
            "ours_fraction_of_roofline": roofline / times["ours"],
            "ours_fraction_of_roofline_per_round": fractions,
            "seed_fraction_of_roofline": roofline / times["seed"],
            "matmul_gflop_s": 2 * side**3 / times["roofline"] / 1e9,
            "few_cell_types": few,
            "few_step_gflop": few_flops / 1e9,
            "ours_few_s": times["ours_few"],
            "ours_few_fraction_of_roofline": few_roofline / times["ours_few"],
        }
        results.append(row)
        print(
            f"train step genes={genes:5d} L={latent} B={batch}: ours {row['ours_cells_per_s']:8.0f}"
            f" cells/s  seed way {row['seed_cells_per_s']:8.0f} cells/s  speed-up "
            f"{row['speedup']:4.1f}x  roofline {row['ours_fraction_of_roofline']:5.1%} "
            f"(rounds {min(fractions):.0%}-{max(fractions):.0%}; seed way "
            f"{row['seed_fraction_of_roofline']:5.1%}; {row['step_gflop']:.1f} GFLOP, "
            f"matmul {row['matmul_gflop_s']:.0f} GFLOP/s); with cell_type of 3 values "
            f"{row['ours_few_fraction_of_roofline']:5.1%}",
            flush=True,
        )
    result = {"device": str(device), "threads": args.threads, "cases": results}
    write_result(args.out, "train_step", result)


if __name__ == "__main__":
    main()
