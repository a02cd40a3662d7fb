"""Cycle training pieces: target sampling and the loss terms."""

from __future__ import annotations

import pytest
import torch

from cae.config import LossWeights
from cae.model.cae import CAE
from cae.model.classifier import ContextClassifier
from cae.train.cycle import (
    BatchMeans,
    ContextMeans,
    classifier_hits,
    classifier_loss,
    context_means_loss,
    generator_losses,
    moved_contexts,
    one_field_moves,
    sample_targets,
)
from cae.train.passes import FusedPasses

SIZES = torch.tensor([5, 3, 4])  # <unk> + 4, <unk> + 2, <unk> + 3 known values


def test_targets_are_known_and_differ_from_a_known_source():
    generator = torch.Generator().manual_seed(0)
    source = torch.stack([torch.randint(0, int(k), (5000,), generator=generator) for k in SIZES], 1)
    target = sample_targets(source, SIZES, generator)
    assert (target >= 1).all(), "<unk> (index 0) is never a target"
    assert (target < SIZES).all()
    known = source != 0
    assert not (target == source)[known].any()


def test_targets_are_uniform_over_the_other_known_values():
    generator = torch.Generator().manual_seed(1)
    source = torch.full((30_000, 3), 2)
    source[:, 2] = 0  # an unknown source may go to any known value
    target = sample_targets(source, SIZES, generator)
    first = torch.bincount(target[:, 0], minlength=5).float() / len(target)
    torch.testing.assert_close(first, torch.tensor([0, 1 / 3, 0, 1 / 3, 1 / 3]), atol=0.015, rtol=0)
    assert set(target[:, 1].tolist()) == {1}, "two known values: the other one every time"
    third = torch.bincount(target[:, 2], minlength=4).float() / len(target)
    torch.testing.assert_close(third, torch.tensor([0, 1 / 3, 1 / 3, 1 / 3]), atol=0.015, rtol=0)


def test_target_sampling_is_reproducible():
    source = torch.ones(50, 3, dtype=torch.long)
    a = sample_targets(source, SIZES, torch.Generator().manual_seed(7))
    b = sample_targets(source, SIZES, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def networks() -> tuple[CAE, ContextClassifier]:
    torch.manual_seed(0)
    sizes = {"a": 5, "b": 3, "c": 4}
    return CAE(10, 4, sizes, 0.5, context_offsets=True), ContextClassifier(10, 8, sizes)


@pytest.mark.parametrize(
    "weights",
    [LossWeights(), LossWeights(self_reconstruction=0, parsimony=0), LossWeights(target=3.0)],
)
def test_total_is_the_weighted_sum_of_the_terms(weights):
    model, classifier = networks()
    x = torch.rand(16, 10) * 3
    source = torch.ones(16, 3, dtype=torch.long)
    target = sample_targets(source, SIZES, torch.Generator().manual_seed(0))
    passes = FusedPasses(model)(x, source, target, moved_contexts(source, target, weights))
    losses = generator_losses(passes, classifier, x, source, target, weights)
    expected = (
        weights.reconstruction * losses.reconstruction
        + weights.integration * losses.integration
        + weights.target * losses.target
        + weights.self_reconstruction * losses.self_reconstruction
        + weights.parsimony * losses.parsimony
    )
    torch.testing.assert_close(losses.total, expected)
    assert all(torch.isfinite(v) and v >= 0 for v in losses.terms().values())


def test_below_zero_is_the_negative_part_of_the_decoded_counterfactuals():
    model, classifier = networks()
    with torch.no_grad():
        for head in model.heads:  # signed offsets: decoded passes below 0 in places
            assert head.offsets is not None
            head.offsets.normal_()
    x = torch.rand(16, 10) * 3
    source = torch.ones(16, 3, dtype=torch.long)
    target = sample_targets(source, SIZES, torch.Generator().manual_seed(0))
    weights = LossWeights(context_means=1.0, below_zero=2.0)
    passes = FusedPasses(model)(x, source, target, moved_contexts(source, target, weights))
    losses = generator_losses(passes, classifier, x, source, target, weights, residual=True)
    assert passes.moved is not None and (passes.cycle1 < 0).any()
    below = [p.clamp_max(0.0).square().mean() for p in (passes.cycle1, passes.moved)]
    torch.testing.assert_close(losses.below_zero, (below[0] + below[1]) / 2)
    off = weights.model_copy(update={"below_zero": 0.0})
    without = generator_losses(passes, classifier, x, source, target, off, residual=True)
    torch.testing.assert_close(losses.total - without.total, 2.0 * losses.below_zero)
    passes = FusedPasses(model)(x.abs(), source, target, None)
    alone = generator_losses(passes, classifier, x, source, target, LossWeights(context_means=0))
    torch.testing.assert_close(alone.below_zero, passes.cycle1.clamp_max(0.0).square().mean())


def test_classifier_loss_ignores_unknown_labels():
    _, classifier = networks()
    x = torch.rand(8, 10)
    unknown = torch.zeros(8, 3, dtype=torch.long)
    loss = classifier_loss(classifier(x), unknown)
    correct, labelled = classifier_hits(classifier(x), unknown)
    assert loss.item() == 0.0, "no known label: no loss (and no NaN)"
    assert labelled.tolist() == [0, 0, 0] and correct.tolist() == [0, 0, 0]

    labels = torch.ones(8, 3, dtype=torch.long)
    labels[:4, 0] = 0
    loss = classifier_loss(classifier(x), labels)
    assert loss.item() > 0
    correct, labelled = classifier_hits(classifier(x), labels)
    assert labelled.tolist() == [4, 8, 8]
    logits = classifier(x)
    expected = [
        int(((logit.argmax(1) == 1) & (labels[:, i] == 1)).sum()) for i, logit in enumerate(logits)
    ]
    assert correct.tolist() == expected


def test_context_means_loss_by_hand() -> None:
    # moved to (1, 1): values 2 and 4 (mean 3); real (1, 1): 1 -> distance 4, weight 2.
    # moved to (2, 1): 10 has no real counterpart; real (2, 2): 5 has no moved cell: both ignored.
    moved = torch.tensor([[2.0, 0.0], [4.0, 0.0], [10.0, 0.0]])
    target = torch.tensor([[1, 1], [1, 1], [2, 1]])
    x = torch.tensor([[1.0, 0.0], [5.0, 0.0], [7.0, 7.0]])
    source = torch.tensor([[1, 1], [2, 2], [2, 2]])
    # (3 - 1)^2 on gene 0, 0 on gene 1: mean over genes 2
    assert context_means_loss(moved, target, BatchMeans(x, source)).item() == pytest.approx(2.0)
    assert context_means_loss(moved[2:], target[2:], BatchMeans(x, source)).item() == 0.0


def test_context_means_of_the_data_average_every_combination_over_batches() -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = torch.tensor([3, 4])
    x = torch.rand(40, 6, generator=generator)
    source = torch.stack([torch.randint(0, k, (40,), generator=generator) for k in (3, 4)], 1)
    batches = [(x[i : i + 7], source[i : i + 7]) for i in range(0, 40, 7)]
    means = ContextMeans.accumulate(batches, sizes, n_genes=6)
    pairs = sorted({tuple(row) for row in source.tolist()})
    assert means.codes.tolist() == sorted(a + 3 * b for a, b in pairs)
    assert ContextMeans.table_bytes(sizes, 6) == 3 * 4 * 6 * 4
    for code, mean, count in zip(means.codes.tolist(), means.means, means.counts, strict=True):
        rows = (source[:, 0] + 3 * source[:, 1]) == code
        torch.testing.assert_close(mean, x[rows].mean(dim=0))
        assert count.item() == rows.sum().item()
    # Against the batch's own cells as the reference, the term is the batch version's.
    moved = torch.rand(40, 6, generator=generator)
    target = torch.stack([torch.randint(0, k, (40,), generator=generator) for k in (3, 4)], 1)
    batch = BatchMeans(x, source)
    torch.testing.assert_close(
        context_means_loss(moved, target, means), context_means_loss(moved, target, batch)
    )
    one = ContextMeans.accumulate([(x[:1], torch.tensor([[1, 2]]))], sizes, n_genes=6)
    unseen = torch.tensor([[2, 3]])  # no such training cells
    assert context_means_loss(moved[:1], unseen, one).item() == 0.0
    assert context_means_loss(moved[:1], torch.tensor([[1, 2]]), one).item() > 0.0
    with pytest.raises(ValueError, match="no training cells"):
        ContextMeans.accumulate([], sizes, n_genes=6)


def test_one_field_moves_change_one_field_per_cell() -> None:
    source = torch.tensor([[1, 1], [1, 1], [2, 2], [2, 2]])
    target = torch.tensor([[3, 3], [3, 3], [4, 4], [4, 4]])
    assert one_field_moves(source, target).tolist() == [[3, 1], [1, 3], [4, 2], [2, 4]]
