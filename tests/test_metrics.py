"""metrics.py: each sample-quality measure against a known answer or its definition written out."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import metrics
from dataset import cohens_d
from modules import ms_ssim


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


# ----------------------------------------------------------------------------- edge cases the mutation run found unguarded


def test_frechet_distance_of_singular_covariances_adds_a_small_ridge() -> None:
    """2 and 3 points in 3-D: Σa Σb is singular and scipy's square root of it is not finite; the distance
    then uses (Σa + εI)(Σb + εI) with ε = 1e-6, written out here."""
    a = np.array([[2.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    b = np.array([[2.0, 2.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 2.0]])
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not np.isfinite(scipy.linalg.sqrtm(cov_a @ cov_b)).all()  # the case reaches the fallback
        ridge = np.eye(3) * 1e-6
        root = scipy.linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b) - 2 * np.trace(root.real)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)


def test_float32_features_are_measured_in_float64() -> None:
    """Classifier features arrive as float32; every measure converts them first, so the answer equals the
    float64 one of the same values (a float32 mean of values near 1000 would be off in the 5th digit)."""
    rng = np.random.default_rng(11)
    a32 = (rng.normal(size=(40, 3)) + 1000).astype(np.float32)
    b32 = (rng.normal(size=(30, 3)) * 2 + 1001).astype(np.float32)
    a64, b64 = a32.astype(np.float64), b32.astype(np.float64)
    assert metrics.frechet_distance(a32, b32) == pytest.approx(metrics.frechet_distance(a64, b64), rel=1e-12)
    assert metrics.frechet_distance(a64, b32) == pytest.approx(metrics.frechet_distance(a64, b64), rel=1e-12)
    scaled32, other32 = a32 / np.float32(1000), b32 / np.float32(1000)
    kid64 = metrics.kernel_inception_distance(scaled32.astype(np.float64), other32.astype(np.float64), subsets=3, subset_size=20)
    assert metrics.kernel_inception_distance(scaled32, other32, subsets=3, subset_size=20) == pytest.approx(kid64, rel=1e-9)
    assert metrics.kernel_inception_distance(scaled32.astype(np.float64), other32, subsets=3, subset_size=20) == pytest.approx(
        kid64, rel=1e-9
    )
    np.testing.assert_allclose(metrics.pairwise_distances(a32, b32), metrics.pairwise_distances(a64, b64), rtol=1e-9)
    np.testing.assert_allclose(metrics.pairwise_distances(a64, b32), metrics.pairwise_distances(a64, b64), rtol=1e-9)
    np.testing.assert_allclose(metrics.pairwise_distances(a32, b64), metrics.pairwise_distances(a64, b64), rtol=1e-9)
    small32, other32 = a32[:8] - 1000, b32[:8] - 1000
    assert metrics.cohens_d_interval(small32, other32, draws=50) == pytest.approx(
        metrics.cohens_d_interval(small32.astype(np.float64), other32.astype(np.float64), draws=50), rel=1e-12
    )
    assert metrics.cohens_d_interval(small32.astype(np.float64), other32, draws=50) == pytest.approx(
        metrics.cohens_d_interval(small32.astype(np.float64), other32.astype(np.float64), draws=50), rel=1e-12
    )


def test_kid_subsets_are_seeded_draws_of_the_capped_size() -> None:
    """Subsets of min(subset_size, |a|, |b|) points drawn without replacement, a's then b's, from
    default_rng(seed): the estimator written out over the same draws; the default seed is 0."""
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(9, 3)), rng.normal(size=(7, 3)) + 0.2
    for subset_size, size in ((5, 5), (8, 7), (20, 7)):
        draws = np.random.default_rng(4)
        values = []
        for _ in range(6):
            x, y = a[draws.choice(9, size, replace=False)], b[draws.choice(7, size, replace=False)]
            values.append(reference_kid(x, y))
        result = metrics.kernel_inception_distance(a, b, subsets=6, subset_size=subset_size, seed=4)
        assert result == pytest.approx((np.mean(values), np.std(values)), rel=1e-9), subset_size
        result = metrics.kernel_inception_distance(b, a, subsets=6, subset_size=subset_size, seed=4)
        assert result[0] == pytest.approx(metrics.kernel_inception_distance(b, a, subsets=6, subset_size=size, seed=4)[0])
    assert metrics.kernel_inception_distance(a, b, subsets=4, subset_size=5) == metrics.kernel_inception_distance(
        a, b, subsets=4, subset_size=5, seed=0
    )
    assert metrics.kernel_inception_distance(a[:2], b[:2], subsets=1)[0] == pytest.approx(reference_kid(a[:2], b[:2]))
    with pytest.raises(ValueError, match="^KID needs at least 2 feature vectors in each set$"):
        metrics.kernel_inception_distance(a[:1], b)


def test_kth_neighbour_radius_is_the_kth_smallest_distance_to_another_point() -> None:
    features = np.random.default_rng(13).normal(size=(300, 4))
    distances = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    for k in (1, 5, 9):
        np.testing.assert_allclose(metrics.kth_neighbour_radii(features, k), np.sort(distances, 1)[:, k - 1], rtol=1e-9)


def test_prdc_balls_are_closed_a_point_on_the_boundary_counts() -> None:
    """Real points 0..9 and generated 10, 12, ..., 20 on a line (k = 1, exact distances): generated 10 lies on
    real 9's ball (radius 1) and real 8 on generated 10's (radius 2); open balls would count neither."""
    real, generated = np.arange(10.0)[:, None], np.arange(10.0, 21.0, 2.0)[:, None]
    result = metrics.precision_recall_density_coverage(real, generated, k=1)
    assert result == pytest.approx({"precision": 1 / 6, "recall": 0.2, "density": 1 / 6, "coverage": 0.1})
    assert result == pytest.approx(reference_prdc(real, generated, 1))


def test_nearest_and_most_correlated_take_the_first_of_equal_references_and_scan_every_chunk() -> None:
    generator = torch.Generator().manual_seed(14)
    references = torch.randint(0, 256, (40, 6, 6), dtype=torch.uint8, generator=generator)
    references[25] = references[3]  # a tie: the first index wins, as argmin / argmax
    queries = torch.stack([references[3], references[0], references[39]])
    for measure in (metrics.nearest_distances, metrics.most_correlated):
        values, indices = measure(queries, references, chunk=16)
        assert indices.tolist() == [3, 0, 39], measure.__name__
        assert indices.dtype == np.int64, f"{measure.__name__} returns indices as {indices.dtype}"
        assert values.dtype == np.float32 and values.shape == (3,)
    assert metrics.nearest_distances(queries, references)[1].tolist() == [3, 0, 39]  # the default chunk


def test_correlation_is_exact_for_faint_images_and_bounded_by_one() -> None:
    """A faint float image (amplitude 1e-3, so |x − mean| < 1) correlates 1 with its copy; rounding never
    takes a correlation outside [−1, 1]."""
    generator = torch.Generator().manual_seed(15)
    faint = (torch.rand(4, 8, 8, generator=generator) - 0.5) * 1e-3
    correlations, indices = metrics.most_correlated(faint, faint)
    assert indices.tolist() == [0, 1, 2, 3] and correlations == pytest.approx(1.0, abs=1e-5)
    copies = torch.randint(0, 256, (200, 1, 5, 5), generator=generator).float()
    correlations, _ = metrics.most_correlated(copies * 3 + 7, copies)
    assert correlations.max() <= 1.0 and correlations.min() >= -1.0
    negative = [metrics.most_correlated(7 - copy * 3, copy)[0][0] for copy in copies[:40, None]]  # r = −1 each
    assert min(negative) >= -1.0 and min(negative) == pytest.approx(-1.0, abs=1e-6)


def test_pairwise_ms_ssim_uses_every_pair_up_to_the_limit_then_seeded_random_pairs() -> None:
    generator = torch.Generator().manual_seed(16)
    ramp = torch.linspace(-0.8, 0.8, 32).expand(32, 32)  # a ramp under more noise each: every pair scores differently
    images = torch.stack([(ramp + 0.15 * k * (torch.rand(32, 32, generator=generator) * 2 - 1)).clamp(-1, 1) for k in range(5)])
    images = images.unsqueeze(1)
    every_pair = [float(ms_ssim(images[i : i + 1], images[j : j + 1])) for i in range(5) for j in range(i + 1, 5)]
    assert metrics.pairwise_ms_ssim(images, pairs=10) == pytest.approx(np.mean(every_pair), rel=1e-6)  # 10 pairs: all
    draws = torch.Generator().manual_seed(3)
    first = torch.randint(5, (9,), generator=draws)
    second = (first + torch.randint(1, 5, (9,), generator=draws)) % 5
    expected = np.mean([float(ms_ssim(images[i : i + 1], images[j : j + 1])) for i, j in zip(first, second)])
    assert metrics.pairwise_ms_ssim(images, pairs=9, seed=3) == pytest.approx(expected, rel=1e-6)  # 9 < 10: random
    assert metrics.pairwise_ms_ssim(images, pairs=9) == metrics.pairwise_ms_ssim(images, pairs=9, seed=0)


def test_cohens_d_interval_needs_two_values_per_group_and_defaults_to_seed_0() -> None:
    low, high = metrics.cohens_d_interval(np.array([1.0, 2.0]), np.array([3.0, 5.0]), draws=200)
    assert math.isfinite(low) and math.isfinite(high) and low <= high
    a, b = np.arange(6.0), np.arange(6.0) * 2
    assert metrics.cohens_d_interval(a, b, draws=100) == metrics.cohens_d_interval(a, b, draws=100, seed=0)


def test_psnr_is_per_image() -> None:
    x = torch.zeros(2, 1, 4, 4)
    offsets = torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    assert torch.allclose(metrics.psnr(x, x + offsets), 10 * torch.log10(4 / torch.tensor([0.01, 0.04])), atol=1e-4)


def test_band_energy_puts_a_frequency_on_a_band_edge_in_the_band_above() -> None:
    """Cosines of period 16 and 8 px (1/16 and 1/8 cycles per pixel, the low band's edges) on 32 px: the
    first belongs to the low band, the second to the mid band; energies are float64 sums over all chunks."""
    columns = torch.arange(32, dtype=torch.float64)
    for period, band in ((16, "low"), (8, "mid")):
        image = torch.cos(2 * math.pi * columns / period).expand(32, 32).reshape(1, 1, 32, 32)
        energy = metrics.band_energy(image.float())
        assert energy.dtype == torch.float64
        assert dict(zip(metrics.SPECTRAL_BANDS, energy.tolist()))[band] == pytest.approx(float(energy.sum()))
        assert float(energy.sum()) == pytest.approx(32**4 / 2, rel=1e-6)  # Parseval: N² Σx² = 1024 · 512


def test_band_energy_sums_every_chunk_and_ratios_hold_for_faint_images(monkeypatch) -> None:
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(17)) * 2 - 1
    whole = metrics.band_energy(images)
    monkeypatch.setattr(metrics, "CHUNK", 2)
    assert torch.allclose(metrics.band_energy(images), whole, rtol=1e-12)
    faint = images * 1e-3  # energies far below 1
    assert metrics.spectral_energy_kept(faint * 2, faint) == pytest.approx(dict.fromkeys(metrics.SPECTRAL_BANDS, 4.0))


def test_distribution_reports_mean_and_percentiles() -> None:
    assert metrics.distribution(np.arange(101.0)) == {"mean": 50.0, "p1": 1.0, "median": 50.0, "p99": 99.0}
    assert metrics.distribution(np.array([3.0, 1.0, 2.0, 10.0])) == pytest.approx(
        {"mean": 4.0, "p1": 1.03, "median": 2.5, "p99": 9.79}
    )
