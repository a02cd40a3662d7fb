"""Context maps, forward + backward: our grouped application versus the seed's loop over
per-category ``nn.Linear`` modules, side by side in one run, with the same-run memory floor.

    python bench/context_maps.py [--quick] [--threads 2]

Cardinality 3, 26 and 790 (sex, assay, Census cell_type), batch 256 and 1024, latent 128. Each
case times, in turn: the seed's loop; ``grouped`` (our CPU default: sorted tiles, one batched
matmul, a gradient sparse in the categories); ``gather`` (our accelerator default: every cell's
map gathered). Then the same with the optimiser step (Adam over the seed's modules, which skips
absent categories; ContextAdam on the stacked maps, which does the same). The floor is the bytes of
the maps a batch touches and of their gradients, at the memory bandwidth of a large copy timed in
the same rounds. Prints one line per case and writes bench/results/context_maps.json.
"""

from __future__ import annotations

import torch
from measure import arguments, copy_case, interleaved, setup, write_result
from seed_reference import SeedContextMaps
from torch import nn

from cae.model.context_maps import apply_context_maps
from cae.train.optim import ContextAdam


def cases_for(
    n_categories: int, batch: int, latent: int, device: torch.device, optimiser: bool
) -> dict[str, object]:
    """The implementations of one shape, as calls doing forward + backward (+ step): the seed's,
    grouped and gather; with the step, also grouped with ``train.torch_internals`` (the optimiser
    reads the sparse gradient in place)."""
    generator = torch.Generator().manual_seed(n_categories * 7 + batch)
    start = torch.rand(n_categories, latent, latent, generator=generator) / latent
    h = torch.rand(batch, latent, generator=generator).to(device).requires_grad_(True)
    index = torch.randint(0, n_categories, (batch,), generator=generator).to(device)
    weights = torch.rand(batch, latent, generator=generator).to(device)

    seed = SeedContextMaps(start).to(device)
    methods = ("grouped", "gather", "internals") if optimiser else ("grouped", "gather")
    maps = {m: nn.Parameter(start.clone().to(device)) for m in methods}
    seed_opt = torch.optim.Adam(seed.parameters(), lr=1e-3)
    ours_opt = {
        m: ContextAdam([p], [p], lr=1e-3, internals=m == "internals") for m, p in maps.items()
    }

    def seed_case() -> None:
        seed_opt.zero_grad(set_to_none=True)
        h.grad = None
        (seed(h, index) * weights).sum().backward()
        if optimiser:
            seed_opt.step()

    def ours(method: str) -> object:
        def case() -> None:
            ours_opt[method].zero_grad(set_to_none=True)
            h.grad = None
            sparse = method != "gather"
            apply = "gather" if method == "gather" else "grouped"
            out = apply_context_maps(h, maps[method], index, apply, sparse_grad=sparse)
            (out * weights).sum().backward()
            if optimiser:
                ours_opt[method].step()

        return case

    return {"seed": seed_case, **{method: ours(method) for method in methods}}


def main() -> None:
    args = arguments(__doc__.split("\n\n")[0]).parse_args()
    device = setup(args.threads)
    latent = 16 if args.quick else 128
    cardinalities = (3, 26) if args.quick else (3, 26, 790)
    batches = (64,) if args.quick else (256, 1024)
    rounds = 2 if args.quick else 7
    copy, copy_bytes = copy_case(device, 16 if args.quick else 256)
    results = []
    for optimiser in (False, True):
        for n_categories in cardinalities:
            for batch in batches:
                cases = cases_for(n_categories, batch, latent, device, optimiser)
                times = interleaved({**cases, "copy": copy}, rounds, device=device)
                bandwidth = copy_bytes / times["copy"]
                generator = torch.Generator().manual_seed(n_categories * 7 + batch)
                present = len(
                    torch.randint(0, n_categories, (batch,), generator=generator).unique()
                )
                touched = 2 * present * latent * latent * 4  # maps read + gradients written
                floor = touched / bandwidth
                ours = "grouped" if device.type == "cpu" else "gather"
                row = {
                    "optimiser_step": optimiser,
                    "cardinality": n_categories,
                    "batch": batch,
                    "latent": latent,
                    "present": present,
                    "seed_ms": times["seed"] * 1e3,
                    "grouped_ms": times["grouped"] * 1e3,
                    "gather_ms": times["gather"] * 1e3,
                    "ours": ours,
                    "speedup": times["seed"] / times[ours],
                    "bandwidth_gb_s": bandwidth / 1e9,
                    "floor_ms": floor * 1e3,
                    "ours_over_floor": times[ours] / floor,
                    "seed_over_floor": times["seed"] / floor,
                }
                if "internals" in times:
                    row["internals_ms"] = times["internals"] * 1e3
                    row["internals_speedup"] = times["seed"] / times["internals"]
                results.append(row)
                what = "fwd+bwd+step" if optimiser else "fwd+bwd     "
                print(
                    f"context maps {what} K={n_categories:4d} B={batch:5d} L={latent}: "
                    f"seed {row['seed_ms']:8.2f} ms  grouped {row['grouped_ms']:7.2f} ms  "
                    f"gather {row['gather_ms']:7.2f} ms  speed-up {row['speedup']:5.1f}x  "
                    f"floor {row['floor_ms']:6.3g} ms (ours {row['ours_over_floor']:5.1f}x, "
                    f"seed {row['seed_over_floor']:5.1f}x)"
                    + (
                        f"  torch_internals {row['internals_ms']:7.2f} ms "
                        f"({row['internals_speedup']:.1f}x)"
                        if "internals_ms" in row
                        else ""
                    ),
                    flush=True,
                )
    result = {"device": str(device), "threads": args.threads, "cases": results}
    write_result(args.out, "context_maps", result)


if __name__ == "__main__":
    main()
