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
