"""The seed's per-category context maps (one bias-free ``nn.Linear`` per category, a Python loop
over the categories present): the reference the context-map and optimiser tests compare with."""

from __future__ import annotations

import torch
from torch import nn


def seed_loop(h: torch.Tensor, linears: nn.ModuleList, index: torch.Tensor) -> torch.Tensor:
    """The seed's approach: one bias-free nn.Linear per category, a Python loop over the
    categories present, outputs reassembled into the batch."""
    out = torch.zeros(h.shape[0], linears[0].out_features)
    for category in index.unique().tolist():
        rows = (index == category).nonzero().squeeze(1)
        out = out.index_copy(0, rows, linears[category](h[rows]))
    return out


def linears_like(maps: torch.Tensor) -> nn.ModuleList:
    """Per-category modules holding the same maps (nn.Linear computes h @ weight.T)."""
    modules = nn.ModuleList(nn.Linear(maps.shape[1], maps.shape[2], bias=False) for _ in maps)
    with torch.no_grad():
        for module, weight in zip(modules, maps, strict=True):
            module.weight.copy_(weight.T)
    return modules
