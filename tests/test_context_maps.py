"""Context maps: grouped and gathered application equal the seed's per-category loop (values and
gradients); the grouped method's tile layouts (the optimiser's tests: tests/test_optim.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cae.model.context_maps import (
    DIRECT_ROWS_UP_TO,
    Tiles,
    apply_context_maps,
    choose_layout,
    plan_tiles,
)
from tests.seed_maps import linears_like, seed_loop


def skewed_index(n_categories: int, batch: int, seed: int) -> torch.Tensor:
    """Most cells in one category, the rest spread out (as in real cell-type labels)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n_categories, (batch,), generator=generator)
    index[: batch * 2 // 3] = 1
    return index[torch.randperm(batch, generator=generator)]


def direct(tiles: Tiles) -> bool:
    """Whether a layout's first part is the direct one (tile k is category k)."""
    return tiles.parts[0].categories is None


def row_category(tiles: Tiles, n_categories: int) -> torch.Tensor:
    """(R,) the category of every row of a padded layout."""
    per_part = [
        torch.arange(n_categories) if part.categories is None else part.categories
        for part in tiles.parts
    ]
    return torch.cat(
        [c.repeat_interleave(part.size) for c, part in zip(per_part, tiles.parts, strict=True)]
    )


CASES = [(3, 17, 4), (26, 256, 16), (790, 300, 8), (5, 1, 6), (40, 200, 8)]


@pytest.mark.parametrize("method", ["grouped", "gather"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(("n_categories", "batch", "latent"), CASES)
@pytest.mark.parametrize("skewed", [False, True])
def test_context_maps_equal_the_seed_loop(method, sparse, n_categories, batch, latent, skewed):
    generator = torch.Generator().manual_seed(n_categories + batch)
    h = torch.rand(batch, latent, generator=generator, requires_grad=True)
    maps = torch.rand(n_categories, latent, latent, generator=generator, requires_grad=True)
    if skewed:
        index = skewed_index(n_categories, batch, seed=batch)
    else:
        index = torch.randint(0, n_categories, (batch,), generator=generator)
    linears = linears_like(maps.detach())
    h_seed = h.detach().clone().requires_grad_(True)

    ours = apply_context_maps(h, maps, index, method, sparse_grad=sparse)
    reference = seed_loop(h_seed, linears, index)
    torch.testing.assert_close(ours, reference)

    weights = torch.rand(batch, latent, generator=generator)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(h.grad, h_seed.grad)
    grad = maps.grad
    assert grad.is_sparse == (sparse and method == "grouped")
    if grad.is_sparse:  # only the categories present have rows
        assert grad.coalesce().indices()[0].tolist() == index.unique().tolist()
        grad = grad.to_dense()
    for category, module in enumerate(linears):
        expected = (
            module.weight.grad.T
            if module.weight.grad is not None
            else torch.zeros_like(grad[category])
        )
        torch.testing.assert_close(grad[category], expected)


def test_layout_keeps_balanced_categories_whole_and_splits_a_dominant_one():
    balanced = np.full(26, 40)
    assert choose_layout(balanced, latent_dim=128)[:2] == (40, False)  # one tile per category
    assert choose_layout(balanced, latent_dim=128, n_categories=26)[:2] == (40, True)  # no gather
    dominant = np.array([700] + [1] * 300)
    size, direct, _ = choose_layout(dominant, latent_dim=128)
    assert 1 < size < 700 and not direct  # padding 300 categories to 700 rows would waste more
    # With K known: one row of every map in place, the dominant category's other cells gathered.
    assert choose_layout(dominant, latent_dim=128, n_categories=301)[:2] == (1, True)
    assert choose_layout(np.array([1, 1, 1]), latent_dim=128)[:2] == (1, False)
    few_of_many = np.ones(50, dtype=int)  # 50 of 790 categories present: gather those
    assert choose_layout(few_of_many, latent_dim=128, n_categories=790)[:2] == (1, False)
    # Many categories of a few cells (cell types in a batch): small tiles read every map in place
    # (at most DIRECT_ROWS_UP_TO rows, where the backward's matmul stays fast).
    counts = np.bincount(np.random.default_rng(0).integers(1, 791, 2048))[1:]
    size, direct, _ = choose_layout(counts[counts > 0], latent_dim=128, n_categories=791)
    assert direct and size <= DIRECT_ROWS_UP_TO < counts.max()


@pytest.mark.parametrize("n_categories", [None, 30])
def test_tiles_place_every_cell_once_inside_its_categorys_tiles(n_categories):
    # Balanced categories: the direct layout is the cheapest when K is given.
    index = torch.randint(0, 30, (257,), generator=torch.Generator().manual_seed(3))
    tiles = plan_tiles(index, latent_dim=64, n_categories=n_categories)
    assert direct(tiles) == (n_categories is not None)
    rows = tiles.destination
    assert len(set(rows.tolist())) == len(index)
    assert torch.equal(row_category(tiles, 30)[rows], index)
    assert tiles.categories.tolist() == index.unique().tolist()


@pytest.mark.parametrize("n_categories", [None, 30])
def test_padding_puts_each_cell_in_its_row_and_zeros_elsewhere(n_categories):
    index = skewed_index(30, 257, seed=4)
    tiles = plan_tiles(index, latent_dim=8, n_categories=n_categories)
    x = torch.rand(257, 5) + 1  # no zero entries
    padded = tiles.pad(x)
    assert padded.shape == (sum(part.n_tiles * part.size for part in tiles.parts), 5)
    assert torch.equal(tiles.unpad(padded), x)
    used = torch.zeros(len(padded), dtype=torch.bool)
    used[tiles.destination] = True
    assert torch.equal(padded[used.logical_not()], torch.zeros(int((~used).sum()), 5))


@pytest.mark.parametrize("n_categories", [None, 30])
def test_a_dominant_category_spans_several_tiles(n_categories):
    """Gathered: the dominant category is cut into several tiles. Direct: its first P cells are
    in its own tile, the rest in a second, gathered part."""
    index = skewed_index(30, 257, seed=3)
    tiles = plan_tiles(index, latent_dim=64, n_categories=n_categories)
    assert direct(tiles) == (n_categories is not None)
    last = tiles.parts[-1]
    assert last.categories is not None and (last.categories == 1).sum() >= 1
    if n_categories is None:
        assert (last.categories == 1).sum() > 1
    else:
        assert len(tiles.parts) == 2
    assert torch.equal(row_category(tiles, 30)[tiles.destination], index)
    h, maps = torch.rand(257, 64), torch.rand(30, 64, 64)
    expected = torch.bmm(h.unsqueeze(1), maps[index]).squeeze(1)
    torch.testing.assert_close(tiles.matmul(h, tiles.part_maps(maps)), expected)


def test_empty_batch():
    h = torch.rand(0, 4, requires_grad=True)
    maps = torch.rand(3, 4, 4, requires_grad=True)
    out = apply_context_maps(h, maps, torch.zeros(0, dtype=torch.long), "grouped", True)
    assert out.shape == (0, 4)
    out.sum().backward()
