"""The evaluation metrics against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cae.evaluate.metrics import (
    accuracy,
    de_genes,
    delta_pearson,
    energy_distance,
    fit_classifier,
    fit_pca,
    r2_mean,
    r2_var,
    response_slope,
    two_sample_auc,
)


def cells_with_mean(mean: list[float]) -> np.ndarray:
    """Two cells whose per-gene mean is ``mean`` (one above it, one below)."""
    m = np.asarray(mean, dtype=float)
    return np.stack([m - 1.0, m + 1.0])


def test_r2_mean_is_the_squared_pearson_of_the_means() -> None:
    # centred means [-1, 0, 1] and [-1, 1, 0]: r = 1 / (sqrt 2 * sqrt 2) = 0.5, r² = 0.25
    assert r2_mean(cells_with_mean([1, 2, 3]), cells_with_mean([1, 3, 2])) == pytest.approx(0.25)
    # a scaled and shifted profile correlates perfectly; so does a reversed one (r = -1)
    assert r2_mean(cells_with_mean([1, 2, 3]), cells_with_mean([5, 7, 9])) == pytest.approx(1.0)
    assert r2_mean(cells_with_mean([1, 2, 3]), cells_with_mean([3, 2, 1])) == pytest.approx(1.0)


def test_r2_mean_on_a_gene_subset() -> None:
    predicted, real = cells_with_mean([1, 2, 3, 100]), cells_with_mean([1, 3, 2, -50])
    assert r2_mean(predicted, real, np.array([0, 1, 2])) == pytest.approx(0.25)


def test_r2_mean_of_a_constant_profile_is_undefined() -> None:
    assert math.isnan(r2_mean(cells_with_mean([2, 2, 2]), cells_with_mean([1, 2, 3])))


def test_r2_var() -> None:
    # per-gene variances (population): predicted [0, 1, 4], real [0, 4, 1]
    predicted = np.array([[0.0, -1.0, -2.0], [0.0, 1.0, 2.0]])
    real = np.array([[0.0, -2.0, -1.0], [0.0, 2.0, 1.0]])
    # centred: [-5, -2, 7] / 3 and [-5, 7, -2] / 3; r = (25 - 14 - 14) / (25 + 4 + 49) = -1/26
    assert r2_var(predicted, real) == pytest.approx(1 / 676)


def test_de_genes_ranks_by_absolute_rank_sum_statistic() -> None:
    source = np.array([[0.0, 15.0, 1.0], [0.1, 15.1, 1.1], [0.2, 15.2, 1.2], [0.3, 15.3, 1.3]])
    target = source.copy()
    target[:, 0] += 10.0  # gene 0: completely separated, up
    target[:, 1] -= 10.0  # gene 1: completely separated, down (same |z|)
    target[:2, 2] += 0.25  # gene 2: partly overlapping
    # |z| = 2.309 for genes 0 and 1 (rank sum 26 vs expected 18, sd sqrt(12)), smaller for gene 2;
    # scanpy orders the tie of genes 0 and 1 its own way
    assert set(de_genes(target, source, 2).tolist()) == {0, 1}
    assert de_genes(target, source, 3).tolist()[2] == 2
    assert de_genes(target, source, 1).tolist() in ([0], [1])
    assert sorted(de_genes(target, source, 10).tolist()) == [0, 1, 2]


def test_de_genes_are_scanpys_wilcoxon_ranking() -> None:
    """The order of |z| of scipy's rank-sum test, gene by gene (equal |z| in either order)."""
    from scipy import stats

    rng = np.random.default_rng(3)
    source = rng.gamma(2.0, 1.0, size=(40, 30))
    target = rng.gamma(2.0, 1.0, size=(50, 30)) + np.linspace(-1.0, 1.5, 30)[None, :].clip(0)
    z = np.abs(stats.ranksums(target, source, axis=0).statistic)
    ranked = de_genes(target, source, 30)
    assert sorted(ranked.tolist()) == list(range(30))
    np.testing.assert_allclose(z[ranked], np.sort(z)[::-1], rtol=1e-5)
    assert z[ranked[0]] > 4.0 and ranked[0] == 29  # the largest shift comes first


def test_de_genes_puts_constant_genes_last() -> None:
    source = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    target = np.array([[1.0, 5.0], [1.0, 6.0], [1.0, 7.0]])
    assert de_genes(target, source, 2).tolist() == [1, 0]


def test_response_slope_measures_how_far_along_the_real_shift() -> None:
    source, real = cells_with_mean([1, 2, 3]), cells_with_mean([3, 2, 1])  # shift (2, 0, -2)
    assert response_slope(real, source, real) == pytest.approx(1.0)
    assert response_slope(cells_with_mean([2, 2, 2]), source, real) == pytest.approx(0.5)
    # a shift across the real one (the middle gene) does not count as going along it
    assert response_slope(cells_with_mean([2, 9, 2]), source, real) == pytest.approx(0.5)
    assert response_slope(source, source, real) == 0.0  # identity
    assert math.isnan(response_slope(real, source, source))  # no real shift to go along


def test_delta_pearson() -> None:
    source = cells_with_mean([1, 1, 1])
    real = cells_with_mean([2, 3, 1])  # real shift [1, 2, 0]
    assert delta_pearson(cells_with_mean([3, 5, 1]), source, real) == pytest.approx(1.0)
    # predicted shift [0, 2, 1] vs real [1, 2, 0]: centred [-1, 1, 0] and [0, 1, -1] -> r = 0.5
    assert delta_pearson(cells_with_mean([1, 3, 2]), source, real) == pytest.approx(0.5)
    assert math.isnan(delta_pearson(source, source, real))  # identity: no shift at all


def test_energy_distance_by_hand() -> None:
    assert energy_distance(np.array([[0.0]]), np.array([[1.0]])) == pytest.approx(2.0)
    # between: mean(|0-1|, |2-1|) = 1; within a: (0 + 2 + 2 + 0) / 4 = 1; within b: 0
    assert energy_distance(np.array([[0.0], [2.0]]), np.array([[1.0]])) == pytest.approx(1.0)
    points = np.random.default_rng(0).normal(size=(20, 3))
    assert energy_distance(points, points) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(points, points + 3.0) > 1.0


def test_fit_pca_finds_the_direction_of_spread() -> None:
    t = np.linspace(-1, 1, 11)
    points = np.stack([t, 2 * t, np.zeros_like(t)], axis=1) + 5.0
    pca = fit_pca(points, 2)
    direction = np.array([1.0, 2.0, 0.0]) / np.sqrt(5.0)
    assert abs(pca.components_[0] @ direction) == pytest.approx(1.0)
    np.testing.assert_allclose(
        np.abs(pca.transform(points)[:, 0]), np.abs(t) * np.sqrt(5.0), atol=1e-12
    )
    assert fit_pca(points, 50).components_.shape == (3, 3)  # at most min(n, G) components


def test_logistic_classifier_separates_two_groups() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(60, 8))
    b = rng.normal(0.0, 1.0, size=(60, 8))
    b[:, :2] += 4.0
    labels = np.array(["ctrl"] * 60 + ["stim"] * 60)
    classifier = fit_classifier(np.concatenate([a, b]), labels, n_components=4)
    assert accuracy(classifier, b, "stim") == 1.0
    assert accuracy(classifier, a, "stim") == 0.0
    assert set(classifier.predict(a[:3])) == {"ctrl"}


def test_logistic_classifier_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="two classes"):
        fit_classifier(np.zeros((4, 3)), np.array(["a"] * 4))


def test_neighbour_mix_counts_each_kinds_neighbours() -> None:
    import scipy.sparse as sp

    from cae.evaluate.embedding import neighbour_mix

    kinds = np.array(["real", "real", "moved", "moved"])
    # real 0 -> real 1; real 1 -> real 0 and moved 2; moved 2 -> moved 3; moved 3 -> moved 2
    graph = sp.csr_matrix((np.ones(5), ([0, 1, 1, 2, 3], [1, 0, 2, 3, 2])), shape=(4, 4))
    mix = neighbour_mix(graph, kinds)
    assert mix["real"] == {"moved": pytest.approx(1 / 3), "real": pytest.approx(2 / 3)}
    assert mix["moved"] == {"moved": 1.0, "real": 0.0}


def test_two_sample_auc_of_one_distribution_is_near_one_half() -> None:
    # Ten pairs of samples of one Gaussian: the classifier has nothing to learn, so each AUC is
    # chance. Measured spread at these sizes: 0.46 to 0.56, mean 0.506 (docs/evaluation.md).
    rng = np.random.default_rng(0)
    values = [
        two_sample_auc(rng.normal(size=(200, 30)), rng.normal(size=(200, 30)), seed, 20)
        for seed in range(10)
    ]
    assert all(abs(v - 0.5) < 0.1 for v in values), values
    assert abs(np.mean(values) - 0.5) < 0.03


def test_two_sample_auc_of_shifted_cells_is_near_one() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 30))
    assert two_sample_auc(real + 2.0, rng.normal(size=(300, 30)), 0, 20) > 0.99
    # a small shift in one gene of 30: clearly above chance, well below 1
    moved = rng.normal(size=(200, 30))
    moved[:, 0] += 0.5
    assert 0.6 < two_sample_auc(moved, real, 0, 20) < 0.95


def test_two_sample_auc_is_deterministic_and_takes_unequal_sides() -> None:
    rng = np.random.default_rng(2)
    generated, real = rng.normal(size=(60, 8)) + 0.3, rng.normal(size=(500, 8))
    first = two_sample_auc(generated, real, seed=3, n_components=5)
    assert two_sample_auc(generated, real, seed=3, n_components=5) == first
    assert two_sample_auc(generated, real, seed=4, n_components=5) != first  # other cells drawn
    assert 0.6 < first < 1.0
    # 60 against 500 cells of one distribution: chance
    assert abs(two_sample_auc(real[:60], real[60:], seed=3, n_components=5) - 0.5) < 0.15


def test_two_sample_auc_of_tiny_or_broken_groups_is_nan_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(3)
    with caplog.at_level("WARNING"):
        assert math.isnan(two_sample_auc(rng.normal(size=(9, 5)), rng.normal(size=(100, 5))))
    assert "9 generated and 100 real cells, it needs at least 10" in caplog.text
    broken = rng.normal(size=(50, 5))
    broken[3, 2] = np.nan
    assert math.isnan(two_sample_auc(broken, rng.normal(size=(50, 5))))
    assert "NaN or infinite" in caplog.text
    # the smallest allowed groups, with more PCA components asked than cells: a value
    assert 0.0 <= two_sample_auc(rng.normal(size=(10, 40)), rng.normal(size=(10, 40)) + 3) <= 1.0
