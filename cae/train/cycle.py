"""One cycle-training step's pieces: target sampling, the loss terms, and the step itself (the
passes they read: :mod:`cae.train.passes`).

For each mini-batch every enabled field of every cell gets a target category, drawn uniformly from
the field's other known categories (``<unk>`` is never a target). Cycle 1 maps ``(x, source ->
target)``, cycle 2 maps the result back ``(x_hat, target -> source)``. Losses:

* reconstruction: cycle-2 output vs ``x`` (mean squared error; with ``model.likelihood = "nb"``
  the negative binomial's negative log likelihood of the counts, :mod:`cae.model.likelihood`);
* integration: every head's latent in cycle 1 vs cycle 2 (the cell's identity survives the trip);
* target consistency: the frozen classifier should read cycle-1 output as the targets;
* self reconstruction (an extension of the seed's design, weight 0 restores it): ``(x, source ->
  source)`` vs ``x``, scored as the reconstruction is;
* parsimony (an extension, weight 0 restores the seed): the mean squared output of the field heads
  in the self pass, so that what the base head can explain stays there and each field's
  contribution measures what only that field explains;
* context means (an extension, off by default): every cell is moved in one field
  (:func:`one_field_moves`); for every context combination the moved cells' targets take, the
  squared distance between the mean of the cells moved there (``model.counterfactual``, decoded or
  residual) and the mean of the real cells of that combination: the real cells of the batch
  (``train.context_means_reference = "batch"``, the combinations both sides have), or all real
  training cells (``"data"``: :class:`ContextMeans`, computed once before training; exact, where a
  batch has a few cells per combination). It ties the size of a counterfactual shift to real cells
  of the target context (the cycle and classifier terms only ask for its direction). Costs one
  more pass (decoding cycle 1's encoding once more, in :class:`~cae.train.passes.FusedPasses`)
  and one host sync (``torch.unique``) per step when on;
* below zero (an extension, weight 0 restores the seed): the mean square of the negative part of the
  decoded counterfactual passes (cycle 1, and the moved pass when there is one). Expression is
  never negative, but field heads of either sign can decode it so, and the classifier reads a gene
  pushed below 0 as a stronger target context: without it the decoded target pass of Kang's
  preset is negative in half its entries, and a residual counterfactual (which subtracts the
  source pass) moves such genes far below what the cells hold, erasing the cells that express
  them (``docs/decisions.md``);
* the classifier's own supervised loss on real cells (a separate optimiser).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cae.config import LossWeights
from cae.data.vocabulary import UNK_INDEX
from cae.model.cae import CAE
from cae.model.classifier import ContextClassifier
from cae.model.likelihood import counts_from_expression, nb_nll
from cae.train.passes import CyclePasses, FusedPasses


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
    below_zero: torch.Tensor
    passes: CyclePasses  # the outputs behind them

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
            "below_zero": self.below_zero,
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
    moved: torch.Tensor, target: torch.Tensor, reference: ContextMeans | BatchMeans
) -> torch.Tensor:
    """Distance between moved cells and real cells of the same full context combination.

    Args:
        moved: (B, G) cells moved to ``target``.
        target: (B, F) their target categories.
        reference: the real cells: all training cells' means (:class:`ContextMeans`) or the
            cells of the batch (:class:`BatchMeans`).

    Returns:
        The mean over genes of ``(mean moved - mean real)^2`` per target combination that real
        cells have, averaged with the moved cells' counts as weights; 0 when no combination
        matches.
    """
    groups, real_means, known = reference.lookup(target)
    n_groups = len(known)
    counts = torch.bincount(groups, minlength=n_groups)  # (groups,) moved cells
    sums = moved.new_zeros(n_groups, moved.shape[1]).index_add_(0, groups, moved)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    distance = (means - real_means.to(moved.dtype)).square().mean(dim=1)  # (groups,)
    weight = counts * known
    return (distance * weight).sum() / weight.sum().clamp_min(1)


@dataclass
class BatchMeans:
    """The real cells of one batch as the context-means reference
    (``train.context_means_reference = "batch"``): the combinations both sides have."""

    x: torch.Tensor  # (B, G) real cells
    source: torch.Tensor  # (B, F) their categories

    def lookup(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The combinations of ``target`` (B, F) and the real cells together: each target's
        group (B,), every group's mean of the real cells (groups, G), and whether real cells
        are in it (groups,)."""
        x, n = self.x, target.shape[0]
        keys, inverse = torch.unique(torch.cat([target, self.source]), dim=0, return_inverse=True)
        sums = x.new_zeros(keys.shape[0], x.shape[1]).index_add_(0, inverse[n:], x)
        counts = x.new_zeros(keys.shape[0]).index_add_(0, inverse[n:], x.new_ones(x.shape[0]))
        return inverse[:n], sums / counts.clamp_min(1).unsqueeze(1), counts > 0


def _combination_codes(contexts: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """(B, F) contexts, (F,) strides -> (B,) int64 codes ``sum_f index_f * stride_f``."""
    return (contexts * strides.to(contexts.device)).sum(dim=1)


@dataclass
class ContextMeans:
    """The mean expression of the real cells of every context combination seen in training.

    A combination (one category per field) is coded as one int64, ``sum_f index_f * stride_f``
    with strides the cumulative products of the fields' sizes.
    """

    codes: torch.Tensor  # (C,) sorted distinct combination codes
    means: torch.Tensor  # (C, G) mean model-space expression of each combination's cells
    counts: torch.Tensor  # (C,) cells of each combination
    strides: torch.Tensor  # (F,) int64

    @staticmethod
    def strides_for(sizes: torch.Tensor) -> torch.Tensor:
        """(F,) categories per field -> (F,) the strides of the combination codes."""
        return torch.cumprod(torch.cat([sizes.new_ones(1), sizes[:-1]]), 0)

    def code(self, contexts: torch.Tensor) -> torch.Tensor:
        """(B, F) contexts -> (B,) their combination codes."""
        return _combination_codes(contexts, self.strides)

    @classmethod
    def accumulate(
        cls, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], sizes: torch.Tensor, n_genes: int
    ) -> ContextMeans:
        """Average the cells of every combination over ``(x (B, G), contexts (B, F))`` batches,
        in a table over every possible combination (see :meth:`table_bytes`).

        Raises:
            ValueError: no batch had a cell.
        """
        strides = cls.strides_for(sizes)
        n_codes = int(torch.prod(sizes))
        sums = counts = None
        for x, contexts in batches:
            if sums is None or counts is None:
                sums = x.new_zeros(n_codes, n_genes, dtype=torch.float32)
                counts = x.new_zeros(n_codes, dtype=torch.float32)
            codes = _combination_codes(contexts, strides)
            sums.index_add_(0, codes, x.float())
            counts.index_add_(0, codes, counts.new_ones(len(codes)))
        if sums is None or counts is None or not bool((counts > 0).any()):
            raise ValueError("no training cells to average")
        present = torch.nonzero(counts).squeeze(1)  # sorted codes
        means = sums[present] / counts[present].unsqueeze(1)
        return cls(present, means, counts[present], strides)

    @staticmethod
    def table_bytes(sizes: torch.Tensor, n_genes: int) -> int:
        """Bytes of :meth:`accumulate`'s table: every combination of the fields' categories
        times the genes, float32."""
        return int(torch.prod(sizes)) * n_genes * 4

    def lookup(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The combinations of ``target`` (B, F): each cell's group (B,), every group's mean
        (groups, G), and whether training cells have that combination (groups,)."""
        groups, inverse = torch.unique(self.code(target), return_inverse=True)
        position = torch.searchsorted(self.codes, groups).clamp_max(len(self.codes) - 1)
        known = self.codes[position] == groups
        return inverse, self.means[position], known


def moved_contexts(
    source: torch.Tensor, target: torch.Tensor, weights: LossWeights
) -> torch.Tensor | None:
    """The targets of the context-means term's moved pass (:func:`one_field_moves`), or None when
    the term is off."""
    return one_field_moves(source, target) if weights.context_means > 0 else None


def generator_losses(
    passes: CyclePasses,
    classifier: nn.Module,
    x: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights,
    residual: bool = False,
    reference: ContextMeans | None = None,
    library: torch.Tensor | None = None,
) -> GeneratorLosses:
    """Weigh the autoencoder's loss terms of one batch's passes (reconstructions by mean squared
    error, or with the count likelihood by :func:`cae.model.likelihood.nb_nll` of the counts).

    The classifier's parameters must be frozen by the caller (``requires_grad_(False)``): its
    output steers the autoencoder but it does not learn from generated cells.

    Args:
        passes: the batch's :class:`~cae.train.passes.CyclePasses`, with the moved pass of
            :func:`moved_contexts` when ``weights.context_means`` > 0.
        classifier: the (frozen) context classifier, or a wrapper that calls it.
        x: (B, G) model-space expression.
        source: (B, F) source categories.
        target: (B, F) target categories from :func:`sample_targets`.
        weights: the loss weights.
        residual: counterfactuals are residual (``model.counterfactual``; context-means term).
        reference: the training cells' combination means for the context-means term; None
            compares with the real cells of the batch.
        library: (B, 1) the cells' total counts, needed with the count likelihood.

    Returns:
        The :class:`GeneratorLosses`; ``total`` is what to back-propagate.
    """
    reconstruction, self_reconstruction = _reconstruction(passes, x, library)
    integration = torch.stack(
        [F.mse_loss(h2, h1) for h1, h2 in zip(passes.latents1, passes.latents2, strict=True)]
    ).mean()  # every head's latent in cycle 1 vs cycle 2
    target_loss = _target_consistency(classifier(passes.cycle1), target, x)
    heads = list(passes.squares.values())
    parsimony = torch.stack(heads).sum() if heads else x.new_zeros(())
    decoded = [passes.cycle1] if passes.moved is None else [passes.cycle1, passes.moved]
    below_zero = torch.stack([d.clamp_max(0.0).square().mean() for d in decoded]).mean()
    context_means = x.new_zeros(())
    if passes.moved is not None:
        moved = passes.moved
        if residual:  # the cell plus the change of the moved field's term, clamped at 0
            moved = (x + moved - passes.own).clamp_min(0.0)
        real = BatchMeans(x, source) if reference is None else reference
        context_means = context_means_loss(moved, one_field_moves(source, target), real)
    total = (
        weights.reconstruction * reconstruction
        + weights.integration * integration
        + weights.target * target_loss
        + weights.self_reconstruction * self_reconstruction
        + weights.parsimony * parsimony
        + weights.context_means * context_means
        + weights.below_zero * below_zero
    )
    return GeneratorLosses(
        total, reconstruction, integration, target_loss, self_reconstruction, parsimony,
        context_means, below_zero, passes,
    )  # fmt: skip


def _reconstruction(
    passes: CyclePasses, x: torch.Tensor, library: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cycle 2's and the self pass's reconstruction loss: mean squared error, or the negative
    binomial's with the count likelihood.

    Raises:
        ValueError: the passes are of a count model and ``library`` is None.
    """
    if passes.cycle2_log_rate is None or passes.own_log_rate is None or passes.log_theta is None:
        return F.mse_loss(passes.cycle2, x), F.mse_loss(passes.own, x)
    if library is None:
        raise ValueError("the count likelihood needs the cells' library sizes")
    counts = counts_from_expression(x.float(), library)
    return (
        nb_nll(counts, passes.cycle2_log_rate, library, passes.log_theta),
        nb_nll(counts, passes.own_log_rate, library, passes.log_theta),
    )


def _target_consistency(
    logits: list[torch.Tensor], target: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """The mean over fields of the cross-entropy of the classifier's reading of cycle 1's output
    (one (B, K_f) logits tensor per field) against the (B, F) targets; 0 without fields."""
    terms = [F.cross_entropy(logit, target[:, i]) for i, logit in enumerate(logits)]
    return torch.stack(terms).mean() if terms else x.new_zeros(())


def classifier_loss(logits: list[torch.Tensor], source: torch.Tensor) -> torch.Tensor:
    """The classifier's supervised loss on real cells, ignoring ``<unk>`` labels.

    Args:
        logits: the classifier's output on the real cells, one (B, K_f) tensor per field.
        source: (B, F) true categories.

    Returns:
        The mean over fields of the cross-entropy over known labels (0, not NaN, for a field
        with no known label in the batch; no host sync).
    """
    terms = []
    for i, logit in enumerate(logits):
        labels = source[:, i]
        ce = F.cross_entropy(logit, labels, ignore_index=UNK_INDEX, reduction="sum")
        terms.append(ce / (labels != UNK_INDEX).sum().clamp_min(1))
    return torch.stack(terms).mean()


def classifier_hits(
    logits: list[torch.Tensor], source: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per field (F,), the cells the classifier labels correctly and the cells with a known
    label (accuracy = correct / labelled; kept as counts so that epochs average exactly).

    Args:
        logits: the classifier's output, one (B, K_f) tensor per field.
        source: (B, F) true categories.

    Returns:
        ``(correct, labelled)``.
    """
    correct, labelled = [], []
    for i, logit in enumerate(logits):
        labels = source[:, i]
        known = labels != UNK_INDEX
        correct.append(((logit.argmax(dim=1) == labels) & known).sum())
        labelled.append(known.sum())
    return torch.stack(correct), torch.stack(labelled)


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
    passes: nn.Module | None = None,
    forward_classifier: nn.Module | None = None,
    autocast: AbstractContextManager | None = None,
    residual: bool = False,
    reference: ContextMeans | None = None,
    library: torch.Tensor | None = None,
) -> tuple[GeneratorLosses, torch.Tensor]:
    """One training step: the autoencoder's update against the frozen classifier, the projection
    of its weights to >= 0 (``CAE.project_nonnegative``), then the classifier's own update on the
    real cells.

    Nothing is read back to the host: the returned losses stay on the device.

    Args:
        model, classifier: the networks (their parameters are updated).
        optimizer: the autoencoder's optimiser; a :class:`cae.train.optim.ContextAdam` reports the
            context-map rows it moved, and only those are projected.
        classifier_optimizer: the classifier's optimiser.
        x: (B, G) model-space expression.
        source, target: (B, F) categories; targets from :func:`sample_targets`.
        weights: the loss weights.
        passes: what computes the step's passes: ``FusedPasses(model)`` (default) or it wrapped.
        forward_classifier: the classifier wrapped (DistributedDataParallel), or None.
        autocast: the autocast context of the forward passes (none by default).
        residual, reference, library: as for :func:`generator_losses`.

    Returns:
        ``(losses, classifier_loss)``.
    """
    autocast = autocast or nullcontext()
    passes = FusedPasses(model) if passes is None else passes
    forward_classifier = classifier if forward_classifier is None else forward_classifier
    classifier.requires_grad_(False)
    with autocast:
        outputs = passes(x, source, target, moved_contexts(source, target, weights))
        losses = generator_losses(
            outputs, classifier, x, source, target, weights, residual, reference, library
        )
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    optimizer.step()
    model.project_nonnegative(getattr(optimizer, "updated_rows", None))
    classifier.requires_grad_(True)

    with autocast:
        c_loss = classifier_loss(forward_classifier(x), source)
    classifier_optimizer.zero_grad(set_to_none=True)
    (weights.classifier * c_loss).backward()
    classifier_optimizer.step()
    return losses, c_loss
