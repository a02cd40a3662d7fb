"""The count likelihood: a negative binomial whose log mean is the heads' sum (scVI's model).

With ``likelihood = "nb"`` the sum of the heads ``eta`` (B, G) is a log mean up to a per-cell
constant: ``log_rate = log_softmax(eta)`` is each gene's log share of the cell's counts, and a
cell of library size ``l`` (its total counts) has the mean ``mu = l * exp(log_rate)``, as scVI
decodes with the observed library size. Counts are negative binomial with that mean and a per-gene
inverse dispersion ``theta = exp(log_theta)`` (variance ``mu + mu^2 / theta``).

Both likelihoods share one model space, log1p of counts per 10,000 (``log1p_cp10k``): the NB
model's mean there is :func:`expression` of its log rate, so evaluation, the classifier and the
cycle's second pass read the same units either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from cae.types import CP10K

WHOLE = 1e-3
"""How close to a whole number a mean count is taken as that number (:func:`round_counts`)."""

__all__ = [
    "WHOLE",
    "counts_from_expression",
    "expression",
    "median_ratio",
    "nb_nll",
    "round_counts",
    "round_log_counts",
    "sample_counts",
]


def expression(log_rate: torch.Tensor) -> torch.Tensor:
    """(B, G) log shares of a cell's counts -> (B, G) the mean in model space,
    ``log1p(CP10K * exp(log_rate))``."""
    return torch.log1p(CP10K * torch.exp(log_rate))


def counts_from_expression(x: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
    """Undo ``log1p_cp10k``: (B, G) model-space values and (B, 1) library sizes -> (B, G) counts
    (exact up to float rounding for cells that were counts)."""
    return torch.expm1(x).clamp_min(0.0) * (library / CP10K)


def nb_nll(
    counts: torch.Tensor, log_rate: torch.Tensor, library: torch.Tensor, log_theta: torch.Tensor
) -> torch.Tensor:
    """The negative binomial's negative log likelihood, averaged over cells and genes.

    Args:
        counts: (B, G) observed counts (need not be whole numbers).
        log_rate: (B, G) log share of the cell's counts per gene (rows log-sum-exp to 0).
        library: (B, 1) library sizes (total counts), > 0.
        log_theta: (G,) log inverse dispersion per gene.

    Returns:
        A scalar: ``-mean log NB(counts; mu = library * exp(log_rate), theta)``.
    """
    log_mu = log_rate + torch.log(library)
    log_theta = log_theta.to(log_mu.dtype)
    theta = torch.exp(log_theta)
    log_theta_mu = torch.logaddexp(log_theta, log_mu)  # log(theta + mu), stable
    log_likelihood = (
        theta * (log_theta - log_theta_mu)
        + counts * (log_mu - log_theta_mu)
        + torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1.0)
    )
    return -log_likelihood.mean()


def sample_counts(
    x: torch.Tensor, library: torch.Tensor, log_theta: torch.Tensor, seed: int
) -> torch.Tensor:
    """Draw counts around model-space means from the negative binomial.

    Args:
        x: (B, G) model-space means (log1p counts per 10,000), e.g. counterfactuals.
        library: (B, 1) library sizes of the cells to draw (> 0).
        log_theta: (G,) log inverse dispersion per gene.
        seed: the draws' seed (the same seed, means and sizes give the same counts; torch's
            global random state is left as it was).

    Returns:
        (B, G) float32 whole counts; gene g of cell b has mean ``library_b`` times ``x_b``'s share
        of gene g, ``expm1(x_bg) / sum_g expm1(x_bg)``.
    """
    rate = torch.expm1(x.float()).clamp_min(0.0)
    share = rate / rate.sum(dim=1, keepdim=True).clamp_min(1e-30)
    log_mu = torch.log(share * library.float())  # -inf where the share is 0: no counts
    theta = torch.exp(log_theta.float()).expand_as(log_mu)
    distribution = torch.distributions.NegativeBinomial(theta, logits=log_mu - theta.log())
    with _seeded(seed, x.device):
        return distribution.sample()


def round_counts(mean: torch.Tensor, seed: int) -> torch.Tensor:
    """Whole counts with the given means and the least added noise (stochastic rounding):
    ``floor(m) + Bernoulli(m - floor(m))``, so a whole mean comes back unchanged.

    A mean within :data:`WHOLE` of a whole number is that number (counts that went through
    ``log1p_cp10k`` and back carry float rounding), so it too comes back unchanged.

    Args:
        mean: (B, G) mean counts, >= 0 and finite.
        seed: the draws' seed (torch's global random state is left as it was).

    Returns:
        (B, G) float32 whole counts, each ``floor(m)`` or ``floor(m) + 1``, with mean ``m``.
    """
    mean = mean.float()
    nearest = torch.round(mean)
    snapped = (mean - nearest).abs() < WHOLE
    whole = torch.where(snapped, nearest, torch.floor(mean))
    with _seeded(seed, mean.device):
        up = torch.rand(mean.shape, device=mean.device) < (mean - whole)
    return whole + (up & ~snapped).float()


def round_log_counts(counts: torch.Tensor, library: torch.Tensor, seed: int) -> torch.Tensor:
    """Whole counts whose log-normalised values keep, in expectation, those of fractional counts:
    ``floor(k)`` or ``floor(k) + 1``, the upper one with the probability that makes the mean of
    ``log1p(CP10K * count / library)`` equal ``log1p(CP10K * k / library)``.

    The normal likelihood's mean is a mean of log-normalised values, not of counts: a gene that
    rises from 0 to a mean of 1.1 in model space, at 40 counts per 10,000 a count, is a count of 1
    in 30% of cells (``1.1 / log1p(40)``), where rounding its mean count (``expm1(1.1) / 40`` =
    0.05) gives one in 5%. As in :func:`round_counts`, a count within :data:`WHOLE` of a whole
    number is that number and comes back unchanged.

    Args:
        counts: (B, G) fractional counts ``k`` (``expm1(x) * library / CP10K`` of model-space
            values ``x``), >= 0 and finite.
        library: (B, 1) the depth the values are normalised at, > 0.
        seed: the draws' seed (torch's global random state is left as it was).

    Returns:
        (B, G) float32 whole counts.
    """
    k = counts.double()
    nearest = torch.round(k)
    snapped = (k - nearest).abs() < WHOLE
    low = torch.where(snapped, nearest, torch.floor(k))
    per_count = CP10K / library.double()
    value, below = torch.log1p(k * per_count), torch.log1p(low * per_count)
    chance = (value - below) / (torch.log1p((low + 1) * per_count) - below)
    with _seeded(seed, k.device):
        up = torch.rand(k.shape, device=k.device, dtype=torch.float64) < chance
    return (low + (up & ~snapped).double()).float()


def median_ratio(moved: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """How much a move changed each cell's typical gene: the median, over the genes the cell
    expresses, of moved over observed counts (DESeq2's median-of-ratios size factor).

    Args:
        moved: (B, G) mean counts of the moved cells.
        counts: (B, G) the cells' observed counts.

    Returns:
        (B, 1) float32 factors; 1 for a cell with no expressed gene or a median that is not > 0.
    """
    ratio = moved.float() / counts.float()
    ratio = torch.where(counts > 0, ratio, torch.full_like(ratio, float("nan")))
    median = torch.nanmedian(ratio, dim=1, keepdim=True).values
    return torch.where(median > 0, median, torch.ones_like(median))


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draw from torch's generator seeded with ``seed``, restoring its state after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
