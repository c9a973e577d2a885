"""Measure a trained run's samples: does the AD/NC conditioning work, how close to real and how diverse
are they, are they useful as training data, are any copies of training images, and which guidance
scale suits the run.

    python evaluate.py                                    # the latest run, 500 images per label
    python evaluate.py --run runs/adni --num-samples 1000 --device cuda --umap
    python evaluate.py --guidance-sweep 1,1.5,2,3,5       # pick the guidance scale
    python evaluate.py --counterfactuals                  # counterfactuals against the demo's true ones
    python evaluate.py --sampler-sweep ddim:50,dpmpp_2m:10,dpmpp_2m:20 --seeds 0,1   # pick sampler and steps

No ImageNet network can be downloaded here, so the yardstick is the run's own: a small CNN trained to
tell AD from NC on the run's training slices and their VAE reconstructions, with augmentations that
mimic decoder artefacts, so that it reads anatomy and not rendering (classifier.py; cached as
<run>/classifier.pt). Reported, for all images and per label:
- conditioning: the AD-vs-NC effect on the CSF-dark share of brain pixels (ventricles and sulci widen in
  AD), Cohen's d generated beside real with bootstrap 95% intervals; and the share of generated images
  the yardstick assigns to the asked-for label, beside its accuracy on real test slices and on their
  VAE reconstructions (the two must agree, or the yardstick is reading the decoder);
- fidelity and diversity in the yardstick's penultimate features, generated vs real test, each beside
  the floor that real training images reach against the same test images: Fréchet distance, KID,
  precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020), k = 5; and
  MS-SSIM of random pairs (match real; mode collapse shows as a higher value);
- sharpness: the spectral energy per frequency band (over the real test slices') of generated images,
  of the test slices' VAE reconstructions and of real training slices, with the reconstructions' PSNR,
  SSIM and MS-SSIM: the decoder's blur, which MS-SSIM at 64 px cannot see, shows in the top band;
- use as training data: the same classifier trained on generated images only and tested on real test
  slices (TSTR), beside trained on as many real training slices, and on both;
- memorisation: each generated image's nearest training image by RMS pixel distance and by Pearson
  correlation (brightness-blind), beside the same for real test images, the share of near-copies, and
  memorisation.png (the 8 closest pairs by each measure).
Slice position is a confound in ADNI; classifier.py's controls show what slice position alone wins.

Writes <run>/metrics.json, <run>/metrics.md (also printed) and <run>/memorisation.png; with --umap also
<run>/umap_features.png (real and generated images in the yardstick's features); with --guidance-sweep
instead <run>/guidance_sweep.{json,md,png}; with --sampler-sweep instead <run>/sampler_sweep.{json,md,png}
(each sampler:steps at each of --seeds, paired per seed with the setting of most steps); with
--over-training instead <run>/over_training.{json,md,png} (the sweep's figures at every UNet epoch the run
kept with --run.keep_every, against training images and minutes); `--quality-curves RUN ... --out F.png`
draws several runs' over-training records in one figure (and table, F.md); with --counterfactuals instead
<run>/counterfactuals.{json,md,png} (counterfactual.py: NC → AD and AD → NC on the demo's pairs, both
methods, a strength sweep). The same --seed and settings give the same numbers; the samples are
predict.py's for the same seed, sampler, steps and batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from classifier import (
    CLASSIFIER_FILE,
    ClassifierSettings,
    SliceClassifier,
    accuracy,
    check_position_balance,
    classifier_controls,
    classify,
    load_or_train_yardstick,
    train_classifier,
)
from config import CLASS_NAMES, DEMO_DATA_DIR, MAX_GUIDANCE, PAIRS_FOLDER
from counterfactual import DEFAULT_GUIDANCE as COUNTERFACTUAL_GUIDANCE
from counterfactual import DEFAULT_STEPS as COUNTERFACTUAL_STEPS
from counterfactual import TARGETS, check_pairs_folder, read_pairs, recommend, save_pairs_figure
from counterfactual import Settings as CounterfactualSettings
from counterfactual import markdown_report as counterfactual_report
from counterfactual import sweep as counterfactual_sweep
from dataset import (
    CORTEX_BAND,
    CSF_REGIONS,
    SliceDataset,
    cohens_d,
    csf_dark_shares,
    csf_dark_shares_by_region,
    load_split_datasets,
    load_splits,
    to_model_range,
    zero_spread,
)
from metrics import (
    BAND_LABELS,
    PRDC_NEIGHBOURS,
    SPECTRAL_BANDS,
    cohens_d_interval,
    distribution,
    frechet_distance,
    kernel_inception_distance,
    most_correlated,
    nearest_distances,
    pairwise_ms_ssim,
    precision_recall_density_coverage,
    psnr,
    spectral_energy_kept,
)
from modules import SAMPLERS, ms_ssim, ssim
from pipeline import (
    MAX_SEED,
    Pipeline,
    check_sampling_options,
    dataset_folders,
    fingerprint,
    load_run,
    load_run_for,
    sampling_options,
    snapshots,
)
from utils import (
    ArgumentParser,
    UsageError,
    check_output_paths,
    new_figure,
    remove_temporary_files,
    report_removed,
    save_figure,
    seed_everything,
    to_uint8,
    umap_embedding,
    usage_errors_exit,
    write_json_atomic,
    write_text_atomic,
)

NEAR_COPY_PERCENTILE = 1.0  # of real test images' nearest-training distances (99th of their correlations)
MEMORISATION_PAIRS = 8
CHUNK = 256  # images per forward pass when only measuring
EVALUATION_FILES = ("metrics.json", "metrics.md", "memorisation.png")
UMAP_FILE = "umap_features.png"
SWEEP_FILES = ("guidance_sweep.json", "guidance_sweep.md", "guidance_sweep.png")
SAMPLER_SWEEP_FILES = ("sampler_sweep.json", "sampler_sweep.md", "sampler_sweep.png")
OVER_TRAINING_FILES = ("over_training.json", "over_training.md", "over_training.png")
COUNTERFACTUAL_FILES = ("counterfactuals.json", "counterfactuals.md", "counterfactuals.png")
DEFAULT_PAIRS = Path(DEMO_DATA_DIR).parent / PAIRS_FOLDER
COUNTERFACTUAL_STRENGTHS = (0.2, 0.3, 0.4, 0.5, 0.6)  # --strengths' default sweep
PAIR_SLICES = 90  # --pair-slices' default: one slice of every demo test scan
GROUPS = ((None, "all"), *enumerate(CLASS_NAMES))  # every figure is reported for all images and per label


# ============================================================================ images and their measurements


@dataclass
class ImageSet:
    """Images of one origin (uint8, N × S × S) with their labels (asked-for or true) and what the
    yardstick makes of them; the nearest-training-image fields are filled in for the sets checked for
    memorisation."""

    pixels: torch.Tensor
    labels: np.ndarray
    predictions: np.ndarray
    features: np.ndarray
    nearest_distance: np.ndarray | None = None  # RMS pixel distance to the nearest training image
    nearest_index: np.ndarray | None = None
    top_correlation: np.ndarray | None = None  # highest Pearson correlation with any training image
    correlated_index: np.ndarray | None = None

    def where(self, keep: np.ndarray) -> ImageSet:
        """The images at the positions or boolean mask `keep`."""
        keep = np.asarray(keep)
        kept = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kept[field.name] = (
                value[torch.from_numpy(keep)] if isinstance(value, torch.Tensor) else None if value is None else value[keep]
            )
        return ImageSet(**kept)

    def of_label(self, label: int | None) -> ImageSet:
        return self if label is None else self.where(self.labels == label)

    def find_nearest_training_images(self, train_pixels: torch.Tensor, device: torch.device) -> None:
        self.nearest_distance, self.nearest_index = nearest_distances(self.pixels.to(device), train_pixels)
        self.top_correlation, self.correlated_index = most_correlated(self.pixels.to(device), train_pixels)


def measured(model: SliceClassifier, pixels: torch.Tensor, labels: np.ndarray, device: torch.device) -> ImageSet:
    return ImageSet(pixels, labels, *classify(model, pixels, device))


def generate_images(pipe: Pipeline, label: int, args: argparse.Namespace) -> torch.Tensor:
    """`args.num_samples` generated images of one label as uint8 (N, S, S), in predict.py's seeded batches."""
    latents = pipe.generate(label, args.num_samples, **sampling_options(args), progress="generating")
    return torch.cat([torch.from_numpy(to_uint8(pipe.decode(chunk))) for chunk in latents.split(args.batch_size)])


def reconstruct(pipe: Pipeline, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, S, S) → their VAE reconstructions from the posterior mean, uint8: the most
    faithful image the generator's decoder can produce."""
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


def prdc_or_nan(real: np.ndarray, generated: np.ndarray) -> dict[str, float]:
    """Precision/recall/density/coverage, or NaN for each when a set has too few images for k."""
    if min(len(real), len(generated)) <= PRDC_NEIGHBOURS:
        return dict.fromkeys(("precision", "recall", "density", "coverage"), math.nan)
    return precision_recall_density_coverage(real, generated)


@dataclass
class Reference:
    """What generated images are measured against, shared by a full evaluation and a guidance sweep."""

    train: SliceDataset
    real_test: ImageSet  # every real test slice, true labels
    reconstructed_test: ImageSet  # their VAE reconstructions
    train_sample: ImageSet  # as many real training slices per label as generated: the floors' sets


def fidelity(generated: ImageSet, reference: Reference, label: int | None, seed: int, device: torch.device) -> dict:
    """Conditioning accuracy, Fréchet, KID and PRDC of one group of generated images (all: None, or a
    label), each beside its real-train-vs-real-test floor; MS-SSIM diversity beside real test pairs."""
    generated, real_test, floor = (images.of_label(label) for images in (generated, reference.real_test, reference.train_sample))
    reconstructed = reference.reconstructed_test.of_label(label)
    kid, kid_floor = (kernel_inception_distance(images.features, real_test.features, seed=seed) for images in (generated, floor))
    return {
        "generated_images": len(generated.labels),
        "conditioning_accuracy": float(np.mean(generated.predictions == generated.labels)),
        "real_test_accuracy": float(np.mean(real_test.predictions == real_test.labels)),
        "reconstructed_test_accuracy": float(np.mean(reconstructed.predictions == reconstructed.labels)),
        "frechet_distance": frechet_distance(generated.features, real_test.features),
        "frechet_floor": frechet_distance(floor.features, real_test.features),
        "kid": kid[0],
        "kid_std": kid[1],
        "kid_floor": kid_floor[0],
        "kid_floor_std": kid_floor[1],
        "prdc": prdc_or_nan(real_test.features, generated.features),
        "prdc_floor": prdc_or_nan(real_test.features, floor.features),
        "ms_ssim_generated": pairwise_ms_ssim(to_model_range(generated.pixels.unsqueeze(1)).to(device), seed=seed),
        "ms_ssim_real": pairwise_ms_ssim(to_model_range(floor.pixels.unsqueeze(1)).to(device), seed=seed),
    }


SHARPNESS_SETS = {  # what each row of the sharpness table measures against the real test slices
    "generated": "generated",
    "reconstructed_test": "VAE reconstructions of the test slices",
    "train_sample": "real training slices (the floor)",
}


def sharpness(generated: ImageSet, reference: Reference, device: torch.device) -> dict:
    """Spectral energy kept per band (metrics.SPECTRAL_BANDS; 1.0 = as sharp as the real test slices) of
    each of SHARPNESS_SETS, and how close the test slices' reconstructions are to them (PSNR, SSIM,
    MS-SSIM): the blur that MS-SSIM at 64 px cannot see shows in the top band."""

    def model_range(images: ImageSet) -> torch.Tensor:
        return to_model_range(images.pixels.unsqueeze(1)).to(device)

    sets = {"generated": generated, "reconstructed_test": reference.reconstructed_test, "train_sample": reference.train_sample}
    real, reconstructed = model_range(reference.real_test), model_range(reference.reconstructed_test)
    return {
        "spectral_energy": {name: spectral_energy_kept(model_range(images), real) for name, images in sets.items()},
        "reconstruction": {
            "psnr": float(psnr(reconstructed, real).mean()),
            "ssim": float(ssim(reconstructed, real).mean()),
            "ms_ssim": float(ms_ssim(reconstructed, real).mean()),
        },
    }


def memorisation(generated: ImageSet, real_sample: ImageSet) -> dict:
    """Nearest-training-image statistics of generated beside real test images (both searched the same
    training set); near-copies are closer (or more correlated) than 99% of real test images are."""
    distance_threshold = float(np.percentile(real_sample.nearest_distance, NEAR_COPY_PERCENTILE))
    correlation_threshold = float(np.percentile(real_sample.top_correlation, 100 - NEAR_COPY_PERCENTILE))
    report = {"near_copy_distance": distance_threshold, "near_copy_correlation": correlation_threshold}
    for label, name in GROUPS:
        group = {}
        for origin, images in (("generated", generated.of_label(label)), ("real_test", real_sample.of_label(label))):
            group[origin] = {
                "nearest_distance": distribution(images.nearest_distance),
                "top_correlation": distribution(images.top_correlation),
                "near_copy_share_distance": float(np.mean(images.nearest_distance < distance_threshold)),
                "near_copy_share_correlation": float(np.mean(images.top_correlation > correlation_threshold)),
            }
        report[name] = group
    return report


def csf_shares(images: ImageSet) -> list[np.ndarray]:
    """CSF-dark share of each image's brain pixels, per label (images without brain left out)."""
    shares = csf_dark_shares(images.pixels.numpy())
    return [shares[(images.labels == label) & np.isfinite(shares)] for label in range(len(CLASS_NAMES))]


def anatomy_of(images: ImageSet, seed: int) -> dict:
    """CSF-dark share by label and Cohen's d (AD minus NC) with its bootstrap 95% interval; where d is
    undefined, `cohens_d_undefined` says why instead of a number."""
    by_label = csf_shares(images)
    report = {}
    for label, values in enumerate(by_label):
        report[f"{CLASS_NAMES[label]}_mean"] = float(values.mean()) if len(values) else math.nan
        report[f"{CLASS_NAMES[label]}_std"] = float(values.std(ddof=1)) if len(values) >= 2 else math.nan
    enough = min(map(len, by_label)) >= 2
    report["cohens_d_AD_minus_NC"] = cohens_d(*by_label) if enough else math.nan
    report["cohens_d_95ci"] = list(cohens_d_interval(*by_label, seed=seed))
    if not enough:
        counts = ", ".join(f"{CLASS_NAMES[label]} {len(values)}" for label, values in enumerate(by_label))
        report["cohens_d_undefined"] = f"fewer than 2 images with brain pixels in a label ({counts})"
    elif zero_spread(*by_label):
        report["cohens_d_undefined"] = "no spread: every image of each label has the same CSF-dark share"
    report["by_region"] = anatomy_by_region(images)
    return report


def anatomy_by_region(images: ImageSet) -> dict:
    """The CSF-dark share's mean by label and Cohen's d (AD − NC) in each of CSF_REGIONS (cortex band,
    deep brain): where a model puts the disease, beside where the real slices have it."""
    shares = csf_dark_shares_by_region(images.pixels.numpy())
    report = {}
    for region, column in zip(CSF_REGIONS, shares.T):
        by_label = [column[(images.labels == label) & np.isfinite(column)] for label in range(len(CLASS_NAMES))]
        means = {f"{name}_mean": float(values.mean()) if len(values) else math.nan for name, values in zip(CLASS_NAMES, by_label)}
        enough = min(map(len, by_label)) >= 2  # cohens_d itself is NaN without spread
        report[region] = means | {"cohens_d_AD_minus_NC": cohens_d(*by_label) if enough else math.nan}
    return report


def regional_effects(report: dict) -> dict[str, float]:
    """An anatomy_of report's Cohen's d (AD − NC) in each of CSF_REGIONS."""
    return {region: row["cohens_d_AD_minus_NC"] for region, row in report["by_region"].items()}


def anatomy(generated: ImageSet, real_test: ImageSet, seed: int, reconstructed_test: ImageSet | None = None) -> dict:
    """The AD-vs-NC anatomy effect of generated beside real test images (and, given, their VAE
    reconstructions: what the decoder keeps of it), and whether the generated effect's sign agrees."""
    report = {"generated": anatomy_of(generated, seed), "real_test": anatomy_of(real_test, seed)}
    if reconstructed_test is not None:
        report["reconstructed_test"] = anatomy_of(reconstructed_test, seed)
    d_generated, d_real = (report[name]["cohens_d_AD_minus_NC"] for name in ("generated", "real_test"))
    report["directions_agree"] = (
        None if math.isnan(d_generated) or math.isnan(d_real) else bool(np.sign(d_generated) == np.sign(d_real))
    )
    return report


def train_on_synthetic(
    generated: ImageSet, train_sample: ImageSet, real_test: ImageSet, draws_per_epoch: int, device: torch.device
) -> dict:
    """TSTR: the yardstick's architecture and augmentations trained on generated images with their
    asked-for labels, on as many real training slices, and on both; each tested on every real test
    slice. All three train for the same number of draws (`draws_per_epoch`, the size of the real
    training split, per epoch: a subtle class difference needs that many steps, whatever the set's
    size) and keep their last epoch, so no real image chooses the model."""
    settings = ClassifierSettings(with_reconstructions=False)
    recipes = {"synthetic": [generated], "real": [train_sample], "real_plus_synthetic": [train_sample, generated]}
    report = {
        "epochs": settings.epochs,
        "draws_per_epoch": draws_per_epoch,
        "images": {},
        "test_accuracy": {},
        "test_accuracy_per_label": {},
    }
    test_labels = torch.from_numpy(real_test.labels)
    for name, sets in recipes.items():
        pixels = torch.cat([images.pixels for images in sets])
        labels = torch.from_numpy(np.concatenate([images.labels for images in sets]))
        description = f"TSTR: training on {name.replace('_', ' ')}"
        model, _ = train_classifier(pixels, labels, settings, device, description=description, draws_per_epoch=draws_per_epoch)
        report["images"][name] = len(labels)
        report["test_accuracy"][name] = accuracy(model, real_test.pixels, test_labels, device)
        report["test_accuracy_per_label"][name] = {
            CLASS_NAMES[label]: accuracy(model, real_test.pixels[test_labels == label], test_labels[test_labels == label], device)
            for label in range(len(CLASS_NAMES))
        }
    return report


def without_nan(value: object) -> object:
    """NaN is not JSON: write it as null."""
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ============================================================================ figures


def save_memorisation_figure(generated: ImageSet, train_pixels: torch.Tensor, path: Path) -> None:
    """The MEMORISATION_PAIRS generated images nearest to a training image by RMS distance (rows 1-2)
    and by correlation (rows 3-4), each above its training image."""
    count = min(MEMORISATION_PAIRS, len(generated.labels))
    by_distance = np.argsort(generated.nearest_distance, kind="stable")[:count]
    by_correlation = np.argsort(-generated.top_correlation, kind="stable")[:count]
    figure, axes = new_figure(4, count, figsize=(1.6 * count, 7.4), squeeze=False)
    rows = [
        (by_distance, generated.nearest_index, lambda i: f"RMS {generated.nearest_distance[i]:.1f}"),
        (by_correlation, generated.correlated_index, lambda i: f"r {generated.top_correlation[i]:.3f}"),
    ]
    for pair_row, (order, partner, caption) in enumerate(rows):
        for column, i in enumerate(order):
            top, bottom = axes[2 * pair_row, column], axes[2 * pair_row + 1, column]
            top.imshow(generated.pixels[i].numpy(), cmap="gray", vmin=0, vmax=255)
            top.set_title(f"{CLASS_NAMES[generated.labels[i]]} · {caption(i)}", fontsize=8)
            bottom.imshow(train_pixels[partner[i]].numpy(), cmap="gray", vmin=0, vmax=255)
            bottom.set_title(f"training #{partner[i]}", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0, 0].set_ylabel("generated", fontsize=9)
    axes[1, 0].set_ylabel("nearest (RMS)", fontsize=9)
    axes[2, 0].set_ylabel("generated", fontsize=9)
    axes[3, 0].set_ylabel("most correlated", fontsize=9)
    figure.suptitle("Generated images closest to a training image (RMS distance in 8-bit grey levels; Pearson r)", fontsize=10)
    save_figure(figure, path)


def save_umap_figure(generated: ImageSet, real: ImageSet, seed: int, path: Path) -> None:
    """UMAP of real test and generated images in the yardstick's features: coloured by label (do the
    classes separate?) and by origin (do generated images sit among real ones?)."""
    embedding = umap_embedding(np.concatenate([real.features, generated.features]), seed)
    is_generated = np.r_[np.zeros(len(real.labels), bool), np.ones(len(generated.labels), bool)]
    labels = np.concatenate([real.labels, generated.labels])
    figure, axes = new_figure(1, 2, figsize=(11, 4.8), squeeze=False)
    by_label, by_origin = axes[0]
    for label, color in zip(range(len(CLASS_NAMES)), ("tab:red", "tab:blue")):
        for origin, marker in ((False, "o"), (True, "x")):
            chosen = embedding[(labels == label) & (is_generated == origin)]
            name = f"{CLASS_NAMES[label]} {'generated' if origin else 'real'}"
            by_label.scatter(chosen[:, 0], chosen[:, 1], s=8, c=color, marker=marker, alpha=0.6, label=name)
    for origin, color in ((False, "tab:grey"), (True, "tab:orange")):
        chosen = embedding[is_generated == origin]
        by_origin.scatter(chosen[:, 0], chosen[:, 1], s=6, c=color, alpha=0.5, label="generated" if origin else "real test")
    by_label.set_title("by label (o real, x generated)", fontsize=10)
    by_origin.set_title("by origin", fontsize=10)
    for axis in (by_label, by_origin):
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(fontsize=8, loc="best", markerscale=2)
    figure.suptitle("Real test and generated slices in the AD/NC yardstick's features (UMAP)", fontsize=11)
    save_figure(figure, path)


def save_sweep_figure(sweep: dict, path: Path) -> None:
    """Conditioning accuracy, anatomy d (whole brain, and in the cortex band and the deep brain, each with
    its real value as a thin line) and fidelity against the guidance scale, with the real references."""
    rows, reference = sweep["scales"], sweep["reference"]
    scales = [row["guidance"] for row in rows]
    figure, axes = new_figure(1, 3, figsize=(14, 4), squeeze=False)
    accuracy_axis, anatomy_axis, fidelity_axis = axes[0]
    accuracy_axis.plot(scales, [row["conditioning_accuracy"] for row in rows], "o-", label="generated")
    accuracy_axis.axhline(reference["real_test_accuracy"], c="grey", label="real test")
    accuracy_axis.axhline(reference["reconstructed_test_accuracy"], ls="--", c="grey", label="real test, reconstructed")
    accuracy_axis.set_title("conditioning accuracy", fontsize=10)
    d = np.array([row["cohens_d_AD_minus_NC"] for row in rows], dtype=float)
    interval = np.array([row["cohens_d_95ci"] for row in rows], dtype=float)
    anatomy_axis.errorbar(scales, d, yerr=[d - interval[:, 0], interval[:, 1] - d], fmt="o-", capsize=3, label="whole brain")
    anatomy_axis.axhspan(*reference["cohens_d_95ci"], color="grey", alpha=0.2, label="real test (95% CI)")
    anatomy_axis.axhline(reference["cohens_d_AD_minus_NC"], c="grey")
    for region, style in zip(CSF_REGIONS, ("s--", "^:")):  # where the effect lies, each beside its real value
        by_scale = [as_float(row["cohens_d_by_region"][region]) for row in rows]  # NaN where JSON holds null
        line = anatomy_axis.plot(scales, by_scale, style, label=region.replace("_", " "))
        real = as_float(reference["cohens_d_by_region"][region])
        anatomy_axis.axhline(real, c=line[0].get_color(), ls=style[1:], lw=0.8)
    anatomy_axis.set_title("anatomy: CSF-dark share, Cohen's d (AD − NC)", fontsize=10)
    fidelity_axis.plot(scales, [row["frechet_distance"] for row in rows], "o-", label="Fréchet distance")
    fidelity_axis.axhline(reference["frechet_floor"], ls="--", c="grey", label="Fréchet floor")
    fidelity_axis.set_title("Fréchet distance (yardstick features)", fontsize=10)
    for axis in axes[0]:
        axis.set_xlabel("guidance scale")
        axis.legend(fontsize=8)
    save_figure(figure, path)


def save_sampler_sweep_figure(sweep: dict, path: Path) -> None:
    """Each metric of a sampler sweep against the steps, one line per sampler through its seeds' mean
    (each seed a dot), beside the baseline's seed-to-seed range (grey band) and the real references."""
    rows, reference, baseline = sweep["rows"], sweep["reference"], sweep["baseline"]
    panels = [
        ("conditioning accuracy", lambda row: row["conditioning_accuracy"], reference["real_test_accuracy"]),
        ("anatomy: Cohen's d (AD − NC)", lambda row: row["cohens_d_AD_minus_NC"], reference["cohens_d_AD_minus_NC"]),
        ("Fréchet distance / floor", lambda row: row["frechet_distance"] / reference["frechet_floor"], 1.0),
        ("precision", lambda row: row["prdc"]["precision"], reference["prdc_floor"]["precision"]),
        ("coverage", lambda row: row["prdc"]["coverage"], reference["prdc_floor"]["coverage"]),
        ("seconds per 64 images", lambda row: row["seconds_per_64_images"], None),
    ]
    figure, axes = new_figure(2, 3, figsize=(14, 8), squeeze=False, layout="constrained")
    for axis, (title, value, real) in zip(axes.flat, panels):
        for sampler in dict.fromkeys(row["sampler"] for row in rows):
            mine = [row for row in rows if row["sampler"] == sampler]
            steps = sorted({row["steps"] for row in mine})
            means = [np.nanmean([as_float(value(row)) for row in mine if row["steps"] == n]) for n in steps]
            line = axis.plot(steps, means, "o-", label=sampler)[0]
            axis.scatter(
                [row["steps"] for row in mine], [as_float(value(row)) for row in mine], s=12, color=line.get_color(), alpha=0.5
            )
        base = [
            as_float(value(row)) for row in rows if (row["sampler"], row["steps"]) == (baseline["sampler"], baseline["steps"])
        ]
        axis.axhspan(
            min(base), max(base), color="grey", alpha=0.25, label=f"{baseline['sampler']} {baseline['steps']}: seed range"
        )
        if real is not None:
            axis.axhline(real, ls="--", c="grey", label="real test" if "accuracy" in title or "Cohen" in title else "floor")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("steps")
        axis.set_xticks(sorted({row["steps"] for row in rows}))
        axis.legend(fontsize=7)
    figure.suptitle(f"Sampler sweep: {sweep['run']} (seeds {', '.join(map(str, sweep['settings']['seeds']))})", fontsize=11)
    save_figure(figure, path)


# What quality-over-training figures and tables show: title, value of a row given the run's reference, the real value.
CURVE_PANELS = (
    ("Fréchet distance / floor", lambda row, ref: row["frechet_distance"] / ref["frechet_floor"], lambda ref: 1.0),
    ("precision", lambda row, ref: row["prdc"]["precision"], lambda ref: ref["prdc_floor"]["precision"]),
    ("coverage", lambda row, ref: row["prdc"]["coverage"], lambda ref: ref["prdc_floor"]["coverage"]),
    ("conditioning accuracy", lambda row, ref: row["conditioning_accuracy"], lambda ref: ref["real_test_accuracy"]),
    ("anatomy: Cohen's d (AD − NC)", lambda row, ref: row["cohens_d_AD_minus_NC"], lambda ref: ref["cohens_d_AD_minus_NC"]),
    ("spectral energy above 1/4 cycle/px", lambda row, ref: row["spectral_energy"]["high"], lambda ref: 1.0),
)


def save_quality_curves(records: dict[str, dict], path: Path) -> None:
    """Each CURVE_PANELS figure of each run's over-training record against the training images seen
    (top row) and the UNet stage's wall-clock minutes (bottom row); dashed: the first run's real value."""
    figure, axes = new_figure(2, len(CURVE_PANELS), figsize=(4 * len(CURVE_PANELS), 7), squeeze=False, layout="constrained")
    for name, record in records.items():
        rows, reference = record["rows"], record["reference"]
        for column, (_, value, _) in enumerate(CURVE_PANELS):
            ys = [as_float(value(row, reference)) for row in rows]
            for axis, x_key, scale in ((axes[0, column], "images_seen", 1e-3), (axes[1, column], "training_seconds", 1 / 60)):
                xs = [as_float(row[x_key]) * scale for row in rows]
                axis.plot(xs, ys, "o-", markersize=3, label=Path(name).name)
    first = next(iter(records.values()))["reference"]
    for column, (title, _, real) in enumerate(CURVE_PANELS):
        for row, xlabel in enumerate(("training images seen (thousands)", "UNet training minutes (this machine)")):
            axis = axes[row, column]
            axis.axhline(as_float(real(first)), ls="--", c="grey")
            axis.set_title(title, fontsize=10)
            axis.set_xlabel(xlabel, fontsize=9)
            axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    figure.suptitle("Sample quality over UNet training (dashed: real test slices or the real-train floor)", fontsize=11)
    save_figure(figure, path)


def quality_curves_report(records: dict[str, dict]) -> str:
    """One table per run: each kept epoch's CURVE_PANELS figures beside its images seen and minutes."""
    lines = ["# Sample quality over UNet training"]
    for name, record in records.items():
        settings, reference = record["settings"], record["reference"]
        lines += [
            "",
            f"## {name}",
            "",
            f"{settings['num_samples']} images per label, {settings['sampler']} {settings['steps']} steps, guidance "
            f"{settings['guidance']}, seed {settings['seed']}; Fréchet floor {number(reference['frechet_floor'])}.",
            "",
            "| epoch | images seen | minutes | " + " | ".join(title for title, _, _ in CURVE_PANELS) + " |",
            "|---:|---:|---:|" + "---:|" * len(CURVE_PANELS),
        ]
        for row in record["rows"]:
            minutes = f"{row['training_seconds'] / 60:.1f}" if row["training_seconds"] is not None else "—"
            images = f"{row['images_seen']:,}" if row["images_seen"] is not None else "—"
            cells = [number(as_float(value(row, reference)), 3) for _, value, _ in CURVE_PANELS]
            lines.append(f"| {row['epoch']} | {images} | {minutes} | " + " | ".join(cells) + " |")
        lines.append(
            "| real / floor | | | " + " | ".join(number(as_float(real(reference)), 3) for _, _, real in CURVE_PANELS) + " |"
        )
    return "\n".join(lines) + "\n"


def as_float(value: float | None) -> float:
    """A record's number, NaN where JSON holds null."""
    return math.nan if value is None else float(value)


# ============================================================================ the report


def number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


def interval(values: list | None) -> str:
    return "n/a" if not values or values[0] is None else f"[{number(values[0], 3)}, {number(values[1], 3)}]"


def prdc_cell(prdc: dict) -> str:
    return " / ".join(number(prdc[key], 3) for key in ("precision", "recall", "density", "coverage"))


FIDELITY_ROWS = (
    ("conditioning accuracy: generated images the yardstick assigns to the asked-for label", "conditioning_accuracy", 3),
    ("yardstick accuracy on real test slices", "real_test_accuracy", 3),
    ("yardstick accuracy on their VAE reconstructions", "reconstructed_test_accuracy", 3),
    ("Fréchet distance, generated vs real test", "frechet_distance", 4),
    ("Fréchet floor, real train vs real test", "frechet_floor", 4),
)


def undefined_effects(anatomy: dict) -> str:
    """Why Cohen's d is undefined for generated or real images, where it is, as sentences ("" if defined)."""
    return "".join(
        f" Cohen's d undefined for {name.replace('_', ' ')}: {anatomy[name]['cohens_d_undefined']}."
        for name in ("generated", "real_test")
        if "cohens_d_undefined" in anatomy[name]
    )


def markdown_report(metrics: dict) -> str:
    """metrics.md: the settings, then one section per measurement of the module docstring."""
    settings = metrics["settings"]
    lines = [
        f"# Sample quality: {metrics['run']} (UNet epoch {metrics['run_epoch']})",
        "",
        (
            f"{settings['num_samples']} generated images per label, {settings['sampler'].upper()} {settings['steps']} steps, "
            f"guidance {settings['guidance']}, seed {settings['seed']}; {metrics['real_test_images']} real test slices."
        ),
        *anatomy_section(metrics["anatomy"]),
        *fidelity_section(metrics["groups"]),
        *sharpness_section(metrics["sharpness"]),
        *tstr_section(metrics["tstr"], metrics["real_test_images"]),
        *memorisation_section(metrics["memorisation"]),
        *yardstick_section(metrics["classifier"]),
        "",
        (
            "All feature-space figures are in the penultimate features of the run's own yardstick, so they compare only "
            "within this table (against their floors). ImageNet-FID is not computed: no Inception weights can be "
            f"downloaded here. Distances are RMS pixel differences in 8-bit grey levels at {metrics['image_size']} px."
        ),
    ]
    return "\n".join(lines) + "\n"


def image_sets(csf: dict) -> list[str]:
    """The image sets an anatomy report holds, in table order (reconstructions only in newer reports)."""
    return [name for name in ("generated", "real_test", "reconstructed_test") if name in csf]


def anatomy_section(csf: dict) -> list[str]:
    """The CSF-dark share by label and Cohen's d, generated beside real test images."""
    lines = [
        "",
        "## Conditioning: anatomy (CSF-dark share of brain pixels; ventricles and sulci widen in AD)",
        "",
        "| images | AD mean ± sd | NC mean ± sd | Cohen's d (AD − NC) | 95% CI (bootstrap) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in image_sets(csf):
        row = csf[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {number(row['AD_mean'], 3)} ± {number(row['AD_std'], 2)} | "
            f"{number(row['NC_mean'], 3)} ± {number(row['NC_std'], 2)} | {number(row['cohens_d_AD_minus_NC'], 3)} | "
            f"{interval(row['cohens_d_95ci'])} |"
        )
    agree = {True: "yes", False: "**no**", None: "n/a"}[csf["directions_agree"]]
    lines += ["", f"Directions agree: {agree}.{undefined_effects(csf)}", "", *region_table(csf)]
    return lines


def region_table(csf: dict) -> list[str]:
    """Where the effect lies: the CSF-dark share by label and its Cohen's d in the cortex band and the deep brain."""

    def cell(region: dict) -> str:
        return f"{number(region['AD_mean'], 3)} / {number(region['NC_mean'], 3)}, d {number(region['cohens_d_AD_minus_NC'], 3)}"

    lines = [
        f"By region: the brain's outer band ({CORTEX_BAND * 64:g}/64 of the image width deep: cortex and sulci) and the "
        "deep brain inside it (the ventricles); AD mean / NC mean, Cohen's d (AD − NC).",
        "",
        "| images | " + " | ".join(region.replace("_", " ") for region in CSF_REGIONS) + " |",
        "|---|" + "---:|" * len(CSF_REGIONS),
    ]
    for name in image_sets(csf):
        lines.append(
            f"| {name.replace('_', ' ')} | " + " | ".join(cell(csf[name]["by_region"][region]) for region in CSF_REGIONS) + " |"
        )
    return lines


def fidelity_section(groups: dict) -> list[str]:
    """Conditioning accuracy, Fréchet, KID, PRDC and MS-SSIM for all images and per label, beside their floors."""

    def row(title: str, cell) -> str:
        return f"| {title} | " + " | ".join(cell(group) for group in groups.values()) + " |"

    lines = [
        "",
        "## Conditioning accuracy and fidelity",
        "",
        "| metric | " + " | ".join(groups) + " |",
        "|---|" + "---:|" * len(groups),
    ]
    lines += [
        row(title, lambda group, key=key, digits=digits: number(group[key], digits)) for title, key, digits in FIDELITY_ROWS
    ]
    return [
        *lines,
        row("KID, generated vs real test (± std over subsets)", lambda g: f"{number(g['kid'])} ± {number(g['kid_std'], 2)}"),
        row("KID floor, real train vs real test", lambda g: f"{number(g['kid_floor'])} ± {number(g['kid_floor_std'], 2)}"),
        row(
            f"precision / recall / density / coverage (k = {PRDC_NEIGHBOURS}), generated vs real test",
            lambda g: prdc_cell(g["prdc"]),
        ),
        row("the same, real train vs real test (the floor)", lambda g: prdc_cell(g["prdc_floor"])),
        row(
            "MS-SSIM of random generated pairs (match real; higher = less diverse)",
            lambda g: number(g["ms_ssim_generated"], 3),
        ),
        row("MS-SSIM of random real pairs", lambda g: number(g["ms_ssim_real"], 3)),
    ]


def sharpness_section(sharp: dict) -> list[str]:
    """Spectral energy kept per band by generated images, reconstructions and real training slices."""
    lines = [
        "",
        "## Sharpness (spectral energy per frequency band, over the real test slices'; 1.0 = as sharp)",
        "",
        "| images | " + " | ".join(f"{BAND_LABELS[band]} cycle/px" for band in SPECTRAL_BANDS) + " |",
        "|---|" + "---:|" * len(SPECTRAL_BANDS),
    ]
    for name, title in SHARPNESS_SETS.items():
        kept = sharp["spectral_energy"][name]
        lines.append(f"| {title} | " + " | ".join(number(kept[band], 2) for band in SPECTRAL_BANDS) + " |")
    recon = sharp["reconstruction"]
    return [
        *lines,
        "",
        f"The test slices' reconstructions against the slices: PSNR {number(recon['psnr'], 3)} dB, SSIM "
        f"{number(recon['ssim'], 3)}, MS-SSIM {number(recon['ms_ssim'], 3)}.",
    ]


def tstr_section(tstr: dict, real_test_images: int) -> list[str]:
    """Real test accuracy of the yardstick's architecture trained on generated, real and both."""
    lines = [
        "",
        "## Train on synthetic, test on real (TSTR)",
        "",
        (
            f"The yardstick's architecture and augmentations, {tstr['epochs']} epochs of {tstr['draws_per_epoch']} draws "
            f"(the real training split's size) each, last epoch kept; tested on all {real_test_images} real test slices."
        ),
        "",
        "| trained on | images | real test accuracy | AD | NC |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, title in (
        ("synthetic", "generated only (TSTR)"),
        ("real", "real training slices"),
        ("real_plus_synthetic", "both"),
    ):
        per_label = tstr["test_accuracy_per_label"][name]
        lines.append(
            f"| {title} | {tstr['images'][name]} | {number(tstr['test_accuracy'][name], 3)} | "
            f"{number(per_label['AD'], 3)} | {number(per_label['NC'], 3)} |"
        )
    return lines


def memorisation_section(copies: dict) -> list[str]:
    """Nearest-training-image distances and correlations, generated beside real test, and the near-copy shares."""

    def row(title: str, cell) -> str:
        return f"| {title} | " + " | ".join(cell(copies[name]) for _, name in GROUPS) + " |"

    lines = [
        "",
        "## Memorisation: nearest training image (memorisation.png shows the closest pairs)",
        "",
        "| measure | " + " | ".join(name for _, name in GROUPS) + " |",
        "|---|" + "---:|" * len(GROUPS),
    ]
    for origin in ("generated", "real_test"):
        who = origin.replace("_", " ")
        lines += [
            row(
                f"RMS distance, {who}: median (1st percentile)",
                lambda g, o=origin: (
                    f"{number(g[o]['nearest_distance']['median'], 3)} ({number(g[o]['nearest_distance']['p1'], 3)})"
                ),
            ),
            row(
                f"correlation, {who}: median (99th percentile)",
                lambda g, o=origin: (
                    f"{number(g[o]['top_correlation']['median'], 3)} ({number(g[o]['top_correlation']['p99'], 3)})"
                ),
            ),
        ]
    for measure in ("distance", "correlation"):
        key = f"near_copy_share_{measure}"
        lines.append(
            row(
                f"near-copies by {measure}: generated (real test ≈ 0.01)",
                lambda g, key=key: f"{number(g['generated'][key], 3)} ({number(g['real_test'][key], 3)})",
            )
        )
    return [
        *lines,
        "",
        (
            f"A near-copy is closer to a training image than {100 - NEAR_COPY_PERCENTILE:g}% of real test slices are "
            f"(RMS below {number(copies['near_copy_distance'], 3)}, or r above {number(copies['near_copy_correlation'], 4)})."
        ),
    ]


def yardstick_section(controls: dict) -> list[str]:
    """How much of the yardstick's accuracy slice position alone explains, overall and per slice tercile."""
    lines = [
        "",
        f"## The yardstick and slice position ({controls['source']})",
        "",
        (
            f"Real test accuracy {number(controls['test_accuracy'], 3)}; weighted so every slice index is half AD, half NC: "
            f"{number(controls['test_accuracy_position_balanced'], 3)}. Slice-position-only accuracy (logistic regression "
            f"from slice index alone, fit on train): {number(controls['slice_position_only_test_accuracy'], 3)}. "
            f"Val accuracy (mean of real and reconstructed val slices) {number(controls['val_accuracy'], 3)}."
        ),
        "",
        "| slice tercile | test images | AD share | yardstick accuracy | slice-position-only accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    return lines + [
        f"| {t['slices']} | {t['images']} | {number(t['AD_share'], 3)} | {number(t['classifier_accuracy'], 3)} | "
        f"{number(t['slice_position_only_accuracy'], 3)} |"
        for t in controls["slice_terciles"]
    ]


def regions_cell(row: dict) -> str:
    """A sweep row's Cohen's d in each of CSF_REGIONS, "cortex band / deep"."""
    return " / ".join(number(row["cohens_d_by_region"][region], 3) for region in CSF_REGIONS)


def sweep_report(sweep: dict) -> str:
    reference, settings = sweep["reference"], sweep["settings"]
    lines = [
        f"# Guidance sweep: {sweep['run']} (UNet epoch {sweep['run_epoch']})",
        "",
        (
            f"{settings['num_samples']} generated images per label per scale, {settings['sampler'].upper()} "
            f"{settings['steps']} steps, seed {settings['seed']}. Real test slices: Cohen's d "
            f"{number(reference['cohens_d_AD_minus_NC'], 3)} {interval(reference['cohens_d_95ci'])}; yardstick accuracy "
            f"{number(reference['real_test_accuracy'], 3)} (reconstructions {number(reference['reconstructed_test_accuracy'], 3)}); "
            f"Fréchet floor {number(reference['frechet_floor'], 4)}; PRDC floor {prdc_cell(reference['prdc_floor'])}."
        ),
        "",
        "| guidance | conditioning accuracy | Cohen's d (AD − NC) | 95% CI | d in the cortex band / deep brain | Fréchet distance "
        "| precision / recall / density / coverage |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sweep["scales"]:
        lines.append(
            f"| {number(row['guidance'], 3)} | {number(row['conditioning_accuracy'], 3)} | {number(row['cohens_d_AD_minus_NC'], 3)} | "
            f"{interval(row['cohens_d_95ci'])} | {regions_cell(row)} | {number(row['frechet_distance'], 4)} | {prdc_cell(row['prdc'])} |"
        )
    lines.append(
        f"| real test (floors) | {number(reference['real_test_accuracy'], 3)} | {number(reference['cohens_d_AD_minus_NC'], 3)} | "
        f"{interval(reference['cohens_d_95ci'])} | {regions_cell(reference)} | {number(reference['frechet_floor'], 4)} | "
        f"{prdc_cell(reference['prdc_floor'])} |"
    )
    lines += [
        "",
        (
            f"Anatomy effect closest to real: guidance {number(sweep['closest_anatomy'], 3)}; lowest Fréchet distance: "
            f"guidance {number(sweep['lowest_frechet'], 3)}. **Recommended: {number(sweep['recommended'], 3)}**, the best "
            "balance of the two (relative anatomy-effect error plus relative Fréchet excess over the lowest); set it for "
            "new runs with `--run.guidance_scale`, or pass `--guidance` to predict.py."
        ),
    ]
    return "\n".join(lines) + "\n"


# What a sampler setting must match the baseline in (sampler_sweep): metric → (its title, its value in a sweep row).
MATCHED_METRICS: dict[str, tuple[str, Callable[[dict], float]]] = {
    "conditioning_accuracy": ("conditioning accuracy", lambda row: row["conditioning_accuracy"]),
    "cohens_d_AD_minus_NC": ("Cohen's d (AD − NC)", lambda row: row["cohens_d_AD_minus_NC"]),
    "frechet_distance": ("Fréchet distance", lambda row: row["frechet_distance"]),
    "precision": ("precision", lambda row: row["prdc"]["precision"]),
    "coverage": ("coverage", lambda row: row["prdc"]["coverage"]),
}


def sampler_sweep(pipe: Pipeline, yardstick: SliceClassifier, reference: Reference, args: argparse.Namespace) -> dict:
    """Conditioning, anatomy, fidelity and time of each sampler:steps of `args.sampler_sweep` at each
    generation seed of `args.seeds`; each setting compared, seed by seed, with the baseline (the setting
    of most steps, the first of those), and the cheapest setting that matches it recommended."""
    rows = []
    for sampler, steps in args.sampler_sweep:
        for seed in args.seeds:
            print(f"{sampler} {steps} steps, seed {seed}")
            row = sweep_row(pipe, yardstick, reference, with_options(args, sampler=sampler, steps=steps, seed=seed))
            per_64 = row["generation_seconds"] * 64 / (len(CLASS_NAMES) * args.num_samples)
            rows.append({"sampler": sampler, "steps": steps, "seed": seed} | row | {"seconds_per_64_images": round(per_64, 3)})
    baseline = max(args.sampler_sweep, key=lambda setting: setting[1])
    comparison, spread = compare_settings(rows, baseline, args.seeds)
    return {
        "reference": sweep_reference(reference, args.seed),
        "rows": rows,
        "baseline": {"sampler": baseline[0], "steps": baseline[1]},
        "baseline_spread": spread,
        "comparison": comparison,
        "recommended": recommended_setting(comparison, spread),
    }


def compare_settings(rows: list[dict], baseline: tuple[str, int], seeds: list[int]) -> tuple[list[dict], dict]:
    """Each setting beside the baseline, paired per seed (the same seed starts both from the same noise):
    per MATCHED_METRICS metric, the mean over seeds of setting minus baseline, and whether it lies
    within the baseline's own seed-to-seed spread (max − min over seeds). A metric the baseline could
    not measure (NaN: too few images) is left out of the match (within: None). Also returns the spreads."""
    by_key = {(row["sampler"], row["steps"], row["seed"]): row for row in rows}

    def values(setting: tuple[str, int], metric: Callable[[dict], float]) -> np.ndarray:
        return np.array([metric(by_key[(*setting, seed)]) for seed in seeds], dtype=float)

    spread = {name: float(np.ptp(values(baseline, metric))) for name, (_, metric) in MATCHED_METRICS.items()}
    comparison = []
    for setting in dict.fromkeys((row["sampler"], row["steps"]) for row in rows):
        entry = {"sampler": setting[0], "steps": setting[1], "mean": {}, "paired_difference": {}, "within_spread": {}}
        for name, (_, metric) in MATCHED_METRICS.items():
            mine, base = values(setting, metric), values(baseline, metric)
            difference = float(np.mean(mine - base))
            entry["mean"][name] = float(np.mean(mine))
            entry["paired_difference"][name] = difference
            entry["within_spread"][name] = None if np.isnan(base).any() else bool(abs(difference) <= spread[name])
        entry["mean"]["seconds_per_64_images"] = float(
            np.mean([by_key[(*setting, seed)]["seconds_per_64_images"] for seed in seeds])
        )
        entry["matches_baseline"] = all(within is not False for within in entry["within_spread"].values())
        comparison.append(entry)
    return comparison, spread


def recommended_setting(comparison: list[dict], spread: dict) -> dict:
    """The fewest steps among the settings that match the baseline in every metric (the baseline itself
    always does); between equal steps, the one whose largest difference is the smallest share of the spread."""

    def largest_share(entry: dict) -> float:
        shares = [
            abs(entry["paired_difference"][name]) / spread[name] if spread[name] > 0 else 0.0
            for name, within in entry["within_spread"].items()
            if within is not None
        ]
        return max(shares, default=0.0)

    best = min((entry for entry in comparison if entry["matches_baseline"]), key=lambda e: (e["steps"], largest_share(e)))
    return {"sampler": best["sampler"], "steps": best["steps"]}


def sampler_sweep_report(sweep: dict) -> str:
    """sampler_sweep.md: every setting at every seed, then each setting paired with the baseline."""
    settings, reference, floor = sweep["settings"], sweep["reference"], sweep["reference"]["frechet_floor"]
    lines = [
        f"# Sampler sweep: {sweep['run']} (UNet epoch {sweep['run_epoch']})",
        "",
        (
            f"{settings['num_samples']} generated images per label per setting and seed, guidance {number(settings['guidance'], 3)}, "
            f"seeds {', '.join(map(str, settings['seeds']))}. Real test slices: Cohen's d {number(reference['cohens_d_AD_minus_NC'], 3)}; "
            f"yardstick accuracy {number(reference['real_test_accuracy'], 3)}; Fréchet floor {number(floor, 4)}; "
            f"PRDC floor {prdc_cell(reference['prdc_floor'])}."
        ),
        "",
        "| sampler | steps | seed | conditioning accuracy | Cohen's d (AD − NC) | Fréchet / floor | precision | coverage | s per 64 images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sweep["rows"]:
        ratio = None if row["frechet_distance"] is None or not floor else row["frechet_distance"] / floor
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {row['seed']} | {number(row['conditioning_accuracy'], 3)} | "
            f"{number(row['cohens_d_AD_minus_NC'], 3)} | {number(ratio, 3)} | {number(row['prdc']['precision'], 3)} | "
            f"{number(row['prdc']['coverage'], 3)} | {number(row['seconds_per_64_images'], 3)} |"
        )
    return "\n".join([*lines, *sampler_comparison_section(sweep)]) + "\n"


def sampler_comparison_section(sweep: dict) -> list[str]:
    """Each setting's mean difference from the baseline, paired per seed, against the baseline's spread."""
    baseline, spread, chosen = sweep["baseline"], sweep["baseline_spread"], sweep["recommended"]
    name = f"{baseline['sampler']} {baseline['steps']}"
    lines = [
        "",
        (
            f"Paired with {name} (the setting of most steps) at each seed, which starts both from the same noise: the mean "
            f"difference over seeds, ✓ where it lies within {name}'s own seed-to-seed spread (max − min over seeds)."
        ),
        "",
        "| sampler | steps | "
        + " | ".join(title for title, _ in MATCHED_METRICS.values())
        + " | s per 64 images (mean) | matches |",
        "|---|---:|" + "---:|" * (len(MATCHED_METRICS) + 2),
    ]
    for entry in sweep["comparison"]:
        cells = [
            f"{number(entry['paired_difference'][key], 3)} {'' if entry['within_spread'][key] is None else '✓' if entry['within_spread'][key] else '✗'}"
            for key in MATCHED_METRICS
        ]
        seconds, matches = number(entry["mean"]["seconds_per_64_images"], 3), "yes" if entry["matches_baseline"] else "no"
        lines.append(f"| {entry['sampler']} | {entry['steps']} | " + " | ".join(cells) + f" | {seconds} | {matches} |")
    lines.append(f"| {name}: seed-to-seed spread | | " + " | ".join(number(spread[key], 3) for key in MATCHED_METRICS) + " | | |")
    return [
        *lines,
        "",
        (
            f"**Recommended: {chosen['sampler']}, {chosen['steps']} steps**, the fewest steps whose every metric lies within "
            f"{name}'s seed-to-seed spread, paired per seed (between equal steps, the smaller largest difference as a share "
            "of the spread); set it for new runs with `--run.sampler` and `--run.sample_steps`, or pass `--sampler` and "
            "`--steps` to predict.py. Seconds are sampling and decoding on this run's device, on whatever else ran beside it."
        ),
    ]


# ============================================================================ command line


def parse_scales(text: str) -> list[float]:
    """`1,1.5,3` → [1.0, 1.5, 3.0]: the guidance scales of a sweep, each from 0 to MAX_GUIDANCE."""
    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,1.5,2,3,5, got {text!r}") from None
    if not all(math.isfinite(scale) and 0 <= scale <= MAX_GUIDANCE for scale in scales):
        raise argparse.ArgumentTypeError(f"guidance scales must be numbers from 0 to {MAX_GUIDANCE:g}, got {text!r}")
    return scales


def parse_sampler_settings(text: str) -> list[tuple[str, int]]:
    """`ddim:50,dpmpp_2m:15` → [("ddim", 50), ("dpmpp_2m", 15)]: a sampler sweep's settings, each a
    sampler of modules.SAMPLERS and at least 1 step (the run's T bounds the steps once it is loaded)."""
    settings = []
    for part in text.split(","):
        sampler, _, steps = part.strip().partition(":")
        if sampler not in SAMPLERS or not steps.strip().isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated sampler:steps with a sampler of {', '.join(SAMPLERS)} and at least 1 step, "
                f"such as ddim:50,dpmpp_2m:15; got {part.strip()!r}"
            )
        settings.append((sampler, int(steps)))
    if len(set(settings)) < len(settings):
        raise argparse.ArgumentTypeError(f"each sampler:steps once, got {text!r}")
    return settings


def parse_seeds(text: str) -> list[int]:
    """`0,1` → [0, 1]: distinct seeds from 0 to MAX_SEED."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) <= MAX_SEED for part in parts) or len(set(map(int, parts))) < len(parts):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated seeds from 0 to {MAX_SEED}, such as 0,1; got {text!r}"
        )
    return [int(part) for part in parts]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run folder (default: the run whose unet.pt is newest in runs/)")
    parser.add_argument("--num-samples", type=int, default=500, help="generated images per label (default 500)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), help="how to sample (default: the run's run.sampler)")
    parser.add_argument(
        "--steps", type=int, help="sampling steps (default: the run's run.sample_steps; another --sampler: 50, ddpm all)"
    )
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's)")
    parser.add_argument(
        "--guidance-sweep",
        type=parse_scales,
        metavar="SCALES",
        help="instead of the full evaluation, measure conditioning and fidelity at each of these scales (e.g. 1,1.5,2,3,5)",
    )
    parser.add_argument(
        "--sampler-sweep",
        type=parse_sampler_settings,
        metavar="SETTINGS",
        help="instead of the full evaluation, measure each sampler:steps at each of --seeds (e.g. ddim:50,dpmpp_2m:15)",
    )
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        help="the generation seeds of --sampler-sweep, two or more (default 0,1); --seed still picks the floors' images",
    )
    parser.add_argument(
        "--over-training",
        action="store_true",
        help="instead of the full evaluation, measure each UNet epoch the run kept (--run.keep_every) and unet.pt",
    )
    parser.add_argument(
        "--quality-curves",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="draw these runs' over_training.json in one figure, --out FILE.png (and its table beside it, .md)",
    )
    parser.add_argument("--out", type=Path, help="the figure --quality-curves writes")
    parser.add_argument("--umap", action="store_true", help=f"also write {UMAP_FILE} (needs umap-learn)")
    add_counterfactual_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (default 64)")
    parser.add_argument("--retrain-classifier", action="store_true", help="train the AD/NC yardstick anew, even if cached")
    parser.add_argument("--overwrite", action="store_true", help="replace the run's earlier evaluation files")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    check_counterfactual_arguments(args)
    if args.num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2 (pairs and spreads need two), got {args.num_samples}")
    if args.guidance_sweep is not None and args.guidance is not None:
        raise UsageError("--guidance and --guidance-sweep exclude each other: give the scales to --guidance-sweep only")
    if args.guidance_sweep is not None and args.umap:
        raise UsageError("--umap belongs to the full evaluation: run it without --guidance-sweep")
    modes = [
        name
        for name, on in (
            ("--guidance-sweep", args.guidance_sweep is not None),
            ("--sampler-sweep", args.sampler_sweep is not None),
            ("--over-training", args.over_training),
        )
        if on
    ]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} exclude each other: run one at a time")
    if args.over_training and args.umap:
        raise UsageError("--umap belongs to the full evaluation: run it without --over-training")
    check_sampler_sweep(args)
    check_sampling_options(args)


def check_sampler_sweep(args: argparse.Namespace) -> None:
    """--sampler-sweep alone names the samplers and steps, and needs two seeds for a spread; --seeds default 0,1."""
    sweep = args.sampler_sweep
    if sweep is None:
        if args.seeds is not None:
            raise UsageError("--seeds belongs to --sampler-sweep: use --seed for one evaluation")
        return
    if args.guidance_sweep is not None:
        raise UsageError("--sampler-sweep and --guidance-sweep exclude each other: run one, then the other")
    if args.umap:
        raise UsageError("--umap belongs to the full evaluation: run it without --sampler-sweep")
    if args.sampler is not None or args.steps is not None:
        raise UsageError("--sampler-sweep names its samplers and steps (sampler:steps): drop --sampler and --steps")
    args.seeds = [0, 1] if args.seeds is None else args.seeds
    if len(args.seeds) < 2:
        raise UsageError(
            f"--seeds {args.seeds[0]}: a sampler sweep compares settings within the seed-to-seed spread; give two or more, e.g. 0,1"
        )


def output_paths(run_dir: Path, args: argparse.Namespace) -> list[Path]:
    if args.counterfactuals:
        return [run_dir / name for name in COUNTERFACTUAL_FILES]
    if args.guidance_sweep is not None:
        return [run_dir / name for name in SWEEP_FILES]
    if args.sampler_sweep is not None:
        return [run_dir / name for name in SAMPLER_SWEEP_FILES]
    if args.over_training:
        return [run_dir / name for name in OVER_TRAINING_FILES]
    return [run_dir / name for name in (*EVALUATION_FILES, *((UMAP_FILE,) if args.umap else ()))]


def check_outputs(pipe: Pipeline, outputs: list[Path], overwrite: bool) -> None:
    """Before any work: what evaluate writes (its files, the yardstick's cache, the decode cache) obeys
    utils.check_output_paths, and replaces earlier files only with --overwrite."""
    check_output_paths(
        dataset_folders(pipe.config),
        folders={"--run": pipe.run_dir, "--data.cache_dir": pipe.config.data.cache_dir},
        files={f"the run's {path.name}": path for path in (*outputs, pipe.run_dir / CLASSIFIER_FILE)},
    )
    existing = [path for path in outputs if path.exists()]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} already exists: add --overwrite to replace it")


def check_data(datasets: dict[str, SliceDataset], data_dir: str) -> None:
    """Before the yardstick trains or anything is sampled: at least 2 readable test and training slices
    of each label (a spread, a Fréchet distance and KID need 2), and training slice indices that do not
    alone tell AD from NC (the yardstick learns from a position-balanced draw)."""
    for split in ("test", "train"):
        counts = np.bincount(datasets[split].labels.numpy(), minlength=len(CLASS_NAMES))
        for label, count in enumerate(counts):
            if count < 2:
                raise UsageError(
                    f"the {split} split of {data_dir} has {count} readable {CLASS_NAMES[label]} slice(s): evaluate compares "
                    f"generated images with at least 2 real ones per label; add slices to its {split}/{CLASS_NAMES[label]} folder"
                )
    check_position_balance(datasets["train"])


def generate_and_measure(pipe: Pipeline, yardstick: SliceClassifier, args: argparse.Namespace) -> tuple[ImageSet, float]:
    """`args.num_samples` images per label at `args.guidance`, measured by the yardstick; and the seconds taken."""
    started = time.perf_counter()
    pixels = torch.cat([generate_images(pipe, label, args) for label in range(len(CLASS_NAMES))])
    seconds = time.perf_counter() - started
    return measured(yardstick, pixels, np.repeat(np.arange(len(CLASS_NAMES)), args.num_samples), pipe.runtime.device), seconds


def full_evaluation(
    pipe: Pipeline, yardstick: SliceClassifier, reference: Reference, args: argparse.Namespace, rng: np.random.Generator
) -> dict:
    """Every metric of the module docstring for samples at `args.guidance`; writes the figures."""
    device = pipe.runtime.device
    generated, seconds = generate_and_measure(pipe, yardstick, args)
    real_sample = reference.real_test.where(per_label_positions(reference.real_test.labels, args.num_samples, rng))
    for images in (generated, real_sample):
        images.find_nearest_training_images(reference.train.pixels, device)
    save_memorisation_figure(generated, reference.train.pixels, pipe.run_dir / "memorisation.png")
    if args.umap:
        save_umap_figure(generated, real_sample, args.seed, pipe.run_dir / UMAP_FILE)
    return {
        "generation_seconds": round(seconds, 3),
        "groups": {name: fidelity(generated, reference, label, args.seed, device) for label, name in GROUPS},
        "sharpness": sharpness(generated, reference, device),
        "anatomy": anatomy(generated, reference.real_test, args.seed, reference.reconstructed_test),
        "tstr": train_on_synthetic(generated, reference.train_sample, reference.real_test, len(reference.train), device),
        "memorisation": memorisation(generated, real_sample),
    }


def with_options(args: argparse.Namespace, **changes: object) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def sweep_reference(reference: Reference, seed: int) -> dict:
    """What a sweep's rows are read against: the real test images' anatomy effect and the yardstick's
    accuracy on them, and the real-train-vs-real-test floors."""
    real_test, reconstructed, floor = reference.real_test, reference.reconstructed_test, reference.train_sample
    real_anatomy = anatomy_of(real_test, seed)
    return {
        "cohens_d_AD_minus_NC": real_anatomy["cohens_d_AD_minus_NC"],
        "cohens_d_95ci": real_anatomy["cohens_d_95ci"],
        "cohens_d_by_region": regional_effects(real_anatomy),
        "real_test_accuracy": float(np.mean(real_test.predictions == real_test.labels)),
        "reconstructed_test_accuracy": float(np.mean(reconstructed.predictions == reconstructed.labels)),
        "frechet_floor": frechet_distance(floor.features, real_test.features),
        "prdc_floor": prdc_or_nan(real_test.features, floor.features),
    }


def sweep_row(pipe: Pipeline, yardstick: SliceClassifier, reference: Reference, args: argparse.Namespace) -> dict:
    """Conditioning, anatomy and fidelity of `args.num_samples` images per label sampled as `args` says
    (guidance, sampler, steps, seed), and the seconds that sampling and decoding them took."""
    generated, seconds = generate_and_measure(pipe, yardstick, args)
    generated_anatomy = anatomy_of(generated, args.seed)
    return {
        "conditioning_accuracy": float(np.mean(generated.predictions == generated.labels)),
        "cohens_d_AD_minus_NC": generated_anatomy["cohens_d_AD_minus_NC"],
        "cohens_d_95ci": generated_anatomy["cohens_d_95ci"],
        "cohens_d_by_region": regional_effects(generated_anatomy),
        "frechet_distance": frechet_distance(generated.features, reference.real_test.features),
        "prdc": prdc_or_nan(reference.real_test.features, generated.features),
        "spectral_energy": spectral_energy_kept(
            *(to_model_range(images.pixels.unsqueeze(1)) for images in (generated, reference.real_test))
        ),
        "generation_seconds": round(seconds, 3),
    }


def guidance_sweep(pipe: Pipeline, yardstick: SliceClassifier, reference: Reference, args: argparse.Namespace) -> dict:
    """Conditioning and fidelity of `args.num_samples` images per label at each scale of `args.guidance_sweep`."""
    real = sweep_reference(reference, args.seed)
    rows = []
    for scale in args.guidance_sweep:
        print(f"guidance {scale:g}")
        rows.append({"guidance": scale} | sweep_row(pipe, yardstick, reference, with_options(args, guidance=scale)))
    d_real = real["cohens_d_AD_minus_NC"]
    scales = [row["guidance"] for row in rows]
    d_generated = np.array([row["cohens_d_AD_minus_NC"] for row in rows])
    frechet = np.array([row["frechet_distance"] for row in rows])
    return {
        "reference": real,
        "scales": rows,
        "closest_anatomy": best_scale(scales, np.abs(d_generated - d_real)),
        "lowest_frechet": best_scale(scales, frechet),
        "recommended": recommended_scale(scales, d_generated, d_real, frechet),
    }


def training_points(pipe: Pipeline) -> list[tuple[int, Path]]:
    """(UNet epoch, checkpoint) of each of the run's snapshots (run.keep_every) and of unet.pt, oldest first."""
    points = {int(path.stem.removeprefix("unet_epoch")): path for path in snapshots(pipe.run_dir)}
    points[pipe.epoch] = pipe.run_dir / "unet.pt"
    return sorted(points.items())


def unet_history(run_dir: Path) -> dict[int, dict]:
    """The UNet stage's history.jsonl entries by epoch."""
    lines = (run_dir / "history.jsonl").read_text().splitlines() if (run_dir / "history.jsonl").is_file() else []
    entries = [json.loads(line) for line in lines if line.strip()]
    return {entry["epoch"]: entry for entry in entries if entry.get("stage") == "unet"}


def over_training(pipe: Pipeline, yardstick: SliceClassifier, reference: Reference, args: argparse.Namespace) -> dict:
    """The sweep's figures (sweep_row) at each kept UNet epoch, sampled alike, with the training images
    seen and the stage's wall-clock seconds (history.jsonl) up to that epoch: quality against training time."""
    history, points = unet_history(pipe.run_dir), training_points(pipe)
    if len(points) < 2:
        raise UsageError(
            f"{pipe.run_dir} kept no UNet snapshots: train it with --run.keep_every K (e.g. 2) to measure over training"
        )
    rows = []
    for epoch, path in points:
        print(f"UNet epoch {epoch} ({path.name})")
        at_epoch = load_run(pipe.run_dir, pipe.runtime, path)
        seconds = sum(entry["seconds"]["total"] for done, entry in history.items() if done <= epoch and "seconds" in entry)
        rows.append(
            {
                "epoch": epoch,
                "images_seen": history[epoch]["step"] * pipe.config.unet_train.batch_size if epoch in history else None,
                "training_seconds": round(seconds, 1) if history else None,
            }
            | sweep_row(at_epoch, yardstick, reference, args)
        )
    return {"reference": sweep_reference(reference, args.seed), "rows": rows}


def best_scale(scales: list[float], cost: np.ndarray) -> float:
    """The scale of the lowest finite cost; NaN when none is finite."""
    return scales[int(np.nanargmin(cost))] if np.isfinite(cost).any() else math.nan


def recommended_scale(scales: list[float], d_generated: np.ndarray, d_real: float, frechet: np.ndarray) -> float:
    """Guidance misleads two ways: an anatomy effect unlike real (too weak at low scales, a caricature
    at high ones) and lost fidelity. Both weighed relatively: |d − d_real| / |d_real| plus the Fréchet
    distance's excess over the sweep's lowest, as a share of that lowest."""
    anatomy_error = np.abs(d_generated - d_real) / abs(d_real)
    fidelity_loss = (frechet - frechet.min()) / abs(frechet.min())
    return best_scale(scales, anatomy_error + fidelity_loss)


def load_checked(args: argparse.Namespace) -> tuple[Pipeline, list[Path], dict[str, SliceDataset], dict]:
    """The run, the files evaluate will write and the run's split datasets, each checked before any
    work (outputs, splits.json, enough slices of each label); earlier writers' temporary files removed."""
    pipe = load_run_for(args)
    outputs = output_paths(pipe.run_dir, args)
    check_outputs(pipe, outputs, args.overwrite)
    if not (pipe.run_dir / "splits.json").is_file():
        raise UsageError(f"{pipe.run_dir} has no splits.json: it is not a finished brainLDM run")
    datasets, splits = load_split_datasets(
        pipe.config.data, load_splits(pipe.run_dir / "splits.json"), return_slice=True, verbose=False
    )
    check_data(datasets, pipe.config.data.data_dir)
    for sampler, steps in args.sampler_sweep or ():
        if steps > pipe.scheduler.num_train_timesteps:
            raise UsageError(
                f"--sampler-sweep {sampler}:{steps}: the run has {pipe.scheduler.num_train_timesteps} diffusion steps"
            )
    report_removed(remove_temporary_files(pipe.run_dir), pipe.run_dir)
    return pipe, outputs, datasets, splits


def yardstick_of(
    pipe: Pipeline, datasets: dict[str, SliceDataset], splits: dict, args: argparse.Namespace
) -> tuple[SliceClassifier, dict]:
    """The run's yardstick, cached or trained (--retrain-classifier), and what it knows of itself."""
    return load_or_train_yardstick(
        pipe.run_dir,
        datasets,
        splits,
        pipe.config.data.image_size,
        fingerprint(pipe.vae),
        lambda pixels: reconstruct(pipe, pixels),
        pipe.runtime.device,
        args.retrain_classifier,
    )


def measure_reference(
    pipe: Pipeline, datasets: dict[str, SliceDataset], splits: dict, args: argparse.Namespace, rng: np.random.Generator
) -> tuple[SliceClassifier, dict, Reference]:
    """The yardstick (cached or trained), what it knows of itself, and the real images it measures against."""
    device, train, test = pipe.runtime.device, datasets["train"], datasets["test"]
    yardstick, yardstick_info = yardstick_of(pipe, datasets, splits, args)
    # The floors compare as many real training images as there are generated ones: Fréchet
    # distance, KID and PRDC depend on the sample size.
    floor_positions = per_label_positions(train.labels.numpy(), args.num_samples, rng)
    reference = Reference(
        train,
        measured(yardstick, test.pixels, test.labels.numpy(), device),
        measured(yardstick, reconstruct(pipe, test.pixels), test.labels.numpy(), device),
        measured(yardstick, train.pixels[floor_positions], train.labels.numpy()[floor_positions], device),
    )
    return yardstick, yardstick_info, reference


def settings_of(args: argparse.Namespace) -> dict:
    """The options that decide the numbers, as recorded in every report."""
    keys = ("num_samples", "steps", "guidance", "seed", "sampler", "batch_size")
    if args.sampler_sweep is not None:  # its rows name sampler, steps and seed
        keys = ("num_samples", "guidance", "seed", "seeds", "batch_size")
    return {key: getattr(args, key) for key in keys}


def evaluate_as_asked(
    pipe: Pipeline,
    yardstick: SliceClassifier,
    yardstick_info: dict,
    reference: Reference,
    datasets: dict[str, SliceDataset],
    args: argparse.Namespace,
    rng: np.random.Generator,
    header: dict,
    figure: Path,
) -> tuple[dict, str]:
    """The record and Markdown report of what the options ask for: a guidance sweep or a sampler sweep
    (each drawing its figure at `figure`), else the full evaluation (which draws its own)."""
    if args.guidance_sweep is not None:
        record = without_nan(header | guidance_sweep(pipe, yardstick, reference, args))
        save_sweep_figure(record, figure)
        return record, sweep_report(record)
    if args.sampler_sweep is not None:
        record = without_nan(header | sampler_sweep(pipe, yardstick, reference, args))
        save_sampler_sweep_figure(record, figure)
        return record, sampler_sweep_report(record)
    if args.over_training:
        record = without_nan(header | over_training(pipe, yardstick, reference, args))
        save_quality_curves({record["run"]: record}, figure)
        return record, quality_curves_report({record["run"]: record})
    controls = classifier_controls(reference.real_test.predictions, datasets["train"], datasets["test"])
    details = {"real_test_images": len(datasets["test"]), "classifier": controls | yardstick_info}
    record = without_nan(header | details | full_evaluation(pipe, yardstick, reference, args, rng))
    return record, markdown_report(record)


def describe(args: argparse.Namespace) -> str:
    """What is sampled, for the first line printed."""
    if args.counterfactuals:
        return f"counterfactuals, DDIM {args.steps} steps, strengths {','.join(f'{s:g}' for s in args.strengths)} | guidance {args.guidance}"
    if args.sampler_sweep is not None:
        settings = ",".join(f"{sampler}:{steps}" for sampler, steps in args.sampler_sweep)
        return f"sampler sweep {settings} | seeds {','.join(map(str, args.seeds))} | guidance {args.guidance}"
    guidance = "sweep " + ",".join(f"{scale:g}" for scale in args.guidance_sweep) if args.guidance_sweep else args.guidance
    kept = " | every kept UNet epoch" if args.over_training else ""
    return f"{args.sampler} {args.steps} steps | guidance {guidance}{kept}"


def draw_quality_curves(runs: list[Path], out: Path | None, overwrite: bool) -> None:
    """--quality-curves: the runs' over_training.json in one figure at `out`, their tables beside it (.md)."""
    if out is None or out.suffix != ".png":
        raise UsageError("--quality-curves needs --out FILE.png (e.g. results/quality_per_minute_demo.png)")
    table = out.with_suffix(".md")
    records = {}
    for run in runs:
        path = run / OVER_TRAINING_FILES[0]
        if not path.is_file():
            raise UsageError(f"{path} not found: run `python evaluate.py --run {run} --over-training` first")
        records[str(run)] = json.loads(path.read_text())
    check_output_paths([], files={"--out": out, "--out's table": table})
    existing = [path for path in (out, table) if path.exists()]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} already exists: add --overwrite to replace it")
    save_quality_curves(records, out)
    write_text_atomic(table, quality_curves_report(records))
    print(f"wrote {out}, {table}")


# ============================================================================ counterfactuals against the truth


def parse_strengths(text: str) -> list[float]:
    """`0.3,0.5` → [0.3, 0.5]: the strengths of a counterfactual sweep, each in (0, 1]."""
    try:
        strengths = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.3,0.5,0.7,0.8, got {text!r}") from None
    if not all(math.isfinite(value) and 0 < value <= 1 for value in strengths):
        raise argparse.ArgumentTypeError(f"strengths are shares of the noise schedule, in (0, 1], got {text!r}")
    return strengths


def add_counterfactual_arguments(parser: ArgumentParser) -> None:
    group = parser.add_argument_group("counterfactuals against the demo's true ones (--counterfactuals)")
    group.add_argument("--counterfactuals", action="store_true", help="instead of the full evaluation, score counterfactuals")
    group.add_argument(
        "--pairs", type=Path, help=f"the pairs folder (default {DEFAULT_PAIRS}, from project_setup.py --demo-pairs)"
    )
    group.add_argument(
        "--strengths", type=parse_strengths, help=f"strength sweep (default {','.join(map(str, COUNTERFACTUAL_STRENGTHS))})"
    )
    group.add_argument(
        "--pair-slices", type=int, help=f"pair slices per direction, one per scan (default {PAIR_SLICES}: every demo test scan)"
    )


def check_counterfactual_arguments(args: argparse.Namespace) -> None:
    """--pairs, --strengths and --pair-slices only with --counterfactuals, which excludes the other modes."""
    options = {"--pairs": args.pairs, "--strengths": args.strengths, "--pair-slices": args.pair_slices}
    given = [name for name, value in options.items() if value is not None]
    if not args.counterfactuals:
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --counterfactuals: add it, or drop them")
        return
    if args.guidance_sweep is not None or args.sampler_sweep is not None or args.over_training or args.umap:
        raise UsageError(
            "--counterfactuals is an evaluation of its own: "
            "run it without --guidance-sweep, --sampler-sweep, --over-training and --umap"
        )
    args.pairs = args.pairs or DEFAULT_PAIRS
    args.strengths = args.strengths or list(COUNTERFACTUAL_STRENGTHS)
    args.guidance = COUNTERFACTUAL_GUIDANCE if args.guidance is None else args.guidance
    args.steps = args.steps or COUNTERFACTUAL_STEPS
    args.pair_slices = PAIR_SLICES if args.pair_slices is None else args.pair_slices
    if args.pair_slices < 2:
        raise UsageError(f"--pair-slices must be at least 2 (a correlation across scans needs two), got {args.pair_slices}")
    check_pairs_folder(args.pairs)


def counterfactual_evaluation(pipe: Pipeline, yardstick: SliceClassifier, args: argparse.Namespace, outputs: list[Path]) -> str:
    """Counterfactuals of the demo's pairs in both directions, both methods and every strength of
    --strengths, scored against the true ones (counterfactual.py); writes `outputs` (json, md, png)
    and returns the Markdown report."""
    pairs = read_pairs(args.pairs, pipe.config.data.image_size, args.pair_slices, args.seed)
    base = CounterfactualSettings(0, steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size)
    device = pipe.runtime.device
    started = time.perf_counter()
    result = counterfactual_sweep(
        pipe, pairs, lambda pixels: classify(yardstick, torch.from_numpy(pixels), device)[0], args.strengths, base
    )
    chosen = recommend(result.rows)
    settings = {key: value for key, value in dataclasses.asdict(base).items() if key not in ("target", "method", "strength")}
    report = without_nan(
        {"run": str(pipe.run_dir), "run_epoch": pipe.epoch, "pairs": str(args.pairs), "slices": len(pairs.names)}
        | {"settings": settings | {"strengths": args.strengths}, "seconds": round(time.perf_counter() - started, 1)}
        | {"targets": TARGETS, "recommended": chosen, "rows": result.rows, "slice_names": pairs.names}
    )
    save_pairs_figure(pairs, result, chosen, outputs[2])
    write_json_atomic(outputs[0], report)
    text = counterfactual_report(report)
    write_text_atomic(outputs[1], text)
    return text


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.quality_curves:
        with usage_errors_exit():
            draw_quality_curves(args.quality_curves, args.out, args.overwrite)
        return
    with usage_errors_exit():
        check_arguments(args)
        pipe, outputs, datasets, splits = load_checked(args)
        seed_everything(args.seed)
        rng = np.random.default_rng(args.seed)
        print(f"run {pipe.run_dir} (epoch {pipe.epoch}) | {describe(args)} | device {pipe.runtime.device}")
        if args.counterfactuals:
            print(counterfactual_evaluation(pipe, yardstick_of(pipe, datasets, splits, args)[0], args, outputs))
            return
        yardstick, yardstick_info, reference = measure_reference(pipe, datasets, splits, args, rng)
        header = {"run": str(pipe.run_dir), "run_epoch": pipe.epoch, "image_size": pipe.config.data.image_size}
        header["settings"] = settings_of(args)
        record, report = evaluate_as_asked(pipe, yardstick, yardstick_info, reference, datasets, args, rng, header, outputs[2])
        write_json_atomic(outputs[0], record)
        write_text_atomic(outputs[1], report)
    print(report)
    print("wrote " + ", ".join(str(path) for path in outputs))


if __name__ == "__main__":
    main()
