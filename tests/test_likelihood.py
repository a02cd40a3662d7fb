"""The count likelihood: the negative binomial, its draws, rounded counts, and the model and loss
built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from cae.config import load_settings
from cae.errors import ConfigError
from cae.model.cae import CAE, contribution_l2
from cae.model.likelihood import (
    counts_from_expression,
    expression,
    median_ratio,
    nb_nll,
    round_counts,
    round_log_counts,
    sample_counts,
)
from cae.train.cycle import generator_losses
from cae.train.passes import FusedPasses
from cae.types import CP10K

SIZES = {"cell_type": 4, "sex": 3}


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    log_theta=st.floats(-4.0, 6.0),
    log_mean=st.floats(-6.0, 8.0),
)
def test_nb_nll_is_scipys_negative_binomial(counts, log_theta, log_mean):
    """Mean -log pmf of scipy's nbinom(n=theta, p=theta/(theta+mu)), for any counts, mean and
    dispersion (the gamma functions and the stable log(theta + mu) included)."""
    c = torch.tensor(counts, dtype=torch.float64).unsqueeze(0)
    library = torch.tensor([[1000.0]], dtype=torch.float64)
    log_rate = torch.full_like(c, log_mean - np.log(1000.0))
    theta_log = torch.full((c.shape[1],), log_theta, dtype=torch.float64)
    theta, mu = np.exp(log_theta), np.exp(log_mean)
    expected = -stats.nbinom.logpmf(counts, theta, theta / (theta + mu)).mean()
    assert nb_nll(c, log_rate, library, theta_log).item() == pytest.approx(expected, rel=1e-6)


def test_expression_and_counts_undo_each_other():
    counts = torch.tensor([[0.0, 3.0, 97.0], [10.0, 0.0, 0.0]])
    library = counts.sum(dim=1, keepdim=True)
    x = torch.log1p(counts / library * CP10K)  # the loader's log1p_cp10k
    torch.testing.assert_close(counts_from_expression(x, library), counts)
    torch.testing.assert_close(expression(torch.log(counts / library)), x)


def test_draws_are_counts_around_the_library_times_the_share_and_repeat_with_the_seed():
    x = torch.log1p(torch.tensor([[0.0, 1.0, 3.0, 60.0]]) * 100).repeat(20_000, 1)
    library = torch.full((20_000, 1), 500.0)
    theta = torch.tensor([1.0, 2.0, 5.0, 50.0])
    counts = sample_counts(x, library, theta.log(), seed=7)
    assert torch.equal(counts, counts.round()) and (counts >= 0).all()
    assert counts[:, 0].sum() == 0  # a share of 0 draws no count
    share = torch.expm1(x[0]) / torch.expm1(x[0]).sum()
    mean = 500 * share
    torch.testing.assert_close(counts.mean(dim=0), mean, rtol=0.03, atol=0.02)
    variance = mean + mean**2 / theta  # the negative binomial's
    torch.testing.assert_close(counts.var(dim=0)[1:], variance[1:], rtol=0.08, atol=0.0)
    assert torch.equal(sample_counts(x, library, theta.log(), seed=7), counts)
    assert not torch.equal(sample_counts(x, library, theta.log(), seed=8), counts)


def test_draws_leave_torchs_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sample_counts(torch.ones(2, 3), torch.full((2, 1), 10.0), torch.zeros(3), seed=1)
    round_counts(torch.full((2, 3), 0.5), seed=1)
    round_log_counts(torch.full((2, 3), 0.5), torch.full((2, 1), 10.0), seed=1)
    assert torch.equal(torch.rand(3), expected)


@settings(deadline=None, max_examples=50)
@given(
    means=hnp.arrays(np.float32, (3, 4), elements=st.floats(0, 1e4, width=32)),
    seed=st.integers(0, 2**63 - 1),
)
def test_rounded_counts_are_whole_next_to_the_mean_and_keep_whole_means(means, seed):
    mean = torch.from_numpy(means)
    counts = round_counts(mean, seed)
    assert torch.equal(counts, counts.round())
    assert ((counts - mean).abs() < 1.0 + 1e-3 * mean).all()  # floor or ceiling (float32)
    assert torch.equal(round_counts(mean, seed), counts)
    whole = mean.round()
    off = torch.tensor([1e-4, -1e-4]).repeat(6)[: whole.numel()].reshape(whole.shape)
    # counts that went through log1p_cp10k and back come back as they were
    assert torch.equal(round_counts((whole + off).clamp_min(0), seed), whole)


def test_median_ratio_is_the_typical_expressed_genes_change():
    counts = torch.tensor([[2.0, 0.0, 4.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    moved = torch.tensor([[1.0, 9.0, 2.0, 5.0], [1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0]])
    # row 0: ratios 0.5, 0.5, 5 over its expressed genes (the unexpressed gene is not one);
    # row 1 expresses nothing and row 2's median is 0: both keep their depth (1)
    torch.testing.assert_close(median_ratio(moved, counts), torch.tensor([[0.5], [1.0], [1.0]]))


def test_rounded_counts_average_to_the_mean():
    mean = torch.tensor([[0.0, 0.02, 0.5, 3.25, 17.9]]).repeat(40_000, 1)
    counts = round_counts(mean, seed=3)
    torch.testing.assert_close(counts.mean(dim=0), mean[0], rtol=0.0, atol=0.01)
    assert counts[:, 0].sum() == 0 and set(counts[:, 3].unique().tolist()) == {3.0, 4.0}
    assert not torch.equal(round_counts(mean, seed=4), counts)


@settings(deadline=None, max_examples=50)
@given(
    counts=hnp.arrays(np.float64, (3, 4), elements=st.floats(0, 1e6)),
    library=hnp.arrays(np.float64, (3, 1), elements=st.floats(1.0, 1e7)),
    seed=st.integers(0, 2**63 - 1),
)
def test_log_rounded_counts_are_whole_next_to_the_count_and_keep_whole_counts(
    counts, library, seed
):
    k, depth = torch.from_numpy(counts), torch.from_numpy(library)
    drawn = round_log_counts(k, depth, seed)
    assert drawn.dtype == torch.float32 and torch.equal(drawn, drawn.round())
    assert ((drawn.double() - k).abs() <= 1.0 + 1e-6 * k).all()  # floor or ceiling
    assert torch.equal(round_log_counts(k, depth, seed), drawn)
    whole = k.round()
    assert torch.equal(round_log_counts(whole + 1e-4, depth, seed).double(), whole)


def test_log_rounded_counts_average_to_the_log_normalised_value():
    # at 40 counts per 10,000 a count: a mean of 1.1 in model space is a count in 30% of cells
    library = torch.full((40_000, 1), 250.0)
    value = torch.tensor([[0.0, 1.1, 4.0, 6.5]]).expand(40_000, -1)
    k = counts_from_expression(value.double(), library.double())
    drawn = round_log_counts(k, library, seed=5)
    log_normalised = torch.log1p(drawn.double() * CP10K / library)
    torch.testing.assert_close(log_normalised.mean(dim=0), value[0].double(), rtol=0, atol=0.02)
    assert abs(float((drawn[:, 1] == 1).double().mean()) - 1.1 / np.log1p(40.0)) < 0.01
    # the same mean count rounded on the count scale gives a count in 5% of cells
    assert float(round_counts(k[:, 1:2], seed=5).mean()) == pytest.approx(0.05, abs=0.01)


def _count_model() -> CAE:
    torch.manual_seed(0)
    model = CAE(12, 5, SIZES, logit_scale=0.5, context_offsets=True, likelihood="nb")
    with torch.no_grad():
        for head in model.heads:
            head.context_maps.add_(torch.rand_like(head.context_maps))
            assert head.offsets is not None
            head.offsets.normal_()
    return model


def _contexts(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(1, k, (n,), generator=generator) for k in SIZES.values()], 1)


def test_the_count_models_output_is_the_mean_of_the_softmax_of_the_heads_sum():
    model = _count_model()
    x = torch.log1p(torch.rand(6, 12) * 50)
    out = model(x, _contexts(6, 0))
    assert out.log_rate is not None
    total = out.base + sum(out.fields.values())
    torch.testing.assert_close(out.log_rate, torch.log_softmax(total, dim=1))
    torch.testing.assert_close(out.output, torch.log1p(CP10K * torch.softmax(total, dim=1)))
    torch.testing.assert_close(torch.expm1(out.output).sum(dim=1), torch.full((6,), CP10K))


def test_count_contributions_and_effects_ignore_a_per_cell_constant():
    """The softmax ignores a term's constant over genes: contributions and effects are read on
    gene-centred terms, so adding a constant to every offset changes neither (nor the output)."""
    model = _count_model()
    x, source = torch.log1p(torch.rand(6, 12) * 50), _contexts(6, 1)
    before = model(x, source)
    norms, effects = contribution_l2(before), model.field_effects(before)
    with torch.no_grad():
        for head in model.heads:
            assert head.offsets is not None
            head.offsets.add_(torch.arange(len(head.offsets)).unsqueeze(1) * 3.0)
    after = model(x, source)
    torch.testing.assert_close(after.output, before.output)
    for name, value in contribution_l2(after).items():
        torch.testing.assert_close(value, norms[name])
    for name, value in model.field_effects(after).items():
        torch.testing.assert_close(value, effects[name])


def test_projection_leaves_the_gene_bias_and_dispersion_signed():
    model = CAE(12, 5, SIZES, logit_scale=0.5, nonnegative="all", likelihood="nb")
    assert model.gene_bias is not None and model.log_theta is not None
    with torch.no_grad():
        model.gene_bias.fill_(-2.0)
        model.log_theta.fill_(-1.0)
        model.base.sub_(1.0)
    model.project_nonnegative()
    assert (model.gene_bias == -2.0).all() and (model.log_theta == -1.0).all()
    assert (model.base >= 0).all()


def test_the_count_loss_scores_the_counts_and_needs_the_library():
    model = _count_model()
    counts = torch.poisson(torch.rand(8, 12) * 20)
    counts[:, 0] += 1  # no empty cell
    library = counts.sum(dim=1, keepdim=True)
    x = torch.log1p(counts / library * CP10K)
    source, target = _contexts(8, 2), _contexts(8, 3)
    passes = FusedPasses(model)(x, source, target)
    classifier = torch.nn.Module()
    classifier.forward = lambda cells: []  # type: ignore[method-assign]  # no fields to read
    weights = load_settings(None, {}).train.weights
    losses = generator_losses(passes, classifier, x, source, target, weights, library=library)
    assert passes.cycle2_log_rate is not None and model.log_theta is not None
    expected = nb_nll(counts, passes.cycle2_log_rate, library, model.log_theta)
    torch.testing.assert_close(losses.reconstruction, expected)
    with pytest.raises(ValueError, match="library sizes"):
        generator_losses(passes, classifier, x, source, target, weights)


def test_the_count_likelihood_refuses_values_that_are_already_normalised():
    with pytest.raises(
        ConfigError, match=r"model.likelihood = 'nb' scores raw counts.*log1p_cp10k"
    ):
        load_settings(None, {"model.likelihood": "nb", "data.transform": "none"})
