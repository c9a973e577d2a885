"""metrics.py: each sample-quality measure against a known answer or its definition written out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import metrics
from dataset import cohens_d


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    features = np.random.default_rng(0).normal(size=(500, 8))
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_a_mean_shift_is_its_squared_length() -> None:
    rng = np.random.default_rng(1)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    features = rng.normal(size=(2000, 6))
    # Same covariance exactly: the closed form |m|² holds to rounding.
    assert metrics.frechet_distance(features, features + shift) == pytest.approx(np.sum(shift**2), abs=1e-6)
    # Independent draws of N(0, I) and N(m, I): |m|² within sampling error.
    other = rng.normal(size=(20000, 6)) + shift
    assert metrics.frechet_distance(rng.normal(size=(20000, 6)), other) == pytest.approx(np.sum(shift**2), rel=0.03)


def test_frechet_distance_of_a_scaled_set_is_its_covariance_trace() -> None:
    """b = 2a (a centred): Σb = 4Σa, (Σa Σb)^½ = 2Σa, so the distance is tr Σa + 4 tr Σa − 4 tr Σa = tr Σa."""
    features = np.random.default_rng(4).normal(size=(300, 5)) * np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    features -= features.mean(0)
    expected = np.trace(np.cov(features, rowvar=False))
    assert metrics.frechet_distance(features, 2 * features) == pytest.approx(expected, rel=1e-9)


def with_covariance(rng: np.random.Generator, count: int, covariance: np.ndarray, mean: list[float]) -> np.ndarray:
    """`count` points whose sample mean and covariance (np.cov) are exactly `mean` and `covariance`."""
    points = rng.normal(size=(count, len(covariance)))
    points -= points.mean(0)
    points = points @ np.linalg.inv(np.linalg.cholesky(np.cov(points, rowvar=False))).T  # sample covariance I
    return points @ np.linalg.cholesky(covariance).T + np.asarray(mean)


def test_frechet_distance_takes_the_root_of_the_covariances_product_not_the_product_of_roots() -> None:
    """Covariances that do not commute, so (Σa Σb)^½ ≠ Σa^½ Σb^½. For 2x2 matrices the trace of the root is
    known in closed form: tr √M = √(tr M + 2 √det M); in 5-D the answer is scipy's sqrtm of the product."""
    rng = np.random.default_rng(10)
    cov_a, cov_b = np.array([[2.0, 1.0], [1.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 4.0]])
    product = cov_a @ cov_b
    assert not np.allclose(product, cov_b @ cov_a)
    expected = 2.0 + np.trace(cov_a + cov_b) - 2 * math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    roots_apart = 2.0 + np.trace(cov_a + cov_b) - 2 * np.trace(scipy.linalg.sqrtm(cov_a) @ scipy.linalg.sqrtm(cov_b))
    assert abs(roots_apart - expected) > 0.05  # the case tells the two formulas apart
    distance = metrics.frechet_distance(with_covariance(rng, 50, cov_a, [0, 0]), with_covariance(rng, 60, cov_b, [1, -1]))
    assert distance == pytest.approx(expected, rel=1e-9), (
        f"Fréchet distance {distance} of N(0, A) and N((1, -1), B) is not the closed form {expected} "
        f"(with the roots of A and B taken apart it would be {roots_apart})"
    )
    cov_a, cov_b = (np.cov(rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5)), rowvar=False) for _ in range(2))
    mean_b = rng.normal(size=5)
    expected = np.sum(mean_b**2) + np.trace(cov_a + cov_b) - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real)
    distance = metrics.frechet_distance(with_covariance(rng, 30, cov_a, [0] * 5), with_covariance(rng, 30, cov_b, mean_b))
    assert distance == pytest.approx(expected, rel=1e-7), f"5-D: {distance} against scipy's closed form {expected}"


def reference_kid(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² with k(p, q) = (p·q / D + 1)³, written out term by term."""

    def kernel(p: np.ndarray, q: np.ndarray) -> float:
        return (p @ q / x.shape[1] + 1) ** 3

    m, n = len(x), len(y)
    within_x = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    across = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return within_x + within_y - 2 * across


def test_kid_matches_the_unbiased_estimator_written_out() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 0.3
    # Subsets of the whole set are permutations of it: every subset gives the same value, so std = 0.
    mean, std = metrics.kernel_inception_distance(a, b, subsets=5, subset_size=50, seed=0)
    assert mean == pytest.approx(reference_kid(a, b), rel=1e-9) and std == pytest.approx(0.0, abs=1e-12)
    # The same set on both sides: the cross term keeps k(x, x), so the value is −2/n · (mean k(x, x) − mean k(x, x')) ≤ 0.
    same, _ = metrics.kernel_inception_distance(a, a, subsets=3, subset_size=50, seed=0)
    assert same == pytest.approx(reference_kid(a, a), rel=1e-9) and same < 0


def test_kid_is_about_zero_for_one_set_and_positive_for_a_shifted_one() -> None:
    features = np.random.default_rng(2).normal(size=(400, 16))
    same, _ = metrics.kernel_inception_distance(features, features, subsets=50, subset_size=200, seed=0)
    shifted, shifted_std = metrics.kernel_inception_distance(features, features + 0.5, subsets=50, subset_size=200, seed=0)
    assert shifted > 3 * shifted_std > 0
    assert abs(same) < 0.05 * shifted


def test_ms_ssim_of_an_image_with_itself_is_one() -> None:
    copies = (torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).repeat(5, 1, 1, 1)
    for pairs in (100, 4):  # all 10 pairs; 4 random ones
        assert metrics.pairwise_ms_ssim(copies, pairs=pairs) == pytest.approx(1.0, abs=1e-5)
    noise = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert metrics.pairwise_ms_ssim(noise) < 0.5


def test_nearest_distances_find_a_planted_copy() -> None:
    generator = torch.Generator().manual_seed(3)
    references = torch.randint(0, 256, (50, 16, 16), dtype=torch.uint8, generator=generator)
    queries = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=generator)
    queries[1] = references[37]
    distances, indices = metrics.nearest_distances(queries, references, chunk=16)  # several chunks
    brute_force = (queries[:, None].float() - references[None].float()).square().mean((2, 3)).sqrt()
    assert indices[1] == 37 and distances[1] == 0.0
    np.testing.assert_array_equal(indices, brute_force.argmin(1).numpy())
    np.testing.assert_allclose(distances, brute_force.min(1).values.numpy(), rtol=1e-5)


def test_most_correlated_ignores_brightness_and_contrast() -> None:
    generator = torch.Generator().manual_seed(6)
    references = torch.randint(0, 256, (40, 12, 12), dtype=torch.uint8, generator=generator)
    queries = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8, generator=generator)
    queries[2] = (references[17].float() * 0.5 + 20).round().to(torch.uint8)  # a darker, flatter copy
    correlations, indices = metrics.most_correlated(queries, references, chunk=16)
    assert indices[2] == 17 and correlations[2] == pytest.approx(1.0, abs=1e-3)
    brute_force = np.corrcoef(queries.flatten(1).double().numpy(), references.flatten(1).double().numpy())[:3, 3:]
    np.testing.assert_array_equal(indices, brute_force.argmax(1))
    np.testing.assert_allclose(correlations, brute_force.max(1), atol=1e-5)
    # The RMS distance calls that copy far: the two measures see different things.
    assert metrics.nearest_distances(queries[2:], references)[0][0] > 20


def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al. 2020, eqs. (1)-(4), written out point by point with closed balls."""

    def distance(p: np.ndarray, q: np.ndarray) -> float:
        return float(np.sqrt(np.sum((p - q) ** 2)))

    def radius(points: np.ndarray, i: int) -> float:
        return sorted(distance(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]

    real_radii = [radius(real, i) for i in range(len(real))]
    fake_radii = [radius(fake, j) for j in range(len(fake))]
    inside = [[distance(r, f) <= real_radii[i] for i, r in enumerate(real)] for f in fake]  # [fake][real]
    return {
        "precision": float(np.mean([any(row) for row in inside])),
        "recall": float(np.mean([any(distance(r, f) <= fake_radii[j] for j, f in enumerate(fake)) for r in real])),
        "density": sum(map(sum, inside)) / (k * len(fake)),
        "coverage": float(np.mean([min(distance(r, f) for f in fake) <= real_radii[i] for i, r in enumerate(real)])),
    }


def test_prdc_matches_the_papers_definitions_written_out() -> None:
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(30, 3)), rng.normal(size=(25, 3)) * 1.3 + 0.4
    expected = reference_prdc(real, fake, k=3)
    assert metrics.precision_recall_density_coverage(real, fake, k=3) == pytest.approx(expected, rel=1e-9)
    assert 0 < expected["precision"] < 1 and 0 < expected["coverage"] < 1  # a case that tells the terms apart


def test_prdc_of_identical_sets_is_one_and_of_disjoint_sets_zero() -> None:
    features = np.random.default_rng(8).normal(size=(200, 8))
    same = metrics.precision_recall_density_coverage(features, features)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(1.0, abs=0.2)  # each real ball holds its own point plus, on average, k others / k
    far = metrics.precision_recall_density_coverage(features, features + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # Mode collapse: every generated point on one real point is precise but covers almost nothing.
    collapsed = metrics.precision_recall_density_coverage(features, np.repeat(features[:1], 50, axis=0))
    assert collapsed["precision"] == 1.0 and collapsed["coverage"] <= 6 / 200 and collapsed["recall"] <= 6 / 200
    with pytest.raises(ValueError, match="more than 5 points"):
        metrics.precision_recall_density_coverage(features[:5], features)


def test_cohens_d_interval_covers_the_estimate_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(9)
    small = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 1.0, 30)
    large = rng.normal(1.0, 1.0, 3000), rng.normal(0.0, 1.0, 3000)
    low, high = metrics.cohens_d_interval(*small)
    assert low < cohens_d(*small) < high
    low_large, high_large = metrics.cohens_d_interval(*large)
    assert low_large < 1.0 < high_large  # the true effect
    assert high_large - low_large < (high - low) / 5  # about √100 = 10x narrower
    assert metrics.cohens_d_interval(*small, seed=3) != (low, high)  # the seed draws the resamples
    assert metrics.cohens_d_interval(*small) == (low, high)  # and fixes them
    assert all(math.isnan(value) for value in metrics.cohens_d_interval(np.array([1.0]), small[1]))


def test_cohens_d_interval_is_95_percent_wide_on_both_sides() -> None:
    """For groups of 500 the sampling distribution of d is close to normal with standard error
    SE = √((n1 + n2) / (n1 n2) + d² / (2 (n1 + n2))) (Hedges & Olkin 1985), so a 95% percentile interval
    reaches about 1.96 SE below and above d; a 90% one would stop at 1.645 SE, a 99% one at 2.58.
    Averaged over 4 data sets the bootstrap's own scatter (about 0.06 SE per end) falls to 0.03 SE."""
    below, above = [], []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(0.5, 1.0, 500), rng.normal(0.0, 1.0, 500)
        d = cohens_d(a, b)
        standard_error = math.sqrt(2 / 500 + d**2 / 2000)
        low, high = metrics.cohens_d_interval(a, b, seed=seed)
        below.append((d - low) / standard_error)
        above.append((high - d) / standard_error)
    reach = (float(np.mean(below)), float(np.mean(above)))
    assert all(1.8 < side < 2.15 for side in reach), (
        f"the interval reaches {reach[0]:.2f} SE below and {reach[1]:.2f} SE above d: a 95% interval reaches 1.96 each way"
    )


def test_psnr_of_a_constant_offset_is_its_closed_form() -> None:
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.allclose(metrics.psnr(x, x + 0.1), torch.full((3,), 10 * math.log10(4 / 0.01)), atol=1e-3)
    assert metrics.psnr(x, x).min() > 100  # identical: only limited by the clamp


def test_spectral_energy_of_identical_sets_is_one_in_every_band() -> None:
    images = torch.rand(6, 1, 32, 32) * 2 - 1
    assert metrics.spectral_energy_kept(images, images) == pytest.approx(dict.fromkeys(metrics.SPECTRAL_BANDS, 1.0))


def test_spectral_energy_of_a_gaussian_blur_follows_its_transfer_function() -> None:
    """White noise blurred by a kernel w keeps |W(fy)|² |W(fx)|² of its power at each frequency, W the
    kernel's discrete Fourier transform: averaged over each band's grid points, that is what
    spectral_energy_kept must find. A 0.6 px blur keeps about 0.14 above 1/4 cycle per pixel, 0.6 between
    1/8 and 1/4, 0.9 below; added noise lifts the top band above 1."""
    from classifier import gaussian_blur

    images = torch.randn(64, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    sigma, radius = 0.6, 2  # gaussian_blur's kernel reaches ceil(3 σ) pixels
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-offsets.square() / (2 * sigma**2))
    weights /= weights.sum()
    frequencies = torch.fft.fftfreq(64, dtype=torch.float64)
    transfer = (weights[None] * torch.cos(2 * math.pi * frequencies[:, None] * offsets[None])).sum(1).square()  # |W(f)|²
    power_kept = transfer[:, None] * transfer[None, :]
    radial = torch.hypot(*torch.meshgrid(frequencies, frequencies, indexing="ij"))
    kept = metrics.spectral_energy_kept(gaussian_blur(images, sigma), images)
    for name, (low, high) in metrics.SPECTRAL_BANDS.items():
        expected = float(power_kept[(radial >= low) & (radial < high)].mean())
        assert kept[name] == pytest.approx(expected, rel=0.03), name
    assert kept["high"] < 0.2 < kept["mid"] < kept["low"] < 1
    noise = 0.5 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    assert metrics.spectral_energy_kept(images + noise, images)["high"] > 1.2


def test_cohens_d_of_groups_without_spread_is_undefined_not_huge() -> None:
    """Every value of each group the same (a dataset of one AD image and one NC image): the pooled
    standard deviation is zero, and var()'s rounding error must not turn that into d ~ 1e15."""
    ad, nc = np.full(20, 0.1), np.full(20, 0.3)
    assert np.var(ad, ddof=1) > 0  # the rounding error that used to be divided by
    assert math.isnan(cohens_d(ad, nc)) and math.isnan(cohens_d(nc, ad))
    assert all(map(math.isnan, metrics.cohens_d_interval(ad, nc)))
    assert cohens_d(np.array([0.1, 0.1, 0.2]), nc) == pytest.approx(
        (0.4 / 3 - 0.3) / math.sqrt(2 * np.var([0.1, 0.1, 0.2], ddof=1) / 21)
    )
