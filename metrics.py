"""Sample-quality math on feature vectors and images, free of files and models: Fréchet distance, KID,
precision/recall/density/coverage, nearest neighbours by pixel distance and by correlation, pairwise
MS-SSIM, a bootstrap interval for Cohen's d, and sharpness (PSNR, spectral energy per frequency band).
evaluate.py feeds it the classifier's features; train.py its validation reconstructions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

from dataset import cohens_d
from modules import ms_ssim

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # the usual choice (Bińkowski et al. 2018); capped at the smaller set
PRDC_NEIGHBOURS = 5  # k of Naeem et al. 2020, who found k = 5 a good default
DIVERSITY_PAIRS = 1000
BOOTSTRAP_DRAWS = 2000
CHUNK = 256  # images per batched comparison
# Radial bands of the 2-D spectrum in cycles per pixel (Nyquist is 1/2): the coarse shape, edges, and the
# 2-4 px texture (grey/white borders, thin sulci) that a blurring decoder loses first and MS-SSIM at
# 64 px barely sees. The high band runs to the spectrum's corners (1/2 · √2). Keys are plain words so
# that they name JSON fields and TensorBoard tags; BAND_LABELS says what each covers.
SPECTRAL_BANDS = {"low": (1 / 16, 1 / 8), "mid": (1 / 8, 1 / 4), "high": (1 / 4, math.inf)}
BAND_LABELS = {"low": "1/16-1/8", "mid": "1/8-1/4", "high": "above 1/4"}  # cycles per pixel


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """|μa − μb|² + tr(Σa + Σb − 2 (Σa Σb)^½) between Gaussians fitted to two (N, D) feature sets."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # fewer images than features make Σa Σb singular: handled below
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():
            offset = np.eye(len(cov_a)) * 1e-6
            root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    mean_term = np.sum((a.mean(0) - b.mean(0)) ** 2)
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real))


def kernel_inception_distance(
    features_a: np.ndarray, features_b: np.ndarray, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0
) -> tuple[float, float]:
    """Unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / D + 1)³ over random subsets
    (size capped at the smaller set): (mean, std). KID's estimator on any features, not only Inception's."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    rng = np.random.default_rng(seed)
    dimension = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        k_xx, k_yy, k_xy = ((p @ q.T / dimension + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (size * (size - 1))
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (Na, Nb) between the rows of two feature sets, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    squared = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]
    return np.sqrt(np.maximum(squared, 0))


def kth_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest other point of the same set (the point itself excluded)."""
    distances = pairwise_distances(features, features)
    np.fill_diagonal(distances, np.inf)
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


def precision_recall_density_coverage(real: np.ndarray, generated: np.ndarray, k: int = PRDC_NEIGHBOURS) -> dict[str, float]:
    """Naeem et al. 2020, with each point's ball B(x, distance to its k-th nearest neighbour) closed:
    - precision (Kynkäänniemi et al. 2019): share of generated points inside some real ball (fidelity);
    - recall: share of real points inside some generated ball (diversity);
    - density: real balls holding a generated point, counted with multiplicity, / (k · generated);
      about 1 when both sets come from one distribution, above 1 where samples crowd the real modes;
    - coverage: share of real points whose own ball holds a generated point.
    Needs more than k points in each set."""
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"precision/recall/density/coverage with k = {k} need more than {k} points in each set")
    real_radii, generated_radii = kth_neighbour_radii(real, k), kth_neighbour_radii(generated, k)
    distances = pairwise_distances(real, generated)  # (real, generated)
    inside_real_balls = distances <= real_radii[:, None]
    return {
        "precision": float(inside_real_balls.any(0).mean()),
        "recall": float((distances <= generated_radii[None, :]).any(1).mean()),
        "density": float(inside_real_balls.sum() / (k * len(generated))),
        "coverage": float((distances.min(1) <= real_radii).mean()),
    }


def nearest_distances(queries: torch.Tensor, references: torch.Tensor, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each query image its nearest reference image: (RMS pixel difference, i.e. L2 / √pixels, in
    the inputs' units; index). Runs on the queries' device; candidates come from matrix products,
    and the winner's distance is recomputed directly, so an exact copy reads 0."""
    flat = queries.flatten(1).float()
    squared_norms = flat.square().sum(1)
    best = torch.full((len(flat),), math.inf, device=flat.device)
    best_index = torch.zeros(len(flat), dtype=torch.long, device=flat.device)
    for start in tqdm(range(0, len(references), chunk), desc="nearest training images", leave=False):
        block = references[start : start + chunk].to(flat.device).flatten(1).float()
        squared = squared_norms[:, None] - 2 * flat @ block.T + block.square().sum(1)[None]
        value, index = squared.min(1)
        better = value < best
        best = torch.where(better, value, best)
        best_index = torch.where(better, index + start, best_index)
    nearest = references[best_index.to(references.device)].to(flat.device).flatten(1).float()
    distances = (flat - nearest).square().mean(1).sqrt()
    return distances.cpu().numpy(), best_index.cpu().numpy()


def _standardised(images: torch.Tensor) -> torch.Tensor:
    """Images (N, ...) flattened, centred and scaled to unit length, so a dot product is Pearson's r.
    A constant image stays all zero (correlation 0 with everything)."""
    flat = images.flatten(1).float()
    flat = flat - flat.mean(1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def most_correlated(queries: torch.Tensor, references: torch.Tensor, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each query image the reference image with the highest Pearson correlation of pixels:
    (correlation, index). Unlike a pixel distance it ignores brightness and contrast, so a copy that
    the decoder rendered darker or flatter still reads close to 1 (Akbar et al. 2025)."""
    flat = _standardised(queries)
    best = torch.full((len(flat),), -math.inf, device=flat.device)
    best_index = torch.zeros(len(flat), dtype=torch.long, device=flat.device)
    for start in tqdm(range(0, len(references), chunk), desc="most correlated training images", leave=False):
        value, index = (flat @ _standardised(references[start : start + chunk].to(flat.device)).T).max(1)
        better = value > best
        best = torch.where(better, value, best)
        best_index = torch.where(better, index + start, best_index)
    return best.clamp(-1, 1).cpu().numpy(), best_index.cpu().numpy()


def pairwise_ms_ssim(images: torch.Tensor, pairs: int = DIVERSITY_PAIRS, seed: int = 0) -> float:
    """Mean MS-SSIM between different images (N ≥ 2, in [-1, 1]), on the images' device: over every
    pair when there are at most `pairs` of them, else over `pairs` random ones."""
    count = len(images)
    if count * (count - 1) // 2 <= pairs:
        first, second = torch.triu_indices(count, count, offset=1)
    else:
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(count, (pairs,), generator=generator)
        second = (first + torch.randint(1, count, (pairs,), generator=generator)) % count  # never the same image
    scores = [ms_ssim(images[i], images[j]) for i, j in zip(first.split(CHUNK), second.split(CHUNK))]
    return float(torch.cat(scores).mean())


def cohens_d_interval(a: np.ndarray, b: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of Cohen's d (a − b): both groups resampled with replacement.
    NaN when either group has fewer than 2 values."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.array([cohens_d(rng.choice(a, len(a)), rng.choice(b, len(b))) for _ in range(draws)])
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def distribution(values: np.ndarray) -> dict[str, float]:
    """Mean, 1st percentile, median and 99th percentile of a set of distances or correlations."""
    return {
        "mean": float(np.mean(values)),
        "p1": float(np.percentile(values, 1)),
        "median": float(np.median(values)),
        "p99": float(np.percentile(values, 99)),
    }


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, (N,), in dB, of images (N, C, H, W) in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def band_energy(images: torch.Tensor) -> torch.Tensor:
    """Summed power |FFT|² of images (N, C, H, W) in each of SPECTRAL_BANDS: (len(SPECTRAL_BANDS),)
    float64, on the images' device."""
    height, width = images.shape[-2:]
    frequencies = [torch.fft.fftfreq(side, device=images.device, dtype=torch.float64) for side in (height, width)]
    radius = torch.hypot(*torch.meshgrid(*frequencies, indexing="ij"))
    masks = torch.stack([(radius >= low) & (radius < high) for low, high in SPECTRAL_BANDS.values()]).double()
    total = torch.zeros(len(SPECTRAL_BANDS), dtype=torch.float64, device=images.device)
    for chunk in images.split(CHUNK):
        power = torch.fft.fft2(chunk.double()).abs().square().sum(dim=(0, 1))  # (H, W), summed over images
        total += (masks * power).sum(dim=(1, 2))
    return total


def energy_ratio(energy: torch.Tensor, count: float, reference_energy: torch.Tensor, reference_count: float) -> dict[str, float]:
    """Band energies (from band_energy) per image over a reference's per image, named by band."""
    ratio = (energy / count) / (reference_energy / reference_count).clamp_min(1e-30)
    return {name: float(value) for name, value in zip(SPECTRAL_BANDS, ratio)}


def spectral_energy_kept(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Per band, the spectral energy per image of `images` over that of `reference` (1.0 = as sharp):
    reconstructions against their slices, or generated against real images. Below 1 in the top band
    is blur; above 1 is noise or an artefact such as a checkerboard."""
    return energy_ratio(band_energy(images), len(images), band_energy(reference), len(reference))
