"""Counterfactual metrics on log-normalised expression, as the field reports them (scGen, CPA).

Every function takes cells x genes arrays in the same space (log1p of counts per 10,000 for
``log1p_cp10k`` data) and returns plain floats, so each can be checked by hand on small arrays:

* :func:`r2_mean` / :func:`r2_var`: the squared Pearson correlation, over genes, of the per-gene
  mean (variance) of predicted cells against real cells (the field's "R² of mean expression");
* :func:`de_genes`: the top-k differentially expressed genes of real target vs source cells,
  scanpy's ``rank_genes_groups`` (Wilcoxon, ranked by the absolute score: both directions);
* :func:`delta_pearson`: the Pearson correlation of the predicted shift against the real shift,
  both relative to the mean of the source cells;
* :func:`response_slope`: how far along the real shift the predicted one goes (1: as far; below 1
  it falls short, as a model that takes a held-out cell type's response from weaker-responding
  neighbours does);
* :func:`energy_distance`: the energy distance between predicted and real cells in a PCA space
  fitted on real cells (:func:`fit_pca`, scikit-learn's PCA);
* :func:`fit_classifier`: an independently trained classifier (scikit-learn's logistic regression
  on PCA features) whose :func:`accuracy` on predicted cells says whether they look like the
  target context.
* :func:`two_sample_auc`: a classifier two-sample test, the cross-validated ROC AUC of the same
  kind of classifier telling predicted cells from real ones (0.5: indistinguishable).

scanpy and scikit-learn are imported inside the functions that use them (scanpy takes seconds to
import), so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist

if TYPE_CHECKING:
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline

log = logging.getLogger(__name__)

MIN_TWO_SAMPLE_CELLS = 10
"""Fewest cells per side for :func:`two_sample_auc` (fewer: NaN, with a warning)."""


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
    """The k genes that differ most between two groups of real cells, as scanpy ranks them.

    ``scanpy.tl.rank_genes_groups(method="wilcoxon", reference=source, rankby_abs=True)``: the
    Wilcoxon rank-sum z-score of each gene, target against source, ranked by its absolute value
    (genes going up and down), as CPA's and scGen's published numbers choose their DE genes.

    Args:
        target: (n, G) cells of the target context, log-normalised.
        source: (m, G) cells of the source context, log-normalised.
        k: how many genes (all of them when k >= G).

    Returns:
        int64 gene indices, most significant first (genes constant in both groups score 0, so
        they come last).
    """
    import anndata
    import scanpy as sc

    groups = pd.Categorical(["target"] * len(target) + ["source"] * len(source))
    cells = anndata.AnnData(
        np.concatenate([target, source]).astype(np.float32),
        obs=pd.DataFrame({"group": groups}, index=[str(i) for i in range(len(groups))]),
        var=pd.DataFrame(index=[str(g) for g in range(target.shape[1])]),
    )
    n = min(k, target.shape[1])
    sc.tl.rank_genes_groups(
        cells, "group", groups=["target"], reference="source", method="wilcoxon",
        rankby_abs=True, n_genes=n,
    )  # fmt: skip
    names = cells.uns["rank_genes_groups"]["names"]["target"]
    return np.asarray(names, dtype=np.int64)


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


def response_slope(predicted: np.ndarray, source: np.ndarray, real: np.ndarray) -> float:
    """How far along the real shift of the mean profile the predicted shift goes.

    Args:
        predicted: (n, G) predicted target cells.
        source: (m, G) source cells the prediction started from.
        real: (r, G) real target cells.

    Returns:
        The least-squares slope, through 0 and over genes, of ``mean(predicted) - mean(source)``
        on ``mean(real) - mean(source)``: 1 when the prediction moves as far along the real
        shift as the real cells (whatever it adds across it), 0 for identity, below 1 when it
        falls short; NaN when the real cells do not differ from the source.
    """
    base = source.mean(axis=0, dtype=np.float64)
    shift = real.mean(axis=0, dtype=np.float64) - base
    norm = float(shift @ shift)
    if norm == 0:
        return math.nan
    return float((predicted.mean(axis=0, dtype=np.float64) - base) @ shift / norm)


def fit_pca(x: np.ndarray, n_components: int) -> PCA:
    """Fit scikit-learn's PCA (exact SVD of the centred data) on the rows of ``x``.

    Args:
        x: (n, G) cells.
        n_components: wanted components; at most ``min(n, G)`` are fitted.

    Returns:
        The fitted ``sklearn.decomposition.PCA``.
    """
    from sklearn.decomposition import PCA

    data = np.asarray(x, dtype=np.float64)
    return PCA(n_components=min(n_components, *data.shape), svd_solver="full").fit(data)


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


def classifier_pipeline(
    n_components: int, seed: int = 0, svd_solver: Literal["full", "covariance_eigh"] = "full"
) -> Pipeline:
    """The evaluation's classifier, unfitted: scikit-learn's PCA (exact), standard scaling and
    ``LogisticRegression`` (L2 penalty, C = 1, L-BFGS), in one pipeline.

    Args:
        n_components: PCA components the classifier sees (the caller keeps it at most the
            smallest training set's ``min(n, G)``).
        seed: the PCA's random state.
        svd_solver: the PCA's exact solver: ``full`` (SVD of the centred cells) or
            ``covariance_eigh`` (eigendecomposition of the G x G covariance: the same components,
            measured 4x faster on 2,000 cells x 2,000 genes; docs/decisions.md, Evaluation).

    Returns:
        The unfitted ``sklearn.pipeline.Pipeline``.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        PCA(n_components=n_components, svd_solver=svd_solver, random_state=seed),
        StandardScaler(),
        LogisticRegression(max_iter=1000),
    )


def fit_classifier(
    x: np.ndarray, labels: np.ndarray, n_components: int = 50, seed: int = 0
) -> Pipeline:
    """An independent classifier of real cells (:func:`classifier_pipeline`; multinomial for more
    than two classes), fitted.

    Trained on real cells, independent of the model under evaluation and of its own training
    classifier; its accuracy on predicted cells (:func:`accuracy`) says whether they look like
    the target context.

    Args:
        x: (n, G) cells.
        labels: (n,) their class labels (text).
        n_components: PCA components the classifier sees (at most ``min(n, G)``).
        seed: the PCA's random state.

    Returns:
        The fitted pipeline (``predict`` gives labels).

    Raises:
        ValueError: fewer than two classes among ``labels``.
    """
    classes = sorted({str(v) for v in labels})
    if len(classes) < 2:
        raise ValueError(f"a classifier needs two classes, got {classes}")
    data = np.asarray(x, dtype=np.float64)
    pipeline = classifier_pipeline(min(n_components, *data.shape), seed)
    return pipeline.fit(data, np.asarray(labels, dtype=str))


def accuracy(classifier: Pipeline, x: np.ndarray, label: str) -> float:
    """Fraction of the cells ``x`` that ``classifier`` (:func:`fit_classifier`) calls ``label``."""
    return float((classifier.predict(np.asarray(x, dtype=np.float64)) == label).mean())


def two_sample_auc(
    generated: np.ndarray,
    real: np.ndarray,
    seed: int = 0,
    n_components: int = 50,
    folds: int = 5,
) -> float:
    """A classifier two-sample test: how well :func:`classifier_pipeline` tells generated cells
    from real ones, as the cross-validated ROC AUC.

    The larger side is subsampled (without replacement, ``seed``) to the size of the smaller, so
    both classes weigh the same; scikit-learn's ``cross_val_score`` then fits the whole pipeline
    (PCA included) on each training part of a shuffled ``StratifiedKFold`` and scores the
    held-out part by ROC AUC; the mean over folds is returned. 0.5 means the classifier cannot
    tell the two sets apart (the generated cells look like real ones); 1.0 means it always can.
    The AUC is reported as is: values below 0.5 are chance (and a classifier fitted to noise
    does slightly worse than chance on held-out cells), not a better generator.

    Args:
        generated: (n, G) generated (predicted) cells.
        real: (m, G) real cells of the same context, in the same space.
        seed: the subsample's, the folds' and the PCA's seed (same inputs, same value).
        n_components: PCA components (at most the smallest training part's ``min(n, G)``).
        folds: cross-validation folds.

    Returns:
        The mean AUC over folds; NaN, with a warning that says why, when either side has fewer
        than :data:`MIN_TWO_SAMPLE_CELLS` cells or a value is not finite.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    n = min(len(generated), len(real))
    if n < max(MIN_TWO_SAMPLE_CELLS, folds):
        log.warning(
            "two-sample AUC not computed: %d generated and %d real cells, it needs at least %d "
            "on each side", len(generated), len(real), max(MIN_TWO_SAMPLE_CELLS, folds),
        )  # fmt: skip
        return float("nan")
    sides = [np.asarray(x, dtype=np.float64) for x in (generated, real)]
    if not all(np.isfinite(side).all() for side in sides):
        log.warning("two-sample AUC not computed: the cells hold NaN or infinite values")
        return float("nan")
    rng = np.random.default_rng([seed, 17])
    x = np.concatenate([s[np.sort(rng.choice(len(s), n, replace=False))] for s in sides])
    y = np.repeat([1, 0], n)  # 1: generated
    training_rows = n * 2 - -(-n * 2 // folds)  # the smallest training part
    components = min(n_components, training_rows, x.shape[1])
    # one PCA per fold: the exact solver measured fastest (docs/decisions.md, Evaluation)
    pipeline = classifier_pipeline(components, seed, "covariance_eigh")
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(pipeline, x, y, cv=split, scoring="roc_auc").mean())
