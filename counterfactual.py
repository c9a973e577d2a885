"""Counterfactual slices: the same brain with the other diagnosis, and how close that comes to the truth.

A slice is encoded, its latent carried to an intermediate noise level (`strength`: the share of the
noise schedule), then denoised with the target label under classifier-free guidance, so the person
stays and the diagnosis changes (Dhinagar et al., EMBC 2024). Two ways to reach that noise level:
- `ddim-inversion`: deterministic DDIM run backwards with the source label (the null label when it is
  unknown) and the same guidance (Wolleb et al., MICCAI 2022, read a healthy counterfactual's
  difference as an anomaly map this way). Each backward step is solved by fixed-point iteration, so
  that the forward DDIM step lands on its input again: with the target label equal to the source,
  the counterfactual gives back the input (up to the iteration's residual);
- `sdedit`: fresh Gaussian noise at that level (Meng et al., ICLR 2022), seeded per batch.
Both denoise with DDIM (eta 0) over the last `strength` share of the sampling schedule.

The signed difference map is the counterfactual minus the slice's own VAE reconstruction, so the
decoder's blur cancels and what is left is the edit: where the model puts the disease.

On the demo's pairs (project_setup.py --demo-pairs: each test scan rendered at the typical AD and
the typical NC severity, every other random draw the same) the edit is scored against the true
counterfactual (`score`): localisation (difference-map correlation), effect (change of the CSF-dark
share), identity (closer to the truth than the source; change outside the atrophy-prone regions) and
the yardstick's flip rate. predict.py --counterfactual and evaluate.py --counterfactuals use this
module; it writes files only through utils' helpers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from config import CLASS_NAMES, PAIRS_MANIFEST
from dataset import (
    IMAGE_SUFFIXES,
    UnreadableImageError,
    brain_mask,
    csf_dark_shares,
    parse_image_name,
    prepare_image,
    read_image,
    to_model_range,
)
from modules import Conditions, guidance_conditions
from pipeline import DEFAULT_SLICE_POSITION, Pipeline, batch_generator, normalise_slices
from utils import UsageError, display_path, new_figure, save_figure, to_uint8

METHODS = ("ddim-inversion", "sdedit")
# Measured on the demo's pairs (docs/evaluation.md, "Counterfactuals against the truth"): DDIM inversion
# keeps the person (SDEdit's fresh noise changed the brain outside the atrophy 4x more), and a low
# strength with more guidance than sampling keeps it best while still flipping the diagnosis.
DEFAULT_METHOD = "ddim-inversion"
DEFAULT_STRENGTH = 0.3
DEFAULT_GUIDANCE = 3.0  # unless --guidance is given: counterfactuals' own, not the run's sampling scale
DEFAULT_STEPS = 50  # DDIM steps over the whole schedule (strength runs the last share), not the run's sampler's
# Fixed-point refinements of each inversion step after plain DDIM inversion's guess (ε taken at
# x_{t_prev}): each costs one more UNet call per step and shrinks the round trip's error.
INVERSION_ITERATIONS = 2
DIFFERENCE_COLOURS = "RdBu_r"  # diverging: blue where the counterfactual is darker (CSF), red where brighter
SCALE_PERCENTILE = 99  # of |difference| inside the brain: the shared colour scale's end
# A pixel is atrophy-prone when the true counterfactual changes it by more than this many grey levels
# (then grown by one pixel); identity is measured outside those pixels.
ATROPHY_LEVEL = 8.0
# The targets, per direction at the recommended setting.
TARGETS = {
    "localisation_median": 0.5,  # at least
    "effect_ratio_error": 0.3,  # at most |ratio of mean changes − 1|
    "effect_correlation": 0.5,  # at least
    "closer_share": 0.8,  # at least
    "flip_rate": 0.8,  # at least
}


@dataclass(frozen=True)
class Settings:
    """How one set of counterfactuals is made; recorded with them."""

    target: int
    method: str = DEFAULT_METHOD
    strength: float = DEFAULT_STRENGTH
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    batch_size: int = 64
    inversion_iterations: int = INVERSION_ITERATIONS


def check_strength(strength: float) -> None:
    if not (math.isfinite(strength) and 0 < strength <= 1):
        raise UsageError(
            f"--strength {strength}: use a number in (0, 1], the share of the noise schedule the slice is carried to "
            f"(e.g. {DEFAULT_STRENGTH}; 1 is pure noise, nothing of the slice left)"
        )


# ============================================================================ the edit


@torch.no_grad()
def inversion_step(
    pipe: Pipeline, x_prev: torch.Tensor, t_prev: int, t: int, conditions: Conditions, guidance: float, iterations: int
) -> torch.Tensor:
    """x_{t_prev} (B, C_z, h, w) → x_t such that DDIM's deterministic step from x_t lands on x_{t_prev}:
    ε is read at the current guess of x_t, x_t = sqrt(ᾱ_t) x̂_0 + sqrt(1 − ᾱ_t) ε with x̂_0 the clean
    latent that ε implies at x_{t_prev}; the first guess is x_{t_prev} itself (plain DDIM inversion)."""
    scheduler, batch = pipe.scheduler, len(x_prev)
    paired = guidance_conditions(conditions, guidance)
    now = torch.full((batch,), t, device=x_prev.device, dtype=torch.long)
    a_prev = scheduler.alpha_bar(torch.full((batch,), t_prev, device=x_prev.device)).float().view(-1, 1, 1, 1)
    x = x_prev
    for _ in range(1 + iterations):
        with pipe.runtime.autocast():
            prediction = scheduler.guided_prediction(pipe.unet, x, now, conditions, guidance, paired=paired)
        noise = scheduler.predict_noise(x, scheduler.predict_x0(x, prediction, now), now)
        clean = (x_prev - (1 - a_prev).sqrt() * noise) / a_prev.sqrt()
        x = scheduler.add_noise(clean, noise, now)
    return x


@torch.no_grad()
def invert(pipe: Pipeline, latents: torch.Tensor, conditions: Conditions, settings: Settings) -> torch.Tensor:
    """Clean latents (B, C_z, h, w) → their DDIM inversion at the first timestep of the schedule's
    last `strength` share: the latents from which DDIM sampling with the same conditions and
    guidance returns them."""
    pipe.unet.eval()
    rising = [-1, *reversed(pipe.scheduler.timesteps(settings.steps, settings.strength))]
    x = latents.to(pipe.runtime.device, torch.float32)
    for t_prev, t in zip(rising[:-1], rising[1:]):
        x = inversion_step(pipe, x, t_prev, t, conditions, settings.guidance, settings.inversion_iterations)
    return x


def noised(pipe: Pipeline, latents: torch.Tensor, settings: Settings, generator: torch.Generator) -> torch.Tensor:
    """SDEdit: clean latents (B, C_z, h, w) under fresh noise at the first timestep of the schedule's last `strength` share."""
    first = pipe.scheduler.timesteps(settings.steps, settings.strength)[0]
    latents = latents.to(pipe.runtime.device, torch.float32)
    noise = torch.randn(latents.shape, device=latents.device, generator=generator)
    return pipe.scheduler.add_noise(latents, noise, torch.full((len(latents),), first, device=latents.device))


def edit_latents(
    pipe: Pipeline, latents: torch.Tensor, source: Conditions, settings: Settings, generator: torch.Generator
) -> torch.Tensor:
    """Clean latents (B, C_z, h, w) with `source` conditions → the counterfactual latents of `settings.target`."""
    if settings.method == "ddim-inversion":
        start = invert(pipe, latents, source, settings)
    else:
        start = noised(pipe, latents, settings, generator)
    target = Conditions(torch.full_like(source.labels, settings.target), source.slice_position)
    return pipe.sample(
        target,
        steps=settings.steps,
        guidance_scale=settings.guidance,
        sampler="ddim",  # eta 0: the inversion's mirror image, whatever the run samples with
        generator=generator,
        start=start,
        strength=settings.strength,
    )


def make_counterfactuals(
    pipe: Pipeline, pixels: np.ndarray, sources: list[int | None], settings: Settings, slice_positions: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 slices (N, S, S) with their labels (None: unknown, inverted with the null label) →
    (VAE reconstructions, counterfactuals), uint8 (N, S, S). Batches of `settings.batch_size`,
    each seeded like predict.py's samples (batch_generator(seed, target, batch index))."""
    reconstructions, counterfactuals = [], []
    for batch_index, start in enumerate(range(0, len(pixels), settings.batch_size)):
        chunk = slice(start, start + settings.batch_size)
        latents = pipe.encode(to_model_range(torch.from_numpy(pixels[chunk]).unsqueeze(1)))
        labels = torch.tensor([Conditions.ABSENT if label is None else label for label in sources[chunk]])
        source = pipe.conditions(labels, None if slice_positions is None else slice_positions[chunk])
        generator = batch_generator(settings.seed, settings.target, batch_index, pipe.runtime.device)
        edited = edit_latents(pipe, latents, source, settings, generator)
        reconstructions.append(to_uint8(pipe.decode(latents)))
        counterfactuals.append(to_uint8(pipe.decode(edited)))
    return np.concatenate(reconstructions), np.concatenate(counterfactuals)


# ============================================================================ reading slices


def slice_files(paths: list[Path]) -> list[Path]:
    """The image files that `paths` name: files as given, folders searched recursively for
    IMAGE_SUFFIXES files (sorted). A missing path or a folder without images is a UsageError."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(
                    f"--counterfactual {display_path(path)} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                    "pass slices or a folder of them"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"--counterfactual {display_path(path)} not found: pass existing slice files or folders")
    return files


def read_originals(files: list[Path]) -> list[np.ndarray]:
    """Each file decoded to uint8 (H, W); one that is not a readable image is a UsageError naming it."""
    try:
        return [read_image(path) for path in files]
    except UnreadableImageError as error:
        raise UsageError(f"--counterfactual: {error}; pass image slices (.jpeg, .jpg, .png) only") from None


def read_slices(files: list[Path], image_size: int) -> np.ndarray:
    """Each file decoded and prepared as in training: uint8 (N, S, S) (read_originals' errors)."""
    return np.stack([prepare_image(pixels, image_size) for pixels in read_originals(files)])


def slice_positions(pipe: Pipeline, files: list[Path]) -> torch.Tensor | None:
    """For a slice-conditioned run, each file's slice position (N,) from its <scanID>_<slice> name,
    the default mid-range one where the name has none; None for other runs."""
    if not pipe.config.unet.slice_conditioning:
        return None
    indices = [slice_index_from_path(path) for path in files]
    known = normalise_slices(torch.tensor([-1 if index is None else index for index in indices]), pipe.slice_range)
    return torch.tensor([DEFAULT_SLICE_POSITION if index is None else float(position) for index, position in zip(indices, known)])


def label_from_path(path: Path) -> int | None:
    """The label a path in the dataset layout carries: its folder named AD or NC; else None (unknown)."""
    name = path.parent.name.upper()
    return CLASS_NAMES.index(name) if name in CLASS_NAMES else None


def slice_index_from_path(path: Path) -> int | None:
    parsed = parse_image_name(path.name)
    return None if parsed is None else parsed[1]


# ============================================================================ measuring


def difference_maps(after: np.ndarray, before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed differences after − before of uint8 slices (N, S, S) in grey levels (float32), zero
    outside the brain, and that brain mask (bool, brain in either slice)."""
    mask = brain_mask(after) | brain_mask(before)
    return np.where(mask, after.astype(np.float32) - before.astype(np.float32), 0.0), mask


def masked_correlations(first: np.ndarray, second: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Pearson correlation of two maps inside each mask, per slice (N,); NaN where either has no spread."""
    values = []
    for a, b, mask in zip(first, second, masks):
        a, b = a[mask].astype(np.float64), b[mask].astype(np.float64)
        values.append(correlation(a, b))
    return np.array(values)


def rms_inside(first: np.ndarray, second: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """RMS difference of uint8 slices inside each mask (N,) in grey levels; NaN for an empty mask."""
    squared = np.square(first.astype(np.float64) - second.astype(np.float64))
    counts = masks.sum(axis=(1, 2))
    return np.where(counts > 0, np.sqrt((squared * masks).sum(axis=(1, 2)) / np.maximum(counts, 1)), math.nan)


def shared_scale(differences: np.ndarray, masks: np.ndarray) -> float:
    """One colour scale for a set of difference maps: the SCALE_PERCENTILE of |difference| inside the brain, at least 1."""
    inside = np.abs(differences[masks])
    return max(1.0, float(np.percentile(inside, SCALE_PERCENTILE))) if inside.size else 1.0


def difference_colours(differences: np.ndarray, masks: np.ndarray, scale: float) -> np.ndarray:
    """Difference maps (N, S, S) → RGB uint8 (N, S, S, 3) on DIFFERENCE_COLOURS over [−scale, scale]; black outside the brain."""
    from matplotlib import colormaps

    rgb = colormaps[DIFFERENCE_COLOURS](np.clip(differences / scale, -1, 1) / 2 + 0.5)[..., :3]
    return np.where(masks[..., None], np.round(rgb * 255), 0).astype(np.uint8)


# ============================================================================ scoring against the truth


def atrophy_prone(true_differences: np.ndarray) -> np.ndarray:
    """Pixels the true counterfactual changes by more than ATROPHY_LEVEL grey levels, grown by one pixel (N, S, S) bool."""
    changed = np.abs(true_differences) > ATROPHY_LEVEL
    return np.stack([ndimage.binary_dilation(mask) for mask in changed])


def score(
    source: np.ndarray,
    truth: np.ndarray,
    reconstruction: np.ndarray,
    counterfactual: np.ndarray,
    truth_reconstruction: np.ndarray,
    flipped: np.ndarray,
) -> dict:
    """Counterfactuals of uint8 source slices (N, S, S) against the true counterfactuals, all
    (N, S, S) uint8; `flipped` (N,) bool: the yardstick assigns the counterfactual to the target
    label. Each figure has a `_ceiling` beside it: the same for `truth_reconstruction`, the truth
    through the VAE, which a perfect edit of the latent would decode to."""
    true, brain = difference_maps(truth, source)
    brain = brain | brain_mask(reconstruction) | brain_mask(counterfactual)
    true_change = csf_dark_shares(truth) - csf_dark_shares(source)
    scores = edit_scores(source, truth, reconstruction, counterfactual, brain, true, true_change)
    ceiling = edit_scores(source, truth, reconstruction, truth_reconstruction, brain, true, true_change)
    outside = brain & ~atrophy_prone(true)
    return (
        {"slices": len(source)}
        | scores
        | {f"{key}_ceiling": value for key, value in ceiling.items()}
        | {
            "true_csf_change_mean": float(np.nanmean(true_change)),
            "closer_share_than_raw_source": float(
                np.mean(rms_inside(counterfactual, truth, brain) < rms_inside(source, truth, brain))
            ),
            "rms_outside_atrophy_median": finite_median(rms_inside(counterfactual, reconstruction, outside)),
            "true_rms_outside_atrophy_median": finite_median(rms_inside(truth, source, outside)),
            "flip_rate": float(np.mean(flipped)),
        }
    )


def edit_scores(
    source: np.ndarray,
    truth: np.ndarray,
    reconstruction: np.ndarray,
    edited: np.ndarray,
    brain: np.ndarray,
    true: np.ndarray,
    true_change: np.ndarray,
) -> dict:
    """What `score` measures of one set of decoded edits (N, S, S) uint8 against the truth: the
    difference map (edited − reconstruction) against the true one (`true`) inside `brain`, the change
    of the CSF-dark share against `true_change`, and the distance to the truth against the reconstruction's."""
    change = csf_dark_shares(edited) - csf_dark_shares(reconstruction)
    distance = rms_inside(edited, truth, brain)
    return {
        "localisation_median": finite_median(masked_correlations(difference_maps(edited, reconstruction)[0], true, brain)),
        "csf_change_mean": float(np.nanmean(change)),
        "effect_ratio": float(np.nanmean(change) / np.nanmean(true_change)),
        "effect_correlation": correlation(change, true_change),
        "closer_share": float(np.mean(distance < rms_inside(reconstruction, truth, brain))),
        "rms_to_truth_median": finite_median(distance),
    }


def finite_median(values: np.ndarray) -> float:
    """Median of the finite values; NaN (without numpy's warning) when there are none."""
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.nan


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two (N,) series over their finite pairs; NaN without spread."""
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2 or np.std(a[keep]) == 0 or np.std(b[keep]) == 0:
        return math.nan
    return float(np.corrcoef(a[keep], b[keep])[0, 1])


def targets_met(row: dict) -> dict[str, bool]:
    """Which of TARGETS one scored row meets."""
    return {
        "localisation_median": row["localisation_median"] >= TARGETS["localisation_median"],
        "effect_ratio_error": abs(row["effect_ratio"] - 1) <= TARGETS["effect_ratio_error"],
        "effect_correlation": row["effect_correlation"] >= TARGETS["effect_correlation"],
        "closer_share": row["closer_share"] >= TARGETS["closer_share"],
        "flip_rate": row["flip_rate"] >= TARGETS["flip_rate"],
    }


# ============================================================================ the demo's pairs

DIRECTIONS = ((1, 0), (0, 1))  # (source, target): NC → AD, then AD → NC
EXAMPLES = 6  # per direction in the evaluation figure


def direction_name(source: int, target: int) -> str:
    return f"{CLASS_NAMES[source]} → {CLASS_NAMES[target]}"


@dataclass
class Pairs:
    """One slice per demo test scan, rendered at each label's typical severity, every other draw the same."""

    names: list[str]  # <scanID>_<slice>
    renders: dict[int, np.ndarray]  # label → uint8 (N, S, S)


def check_pairs_folder(folder: Path) -> None:
    if not (folder / PAIRS_MANIFEST).is_file():
        raise UsageError(
            f"{display_path(folder)} holds no {PAIRS_MANIFEST}: build the pairs with python project_setup.py --demo-pairs "
            "(the --scans and --seed the demo was built with), or pass their folder with --pairs"
        )


def read_pairs(folder: Path, image_size: int, count: int, seed: int) -> Pairs:
    """One random slice of each of up to `count` random scans in a pairs folder, both renders."""
    check_pairs_folder(folder)
    manifest = json.loads((folder / PAIRS_MANIFEST).read_text())
    rng = np.random.default_rng(seed)
    names = []
    for scan in manifest["test_scans"]:
        found = sorted((folder / CLASS_NAMES[0]).glob(f"{scan['scan_id']}_*.jpeg"))
        if found:
            names.append(found[rng.integers(len(found))].name)
    if not names:
        raise UsageError(
            f"{display_path(folder)} holds no pair slices: build them again with python project_setup.py --demo-pairs"
        )
    names = sorted(rng.choice(names, size=min(count, len(names)), replace=False).tolist())
    renders = {}
    for label, class_name in enumerate(CLASS_NAMES):
        missing = [name for name in names if not (folder / class_name / name).is_file()]
        if missing:
            raise UsageError(f"{display_path(folder / class_name / missing[0])} is missing: build the pairs again")
        renders[label] = read_slices([folder / class_name / name for name in names], image_size)
    return Pairs(names, renders)


def reconstruct(pipe: Pipeline, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 slices (N, S, S) → their VAE reconstructions from the posterior mean, uint8 (N, S, S)."""
    images = to_model_range(torch.from_numpy(pixels).unsqueeze(1))
    return np.concatenate([to_uint8(pipe.decode(pipe.encode(chunk))) for chunk in images.split(batch_size)])


@dataclass
class Sweep:
    rows: list[dict]  # one per direction, method and strength: `score`'s figures and the yardstick's references
    edited: dict[tuple[str, str, float], np.ndarray]  # (direction, method, strength) → counterfactuals uint8 (N, S, S)
    reconstructions: dict[int, np.ndarray]  # label → the pairs' renders of that label through the VAE


def sweep(
    pipe: Pipeline, pairs: Pairs, judge: Callable[[np.ndarray], np.ndarray], strengths: list[float], base: Settings
) -> Sweep:
    """Both directions, both METHODS, every strength, scored against the pairs. `judge` maps uint8
    slices (N, S, S) to the yardstick's labels (N,)."""
    rows, edited = [], {}
    reconstructions = {label: reconstruct(pipe, images, base.batch_size) for label, images in pairs.renders.items()}
    for source, target in DIRECTIONS:
        name = direction_name(source, target)
        references = {
            "yardstick_truth_rate": float(np.mean(judge(pairs.renders[target]) == target)),
            "yardstick_source_rate": float(np.mean(judge(pairs.renders[source]) == target)),
            "flip_rate_ceiling": float(np.mean(judge(reconstructions[target]) == target)),
        }
        for method in METHODS:
            for strength in strengths:
                print(f"counterfactuals {name}, {method}, strength {strength:g}")
                settings = dataclasses.replace(base, target=target, method=method, strength=strength)
                _, counterfactuals = make_counterfactuals(pipe, pairs.renders[source], [source] * len(pairs.names), settings)
                scores = score(
                    pairs.renders[source],
                    pairs.renders[target],
                    reconstructions[source],
                    counterfactuals,
                    reconstructions[target],
                    judge(counterfactuals) == target,
                )
                rows.append({"direction": name, "method": method, "strength": strength} | scores | references)
                edited[name, method, strength] = counterfactuals
    return Sweep(rows, edited, reconstructions)


def recommend(rows: list[dict]) -> dict:
    """The (method, strength) meeting the most TARGETS over both directions; ties go to the higher mean
    difference-map correlation."""
    settings = sorted({(row["method"], row["strength"]) for row in rows}, key=lambda key: (METHODS.index(key[0]), key[1]))

    def merit(key: tuple[str, float]) -> tuple[int, float]:
        chosen = [row for row in rows if (row["method"], row["strength"]) == key]
        met = sum(sum(targets_met(row).values()) for row in chosen)
        return met, float(np.nanmean([row["localisation_median"] for row in chosen]))

    method, strength = max(settings, key=merit)
    return {"method": method, "strength": strength, "targets_met": merit((method, strength))[0]}


# ============================================================================ report and figures

# (row key, what it measures, target) of the report's headline table
REPORT_ROWS = (
    ("localisation_median", "difference-map correlation, predicted vs true, inside the brain (median over slices)", "≥ 0.5"),
    ("effect_ratio", "CSF-dark share change: mean predicted / mean true", "0.7 to 1.3"),
    ("effect_correlation", "CSF-dark share change: correlation of predicted and true across scans", "≥ 0.5"),
    ("csf_change_mean", "CSF-dark share change, mean predicted (counterfactual − reconstruction)", ""),
    ("true_csf_change_mean", "CSF-dark share change, mean true (true counterfactual − source)", ""),
    ("closer_share", "closer to the truth than the source's reconstruction (RMS in the brain)", "≥ 0.8"),
    ("closer_share_than_raw_source", "closer to the truth than the source slice itself", ""),
    ("rms_to_truth_median", "RMS distance to the truth, grey levels (median)", ""),
    ("rms_outside_atrophy_median", "change outside the atrophy-prone regions, RMS grey levels (median)", ""),
    ("true_rms_outside_atrophy_median", "the true counterfactual's change there", ""),
    ("flip_rate", "yardstick flip rate: counterfactuals it assigns to the target label", "≥ 0.8"),
    ("yardstick_truth_rate", "the same for the true counterfactuals", ""),
    ("yardstick_source_rate", "the same for the unedited sources", ""),
)
SWEEP_COLUMNS = (
    "localisation_median",
    "effect_ratio",
    "effect_correlation",
    "closer_share",
    "rms_outside_atrophy_median",
    "flip_rate",
)


def cell(value: object) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3g}"


def markdown_report(report: dict) -> str:
    """The headline table at the recommended setting (rows name the measures) and the whole sweep."""
    chosen, settings = report["recommended"], report["settings"]
    directions = [direction_name(source, target) for source, target in DIRECTIONS]
    at = {
        row["direction"]: row
        for row in report["rows"]
        if (row["method"], row["strength"]) == (chosen["method"], chosen["strength"])
    }
    lines = [
        f"# Counterfactuals against the truth: {report['run']} (UNet epoch {report['run_epoch']})",
        "",
        f"{report['slices']} demo test scans, one slice each ({report['pairs']}), DDIM {settings['steps']} steps over the "
        f"schedule, guidance {settings['guidance']:g}, seed {settings['seed']}, {settings['inversion_iterations']} fixed-point "
        f"iterations per inversion step. **Recommended: {chosen['method']} at strength {chosen['strength']:g}** "
        f"({chosen['targets_met']} of {2 * len(TARGETS)} targets met).",
        "",
        f"| at {chosen['method']}, strength {chosen['strength']:g} | {' | '.join(directions)} | target | ceiling: the truth "
        f"through the VAE, {' | '.join(directions)} |",
        "|---|" + "---:|" * (2 * len(directions) + 1),
    ]
    for key, meaning, target in REPORT_ROWS:
        ceiling = " | ".join(cell(at[name].get(f"{key}_ceiling")) if f"{key}_ceiling" in at[name] else "" for name in directions)
        lines.append(f"| {meaning} | {' | '.join(cell(at[name][key]) for name in directions)} | {target} | {ceiling} |")
    lines += [
        "",
        "| direction | method | strength | " + " | ".join(SWEEP_COLUMNS) + " |",
        "|---|---|---:|" + "---:|" * len(SWEEP_COLUMNS),
    ]
    for row in report["rows"]:
        values = " | ".join(cell(row[key]) for key in SWEEP_COLUMNS)
        lines.append(f"| {row['direction']} | {row['method']} | {row['strength']:g} | {values} |")
    return "\n".join(lines) + "\n"


def save_image_table(
    cells: list[list[np.ndarray]], row_titles: list[str], column_titles: list[str], path: Path, title: str, scale: float
) -> None:
    """A figure of images, cells[row][column] each uint8 (S, S) grey or (S, S, 3) colour, with a
    colour bar for the difference maps' shared scale (± `scale` grey levels)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rows, columns = len(cells), len(cells[0])
    height = 1.55 * rows + 0.4
    figure, axes = new_figure(rows, columns, figsize=(1.5 * columns + 1.2, height), squeeze=False)
    figure.subplots_adjust(top=1 - 0.45 / height, bottom=0.1 / height)
    for row, (images, row_title) in enumerate(zip(cells, row_titles)):
        for column, image in enumerate(images):
            axis = axes[row][column]
            axis.imshow(image, cmap="gray", vmin=0, vmax=255) if image.ndim == 2 else axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(column_titles[column], fontsize=8)
            if column == 0:
                axis.set_ylabel(row_title, fontsize=8)
    bar = figure.colorbar(
        ScalarMappable(Normalize(-scale, scale), colormaps[DIFFERENCE_COLOURS]), ax=axes, shrink=0.5, fraction=0.03, pad=0.02
    )
    bar.set_label("difference, grey levels", fontsize=8)
    figure.suptitle(title, fontsize=9, y=1 - 0.1 / height)
    save_figure(figure, path)


def save_pairs_figure(pairs: Pairs, result: Sweep, chosen: dict, path: Path) -> None:
    """Per direction, EXAMPLES evenly spaced pair slices at the chosen setting; rows: source,
    counterfactual, predicted difference (counterfactual − reconstruction), true difference
    (true counterfactual − source), all differences on one scale."""
    shown = np.unique(np.linspace(0, len(pairs.names) - 1, EXAMPLES).round().astype(int))
    blocks = []
    for source, target in DIRECTIONS:
        edited = result.edited[direction_name(source, target), chosen["method"], chosen["strength"]][shown]
        predicted = difference_maps(edited, result.reconstructions[source][shown])
        true = difference_maps(pairs.renders[target][shown], pairs.renders[source][shown])
        blocks.append((source, target, edited, predicted, true))
    scale = shared_scale(
        np.concatenate([maps for block in blocks for maps, _ in block[3:]]),
        np.concatenate([mask for block in blocks for _, mask in block[3:]]),
    )
    cells, titles = [], []
    for source, target, edited, predicted, true in blocks:
        name = direction_name(source, target)
        cells += [
            list(pairs.renders[source][shown]),
            list(edited),
            list(difference_colours(*predicted, scale)),
            list(difference_colours(*true, scale)),
        ]
        titles += [f"{name}\nsource", "counterfactual", "predicted\ndifference", "true\ndifference"]
    title = f"Counterfactuals, {chosen['method']} at strength {chosen['strength']:g}: blue = darker (CSF), red = brighter"
    save_image_table(cells, titles, [pairs.names[i].rsplit(".", 1)[0] for i in shown], path, title, scale)
