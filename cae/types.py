"""The choices of settings that the model and the settings both name.

The lowest layer beside :mod:`cae.errors`: ``cae/model`` types its arguments with these and
``cae/config`` validates the settings against the same lists, so a choice is added in one place.
"""

from __future__ import annotations

from typing import Literal

# How per-category context maps are applied to a batch (see cae.model.context_maps).
ContextMapMethod = Literal["auto", "grouped", "gather"]

# Which parameters are kept >= 0: "all" (the seed's design) or "base" (signed field heads).
Nonnegative = Literal["all", "base"]

# The likelihood of the model's reconstruction (cae.model.likelihood): "nb", a negative binomial
# of the raw counts with the heads' sum as its log mean (scVI's), or "normal", the mean squared
# error of the log-normalised values (the seed's design).
Likelihood = Literal["nb", "normal"]

# How the learning rates change over the epochs (cae.train.optim.scheduled_lr).
LRSchedule = Literal["constant", "cosine"]

# Counts per cell that log1p_cp10k normalises to: log1p(counts / total * CP10K). The model-space
# unit of both likelihoods' outputs, so data and model share it.
CP10K = 1e4
