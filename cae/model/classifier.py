"""The context classifier: predicts every field's category from expression.

It gives the autoencoder its target-consistency signal (cycle-1 output should be classified as the
target context) and is trained on real cells with its own optimiser. This is not a GAN: the
classifier is frozen while the autoencoder learns from it, and never learns from generated cells.
"""

from __future__ import annotations

import torch
from torch import nn


class ContextClassifier(nn.Module):
    """A shared two-layer trunk and one linear head per field.

    Args:
        n_genes: G, genes per cell.
        hidden: width of the trunk.
        field_sizes: ``{field: K_f}`` categories per field including ``<unk>`` (index 0, never a
            training label: losses ignore it).
    """

    def __init__(self, n_genes: int, hidden: int, field_sizes: dict[str, int]) -> None:
        super().__init__()
        self.fields: tuple[str, ...] = tuple(field_sizes)
        self.trunk = nn.Sequential(
            nn.Linear(n_genes, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, size) for size in field_sizes.values())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, G) -> one (B, K_f) logit tensor per field, in field order."""
        features = self.trunk(x)  # (B, hidden)
        return [head(features) for head in self.heads]
