"""Counterfactual metrics on log-normalised expression, as the field reports them (scGen, CPA).

Every function takes cells x genes arrays in the same space (log1p of counts per 10,000 for
``log1p_cp10k`` data) and returns plain floats, so each can be checked by hand on small arrays:

* :func:`r2_mean` / :func:`r2_var`: the squared Pearson correlation, over genes, of the per-gene
  mean (variance) of predicted cells against real cells (the field's "R² of mean expression");
* :func:`de_genes`: the top-k differentially expressed genes of real target vs source cells, by the
  absolute Wilcoxon rank-sum statistic (both directions);
* :func:`delta_pearson`: the Pearson correlation of the predicted shift against the real shift,
  both relative to the mean of the source cells;
* :func:`energy_distance`: the energy distance between predicted and real cells in a PCA space
  fitted on real cells (:func:`fit_pca`);
* :class:`LogisticClassifier`: an independently trained classifier whose accuracy on predicted cells
  says whether they look like the target context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from scipy.spatial.distance import cdist


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors; NaN when either is constant (undefined)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def r2_mean(predicted: np.ndarray, real: np.ndarray, genes: np.ndarray | None = None) -> float:
    """Squared Pearson correlation over genes of the mean expression of two sets of cells.

    Args:
        predicted: (n, G) predicted cells.
        real: (m, G) real cells.
        genes: optional gene indices to restrict to (e.g. :func:`de_genes`).

    Returns:
        r² in [0, 1]; NaN when a mean profile is constant.
    """
    a, b = predicted.mean(axis=0), real.mean(axis=0)
    if genes is not None:
        a, b = a[genes], b[genes]
    return _pearson(a, b) ** 2


def r2_var(predicted: np.ndarray, real: np.ndarray, genes: np.ndarray | None = None) -> float:
    """Squared Pearson correlation over genes of the per-gene variance of two sets of cells.

    Args and returns as :func:`r2_mean`.
    """
    a, b = predicted.var(axis=0), real.var(axis=0)
    if genes is not None:
        a, b = a[genes], b[genes]
    return _pearson(a, b) ** 2


def de_genes(target: np.ndarray, source: np.ndarray, k: int) -> np.ndarray:
    """The k genes that differ most between two groups of real cells (Wilcoxon rank-sum).

    Args:
        target: (n, G) cells of the target context.
        source: (m, G) cells of the source context.
        k: how many genes (all of them when k >= G).

    Returns:
        int64 gene indices, most significant first, ranked by ``|z|`` of
        ``scipy.stats.ranksums(target, source)`` (ties broken by the gene's index; genes that
        are constant in both groups come last).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        z = stats.ranksums(target, source, axis=0).statistic
    score = np.nan_to_num(np.abs(np.asarray(z, dtype=np.float64)), nan=-1.0)
    order = np.lexsort((np.arange(score.size), -score))
    return order[: min(k, score.size)].astype(np.int64)


def delta_pearson(
    predicted: np.ndarray, source: np.ndarray, real: np.ndarray, genes: np.ndarray | None = None
) -> float:
    """Pearson correlation of the predicted shift and the real shift of the mean profile.

    Args:
        predicted: (n, G) predicted target cells.
        source: (m, G) source cells the prediction started from.
        real: (r, G) real target cells.
        genes: optional gene indices to restrict to.

    Returns:
        Pearson r of ``mean(predicted) - mean(source)`` against ``mean(real) - mean(source)``;
        NaN when either shift is constant (e.g. the identity prediction).
    """
    base = source.mean(axis=0)
    a, b = predicted.mean(axis=0) - base, real.mean(axis=0) - base
    if genes is not None:
        a, b = a[genes], b[genes]
    return _pearson(a, b)


@dataclass(frozen=True)
class PCA:
    """A fitted principal-component projection: ``(x - mean) @ components.T``."""

    mean: np.ndarray  # (G,)
    components: np.ndarray  # (P, G), orthonormal rows

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(n, G) -> (n, P)."""
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


def fit_pca(x: np.ndarray, n_components: int) -> PCA:
    """Fit a PCA on the rows of ``x`` (exact SVD of the centred data).

    Args:
        x: (n, G) cells.
        n_components: wanted components; at most ``min(n, G)``.

    Returns:
        The fitted :class:`PCA`.
    """
    data = np.asarray(x, dtype=np.float64)
    mean = data.mean(axis=0)
    _, _, vt = np.linalg.svd(data - mean, full_matrices=False)
    return PCA(mean, vt[: min(n_components, vt.shape[0])])


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The energy distance between two point clouds (Székely): ``2 E|X-Y| - E|X-X'| - E|Y-Y'|``.

    The within-set means include the zero self-distances (the V-statistic), so the value is >= 0
    and exactly 0 for identical sets.

    Args:
        a: (n, d) points.
        b: (m, d) points.

    Returns:
        The energy distance (0 when the two sets have the same distribution).
    """
    between = cdist(a, b).mean()
    return float(2 * between - cdist(a, a).mean() - cdist(b, b).mean())


class LogisticClassifier:
    """Multinomial logistic regression (L2-penalised, fitted with L-BFGS) on PCA features.

    Trained on real cells, independent of the model under evaluation and of its own training
    classifier; its accuracy on predicted cells says whether they look like the target context.

    Args:
        n_components: PCA components the classifier sees.
        l2: penalty on the weights (per cell, so it does not depend on the number of cells).
        seed: seed of the weights' initialisation.
    """

    def __init__(self, n_components: int = 50, l2: float = 1e-3, seed: int = 0) -> None:
        self.n_components = n_components
        self.l2 = l2
        self.seed = seed
        self.classes: list[str] = []
        self.pca: PCA | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.scale: np.ndarray | None = None

    def _features(self, x: np.ndarray) -> torch.Tensor:
        assert self.pca is not None and self.scale is not None
        return torch.from_numpy(self.pca.transform(x) / self.scale)

    def fit(self, x: np.ndarray, labels: np.ndarray) -> LogisticClassifier:
        """Fit on real cells.

        Args:
            x: (n, G) cells.
            labels: (n,) their class labels (text).

        Returns:
            ``self``.

        Raises:
            ValueError: fewer than two classes among ``labels``.
        """
        self.classes = sorted({str(v) for v in labels})
        if len(self.classes) < 2:
            raise ValueError(f"a classifier needs two classes, got {self.classes}")
        self.pca = fit_pca(x, self.n_components)
        projected = self.pca.transform(x)
        self.scale = projected.std(axis=0) + 1e-8
        features = torch.from_numpy(projected / self.scale)
        target = torch.tensor([self.classes.index(str(v)) for v in labels])
        generator = torch.Generator().manual_seed(self.seed)
        weight = (0.01 * torch.randn(features.shape[1], len(self.classes), generator=generator)).to(
            torch.float64
        )
        weight.requires_grad_(True)
        bias = torch.zeros(len(self.classes), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(features @ weight + bias, target)
            loss = loss + self.l2 * (weight * weight).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n, G) cells -> (n,) predicted labels (text)."""
        assert self.weight is not None and self.bias is not None
        index = (self._features(x) @ self.weight + self.bias).argmax(dim=1).numpy()
        return np.asarray(self.classes, dtype=object)[index]

    def accuracy(self, x: np.ndarray, label: str) -> float:
        """Fraction of the cells ``x`` classified as ``label``."""
        return float((self.predict(x) == label).mean())
