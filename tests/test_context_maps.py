"""Context maps: grouped and gathered application equal the seed's per-category loop (values and
gradients); ContextAdam moves only the categories a batch touched, as Adam over one module per
category does."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cae.model.cae import CAE
from cae.model.classifier import ContextClassifier
from cae.model.context_maps import (
    DIRECT_ROWS_UP_TO,
    Tiles,
    apply_context_maps,
    choose_layout,
    plan_tiles,
)
from cae.train import optim
from cae.train.optim import ContextAdam


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


# --- the optimiser ----------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_context_adam_equals_adam_over_one_module_per_category(fused):
    """Several steps on batches that miss some categories: every category's map follows the
    seed's per-category Adam exactly (absent categories do not move; step counts per category),
    from sparse and from dense gradients, by the fused kernel and by the fallback."""
    n_categories, latent, batch, lr = 7, 5, 12, 0.05
    generator = torch.Generator().manual_seed(0)
    start = torch.rand(n_categories, latent, latent, generator=generator)
    linears = linears_like(start)
    seed_optimizer = torch.optim.Adam(linears.parameters(), lr=lr)
    ours = {sparse: nn.Parameter(start.clone()) for sparse in (True, False)}
    optimizers = {s: ContextAdam([p], [p], lr=lr, fused=fused) for s, p in ours.items()}
    for step in range(6):
        h = torch.rand(batch, latent, generator=generator)
        index = torch.randint(0, 4 if step < 3 else n_categories, (batch,), generator=generator)
        weights = torch.rand(batch, latent, generator=generator)
        seed_optimizer.zero_grad(set_to_none=True)
        (seed_loop(h, linears, index) * weights).sum().backward()
        seed_optimizer.step()
        for sparse, maps in ours.items():
            optimizers[sparse].zero_grad(set_to_none=True)
            out = apply_context_maps(h, maps, index, "grouped", sparse_grad=sparse)
            (out * weights).sum().backward()
            optimizers[sparse].step()
            # On the CPU a dense gradient's touched rows are found too: both report them.
            rows = optimizers[sparse].updated_rows
            assert rows[maps].tolist() == index.unique().tolist()
    for maps in ours.values():
        for category, module in enumerate(linears):
            torch.testing.assert_close(maps[category], module.weight.detach().T)
    steps = optimizers[True].state[ours[True]]["step"]
    assert steps.max() <= 6 and steps[4:].max() <= 3  # categories 4-6 only in the last 3 steps
    assert steps.tolist() == optimizers[False].state[ours[False]]["step"].tolist()


def test_context_adam_leaves_absent_categories_untouched_and_state_round_trips():
    model = CAE(n_genes=6, latent_dim=3, field_sizes={"f": 5}, logit_scale=0.5)
    model.configure_context_maps("grouped", sparse_grad=True)
    optimizer = ContextAdam(model.parameters(), model.row_parameters(), lr=0.1)
    before = model.heads[0].context_maps.detach().clone()
    x = torch.rand(4, 6)
    source = torch.tensor([[1], [1], [2], [2]])
    out = model(x, source)
    out.output.sum().backward()
    optimizer.step()
    model.project_nonnegative(optimizer.updated_rows)
    after = model.heads[0].context_maps.detach()
    assert not torch.equal(after[1], before[1]) and not torch.equal(after[2], before[2])
    for absent in (0, 3, 4):
        assert torch.equal(after[absent], before[absent])
    clone = ContextAdam(model.parameters(), model.row_parameters(), lr=0.1)
    clone.load_state_dict(optimizer.state_dict())
    steps = clone.state[model.heads[0].context_maps]["step"]
    assert steps.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]


def test_the_trainers_optimisers_are_fused_on_the_cpu_and_step_as_plain_adam():
    torch.manual_seed(0)
    model = CAE(n_genes=6, latent_dim=3, field_sizes={"f": 5}, logit_scale=0.5)
    model.configure_context_maps("grouped", sparse_grad=True)
    classifier = ContextClassifier(6, 4, {"f": 5})
    plain = copy.deepcopy(model), copy.deepcopy(classifier)
    optimizer, classifier_optimizer = optim.build_optimizers(model, classifier, 0.1, 0.05)
    references = (
        ContextAdam(plain[0].parameters(), plain[0].row_parameters(), lr=0.1, fused=False),
        torch.optim.Adam(plain[1].parameters(), lr=0.05, fused=False),
    )
    for opt in (optimizer, classifier_optimizer):
        assert all(group["fused"] for group in opt.param_groups)
    x, source = torch.rand(4, 6), torch.tensor([[1], [1], [2], [3]])
    for _ in range(3):
        for net, clf, opts in ((model, classifier, (optimizer, classifier_optimizer)),
                               (*plain, references)):  # fmt: skip
            for o in opts:
                o.zero_grad()
            (net(x, source).output.square().sum() + clf(x)[0].sum()).backward()
            for o in opts:
                o.step()
    for ours, reference in zip(
        [*model.parameters(), *classifier.parameters()],
        [*plain[0].parameters(), *plain[1].parameters()],
        strict=True,
    ):
        torch.testing.assert_close(ours, reference)


def test_context_adam_steps_the_state_it_holds_after_load_state_dict():
    """The row views ContextAdam keeps between steps follow a state replaced by
    load_state_dict: stepping after a reload gives what a fresh optimiser given that state
    gives."""
    maps = torch.nn.Parameter(torch.rand(4, 3, 3))
    optimizer = ContextAdam([maps], [maps], lr=0.1)
    index, h = torch.tensor([0, 1, 1, 3]), torch.rand(4, 3)

    def step(opt: ContextAdam, param: torch.nn.Parameter) -> None:
        opt.zero_grad(set_to_none=True)
        apply_context_maps(h, param, index, "grouped", sparse_grad=True).square().sum().backward()
        opt.step()

    step(optimizer, maps)
    saved, weights = copy.deepcopy(optimizer.state_dict()), maps.detach().clone()
    step(optimizer, maps)
    optimizer.load_state_dict(copy.deepcopy(saved))  # new state tensors, the old views stale
    with torch.no_grad():
        maps.copy_(weights)
    step(optimizer, maps)
    fresh_maps = torch.nn.Parameter(weights.clone())
    fresh = ContextAdam([fresh_maps], [fresh_maps], lr=0.1)
    fresh.load_state_dict(copy.deepcopy(saved))
    step(fresh, fresh_maps)
    torch.testing.assert_close(maps.detach(), fresh_maps.detach())
    torch.testing.assert_close(optimizer.state[maps]["exp_avg"], fresh.state[fresh_maps]["exp_avg"])
    assert optimizer.state[maps]["step"].tolist() == [2.0, 2.0, 0.0, 2.0]


def test_project_nonnegative_on_rows_clamps_those_rows():
    """A few changed rows are clamped one by one and the others left alone; when most rows
    changed, the whole parameter is clamped in one call (the same result while the other rows
    are >= 0, as projection after every step keeps them)."""
    model = CAE(n_genes=6, latent_dim=3, field_sizes={"f": 8}, logit_scale=0.5)
    maps = model.heads[0].context_maps
    with torch.no_grad():
        maps.sub_(2.0)
        model.base.sub_(2.0)
    model.project_nonnegative({maps: torch.tensor([1, 3])})
    assert (maps[[1, 3]] >= 0).all() and (maps[[0, 2, 4, 5, 6, 7]] < 0).any(dim=(1, 2)).all()
    assert (model.base >= 0).all()
    model.project_nonnegative({maps: torch.tensor([0, 2, 4])})
    assert (maps >= 0).all()


def test_masked_update_from_a_dense_gradient_equals_the_row_update():
    """The accelerator's sync-free path (every row computed, untouched rows kept) gives what the
    row-by-row update gives."""
    generator = torch.Generator().manual_seed(5)
    start = torch.rand(6, 3, 3, generator=generator)
    grad = torch.rand(6, 3, 3, generator=generator)
    grad[[1, 4]] = 0.0
    results = []
    for masked in (False, True):
        maps = nn.Parameter(start.clone())
        optimizer = ContextAdam([maps], [maps], lr=0.1)
        for _ in range(3):
            maps.grad = grad.clone()
            if masked:
                group = optimizer.param_groups[1]
                state = optimizer.state[maps]
                if not state:
                    state["step"] = torch.zeros(6)
                    state["exp_avg"] = torch.zeros_like(maps)
                    state["exp_avg_sq"] = torch.zeros_like(maps)
                with torch.no_grad():
                    optimizer._masked_step(maps, maps.grad, state, group)
            else:
                optimizer.step()
        results.append((maps.detach().clone(), optimizer.state[maps]["step"].clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].tolist() == results[1][1].tolist() == [3, 0, 3, 3, 0, 3]
    torch.testing.assert_close(results[0][0][[1, 4]], start[[1, 4]])
