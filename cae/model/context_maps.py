"""Per-category context maps applied to a whole batch: ``out[b] = h[b] @ maps[index[b]]``.

A field with K categories has one L x L map per category, stacked in one (K, L, L) parameter. The
seed applied them with a Python loop over the categories present in a batch (one ``nn.Linear`` per
category, a device sync for each); here the whole batch is one call, by one of two methods:

* ``grouped``: sort the cells by category, cut each category's cells into tiles of P rows (P chosen
  per batch from the category counts), gather one map per tile and run one batched matmul. The
  backward pass returns a gradient that is *sparse in K*: only the categories present in the batch
  have rows (``sparse_grad=True``), so the optimiser (:class:`cae.train.optim.ContextAdam`) moves
  only those, as the seed's per-category modules did, and pays nothing for absent categories.
  Choosing P reads the counts on the host: cheap on a CPU, a sync on an accelerator.
* ``gather``: gather every cell's own map (B, L, L) and run one batched matmul. No host sync and
  static shapes (good for accelerators and ``torch.compile``); the gradient is dense in K.

``auto`` picks ``grouped`` on the CPU and ``gather`` elsewhere (``bench/context_maps.py`` measures
both against the seed's loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

# Say so explicitly (the default) so that sparse gradients do not warn on every run.
torch.sparse.check_sparse_tensor_invariants.disable()

ContextMapMethod = Literal["auto", "grouped", "gather"]
CONTEXT_MAP_METHODS: tuple[str, ...] = ("auto", "grouped", "gather")


def resolve_method(method: str, device: torch.device) -> Literal["grouped", "gather"]:
    """``auto`` -> ``grouped`` on the CPU, ``gather`` on any other device; others unchanged.

    Raises:
        ValueError: an unknown method.
    """
    if method not in CONTEXT_MAP_METHODS:
        raise ValueError(f"context map method {method!r} is not one of {CONTEXT_MAP_METHODS}")
    if method == "auto":
        return "grouped" if device.type == "cpu" else "gather"
    return method  # type: ignore[return-value]


def apply_context_maps(
    h: torch.Tensor,
    maps: torch.Tensor,
    index: torch.Tensor,
    method: ContextMapMethod = "gather",
    sparse_grad: bool = False,
) -> torch.Tensor:
    """Multiply every cell's latent vector by its own context's map, for the whole batch at once.

    Args:
        h: (B, L) latent vectors.
        maps: (K, L, L) one map per category.
        index: (B,) int64 category of each cell.
        method: ``grouped``, ``gather`` or ``auto`` (see the module docstring).
        sparse_grad: with ``grouped``, give ``maps`` a sparse COO gradient holding only the
            categories present in ``index`` (dense otherwise; ``gather`` is always dense).

    Returns:
        (B, L) with row b equal to ``h[b] @ maps[index[b]]``.
    """
    if resolve_method(method, h.device) == "gather":
        return torch.bmm(h.unsqueeze(1), maps[index]).squeeze(1)  # (B, 1, L) @ (B, L, L)
    return _GroupedContextMaps.apply(h, maps, index, sparse_grad)


@dataclass
class Tiles:
    """How one batch's cells are laid out for the grouped matmul.

    Cells sorted by category are cut into tiles of ``size`` rows; a category with more cells than
    that spans several tiles, and the last tile of each category is padded with zero rows.
    """

    size: int  # P, rows per tile
    categories: torch.Tensor  # (U,) int64 sorted categories present in the batch
    tile_group: torch.Tensor  # (T,) int64 position in ``categories`` of each tile's category
    destination: torch.Tensor  # (B,) int64 row of each cell in the (T * P, L) padded layout

    @property
    def n_tiles(self) -> int:
        """T, the number of tiles."""
        return len(self.tile_group)

    @property
    def split(self) -> bool:
        """Whether some category spans more than one tile."""
        return self.n_tiles != len(self.categories)


def choose_tile_size(counts: np.ndarray, latent_dim: int) -> int:
    """The tile size P that minimises the grouped matmul's estimated cost.

    Each tile costs its map (L x L, about L rows' worth of reads and writes) plus its P rows of
    activations, so the estimate is ``T(P) * (L + P)`` with ``T(P) = sum ceil(count / P)``.
    Candidates are the powers of two below the largest count, and the largest count itself (every
    category in one tile).

    Args:
        counts: (U,) cells per present category.
        latent_dim: L.

    Returns:
        P >= 1.
    """
    largest = int(counts.max())
    candidates = [1 << i for i in range(max(largest - 1, 1).bit_length()) if 1 << i < largest]
    candidates.append(largest)
    costs = [int(np.ceil(counts / size).sum()) * (latent_dim + size) for size in candidates]
    return candidates[int(np.argmin(costs))]


def plan_tiles(index: torch.Tensor, latent_dim: int) -> Tiles:
    """Sort a batch's cells by category and lay them out in tiles (on the host: B is small).

    Args:
        index: (B,) int64 category of each cell, B >= 1.
        latent_dim: L (weighs the cost of a tile's map against its rows).

    Returns:
        The :class:`Tiles`, its tensors on ``index``'s device.
    """
    cells = index.cpu().numpy()
    order = np.argsort(cells, kind="stable")  # (B,)
    ordered = cells[order]
    first = np.empty(len(cells), dtype=bool)  # (B,) the first cell of each category
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    starts = np.flatnonzero(first)  # (U,)
    counts = np.diff(np.append(starts, len(cells)))
    size = choose_tile_size(counts, latent_dim)
    n_tiles = -(-counts // size)  # (U,) tiles per category
    group = np.cumsum(first) - 1  # (B,) category position of each sorted cell
    rank = np.arange(len(cells)) - starts[group]  # (B,) position within its category
    tile = (np.cumsum(n_tiles) - n_tiles)[group] + rank // size
    destination = np.empty(len(cells), dtype=np.int64)
    destination[order] = tile * size + rank % size
    tile_group = np.repeat(np.arange(len(starts)), n_tiles)  # (T,)
    device = index.device
    return Tiles(
        size,
        torch.from_numpy(ordered[starts]).to(device),
        torch.from_numpy(tile_group).to(device),
        torch.from_numpy(destination).to(device),
    )


class _GroupedContextMaps(torch.autograd.Function):
    """Sorted grouped matmul over the categories present; gradient sparse (or dense) in K."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        h: torch.Tensor,
        maps: torch.Tensor,
        index: torch.Tensor,
        sparse_grad: bool,
    ) -> torch.Tensor:
        ctx.maps, ctx.sparse_grad = maps, sparse_grad
        if h.shape[0] == 0:
            ctx.tiles = None
            return h.new_empty(0, maps.shape[2])
        tiles = plan_tiles(index, h.shape[1])
        size, n_tiles = tiles.size, tiles.n_tiles
        tile_maps = maps[tiles.categories[tiles.tile_group]].to(h.dtype)  # (T, L, L)
        padded = h.new_zeros(n_tiles * size, h.shape[1]).index_copy_(0, tiles.destination, h)
        out = torch.bmm(padded.view(n_tiles, size, -1), tile_maps)  # (T, P, L)
        ctx.save_for_backward(h, index, tile_maps)
        ctx.tiles = tiles
        return out.view(n_tiles * size, -1)[tiles.destination]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        maps: torch.Tensor = ctx.maps
        if ctx.tiles is None:
            return grad_out.new_zeros(0, maps.shape[1]), None, None, None
        h, index, tile_maps = ctx.saved_tensors
        tiles: Tiles = ctx.tiles
        grad_h = None
        if ctx.needs_input_grad[0]:
            size, n_tiles = tiles.size, tiles.n_tiles
            padded = grad_out.new_zeros(n_tiles * size, grad_out.shape[1])
            padded.index_copy_(0, tiles.destination, grad_out)
            grad_h = torch.bmm(padded.view(n_tiles, size, -1), tile_maps.transpose(1, 2))
            grad_h = grad_h.view(n_tiles * size, -1)[tiles.destination]  # (B, L)
        grad_maps = None
        if ctx.needs_input_grad[1]:
            if ctx.sparse_grad:  # summed over every use when the backward pass ends
                _ROW_GRADIENTS.add(maps, h, grad_out, index)
            else:
                rows, values = grouped_outer_sum(h, grad_out, index, tiles)
                grad_maps = values.new_zeros(maps.shape).index_copy_(0, rows, values)
                grad_maps = grad_maps.to(maps.dtype)
        return grad_h, grad_maps, None, None


def grouped_outer_sum(
    h: torch.Tensor, g: torch.Tensor, index: torch.Tensor, tiles: Tiles | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per category present, the sum over its cells of ``outer(h[b], g[b])``: the gradient of the
    maps that produced ``g``'s outputs from ``h``.

    Args:
        h: (N, L) the maps' inputs.
        g: (N, L) gradients of their outputs.
        index: (N,) category of each row.
        tiles: the layout of ``index`` if already planned.

    Returns:
        ``(rows, values)``: (U,) sorted distinct categories and (U, L, L) their gradients.
    """
    tiles = tiles or plan_tiles(index, h.shape[1])
    size, n_tiles = tiles.size, tiles.n_tiles
    h_tiles = h.new_zeros(n_tiles * size, h.shape[1]).index_copy_(0, tiles.destination, h)
    g_tiles = g.new_zeros(n_tiles * size, g.shape[1]).index_copy_(0, tiles.destination, g)
    h_tiles, g_tiles = h_tiles.view(n_tiles, size, -1), g_tiles.view(n_tiles, size, -1)
    values = torch.bmm(h_tiles.transpose(1, 2), g_tiles)  # (T, L, L) one sum per tile
    if tiles.split:  # sum the tiles of each category
        summed = values.new_zeros(len(tiles.categories), *values.shape[1:])
        values = summed.index_add_(0, tiles.tile_group, values)
    return tiles.categories, values


class _RowGradientCollector:
    """Collects, during one backward pass, every use's factors of a sparse-gradient map's
    gradient (the maps' inputs and output gradients, by category), and when the pass ends sets
    their sum on the parameter as one sparse COO ``.grad`` holding only the categories used.

    A training step applies each field's maps six times (encode and decode, in three passes);
    summing the outer products of all uses in one grouped matmul writes each touched category's
    L x L gradient once, instead of once per use plus the sums of sparse tensors autograd makes.
    The gradient therefore appears on ``.grad`` when ``backward()`` returns (use ``backward()``,
    not ``torch.autograd.grad``, for these maps).
    """

    def __init__(self) -> None:
        self.pending: dict[int, tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]] = {}

    def add(
        self, maps: torch.Tensor, h: torch.Tensor, g: torch.Tensor, index: torch.Tensor
    ) -> None:
        """Keep one use's factors; the first flush queued on this backward pass sums them all."""
        torch.autograd.Variable._execution_engine.queue_callback(self.flush)
        self.pending.setdefault(id(maps), (maps, []))[1].append((h, g, index))

    def flush(self) -> None:
        """Set the summed gradient of every pending parameter (a no-op when nothing is left)."""
        pending, self.pending = self.pending, {}
        with torch.no_grad():
            for maps, uses in pending.values():
                h, g, index = (torch.cat(parts) for parts in zip(*uses, strict=True))
                rows, values = grouped_outer_sum(h, g, index)
                grad = _sparse_rows(rows, values.to(maps.dtype), maps.shape)
                maps.grad = grad if maps.grad is None else maps.grad + grad


_ROW_GRADIENTS = _RowGradientCollector()


def _sparse_rows(rows: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A sparse COO tensor holding ``values`` at the sorted, distinct first-dimension ``rows``."""
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False
    )
