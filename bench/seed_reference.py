"""The seed's design, written here as the benchmarks' reference (the platform never uses it).

The seed's design keeps one ``nn.Linear`` (L -> L) per category of a field and, for each batch,
loops in Python over the categories present: select their cells, apply their module, reassemble
the batch. Each category costs a few small kernels and a host sync (the mask's ``nonzero``); each
module has its own Adam state, so a category absent from a batch has no gradient and does not move.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from cae.model.cae import CAE, FieldHead
from cae.model.context_maps import MapsGradient, MapsPlan


class SeedContextMaps(nn.Module):
    """One bias-free ``nn.Linear`` per category, applied in a loop over the categories present."""

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        n_categories, latent, out = maps.shape
        self.linears = nn.ModuleList(
            nn.Linear(latent, out, bias=False) for _ in range(n_categories)
        )
        with torch.no_grad():
            for module, weight in zip(self.linears, maps, strict=True):
                module.weight.copy_(weight.T)  # nn.Linear computes h @ weight.T

    def forward(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, L), (B,) -> (B, L): each cell through its category's module."""
        parts, rows = [], []
        for category in index.unique().tolist():  # host sync
            selected = (index == category).nonzero().squeeze(1)  # host sync per category
            parts.append(self.linears[category](h[selected]))
            rows.append(selected)
        return torch.cat(parts)[torch.argsort(torch.cat(rows))]


class SeedFieldHead(FieldHead):
    """A field head whose context maps are applied the seed's way (same encoder and decoder)."""

    def __init__(self, head: FieldHead) -> None:
        nn.Module.__init__(self)
        self.encoder, self.decoder, self.offsets = head.encoder, head.decoder, head.offsets
        self.seed_maps = SeedContextMaps(head.context_maps.detach())
        # Only the shape is kept (field_sizes); the seed's design has no stacked parameter.
        self.register_buffer("context_maps", torch.empty(head.context_maps.shape[0], 0, 0))
        self.map_method, self.sparse_grad = "gather", False

    def apply_maps(
        self,
        h: torch.Tensor,
        index: torch.Tensor,
        plan: MapsPlan | None = None,
        gradient: MapsGradient | None = None,
    ) -> torch.Tensor:
        return self.seed_maps(h, index)


def seed_way(model: CAE) -> CAE:
    """A copy of ``model`` whose heads apply their context maps the seed's way."""
    seed = copy.deepcopy(model)
    seed.heads = nn.ModuleList(SeedFieldHead(head) for head in seed.heads)
    return seed


def seed_batches(
    chunk: sp.csr_matrix,
    contexts: np.ndarray,
    batch_size: int,
    generator: torch.Generator,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The seed's inner loader over one chunk: a map-style dataset whose item densifies one row,
    collated by a ``DataLoader`` (the chunk's rows in a shuffled order). With ``num_workers`` the
    loader starts its workers anew for this chunk, as the seed's per-chunk inner loaders do."""

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return chunk.shape[0]

        def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
            dense = torch.from_numpy(chunk[row].toarray()[0])  # one row at a time
            return dense, torch.from_numpy(contexts[row])

    loader = torch.utils.data.DataLoader(
        Rows(),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
    )
    yield from loader
