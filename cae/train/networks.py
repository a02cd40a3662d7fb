"""The networks of a model: built for inference, or for training with the handles a training
step and an evaluation call (several processes, compilation, the weights' moving average)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cae.config import Settings
from cae.errors import ConfigError
from cae.model.cae import CAE
from cae.model.classifier import ContextClassifier
from cae.train.distributed import Ranks
from cae.train.passes import FusedPasses


def build_networks(
    settings: Settings, n_genes: int, sizes: dict[str, int]
) -> tuple[CAE, ContextClassifier]:
    """Create the autoencoder and classifier for these settings, genes and vocabulary sizes."""
    model = CAE(
        n_genes,
        settings.model.latent_dim,
        sizes,
        settings.model.logit_scale,
        settings.model.context_offsets,
        settings.model.nonnegative,
        settings.model.likelihood,
    )
    classifier = ContextClassifier(n_genes, settings.model.classifier_hidden, sizes)
    return model, classifier


@dataclass
class Networks:
    """One training's networks and what each part of training calls.

    The optimisers update ``model`` and ``classifier``; training steps call ``train_passes`` (the
    model's :class:`~cae.train.passes.FusedPasses`) and ``train_classifier``, wrapped for several
    processes and compiled when asked; evaluation and checkpoints for inference use
    ``eval_model``.
    """

    model: CAE
    classifier: ContextClassifier
    train_passes: nn.Module
    train_classifier: nn.Module
    averaged: AveragedModel | None  # the moving average of the weights (train.ema), else None

    @property
    def eval_model(self) -> CAE:
        """The averaged weights (train.ema) or the weights themselves."""
        return self.model if self.averaged is None else cast(CAE, self.averaged.module)


def ema_rate(decay: float, steps: int) -> float:
    """The decay of the moving average's update after ``steps`` updates: ``decay``, but at most
    ``(1 + steps) / (10 + steps)`` (TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates``), so that a short training's average is of its recent weights rather than of
    its first ones (at ``decay`` 0.99 the first step's weights would keep 0.99^n of the average
    after n steps; with the ramp the average covers about the last tenth of the steps until
    ``decay`` is reached, after about 900 steps at 0.99)."""
    return min(decay, (1 + steps) / (10 + steps))


Tensors = list[torch.Tensor] | tuple[torch.Tensor, ...]


def ema_with_warmup(decay: float) -> Callable[[Tensors, Tensors, torch.Tensor | int], None]:
    """``AveragedModel``'s ``multi_avg_fn`` for an exponential moving average of the weights with
    the decay of :func:`ema_rate` (the update number is ``AveragedModel``'s own ``n_averaged``,
    which the checkpoint keeps, so a resumed training averages exactly as an unbroken one)."""

    @torch.no_grad()
    def update(averaged: Tensors, current: Tensors, n: torch.Tensor | int) -> None:
        weight = 1.0 - ema_rate(decay, int(n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:  # integer buffers (counts, indices) are not averaged: the model's are kept
            for mine, theirs in zip(averaged, current, strict=True):
                mine.copy_(theirs)

    return update


def training_networks(
    settings: Settings, n_genes: int, sizes: dict[str, int], device: torch.device, ranks: Ranks
) -> Networks:
    """Build the networks of a training on ``device``: context maps as ``train.context_maps``
    asks, DistributedDataParallel over several ``ranks``, ``train.compile``, ``train.ema``.

    Raises:
        ConfigError: the networks do not fit in memory (the message names the settings to lower).
    """
    try:
        model, classifier = build_networks(settings, n_genes, sizes)
    except (MemoryError, RuntimeError) as err:  # torch says "can't allocate memory"
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        raise ConfigError(
            f"the networks for {n_genes:,} genes do not fit in memory with model.latent_dim = "
            f"{settings.model.latent_dim} and model.classifier_hidden = "
            f"{settings.model.classifier_hidden}; lower them (--latent-dim)"
        ) from None
    model.to(device)
    classifier.to(device)
    train = settings.train
    method = train.context_maps
    if method == "auto" and train.compile:
        method = "gather"  # static shapes, no host sync: what the compiler wants
    # Sparse map gradients need no reduction across ranks, which DDP does only for dense ones.
    model.configure_context_maps(method, sparse_grad=not ranks.enabled)
    train_passes: nn.Module = FusedPasses(model)
    train_classifier: nn.Module = classifier
    if ranks.enabled:  # DDP averages the gradients of the processes
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        train_passes = DistributedDataParallel(train_passes, device_ids=ids)
        train_classifier = DistributedDataParallel(classifier, device_ids=ids)
    if train.compile:
        # compiling a Module gives a Module (an OptimizedModule); the stubs say only Callable
        train_passes = cast(nn.Module, torch.compile(train_passes))
    averaged = None
    if train.ema > 0:
        averaged = AveragedModel(model, multi_avg_fn=ema_with_warmup(train.ema), use_buffers=True)
    return Networks(model, classifier, train_passes, train_classifier, averaged)
