"""Per-category context maps applied to a whole batch: ``out[b] = h[b] @ maps[index[b]]``.

A field with K categories has one L x L map per category, stacked in one (K, L, L) parameter.
A Python loop over the categories present in a batch (one ``nn.Linear`` per category, the seed's
design) costs a device sync per category; here the whole batch is one call, by one of two methods:

* ``grouped``: sort the cells by category. With few categories present (up to
  :data:`SEGMENTS_UP_TO`), one matmul per category over its cells. Otherwise lay each category's
  cells out in tiles of P rows (P chosen per batch from the category counts) and let one batched
  matmul apply every tile's map: the stacked maps as they are when most categories are present
  (small tiles, and the few cells past them in a second batched matmul), else the gathered maps
  of the present ones. With ``sparse_grad`` the maps' gradient is sparse in K: only the
  categories the batch used have rows (a training pass's applications of the maps share one
  :class:`MapsGradient`, which sums them all in one grouped matmul), so the optimiser
  (:class:`cae.train.optim.ContextAdam`) moves only those categories, as it would separate
  per-category modules, and pays nothing for absent ones. Sorting reads the categories on
  the host: cheap on a CPU, a sync on an accelerator.
* ``gather``: gather every cell's own map (B, L, L) and run one batched matmul. No host sync and
  static shapes (good for accelerators and ``torch.compile``); the gradient is dense in K.

``auto`` picks ``grouped`` on the CPU and ``gather`` elsewhere (``bench/context_maps.py`` measures
both against the seed's loop). Every path uses public torch APIs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast, get_args

import numpy as np
import torch

from cae.types import ContextMapMethod

CONTEXT_MAP_METHODS: tuple[str, ...] = get_args(ContextMapMethod)


def resolve_method(method: str, device: torch.device) -> Literal["grouped", "gather"]:
    """``auto`` -> ``grouped`` on the CPU, ``gather`` on any other device; others unchanged.

    Raises:
        ValueError: an unknown method.
    """
    if method not in CONTEXT_MAP_METHODS:
        raise ValueError(f"context map method {method!r} is not one of {CONTEXT_MAP_METHODS}")
    if method == "auto":
        return "grouped" if device.type == "cpu" else "gather"
    return cast(Literal["grouped", "gather"], method)  # one of the two: checked above


def apply_context_maps(
    h: torch.Tensor,
    maps: torch.Tensor,
    index: torch.Tensor,
    method: ContextMapMethod = "gather",
    sparse_grad: bool = False,
    plan: MapsPlan | None = None,
    gradient: MapsGradient | None = None,
) -> torch.Tensor:
    """Multiply every cell's latent vector by its own context's map, for the whole batch at once.

    Args:
        h: (B, L) latent vectors.
        maps: (K, L, L) one map per category.
        index: (B,) int64 category of each cell.
        method: ``grouped``, ``gather`` or ``auto`` (see the module docstring).
        sparse_grad: with ``grouped``, give ``maps`` a sparse COO gradient holding only the
            categories present in ``index`` (dense otherwise; ``gather`` is always dense).
        plan: with ``grouped``, ``plan_maps(index, L, K)`` made beforehand (made here if None).
        gradient: with ``grouped``, the :class:`MapsGradient` of ``maps`` in this pass: the maps'
            gradient of every application registered with it is summed at once, when the
            backward pass reaches the first application (None: each application's own).

    Returns:
        (B, L) with row b equal to ``h[b] @ maps[index[b]]``.
    """
    if resolve_method(method, h.device) == "gather":
        return torch.bmm(h.unsqueeze(1), maps[index]).squeeze(1)  # (B, 1, L) @ (B, L, L)
    return _GroupedContextMaps.apply(h, maps, index, sparse_grad, plan, gradient)


@dataclass
class MapsPlan:
    """How the grouped method lays out one application's cells: sorted by category, then one
    matmul per category (few present: ``tiles`` None) or the batched matmul over ``tiles``."""

    sort: CategorySort
    tiles: Tiles | None
    # Without tiles: (B,) the cell at each sorted position, and the sorted position of each cell,
    # on the index's device.
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None


def plan_maps(index: torch.Tensor, latent_dim: int, n_categories: int) -> MapsPlan:
    """Lay out one application of a field's maps (host work, cheap: B is small).

    Planning every application of a pass one after another, before its matmuls, is faster than
    planning each just before its own: the host's caches are cold after every large matmul.

    Args:
        index: (B,) int64 category of each cell, B >= 1.
        latent_dim: L.
        n_categories: K.

    Returns:
        The :class:`MapsPlan`.
    """
    sort = sort_by_category(index)
    if len(sort.categories) > SEGMENTS_UP_TO:
        return MapsPlan(sort, plan_tiles(index, latent_dim, n_categories, sort))
    inverse = np.empty_like(sort.order)
    inverse[sort.order] = np.arange(len(inverse))
    order, inverse_t = (torch.from_numpy(a).to(index.device) for a in (sort.order, inverse))
    return MapsPlan(sort, None, order, inverse_t)


@dataclass
class TilePart:
    """Tiles of one size in a :class:`Tiles` layout."""

    size: int  # P, rows per tile
    # (T,) int64 category of each tile; None: tile k is category k for every k < K (the stacked
    # maps are used as they are, with no gather)
    categories: torch.Tensor | None
    n_tiles: int  # T


@dataclass
class Tiles:
    """How one batch's cells are laid out for the grouped matmul.

    Cells sorted by category are cut into tiles; the last tile of each category is padded with
    zero rows. A layout has one or two parts, their rows one after the other in one padded
    buffer. Gathered layout: one part, tiles of P rows, a category with more cells spanning
    several tiles. Direct layout: tile k is category k for every k < K (absent categories get
    empty tiles) and holds its first P cells; the cells of the few categories with more go into a
    second, gathered part.
    """

    parts: tuple[TilePart, ...]
    categories: torch.Tensor  # (U,) int64 sorted categories present in the batch
    destination: torch.Tensor  # (B,) int64 row of each cell in the padded layout
    # (R,) int64 cell of each row of the padded layout, B for a padding row (see ``pad``)
    slot_source: torch.Tensor

    def part_maps(self, maps: torch.Tensor) -> list[torch.Tensor]:
        """Each part's (T, L, M) maps: ``maps`` itself for a direct part, else gathered."""
        return [
            maps if p.categories is None else maps.index_select(0, p.categories) for p in self.parts
        ]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M) -> (R, M): the rows in the padded layout, zero rows for padding."""
        return _gather_padded(x, self.slot_source)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """(R, M) -> (B, M): every cell's row of the padded layout."""
        return padded.index_select(0, self.destination)

    def matmul(self, x: torch.Tensor, part_maps: list[torch.Tensor]) -> torch.Tensor:
        """(B, L) -> (B, M): every cell times its tile's map, one batched matmul per part."""
        padded = self.pad(x)
        out = padded.new_empty(padded.shape[0], part_maps[0].shape[2])
        start = 0
        for part, maps in zip(self.parts, part_maps, strict=True):
            stop = start + part.n_tiles * part.size
            tiles = padded[start:stop].view(part.n_tiles, part.size, -1)
            torch.bmm(tiles, maps, out=out[start:stop].view(part.n_tiles, part.size, -1))
            start = stop
        return self.unpad(out)


def _candidate_sizes(largest: int) -> list[int]:
    """Tile sizes worth trying: the powers of two below ``largest``, and ``largest``."""
    sizes = [1 << i for i in range(max(largest - 1, 1).bit_length()) if 1 << i < largest]
    return [*sizes, largest]


# What a tile's row costs, as a fraction of reading its L x L map: a batched matmul of small tiles
# by whole maps mostly reads the maps, and each further row of every tile adds a little (latent
# 128, 791 maps read from memory: the forward's product grows by 1/17 of a map's time per row,
# the backward's by the transposed maps by 1/10).
ROW_COST = 0.1

# Rows per tile of the small tiles of the direct layout at most: the backward pass's product by
# the transposed maps costs half as much again from 6 rows per tile on, with MKL (measurements in
# docs/decisions.md).
DIRECT_ROWS_UP_TO = 5


class Layout(NamedTuple):
    """A batch's tile layout, as :func:`choose_layout` picks it."""

    size: int  # P, rows per tile
    direct: bool  # tile k is category k for every k < K, the stacked maps read in place
    rest_size: int  # rows per tile of a direct layout's gathered part; 0 when it has none


def choose_layout(counts: np.ndarray, latent_dim: int, n_categories: int | None = None) -> Layout:
    """The layout that minimises the estimated cost of one batched matmul over the tiles.

    Costs count memory traffic in rows of a map (L), a tile's row as :data:`ROW_COST` of its map.
    In the gathered layout each tile costs its map (gathered, then read: 2L) and its rows:
    ``T(P) (2 + c P) L`` with ``T(P) = sum ceil(count / P)``, for P among the powers of two below
    the largest count and the largest count itself. The direct layout reads all K maps in place,
    ``K (1 + c P) L``, with tiles of every category's largest count, or of at most
    :data:`DIRECT_ROWS_UP_TO` rows and the cells past a category's first P in a gathered part.
    Computed on the distinct counts, a few numpy calls: this runs on the host for every
    application, with the caches cold after the matmuls.

    Args:
        counts: (U,) cells per present category.
        latent_dim: L.
        n_categories: K; None rules the direct layout out.

    Returns:
        The :class:`Layout`.
    """
    histogram = np.bincount(counts)
    values = np.flatnonzero(histogram)  # (V,) the distinct counts
    weight = histogram[values].astype(np.float64)  # (V,) categories with each
    largest = int(values[-1])
    sizes = _candidate_sizes(largest)
    gathered = weight @ np.ceil(values[:, None] / np.array(sizes))  # (C,) tiles per size
    gathered *= (2 + ROW_COST * np.array(sizes)) * latent_dim
    best = int(np.argmin(gathered))
    if n_categories is not None:
        direct = sorted({*range(1, min(largest, DIRECT_ROWS_UP_TO) + 1), largest})  # (S,)
        rest_sizes = np.array(sorted({*sizes, *(largest - d for d in direct if d < largest)}))
        rest = np.clip(values[:, None] - np.array(direct), 0, None)  # (V, S) past the first P
        rest_tiles = weight @ np.ceil(rest[:, :, None] / rest_sizes).reshape(len(values), -1)
        rest_costs = rest_tiles.reshape(len(direct), -1) * (2 + ROW_COST * rest_sizes)
        rest_best = rest_costs.argmin(axis=1)  # (S,) each direct size's best rest size
        costs = n_categories * (1 + ROW_COST * np.array(direct)) + rest_costs.min(axis=1)
        choice = int(np.argmin(costs))
        if costs[choice] * latent_dim < gathered[best]:
            size = direct[choice]
            rest_size = int(rest_sizes[rest_best[choice]]) if size < largest else 0
            return Layout(size, True, rest_size)
    return Layout(sizes[best], False, 0)


# With this many categories present or fewer, one matmul per category on the sorted cells is
# cheapest: no padding, and few calls. Few matters: on a busy machine each multi-threaded call can
# wait a scheduler time slice for its other thread, so one batched call beats dozens of small ones.
SEGMENTS_UP_TO = 8


@dataclass
class CategorySort:
    """A batch's cells sorted by category (host arrays: B is small)."""

    order: np.ndarray  # (B,) the cell at each sorted position
    categories: np.ndarray  # (U,) sorted distinct categories
    starts: np.ndarray  # (U,) first sorted position of each category
    counts: np.ndarray  # (U,) cells of each category
    group: np.ndarray  # (B,) position in ``categories`` of each sorted cell
    rank: np.ndarray  # (B,) rank of each sorted cell within its category


def sort_by_category(index: torch.Tensor) -> CategorySort:
    """Sort the cells of ``index`` (B,), B >= 1, by category, stably, on the host."""
    cells = index.cpu().numpy()
    order = np.argsort(cells, kind="stable")
    ordered = cells[order]
    first = np.empty(len(cells), dtype=bool)  # the first cell of each category
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    group = np.cumsum(first) - 1
    return CategorySort(
        order,
        ordered[starts],
        starts,
        np.diff(np.append(starts, len(cells))),
        group,
        np.arange(len(cells)) - starts[group],
    )


def plan_tiles(
    index: torch.Tensor,
    latent_dim: int,
    n_categories: int | None = None,
    sort: CategorySort | None = None,
) -> Tiles:
    """Sort a batch's cells by category and lay them out in tiles (on the host: B is small).

    Args:
        index: (B,) int64 category of each cell, B >= 1.
        latent_dim: L (weighs the cost of a tile's map against its rows).
        n_categories: K, when the direct layout (no gather of maps) may be chosen.
        sort: ``sort_by_category(index)``, when the caller has it.

    Returns:
        The :class:`Tiles`, its tensors on ``index``'s device.
    """
    sort = sort_by_category(index) if sort is None else sort
    size, direct, rest_size = choose_layout(sort.counts, latent_dim, n_categories)
    row = np.empty(len(sort.order), dtype=np.int64)  # (B,) padded row of each sorted cell
    parts: list[tuple[int, np.ndarray | None, int]]  # (P, categories of the tiles, T) per size
    if direct:
        assert n_categories is not None
        parts = [(size, None, n_categories)]
        first = sort.rank < size
        row[first] = sort.categories[sort.group[first]] * size + sort.rank[first]
        if rest_size:
            rest = np.clip(sort.counts - size, 0, None)  # (U,) cells past a category's first P
            offset = n_categories * size
            row[~first], tiles = _gathered_rows(sort, rest, sort.rank - size, rest_size, ~first)
            row[~first] += offset
            parts.append((rest_size, tiles, len(tiles)))
    else:
        row[:], tiles = _gathered_rows(sort, sort.counts, sort.rank, size, slice(None))
        parts = [(size, tiles, len(tiles))]
    n_cells = len(sort.order)
    destination = np.empty(n_cells, dtype=np.int64)
    destination[sort.order] = row
    slot_source = np.full(sum(p[0] * p[2] for p in parts), n_cells, dtype=np.int64)
    slot_source[destination] = np.arange(n_cells)
    device = index.device

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device)

    return Tiles(
        tuple(
            TilePart(size, None if c is None else tensor(c), n_tiles) for size, c, n_tiles in parts
        ),
        tensor(sort.categories),
        tensor(destination),
        tensor(slot_source),
    )


def _gathered_rows(
    sort: CategorySort,
    counts: np.ndarray,
    rank: np.ndarray,
    size: int,
    cells: np.ndarray | slice,
) -> tuple[np.ndarray, np.ndarray]:
    """The gathered layout of some sorted cells: each category's ``counts`` cells (their ranks
    within it ``rank``) in tiles of ``size`` rows.

    Returns:
        ``(rows, tile_category)``: the padded row of each of the ``cells`` and (T,) the category
        of each tile.
    """
    n_tiles = -(-counts // size)  # (U,) tiles per category
    tile = (np.cumsum(n_tiles) - n_tiles)[sort.group[cells]] + rank[cells] // size
    return tile * size + rank[cells] % size, np.repeat(sort.categories, n_tiles)


def _gather_padded(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N, M), (R,) -> (R, M): ``x``'s rows at ``rows``, a zero row where ``rows`` is N."""
    return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, rows)


def _segment_matmul(
    ordered: torch.Tensor, sort: CategorySort, matrices: list[torch.Tensor]
) -> torch.Tensor:
    """(B, L) rows sorted by category -> (B, M), still sorted: each row times its category's
    matrix (``matrices[u]``: L x M), one matmul per category."""
    out = ordered.new_empty(len(ordered), matrices[0].shape[1])
    for start, count, matrix in zip(
        sort.starts.tolist(), sort.counts.tolist(), matrices, strict=True
    ):
        torch.mm(ordered[start : start + count], matrix, out=out[start : start + count])
    return out


def _segment_outer_sum(h: torch.Tensor, g: torch.Tensor, sort: CategorySort) -> torch.Tensor:
    """(B, L), (B, M) rows sorted by category -> (U, L, M): per category, the sum over its rows of
    ``outer(h[b], g[b])``, one matmul per category."""
    values = h.new_empty(len(sort.categories), h.shape[1], g.shape[1])
    for position, (start, count) in enumerate(
        zip(sort.starts.tolist(), sort.counts.tolist(), strict=True)
    ):
        rows = slice(start, start + count)
        torch.mm(h[rows].T, g[rows], out=values[position])
    return values


class _GroupedContextMaps(torch.autograd.Function):
    """Sorted grouped matmul over the categories present; gradient sparse (or dense) in K."""

    @staticmethod
    def forward(
        ctx: Any,  # torch's FunctionCtx type lacks what forward sets on it (maps, plan, ...)
        h: torch.Tensor,
        maps: torch.Tensor,
        index: torch.Tensor,
        sparse_grad: bool,
        plan: MapsPlan | None,
        gradient: MapsGradient | None,
    ) -> torch.Tensor:
        ctx.maps, ctx.sparse_grad, ctx.plan, ctx.gradient = maps, sparse_grad, None, gradient
        ctx.first = gradient is not None and gradient.register()
        if h.shape[0] == 0:
            return h.new_empty(0, maps.shape[2])
        plan = plan_maps(index, h.shape[1], maps.shape[0]) if plan is None else plan
        ctx.plan = plan
        if plan.tiles is None:  # one matmul per category over its sorted cells
            assert plan.order is not None and plan.inverse is not None  # set when tiles is None
            ordered = h.index_select(0, plan.order)  # (several times faster than h[order])
            ctx.save_for_backward(ordered, index)
            chosen = [maps[c].to(h.dtype) for c in plan.sort.categories.tolist()]
            return _segment_matmul(ordered, plan.sort, chosen).index_select(0, plan.inverse)
        part_maps = [m.to(h.dtype) for m in plan.tiles.part_maps(maps)]  # (T, L, L) each
        ctx.save_for_backward(h, index, *part_maps)
        return plan.tiles.matmul(h, part_maps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        maps: torch.Tensor = ctx.maps
        plan: MapsPlan | None = ctx.plan
        gradient: MapsGradient | None = ctx.gradient
        grad_h: torch.Tensor | None = None
        if plan is None:  # no cells
            grad_h = grad_out.new_zeros(0, maps.shape[1])
        elif plan.tiles is None:
            grad_h = _GroupedContextMaps._segments_backward(ctx, grad_out)
        else:
            h, index, *part_maps = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                grad_h = plan.tiles.matmul(grad_out, [m.transpose(1, 2) for m in part_maps])
            if ctx.needs_input_grad[1]:
                _use(ctx).add(h, grad_out, index, plan.sort)
        grad_maps = None
        if ctx.needs_input_grad[1] and (gradient is None or ctx.first):
            grad_maps = _use(ctx).total(maps)
        return grad_h, grad_maps, None, None, None, None

    @staticmethod
    def _segments_backward(ctx: Any, grad_out: torch.Tensor) -> torch.Tensor | None:
        """The inputs' gradient of an application by one matmul per category (the maps' factors
        go to the application's :class:`MapsGradient`)."""
        maps: torch.Tensor = ctx.maps
        plan: MapsPlan = ctx.plan
        ordered, index = ctx.saved_tensors
        assert plan.order is not None and plan.inverse is not None  # set when tiles is None
        grad_sorted = grad_out.index_select(0, plan.order)
        grad_h = None
        if ctx.needs_input_grad[0]:
            chosen = [maps[c].T.to(grad_out.dtype) for c in plan.sort.categories.tolist()]
            grad_h = _segment_matmul(grad_sorted, plan.sort, chosen).index_select(0, plan.inverse)
        if ctx.needs_input_grad[1]:  # rows already sorted: their sort is the identity order
            sort = plan.sort
            in_order = CategorySort(
                np.arange(len(sort.order)), sort.categories, sort.starts, sort.counts,
                sort.group, sort.rank,
            )  # fmt: skip
            _use(ctx).add(ordered, grad_sorted, index.index_select(0, plan.order), in_order)
        return grad_h


def _use(ctx: Any) -> MapsGradient:
    """The :class:`MapsGradient` an application's backward adds its factors to: the pass's, or
    (without one) the application's own, made on first use."""
    if ctx.gradient is None:
        ctx.gradient = MapsGradient(ctx.sparse_grad)
    gradient: MapsGradient = ctx.gradient
    return gradient


@dataclass
class OuterPlan:
    """How :func:`grouped_outer_sum` lays out its rows (host work, made by
    :func:`plan_outer_sum`)."""

    sort: CategorySort
    categories: torch.Tensor  # (U,) sorted distinct categories, on the rows' device
    order: torch.Tensor  # (N,) the row at each sorted position
    size: int  # P, rows per category's tile; 0: one matmul per category instead
    slots: torch.Tensor | None  # (U P,) row of each tile slot, N for padding


def plan_outer_sum(
    index: torch.Tensor, latent_dim: int, sort: CategorySort | None = None
) -> OuterPlan:
    """Lay out :func:`grouped_outer_sum`'s rows of categories ``index`` (N,), N >= 1
    (``sort``: ``sort_by_category(index)``, when the caller has it)."""
    sort = sort_by_category(index) if sort is None else sort
    device = index.device
    categories = torch.from_numpy(sort.categories).to(device)
    order = torch.from_numpy(sort.order).to(device)
    if len(sort.categories) <= SEGMENTS_UP_TO:
        return OuterPlan(sort, categories, order, 0, None)
    size = _outer_tile_size(sort.counts, latent_dim)
    kept = sort.rank < size  # a category's first P rows go into its tile, the rest padding
    slot_source = np.full(len(sort.categories) * size, len(sort.order), dtype=np.int64)
    slot_source[sort.group[kept] * size + sort.rank[kept]] = sort.order[kept]
    return OuterPlan(sort, categories, order, size, torch.from_numpy(slot_source).to(device))


def grouped_outer_sum(
    h: torch.Tensor, g: torch.Tensor, index: torch.Tensor, plan: OuterPlan | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per category present, the sum over its rows of ``outer(h[b], g[b])``: the gradient of the
    maps that produced ``g``'s outputs from ``h``.

    With few categories, one matmul per category over its sorted rows. Otherwise every
    category's first P rows go into one padded batched matmul that writes each category's L x L
    sum once; the rows of the few categories with more than P rows are added to their sums
    afterwards, one matmul each (no scatter-add of L x L blocks, which is slow on the CPU).

    Args:
        h: (N, L) the maps' inputs.
        g: (N, L) gradients of their outputs.
        index: (N,) category of each row, N >= 1.
        plan: ``plan_outer_sum(index, L)`` made beforehand (made here if None).

    Returns:
        ``(rows, values)``: (U,) sorted distinct categories and (U, L, L) their gradients.
    """
    plan = plan_outer_sum(index, h.shape[1]) if plan is None else plan
    sort, order, size = plan.sort, plan.order, plan.size
    n_groups = len(sort.categories)
    if plan.slots is None:  # one matmul per category, no padding
        h_sorted, g_sorted = h.index_select(0, order), g.index_select(0, order)
        return plan.categories, _segment_outer_sum(h_sorted, g_sorted, sort)
    h_tiles, g_tiles = (_gather_padded(x, plan.slots).view(n_groups, size, -1) for x in (h, g))
    values = torch.bmm(h_tiles.transpose(1, 2), g_tiles)  # (U, L, L)
    for position in np.flatnonzero(sort.counts > size).tolist():  # the rest of large categories
        start = sort.starts[position]
        rest = order[start + size : start + sort.counts[position]]
        values[position].addmm_(h.index_select(0, rest).T, g.index_select(0, rest))
    return plan.categories, values


def _outer_tile_size(counts: np.ndarray, latent_dim: int) -> int:
    """P for :func:`grouped_outer_sum`: every category costs its L x L output and P padded rows,
    each larger category a separate matmul (about 2L rows' worth) over its other rows."""
    values, weight = np.unique(counts, return_counts=True)  # distinct counts, categories of each
    sizes = np.array(_candidate_sizes(int(values[-1])))
    larger = weight @ (values[:, None] > sizes)  # (C,) categories with more than P rows
    rest = weight @ np.clip(values[:, None] - sizes, 0, None)  # (C,) their other rows
    costs = len(counts) * (latent_dim + sizes) + larger * 2 * latent_dim + rest
    return int(sizes[int(np.argmin(costs))])


# One application's factors of its maps' gradient: the maps' inputs h, their output gradients g,
# the categories, and their sort when known.
_Use = tuple[torch.Tensor, torch.Tensor, torch.Tensor, CategorySort | None]


class MapsGradient:
    """The gradient of one field's context maps over every application of one pass, summed at
    once.

    A training step applies each field's maps four times (encoding and decoding, in both cycles).
    Each application registers with the pass's :class:`MapsGradient` in the forward pass; in the
    backward pass each adds its factors (the maps' inputs and output gradients, by category), and
    the first application, whose backward runs last (every other application depends on its
    output), returns their sum as the maps' gradient: one grouped matmul writes each touched
    category's L x L gradient once, instead of once per application plus autograd's sums. The
    gradient is ordinary autograd output (``backward()`` and ``torch.autograd.grad`` both see it).

    Args:
        sparse: give the gradient as sparse COO in K (the categories used only), else dense.
    """

    def __init__(self, sparse: bool) -> None:
        self.sparse = sparse
        self.uses: list[_Use] = []
        self.registered = 0
        self.summed = False

    def register(self) -> bool:
        """Count one application in the forward pass; True for the first (it returns the sum)."""
        self.registered += 1
        return self.registered == 1

    def add(
        self,
        h: torch.Tensor,
        g: torch.Tensor,
        index: torch.Tensor,
        sort: CategorySort | None = None,
    ) -> None:
        """Keep one application's factors (and its rows' sort by category, when known).

        Raises:
            RuntimeError: the sum was taken already: an application whose backward runs after the
                first application's cannot share its gradient (register it with a pass of its own).
        """
        if self.summed:
            raise RuntimeError(
                "a context-map application reached its backward after the pass's first one: its "
                "gradient would be lost; give it a MapsGradient of its own"
            )
        self.uses.append((h, g, index, sort))

    def total(self, maps: torch.Tensor) -> torch.Tensor | None:
        """The maps' gradient: every kept application's summed (None when none was kept)."""
        self.summed = True
        uses, self.uses = self.uses, []
        if not uses:
            return None
        with torch.no_grad():
            if len(uses) == 1:  # its own rows and sort
                h, g, index, sort = uses[0]
            else:
                h, g, index = (torch.cat(parts) for parts in list(zip(*uses, strict=True))[:3])
                sort = None
            plan = plan_outer_sum(index, h.shape[1], sort)
            rows, values = grouped_outer_sum(h, g, index, plan)
            return _rows_gradient(rows, values.to(maps.dtype), maps.shape, self.sparse)


def _sparse_rows(rows: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A sparse COO tensor holding ``values`` at the sorted, distinct first-dimension ``rows``."""
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False
    )


def _rows_gradient(
    rows: torch.Tensor, values: torch.Tensor, shape: torch.Size, sparse: bool
) -> torch.Tensor:
    """A (K, L, M) gradient holding ``values`` (U, L, M) at the sorted distinct ``rows``: sparse
    COO in K, or dense with zeros elsewhere."""
    if sparse:
        return _sparse_rows(rows, values, shape)
    return values.new_zeros(shape).index_copy_(0, rows, values)
