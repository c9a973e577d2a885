"""The AD/NC slice classifier that evaluate.py measures generated images with, its training, its cache,
and its slice-position controls.

A yardstick for generated images must read anatomy, not how a decoder renders it. So the run's
classifier learns from real training slices *and* their VAE reconstructions (same labels), under
augmentations that mimic decoder artefacts: blur, pixel noise, brightness and contrast shifts, and a
faint checkerboard of the periods that stride-2 up/downsampling leaves. Its best epoch is the one with
the best mean accuracy over real val slices and their reconstructions. The same architecture and
augmentations train the train-on-synthetic classifiers (TSTR).

Slice position is a confound in ADNI (AD scans' windows start lower), so the yardstick learns from a
position-balanced draw (at every slice index half AD, half NC), and `classifier_controls` reports what
position alone could win.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from config import CLASS_NAMES
from dataset import SliceDataset, to_model_range
from utils import UsageError, load_checkpoint, save_checkpoint

CLASSIFIER_FILE = "classifier.pt"
CLASSIFIER_FORMAT = 3  # bump when the architecture or training changes, so caches retrain (3: + reconstructions)
CHUNK = 256  # images per forward pass when only measuring


@dataclass(frozen=True)
class ClassifierSettings:
    """How a classifier is built and trained; part of the yardstick's cache fingerprint.

    Each artefact augmentation is applied to a random half of a batch, at a random strength up to
    its maximum, so clean images stay in the mix. Strengths are in the model's [-1, 1] units."""

    channels: tuple[int, ...] = (16, 32, 64, 128)  # one conv + 2x max-pool stage each
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    blur_sigma: float = 1.0  # blended a random amount towards a Gaussian blur of this sigma (pixels)
    noise_std: float = 0.05
    brightness: float = 0.1  # added offset up to ±this
    contrast: float = 0.15  # gain up to 1 ± this
    grid_amplitude: float = 0.06  # checkerboard of period 2, 4 or 8 pixels, up to ±this
    with_reconstructions: bool = True  # the yardstick also learns from VAE reconstructions
    seed: int = 0


GRID_PERIODS = (2, 4, 8)  # what one, two and three stride-2 stages leave behind


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


def checkerboard(size: int, period: int, phase: tuple[int, int]) -> torch.Tensor:
    """A ±1 checkerboard (size, size) whose squares are period/2 pixels wide, shifted by `phase`."""
    cells = (torch.arange(size) + torch.tensor(phase)[:, None]) // max(1, period // 2)
    return ((cells[0][:, None] + cells[1][None, :]) % 2).float() * 2 - 1


def with_decoder_artefacts(images: torch.Tensor, settings: ClassifierSettings, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of (B, 1, S, S) images in [-1, 1]: a left-right flip (a brain is nearly
    symmetric), then blur, noise, brightness/contrast and a checkerboard, each on a random half of the
    batch at a random strength. Random numbers come from `generator` (CPU), so a seed fixes them."""
    count, size = len(images), images.shape[-1]

    def uniform(low: float, high: float) -> torch.Tensor:  # (B, 1, 1, 1) on the images' device
        return (low + (high - low) * torch.rand(count, 1, 1, 1, generator=generator)).to(images.device)

    def half() -> torch.Tensor:  # 1 for a random half of the batch, else 0
        return (torch.rand(count, 1, 1, 1, generator=generator) < 0.5).float().to(images.device)

    images = torch.where(half().bool(), images.flip(-1), images)
    if settings.blur_sigma > 0:
        images = torch.lerp(images, gaussian_blur(images, settings.blur_sigma), uniform(0, 1) * half())
    images = images * (1 + settings.contrast * uniform(-1, 1) * half()) + settings.brightness * uniform(-1, 1) * half()
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    images = images + noise * settings.noise_std * uniform(0, 1) * half()
    if settings.grid_amplitude > 0:
        period = GRID_PERIODS[int(torch.randint(len(GRID_PERIODS), (), generator=generator))]
        phase = tuple(int(p) for p in torch.randint(period, (2,), generator=generator))
        grid = checkerboard(size, period, phase).to(images.device)
        images = images + grid * settings.grid_amplitude * uniform(-1, 1) * half()
    return images


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


def accuracy(model: SliceClassifier, pixels: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    return float(np.mean(classify(model, pixels, device)[0] == labels.numpy()))


def train_classifier(
    pixels: torch.Tensor,
    labels: torch.Tensor,
    settings: ClassifierSettings,
    device: torch.device,
    weights: torch.Tensor | None = None,
    validation: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    description: str = "training an AD/NC classifier",
    draws_per_epoch: int | None = None,
) -> tuple[SliceClassifier, float | None]:
    """Train on uint8 images (N, S, S) with labels (N,) for `settings.epochs` epochs of
    `draws_per_epoch` (default N) draws with replacement, by `weights` when given, else uniform, under
    `with_decoder_artefacts`.

    With `validation` sets [(pixels, labels), ...] the epoch with the best mean accuracy over them is
    kept and that accuracy returned; without, the last epoch is kept (None), as in TSTR, where no
    real image may choose the model."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = SliceClassifier(settings.channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    draws = len(pixels) if draws_per_epoch is None else draws_per_epoch
    steps_per_epoch = math.ceil(draws / settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs * steps_per_epoch)
    draw_weights = torch.ones(len(pixels), dtype=torch.float64) if weights is None else weights
    best_accuracy, best_state = None, None
    for _ in tqdm(range(settings.epochs), desc=description, leave=False):
        model.train()
        for batch in torch.multinomial(draw_weights, draws, replacement=True, generator=generator).split(settings.batch_size):
            images = with_decoder_artefacts(to_model_range(pixels[batch].unsqueeze(1)).to(device), settings, generator)
            loss = F.cross_entropy(model(images), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if validation:
            score = float(np.mean([accuracy(model, *pair, device) for pair in validation]))
            if best_accuracy is None or score > best_accuracy:
                best_accuracy, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), best_accuracy


# ============================================================================ the run's yardstick


def position_balancing_weights(labels: np.ndarray, slice_indices: np.ndarray) -> np.ndarray:
    """Per-image weights under which every slice index is half AD, half NC, each index keeping its share
    of the images. Indices that hold one class only get weight 0: position alone decides them (all
    zero when no index holds both: `check_position_balance`)."""
    weights = np.zeros(len(labels))
    for index in np.unique(slice_indices):
        here = slice_indices == index
        counts = np.bincount(labels[here], minlength=len(CLASS_NAMES))
        if (counts > 0).all():
            weights[here] = here.sum() / (len(CLASS_NAMES) * counts[labels[here]])
    return weights


def check_position_balance(train: SliceDataset) -> None:
    """The yardstick learns from a position-balanced draw of the training slices: some slice index must
    hold both AD and NC, or slice position alone separates the classes and nothing is left to learn."""
    if not position_balancing_weights(train.labels.numpy(), train.slice_indices.numpy()).any():
        raise UsageError(
            "no slice index of the training split holds both AD and NC images: slice position alone separates "
            "the classes, so no yardstick can be trained on anatomy; use a dataset whose classes share slice positions"
        )


def classifier_fingerprint(
    splits: dict[str, list[str]], image_size: int, vae_fingerprint: str, settings: ClassifierSettings
) -> str:
    """A hash of everything the trained yardstick depends on (the VAE too: it learns from its
    reconstructions): change any of it and it is retrained."""
    inputs = {
        "format": CLASSIFIER_FORMAT,
        "splits": splits,
        "image_size": image_size,
        "vae": vae_fingerprint,
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def train_yardstick(
    datasets: dict[str, SliceDataset],
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    settings: ClassifierSettings,
    device: torch.device,
) -> tuple[SliceClassifier, float]:
    """The run's classifier: position-balanced real training slices plus (with_reconstructions) their
    reconstructions, chosen on val real and val reconstructions. Returns it and its val accuracy."""
    train, val = datasets["train"], datasets["val"]
    check_position_balance(train)
    weights = torch.from_numpy(position_balancing_weights(train.labels.numpy(), train.slice_indices.numpy()))
    pixels, labels, validation = train.pixels, train.labels, [(val.pixels, val.labels)]
    if settings.with_reconstructions:
        pixels = torch.cat([pixels, reconstruct(train.pixels)])
        labels, weights = torch.cat([labels, labels]), torch.cat([weights, weights])
        validation.append((reconstruct(val.pixels), val.labels))
    model, val_accuracy = train_classifier(
        pixels, labels, settings, device, weights, validation, description="training the AD/NC yardstick"
    )
    return model, val_accuracy


def cached_yardstick(
    path: Path, fingerprint: str, settings: ClassifierSettings, device: torch.device
) -> tuple[SliceClassifier, float] | None:
    """The yardstick cached in `path` and its val accuracy, when it was trained on what `fingerprint`
    describes; None for a stale cache, and for a damaged or foreign file (not a checkpoint, not a
    dict, weights of another shape), which only costs a retraining."""
    try:
        state = load_checkpoint(path, device)
    except UsageError:
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint or "val_accuracy" not in state:
        return None
    model = SliceClassifier(settings.channels).to(device)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError, AttributeError):
        return None
    return model.eval(), state["val_accuracy"]


def load_or_train_yardstick(
    run_dir: Path,
    datasets: dict[str, SliceDataset],
    splits: dict[str, list[str]],
    image_size: int,
    vae_fingerprint: str,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    retrain: bool,
    settings: ClassifierSettings = ClassifierSettings(),
) -> tuple[SliceClassifier, dict]:
    """The run's cached classifier when its fingerprint matches (and not `retrain`); else train and cache one.
    `reconstruct` maps uint8 images (N, S, S) to their uint8 VAE reconstructions."""
    path = run_dir / CLASSIFIER_FILE
    fingerprint = classifier_fingerprint(splits, image_size, vae_fingerprint, settings)
    info = {"settings": asdict(settings)}
    if path.is_file() and not retrain:
        cached = cached_yardstick(path, fingerprint, settings, device)
        if cached is not None:
            return cached[0], {"source": f"reused {path.name}", "val_accuracy": cached[1]} | info
    model, val_accuracy = train_yardstick(datasets, reconstruct, settings, device)
    save_checkpoint(
        {"fingerprint": fingerprint, "settings": asdict(settings), "model": model.state_dict(), "val_accuracy": val_accuracy},
        path,
    )
    return model, {"source": f"trained, saved as {path.name}", "val_accuracy": val_accuracy} | info


# ============================================================================ slice-position controls


def slice_position_only_predictions(train: SliceDataset, test: SliceDataset) -> np.ndarray:
    """Test predictions of a logistic regression from slice index alone, fit on train: what position can win."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression())
    model.fit(train.slice_indices.numpy()[:, None].astype(float), train.labels.numpy())
    return model.predict(test.slice_indices.numpy()[:, None].astype(float))


def classifier_controls(test_predictions: np.ndarray, train: SliceDataset, test: SliceDataset) -> dict:
    """Test accuracy beside what slice position alone achieves, position-balanced, and per slice tercile."""
    labels, slices = test.labels.numpy(), test.slice_indices.numpy()
    correct = test_predictions == labels
    position_correct = slice_position_only_predictions(train, test) == labels
    balance = position_balancing_weights(labels, slices)  # all zero when no test slice index holds both labels
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
        "test_accuracy_position_balanced": float(np.average(correct, weights=balance)) if balance.any() else math.nan,
        "slice_position_only_test_accuracy": float(position_correct.mean()),
        "slice_terciles": terciles,
    }
