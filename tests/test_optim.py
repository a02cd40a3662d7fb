"""The optimiser: ContextAdam's lazy per-category updates against Adam over one module per
category, its state, and the trainer's fused optimisers."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from cae.model.cae import CAE
from cae.model.classifier import ContextClassifier
from cae.model.context_maps import apply_context_maps
from cae.train import optim
from cae.train.optim import ContextAdam
from tests.seed_maps import linears_like, seed_loop


@pytest.mark.parametrize(("fused", "internals"), [(True, False), (False, False), (True, True)])
def test_context_adam_equals_adam_over_one_module_per_category(fused, internals):
    """Several steps on batches that miss some categories: every category's map follows the
    seed's per-category Adam exactly (absent categories do not move; step counts per category),
    from sparse and from dense gradients, by the fused kernel and by the fallback."""
    n_categories, latent, batch, lr = 7, 5, 12, 0.05
    generator = torch.Generator().manual_seed(0)
    start = torch.rand(n_categories, latent, latent, generator=generator)
    linears = linears_like(start)
    seed_optimizer = torch.optim.Adam(linears.parameters(), lr=lr)
    ours = {sparse: nn.Parameter(start.clone()) for sparse in (True, False)}
    optimizers = {
        s: ContextAdam([p], [p], lr=lr, fused=fused, internals=internals) for s, p in ours.items()
    }
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


@pytest.mark.parametrize("internals", [False, True])
def test_context_adam_sums_a_gradient_of_several_applications(internals):
    """Two applications without a shared MapsGradient leave an uncoalesced gradient with repeated
    rows: summed the same with and without torch internals, equal to the dense gradient's step."""
    generator = torch.Generator().manual_seed(5)
    start = torch.rand(6, 4, 4, generator=generator)
    h = torch.rand(20, 4, generator=generator)
    first, second = (torch.randint(0, 6, (20,), generator=generator) for _ in range(2))
    results = []
    for sparse in (True, False):
        maps = nn.Parameter(start.clone())
        optimizer = ContextAdam([maps], [maps], lr=0.1, internals=internals and sparse)
        once = apply_context_maps(h, maps, first, "grouped", sparse_grad=sparse)
        twice = apply_context_maps(once, maps, second, "grouped", sparse_grad=sparse)
        twice.sum().backward()
        assert maps.grad.is_sparse == sparse
        optimizer.step()
        results.append(maps.detach())
    torch.testing.assert_close(results[0], results[1])


def test_the_cosine_schedule_runs_from_the_full_rate_down_and_constant_stays():
    epochs = 10
    rates = [optim.scheduled_lr(0.1, "cosine", e, epochs) for e in range(1, epochs + 1)]
    assert rates[0] == 0.1 and all(a > b > 0 for a, b in itertools.pairwise(rates))
    assert rates[-1] == pytest.approx(0.1 * (1 - math.cos(math.pi / epochs)) / 2)
    assert optim.scheduled_lr(0.1, "cosine", 6, epochs) == pytest.approx(0.05)
    assert {optim.scheduled_lr(0.1, "constant", e, epochs) for e in range(1, 11)} == {0.1}
