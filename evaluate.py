"""Measure a trained run's samples: does the AD/NC conditioning work, how close to real and how diverse
are they, are any copies of training images, and does their anatomy differ the way real AD and NC do.

    python evaluate.py                                    # the latest run, 500 images per label
    python evaluate.py --run runs/adni --num-samples 1000 --device cuda

No ImageNet network can be downloaded here, so the yardstick is the run's own: a small CNN trained to
tell AD from NC on the run's training split (best epoch chosen on its val split), cached as
<run>/classifier.pt and reused while the splits, the image size and its settings are unchanged.
- conditioning accuracy: the share of generated images it assigns to the asked-for label, read
  against its accuracy on real test images and on their VAE reconstructions (a sample can look no
  more AD than real AD does, nor be sharper than the decoder makes it);
- Fréchet distance and KID in its penultimate features, generated vs real test, beside the floor
  that real training images reach against the same test images;
- diversity: mean MS-SSIM over random generated pairs beside real pairs (match real, do not minimise;
  mode collapse shows as a higher value);
- memorisation: each generated image's distance to its nearest training image beside the same for
  real test images, and the share of near-copies (closer than 99% of real test images are);
- anatomy: the CSF-dark share of brain pixels (project_setup.py's measure: ventricles and sulci widen
  in AD) of generated AD vs NC beside real AD vs NC, with Cohen's d and whether the directions agree.
Every metric is reported for all images and per label.

Slice position is a confound in ADNI: AD scans' slice windows start lower, and the height of a slice
shows in its anatomy. The classifier sees pixels only, and it learns from a position-balanced draw of
the training images (at every slice index half AD, half NC), so reading the slice height earns it
nothing there. The controls in metrics.json: the test accuracy of a logistic regression from slice
index alone ("slice-position-only accuracy"), the classifier's test accuracy weighted to the same
balance, and its accuracy in each slice tercile beside what position alone achieves there, so a reader
can see that it does not win in one window only.

Writes <run>/metrics.json and <run>/metrics.md (a Markdown table, also printed). The same --seed and
settings give the same numbers; the samples are predict.py's for the same seed, steps and batch size.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from config import CLASS_NAMES
from dataset import (
    SliceDataset,
    brain_pixels,
    cohens_d,
    csf_dark_share,
    load_split_datasets,
    load_splits,
    to_model_range,
)
from modules import SAMPLERS, ms_ssim
from pipeline import Pipeline, check_sampling_options, load_run_for, sampling_options
from utils import (
    ArgumentParser,
    UsageError,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    to_uint8,
    usage_errors_exit,
    write_json_atomic,
    write_text_atomic,
)

CLASSIFIER_FILE = "classifier.pt"
CLASSIFIER_FORMAT = 2  # bump when the classifier's architecture or training changes, so caches retrain
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # the usual choice (Bińkowski et al. 2018); capped at the smaller set
DIVERSITY_PAIRS = 1000
NEAR_COPY_PERCENTILE = 1.0  # of real test images' nearest-training distances
CHUNK = 256  # images per forward pass when only measuring


# ============================================================================ metric math


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


# ============================================================================ slice-position controls


def position_balancing_weights(labels: np.ndarray, slice_indices: np.ndarray) -> np.ndarray:
    """Per-image weights under which every slice index is half AD, half NC, each index keeping its share
    of the images. Indices that hold one class only get weight 0: position alone decides them."""
    weights = np.zeros(len(labels))
    for index in np.unique(slice_indices):
        here = slice_indices == index
        counts = np.bincount(labels[here], minlength=len(CLASS_NAMES))
        if (counts > 0).all():
            weights[here] = here.sum() / (len(CLASS_NAMES) * counts[labels[here]])
    if not weights.any():
        raise UsageError("no slice index holds both AD and NC images: slice position alone separates the classes")
    return weights


def slice_position_only_predictions(train: SliceDataset, test: SliceDataset) -> np.ndarray:
    """Test predictions of a logistic regression from slice index alone, fit on train: what position can win."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression())
    model.fit(train.slice_indices.numpy()[:, None].astype(float), train.labels.numpy())
    return model.predict(test.slice_indices.numpy()[:, None].astype(float))


# ============================================================================ the AD/NC classifier


@dataclass(frozen=True)
class ClassifierSettings:
    """How the yardstick classifier is built and trained; part of its cache fingerprint."""

    channels: tuple[int, ...] = (16, 32, 64, 128)  # one conv + 2x max-pool stage each
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # Training images are blended a random amount towards a Gaussian blur of this sigma (pixels):
    # generated slices are smoother than real ones, and a yardstick that read sharpness as a class
    # cue would judge the smoothing, not the anatomy (measured: without it, every demo sample read NC).
    blur_sigma: float = 1.0
    seed: int = 0


class SliceClassifier(nn.Module):
    """Conv-GroupNorm-SiLU-maxpool stages, global average pooling (the feature vector), one linear layer.

    GroupNorm, not BatchNorm: it behaves the same in training and evaluation, so a short training run
    (a small dataset) leaves no half-settled running statistics behind."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        layers, previous = [], 1
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, 3, padding=1, bias=False),
                nn.GroupNorm(math.gcd(8, width), width),
                nn.SiLU(),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(previous, len(CLASS_NAMES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, S, S) images with reflected borders."""
    radius = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-coords.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


@torch.no_grad()
def classify(model: SliceClassifier, pixels: torch.Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, S, S) → predicted labels (N,) and penultimate features (N, D) in float64."""
    model.eval()
    predictions, features = [], []
    for chunk in pixels.split(CHUNK):
        feature = model.features(to_model_range(chunk.unsqueeze(1)).to(device))
        predictions.append(model.head(feature).argmax(1).cpu())
        features.append(feature.double().cpu())
    return torch.cat(predictions).numpy(), torch.cat(features).numpy()


def train_classifier(
    train: SliceDataset, val: SliceDataset, settings: ClassifierSettings, device: torch.device
) -> tuple[SliceClassifier, float]:
    """Train on position-balanced draws of `train` with random left-right flips (a brain is nearly
    symmetric) and random blur; keep the epoch with the best val accuracy. Returns the model and that accuracy."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = SliceClassifier(settings.channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs * steps_per_epoch)
    weights = torch.from_numpy(position_balancing_weights(train.labels.numpy(), train.slice_indices.numpy()))
    best_accuracy, best_state = -1.0, {}
    for _ in tqdm(range(settings.epochs), desc="training the AD/NC classifier", leave=False):
        model.train()
        for batch in torch.multinomial(weights, len(train), replacement=True, generator=generator).split(settings.batch_size):
            images = to_model_range(train.pixels[batch].unsqueeze(1))
            flip = (torch.rand(len(batch), generator=generator) < 0.5).view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images).to(device)
            if settings.blur_sigma > 0:
                amount = torch.rand(len(batch), 1, 1, 1, generator=generator).to(device)
                images = torch.lerp(images, gaussian_blur(images, settings.blur_sigma), amount)
            loss = F.cross_entropy(model(images), train.labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        accuracy = float(np.mean(classify(model, val.pixels, device)[0] == val.labels.numpy()))
        if accuracy > best_accuracy:
            best_accuracy, best_state = accuracy, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval(), best_accuracy


def classifier_fingerprint(splits: dict[str, list[str]], image_size: int, settings: ClassifierSettings) -> str:
    """A hash of everything the trained classifier depends on: change any of it and it is retrained."""
    inputs = {"format": CLASSIFIER_FORMAT, "splits": splits, "image_size": image_size, "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def load_or_train_classifier(
    run_dir: Path,
    datasets: dict[str, SliceDataset],
    splits: dict[str, list[str]],
    image_size: int,
    device: torch.device,
    retrain: bool,
    settings: ClassifierSettings = ClassifierSettings(),
) -> tuple[SliceClassifier, dict]:
    """The run's cached classifier when its fingerprint matches (and not `retrain`); else train and cache one."""
    path = run_dir / CLASSIFIER_FILE
    fingerprint = classifier_fingerprint(splits, image_size, settings)
    if path.is_file() and not retrain:
        try:
            state = load_checkpoint(path, device)
        except UsageError:
            state = {}  # an unreadable cache is a stale cache
        if state.get("fingerprint") == fingerprint:
            model = SliceClassifier(settings.channels).to(device)
            model.load_state_dict(state["model"])
            return model.eval(), {
                "source": f"reused {path.name}",
                "val_accuracy": state["val_accuracy"],
                "settings": asdict(settings),
            }
    model, val_accuracy = train_classifier(datasets["train"], datasets["val"], settings, device)
    save_checkpoint(
        {"fingerprint": fingerprint, "settings": asdict(settings), "model": model.state_dict(), "val_accuracy": val_accuracy},
        path,
    )
    return model, {"source": f"trained, saved as {path.name}", "val_accuracy": val_accuracy, "settings": asdict(settings)}


def classifier_controls(test_predictions: np.ndarray, train: SliceDataset, test: SliceDataset) -> dict:
    """Test accuracy beside what slice position alone achieves, position-balanced, and per slice tercile."""
    labels, slices = test.labels.numpy(), test.slice_indices.numpy()
    correct = test_predictions == labels
    position_correct = slice_position_only_predictions(train, test) == labels
    edges = np.quantile(train.slice_indices.numpy(), [1 / 3, 2 / 3])
    tercile = np.searchsorted(edges, slices, side="right")
    terciles = []
    for part in range(3):
        here = tercile == part
        if here.any():
            terciles.append(
                {
                    "slices": f"{slices[here].min()}-{slices[here].max()}",
                    "images": int(here.sum()),
                    "AD_share": float(np.mean(labels[here] == 0)),
                    "classifier_accuracy": float(correct[here].mean()),
                    "slice_position_only_accuracy": float(position_correct[here].mean()),
                }
            )
    return {
        "test_accuracy": float(correct.mean()),
        "test_accuracy_position_balanced": float(np.average(correct, weights=position_balancing_weights(labels, slices))),
        "slice_position_only_test_accuracy": float(position_correct.mean()),
        "slice_terciles": terciles,
    }


# ============================================================================ images and their measurements


@dataclass
class ImageSet:
    """Images of one origin (uint8, N × S × S) with their labels (asked-for or true) and what the
    classifier makes of them; `nearest_train` is filled in for the sets checked for memorisation."""

    pixels: torch.Tensor
    labels: np.ndarray
    predictions: np.ndarray
    features: np.ndarray
    nearest_train: np.ndarray | None = None

    def where(self, keep: np.ndarray) -> ImageSet:
        nearest = None if self.nearest_train is None else self.nearest_train[keep]
        return ImageSet(
            self.pixels[torch.from_numpy(keep)], self.labels[keep], self.predictions[keep], self.features[keep], nearest
        )

    def of_label(self, label: int | None) -> ImageSet:
        return self if label is None else self.where(self.labels == label)


def measured(model: SliceClassifier, pixels: torch.Tensor, labels: np.ndarray, device: torch.device) -> ImageSet:
    return ImageSet(pixels, labels, *classify(model, pixels, device))


def generate_images(pipe: Pipeline, label: int, args) -> torch.Tensor:
    """`args.num_samples` generated images of one label as uint8 (N, S, S), in predict.py's seeded batches."""
    latents = pipe.generate(label, args.num_samples, **sampling_options(args), progress="generating")
    return torch.cat([torch.from_numpy(to_uint8(pipe.decode(chunk))) for chunk in latents.split(args.batch_size)])


def reconstruct(pipe: Pipeline, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, S, S) → their VAE reconstructions from the posterior mean, uint8: the most
    faithful image the generator's decoder can produce, so the ceiling for generated images."""
    images = []
    for chunk in pixels.split(CHUNK):
        images.append(torch.from_numpy(to_uint8(pipe.decode(pipe.encode(to_model_range(chunk.unsqueeze(1)))))))
    return torch.cat(images)


def per_label_positions(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of up to `count` random images of each label."""
    chosen = [
        rng.choice(np.flatnonzero(labels == label), min(count, int(np.sum(labels == label))), replace=False)
        for label in range(len(CLASS_NAMES))
    ]
    return np.sort(np.concatenate(chosen))


def distribution(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "p1": float(np.percentile(values, 1)), "median": float(np.median(values))}


def group_metrics(
    generated: ImageSet,
    real_test: ImageSet,
    reconstructed_test: ImageSet,
    train_sample: ImageSet,
    real_sample: ImageSet,
    near_copy_threshold: float,
    seed: int,
    device: torch.device,
) -> dict:
    """Every generated-vs-real metric for one group of images (all, or one label)."""
    kid = kernel_inception_distance(generated.features, real_test.features, seed=seed)
    kid_floor = kernel_inception_distance(train_sample.features, real_test.features, seed=seed)
    return {
        "generated_images": len(generated.labels),
        "conditioning_accuracy": float(np.mean(generated.predictions == generated.labels)),
        "real_test_accuracy": float(np.mean(real_test.predictions == real_test.labels)),
        "reconstructed_test_accuracy": float(np.mean(reconstructed_test.predictions == reconstructed_test.labels)),
        "frechet_distance": frechet_distance(generated.features, real_test.features),
        "frechet_floor": frechet_distance(train_sample.features, real_test.features),
        "kid": kid[0],
        "kid_std": kid[1],
        "kid_floor": kid_floor[0],
        "kid_floor_std": kid_floor[1],
        "ms_ssim_generated": pairwise_ms_ssim(to_model_range(generated.pixels.unsqueeze(1)).to(device), seed=seed),
        "ms_ssim_real": pairwise_ms_ssim(to_model_range(real_sample.pixels.unsqueeze(1)).to(device), seed=seed),
        "nearest_train_generated": distribution(generated.nearest_train),
        "nearest_train_real": distribution(real_sample.nearest_train),
        "near_copy_share_generated": float(np.mean(generated.nearest_train < near_copy_threshold)),
        "near_copy_share_real": float(np.mean(real_sample.nearest_train < near_copy_threshold)),
    }


def anatomy(generated: ImageSet, real_test: ImageSet) -> dict:
    """CSF-dark share of AD vs NC images, generated beside real; Cohen's d is AD minus NC."""
    report = {}
    for name, images in (("generated", generated), ("real_test", real_test)):
        shares = np.array([csf_dark_share(brain_pixels(image)) for image in images.pixels.numpy()])
        by_label = [shares[(images.labels == label) & np.isfinite(shares)] for label in range(len(CLASS_NAMES))]
        report[name] = {}
        for label, values in enumerate(by_label):
            report[name][f"{CLASS_NAMES[label]}_mean"] = float(values.mean()) if len(values) else math.nan
            report[name][f"{CLASS_NAMES[label]}_std"] = float(values.std(ddof=1)) if len(values) >= 2 else math.nan
        report[name]["cohens_d_AD_minus_NC"] = cohens_d(*by_label) if min(map(len, by_label)) >= 2 else math.nan
    d_generated, d_real = report["generated"]["cohens_d_AD_minus_NC"], report["real_test"]["cohens_d_AD_minus_NC"]
    report["directions_agree"] = (
        None if math.isnan(d_generated) or math.isnan(d_real) else bool(np.sign(d_generated) == np.sign(d_real))
    )
    return report


def without_nan(value: object) -> object:
    """NaN is not JSON: write it as null."""
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ============================================================================ the report


def number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


GROUP_ROWS = (
    (
        "conditioning accuracy: generated images classified as the asked-for label",
        lambda g: number(g["conditioning_accuracy"], 3),
    ),
    ("classifier accuracy on real test images (the ceiling)", lambda g: number(g["real_test_accuracy"], 3)),
    ("classifier accuracy on VAE reconstructions of real test images", lambda g: number(g["reconstructed_test_accuracy"], 3)),
    ("Fréchet distance, generated vs real test", lambda g: number(g["frechet_distance"])),
    ("Fréchet floor, real train vs real test", lambda g: number(g["frechet_floor"])),
    ("KID, generated vs real test (± std over subsets)", lambda g: f"{number(g['kid'])} ± {number(g['kid_std'], 2)}"),
    ("KID floor, real train vs real test", lambda g: f"{number(g['kid_floor'])} ± {number(g['kid_floor_std'], 2)}"),
    ("MS-SSIM of random generated pairs (match real; higher = less diverse)", lambda g: number(g["ms_ssim_generated"], 3)),
    ("MS-SSIM of random real test pairs", lambda g: number(g["ms_ssim_real"], 3)),
    (
        "nearest-training-image distance, generated: median (1st percentile)",
        lambda g: f"{number(g['nearest_train_generated']['median'], 3)} ({number(g['nearest_train_generated']['p1'], 3)})",
    ),
    (
        "nearest-training-image distance, real test: median (1st percentile)",
        lambda g: f"{number(g['nearest_train_real']['median'], 3)} ({number(g['nearest_train_real']['p1'], 3)})",
    ),
    (
        "near-copies: share closer than 99% of real test images (real: about 0.01)",
        lambda g: f"{number(g['near_copy_share_generated'], 3)} (real {number(g['near_copy_share_real'], 3)})",
    ),
)


def markdown_report(metrics: dict) -> str:
    settings, groups, controls, csf = metrics["settings"], metrics["groups"], metrics["classifier"], metrics["anatomy"]
    lines = [
        f"# Sample quality: {metrics['run']} (UNet epoch {metrics['run_epoch']})",
        "",
        (
            f"{settings['num_samples']} generated images per label, {settings['sampler'].upper()} {settings['steps']} steps, guidance {settings['guidance']}, "
            f"seed {settings['seed']}; {metrics['real_test_images']} real test images."
        ),
        "",
        "| metric | " + " | ".join(groups) + " |",
        "|---|" + "---:|" * len(groups),
    ]
    lines += [f"| {title} | " + " | ".join(cell(group) for group in groups.values()) + " |" for title, cell in GROUP_ROWS]
    lines += [
        "",
        f"## The classifier and slice position ({controls['source']})",
        "",
        (
            f"Real test accuracy {number(controls['test_accuracy'], 3)}; weighted so every slice index is half AD, half NC: "
            f"{number(controls['test_accuracy_position_balanced'], 3)}. Slice-position-only accuracy (logistic regression "
            f"from slice index alone, fit on train): {number(controls['slice_position_only_test_accuracy'], 3)}. "
            f"Val accuracy {number(controls['val_accuracy'], 3)}."
        ),
        "",
        "| slice tercile | test images | AD share | classifier accuracy | slice-position-only accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {t['slices']} | {t['images']} | {number(t['AD_share'], 3)} | {number(t['classifier_accuracy'], 3)} | "
        f"{number(t['slice_position_only_accuracy'], 3)} |"
        for t in controls["slice_terciles"]
    ]
    agree = {True: "yes", False: "**no**", None: "n/a"}[csf["directions_agree"]]
    lines += [
        "",
        "## Anatomy: CSF-dark share of brain pixels (ventricles and sulci widen in AD)",
        "",
        "| images | AD mean ± sd | NC mean ± sd | Cohen's d (AD − NC) |",
        "|---|---:|---:|---:|",
    ]
    for name in ("generated", "real_test"):
        row = csf[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {number(row['AD_mean'], 3)} ± {number(row['AD_std'], 2)} | "
            f"{number(row['NC_mean'], 3)} ± {number(row['NC_std'], 2)} | {number(row['cohens_d_AD_minus_NC'], 3)} |"
        )
    lines += [
        "",
        f"Directions agree: {agree}.",
        "",
        (
            "Fréchet distance and KID are measured in the penultimate features of the run's own AD/NC classifier, so they "
            "compare only within this table (against their floors). ImageNet-FID is not computed: no Inception weights "
            f"can be downloaded here. Distances are RMS pixel differences in 8-bit grey levels at {metrics['image_size']} px; "
            "the training images searched include both labels."
        ),
    ]
    return "\n".join(lines) + "\n"


# ============================================================================ command line


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder (default: the run whose unet.pt is newest in runs/)")
    parser.add_argument("--num-samples", type=int, default=500, help="generated images per label (default 500)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (default 64)")
    parser.add_argument("--retrain-classifier", action="store_true", help="train the AD/NC classifier anew, even if cached")
    parser.add_argument("--overwrite", action="store_true", help="replace the run's existing metrics.json and metrics.md")
    return parser


def check_arguments(args) -> None:
    if args.num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2 (pairs and spreads need two), got {args.num_samples}")
    check_sampling_options(args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with usage_errors_exit():
        check_arguments(args)
        pipe = load_run_for(args)
        device = pipe.runtime.device
        outputs = {"json": pipe.run_dir / "metrics.json", "md": pipe.run_dir / "metrics.md"}
        existing = [path for path in outputs.values() if path.exists()]
        if existing and not args.overwrite:
            raise UsageError(f"{existing[0]} already exists: add --overwrite to replace it")
        if not (pipe.run_dir / "splits.json").is_file():
            raise UsageError(f"{pipe.run_dir} has no splits.json: it is not a finished brainLDM run")
        datasets, splits = load_split_datasets(
            pipe.config.data, load_splits(pipe.run_dir / "splits.json"), return_slice=True, verbose=False
        )
        train, test = datasets["train"], datasets["test"]
        seed_everything(args.seed)
        rng = np.random.default_rng(args.seed)
        print(
            f"run {pipe.run_dir} (epoch {pipe.epoch}) | {args.sampler} {args.steps} steps | guidance {args.guidance} | device {device}"
        )

        classifier, classifier_info = load_or_train_classifier(
            pipe.run_dir, datasets, splits, pipe.config.data.image_size, device, args.retrain_classifier
        )
        real_test = measured(classifier, test.pixels, test.labels.numpy(), device)
        reconstructed_test = measured(classifier, reconstruct(pipe, test.pixels), test.labels.numpy(), device)
        controls = classifier_controls(real_test.predictions, train, test) | classifier_info
        # The floor compares as many real training images as there are generated ones, as Fréchet
        # distance and KID depend on the sample size.
        floor_positions = per_label_positions(train.labels.numpy(), args.num_samples, rng)
        train_sample = measured(classifier, train.pixels[floor_positions], train.labels.numpy()[floor_positions], device)

        started = time.perf_counter()
        generated_pixels = torch.cat([generate_images(pipe, label, args) for label in range(len(CLASS_NAMES))])
        seconds = time.perf_counter() - started
        asked_labels = np.repeat(np.arange(len(CLASS_NAMES)), args.num_samples)
        generated = measured(classifier, generated_pixels, asked_labels, device)

        real_sample = real_test.where(per_label_positions(real_test.labels, args.num_samples, rng))
        for images in (generated, real_sample):
            images.nearest_train = nearest_distances(images.pixels.to(device), train.pixels)[0]
        near_copy_threshold = float(np.percentile(real_sample.nearest_train, NEAR_COPY_PERCENTILE))

        groups = {}
        for label, name in [(None, "all")] + list(enumerate(CLASS_NAMES)):
            groups[name] = group_metrics(
                generated.of_label(label),
                real_test.of_label(label),
                reconstructed_test.of_label(label),
                train_sample.of_label(label),
                real_sample.of_label(label),
                near_copy_threshold,
                args.seed,
                device,
            )
        metrics = without_nan(
            {
                "run": str(pipe.run_dir),
                "run_epoch": pipe.epoch,
                "image_size": pipe.config.data.image_size,
                "settings": {
                    "num_samples": args.num_samples,
                    "steps": args.steps,
                    "guidance": args.guidance,
                    "seed": args.seed,
                    "sampler": args.sampler,
                    "batch_size": args.batch_size,
                },
                "generation_seconds": round(seconds, 3),
                "real_test_images": len(test),
                "near_copy_threshold": near_copy_threshold,
                "classifier": controls,
                "groups": groups,
                "anatomy": anatomy(generated, real_test),
            }
        )
        report = markdown_report(metrics)
        write_json_atomic(outputs["json"], metrics)
        write_text_atomic(outputs["md"], report)
    print(report)
    print(f"wrote {outputs['json']} and {outputs['md']}")


if __name__ == "__main__":
    main()
