"""One cycle-training step's pieces: target sampling and the loss terms.

For each mini-batch every enabled field of every cell gets a target category, drawn uniformly from
the field's other known categories (``<unk>`` is never a target). Cycle 1 maps ``(x, source ->
target)``, cycle 2 maps the result back ``(x_hat, target -> source)``. Losses:

* reconstruction: cycle-2 output vs ``x``;
* integration: every head's latent in cycle 1 vs cycle 2 (the cell's identity survives the trip);
* target consistency: the frozen classifier should read cycle-1 output as the targets;
* self reconstruction (an extension of the seed's design, weight 0 restores it): ``(x, source ->
  source)`` vs ``x``;
* parsimony (an extension, weight 0 restores the seed): the mean squared output of the field heads
  in the self pass, so that what the base head can explain stays there and each field's
  contribution measures what only that field explains;
* context means (an extension, off by default): every cell is moved in one field
  (:func:`one_field_moves`); for every context combination that both a moved cell's targets and a
  real cell's source take in the batch, the squared distance between the mean of the cells moved
  there (``model.counterfactual``, decoded or residual) and the mean of the real cells there. It
  ties the size of a counterfactual shift to real cells of the target context (the cycle and
  classifier terms only ask for its direction). Costs a forward pass and one host sync
  (``torch.unique``) per step when on;
* the classifier's own supervised loss on real cells (a separate optimiser).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cae.config import LossWeights
from cae.data.vocabulary import UNK_INDEX
from cae.model.cae import CAE, CAEOutput
from cae.model.classifier import ContextClassifier


@dataclass
class GeneratorLosses:
    """The autoencoder's loss terms for one batch (scalar tensors) and the outputs behind them."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    integration: torch.Tensor
    target: torch.Tensor
    self_reconstruction: torch.Tensor
    parsimony: torch.Tensor
    context_means: torch.Tensor
    cycle1: CAEOutput
    own: CAEOutput  # the cell in its own context: (x, source -> source)

    def terms(self) -> dict[str, torch.Tensor]:
        """The named terms, for logging."""
        return {
            "loss": self.total,
            "reconstruction": self.reconstruction,
            "integration": self.integration,
            "target": self.target,
            "self_reconstruction": self.self_reconstruction,
            "parsimony": self.parsimony,
            "context_means": self.context_means,
        }


def sample_targets(
    source: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Draw a target category for every field of every cell, uniform over the other known ones.

    Args:
        source: (B, F) int64 source categories, 0 = ``<unk>``.
        sizes: (F,) int64 categories per field including ``<unk>`` (each field has >= 2 known).
        generator: a CPU generator (draws happen on the CPU so that runs are reproducible on any
            device).

    Returns:
        (B, F) int64 targets in ``1..K_f-1``, never equal to a known source.
    """
    source_cpu = source.cpu()
    known = (sizes - 1).unsqueeze(0)  # (1, F) known categories per field
    unknown_source = source_cpu == UNK_INDEX  # (B, F)
    choices = torch.where(unknown_source, known, known - 1)  # (B, F) categories to choose from
    draw = (torch.rand(source_cpu.shape, generator=generator) * choices).long()  # (B, F)
    target = draw + 1  # skip <unk>
    # Skip over the source category itself: values at or above it shift up by one.
    target = torch.where(~unknown_source & (target >= source_cpu), target + 1, target)
    return target.to(source.device)


def one_field_moves(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targets that move one field per cell: cell ``b`` takes ``target``'s value of field
    ``b mod F`` and keeps its source values elsewhere (batches are shuffled, so every field is
    moved for a share of the cells). Its real counterparts then differ from it in that field
    only."""
    column = torch.arange(source.shape[0], device=source.device) % source.shape[1]
    single = source.clone()
    rows = torch.arange(source.shape[0], device=source.device)
    single[rows, column] = target[rows, column]
    return single


def context_means_loss(
    moved: torch.Tensor, target: torch.Tensor, x: torch.Tensor, source: torch.Tensor
) -> torch.Tensor:
    """Distance between moved cells and real cells of the same full context combination.

    Args:
        moved: (B, G) cells moved to ``target``.
        target: (B, F) their target categories.
        x: (B, G) real cells.
        source: (B, F) their categories.

    Returns:
        The mean over genes of ``(mean moved - mean real)^2`` per combination present on both
        sides, averaged with the moved cells' counts as weights; 0 when no combination matches.
    """
    keys, inverse = torch.unique(torch.cat([target, source]), dim=0, return_inverse=True)
    n_groups, n = keys.shape[0], moved.shape[0]
    sums = moved.new_zeros(2, n_groups, moved.shape[1])
    counts = moved.new_zeros(2, n_groups)
    sums[0].index_add_(0, inverse[:n], moved)
    sums[1].index_add_(0, inverse[n:], x)
    counts[0].index_add_(0, inverse[:n], moved.new_ones(n))
    counts[1].index_add_(0, inverse[n:], x.new_ones(x.shape[0]))
    both = (counts > 0).all(dim=0)  # (groups,) present on both sides
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    distance = (means[0] - means[1]).square().mean(dim=1)  # (groups,)
    weight = counts[0] * both
    return (distance * weight).sum() / weight.sum().clamp_min(1)


def generator_losses(
    model: CAE,
    classifier: ContextClassifier,
    x: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights,
    residual: bool = False,
) -> GeneratorLosses:
    """Run both cycles (and the self pass) and weigh the autoencoder's loss terms.

    The classifier's parameters must be frozen by the caller (``requires_grad_(False)``): its
    output steers the autoencoder but it does not learn from generated cells.

    Args:
        model: the autoencoder (or a wrapper that calls it: DistributedDataParallel, compiled).
        classifier: the (frozen) context classifier.
        x: (B, G) model-space expression.
        source: (B, F) source categories.
        target: (B, F) target categories from :func:`sample_targets`.
        weights: the loss weights.
        residual: counterfactuals are residual (``model.counterfactual``): the context-means
            term compares ``x + cycle 1 - self pass`` with the real cells.

    Returns:
        The :class:`GeneratorLosses`; ``total`` is what to back-propagate.
    """
    # Cycle 1 and the self pass share one encoding of x (the same numbers as two passes).
    cycle1 = model(x, source, target, and_source=True)
    own = cycle1.own
    assert own is not None
    cycle2 = model(cycle1.output, target, source)
    reconstruction = F.mse_loss(cycle2.output, x)
    latents = [F.mse_loss(cycle2.base_hidden, cycle1.base_hidden)]
    latents += [F.mse_loss(cycle2.field_hidden[f], h) for f, h in cycle1.field_hidden.items()]
    integration = torch.stack(latents).mean()
    logits = classifier(cycle1.output)
    target_terms = [F.cross_entropy(logit, target[:, i]) for i, logit in enumerate(logits)]
    target_loss = torch.stack(target_terms).mean() if target_terms else x.new_zeros(())
    self_reconstruction = F.mse_loss(own.output, x)
    heads = [values.square().mean() for values in own.fields.values()]
    parsimony = torch.stack(heads).sum() if heads else x.new_zeros(())
    context_means = x.new_zeros(())
    if weights.context_means > 0:
        single = one_field_moves(source, target)
        moved = model(x, source, single).output  # a plain call: model may be a DDP wrapper
        if residual:
            moved = (x + moved - own.output).clamp_min(0.0)
        context_means = context_means_loss(moved, single, x, source)
    total = (
        weights.reconstruction * reconstruction
        + weights.integration * integration
        + weights.target * target_loss
        + weights.self_reconstruction * self_reconstruction
        + weights.parsimony * parsimony
        + weights.context_means * context_means
    )
    return GeneratorLosses(
        total, reconstruction, integration, target_loss, self_reconstruction, parsimony,
        context_means, cycle1, own,
    )  # fmt: skip


def classifier_loss(
    classifier: ContextClassifier, x: torch.Tensor, source: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The classifier's supervised loss on real cells, ignoring ``<unk>`` labels.

    Args:
        classifier: the context classifier (trainable).
        x: (B, G) real model-space expression.
        source: (B, F) true categories.

    Returns:
        ``(loss, correct, labelled)``: the mean cross-entropy over fields, and per field (F,) the
        count of correctly classified cells and of cells with a known label (accuracy =
        correct / labelled; kept as counts so that epochs average exactly).
    """
    logits = classifier(x)
    terms, correct, labelled = [], [], []
    for i, logit in enumerate(logits):
        labels = source[:, i]
        known = labels != UNK_INDEX
        # A sum over known labels divided by their count: no host sync, and 0 (not NaN) when a
        # batch has no known label for a field.
        ce = F.cross_entropy(logit, labels, ignore_index=UNK_INDEX, reduction="sum")
        terms.append(ce / known.sum().clamp_min(1))
        correct.append(((logit.argmax(dim=1) == labels) & known).sum())
        labelled.append(known.sum())
    return torch.stack(terms).mean(), torch.stack(correct), torch.stack(labelled)


def training_step(
    model: CAE,
    classifier: ContextClassifier,
    optimizer: torch.optim.Optimizer,
    classifier_optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights,
    *,
    forward_model: nn.Module | None = None,
    forward_classifier: nn.Module | None = None,
    autocast: AbstractContextManager | None = None,
    residual: bool = False,
) -> tuple[GeneratorLosses, torch.Tensor]:
    """One training step: the autoencoder's update against the frozen classifier, the projection
    to non-negative weights, then the classifier's own update on the real cells.

    Nothing is read back to the host: the returned losses stay on the device.

    Args:
        model, classifier: the networks (their parameters are updated).
        optimizer: the autoencoder's optimiser; a :class:`cae.train.optim.ContextAdam` reports the
            context-map rows it moved, and only those are projected.
        classifier_optimizer: the classifier's optimiser.
        x: (B, G) model-space expression.
        source, target: (B, F) categories; targets from :func:`sample_targets`.
        weights: the loss weights.
        forward_model, forward_classifier: what to call for the forward passes when not the bare
            networks (DistributedDataParallel wrappers, a compiled model).
        autocast: the autocast context of the forward passes (none by default).
        residual: counterfactuals are residual (see :func:`generator_losses`).

    Returns:
        ``(losses, classifier_loss)``.
    """
    autocast = autocast or nullcontext()
    forward_model = model if forward_model is None else forward_model
    forward_classifier = classifier if forward_classifier is None else forward_classifier
    classifier.requires_grad_(False)
    with autocast:
        losses = generator_losses(
            forward_model, classifier, x, source, target, weights, residual=residual
        )
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    optimizer.step()
    model.project_nonnegative(getattr(optimizer, "updated_rows", None))
    classifier.requires_grad_(True)

    with autocast:
        c_loss, _, _ = classifier_loss(forward_classifier, x, source)
    classifier_optimizer.zero_grad(set_to_none=True)
    (weights.classifier * c_loss).backward()
    classifier_optimizer.step()
    return losses, c_loss
