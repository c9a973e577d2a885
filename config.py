"""Every setting of brainLDM: one dataclass per concern, the one preset table, command-line overrides.

    config = make_config("demo")                       # a preset
    apply_overrides(config, {"unet.channels": "32,64"})  # what `--unet.channels 32,64` does
    read_config(Path("runs/demo"))                     # a run's own config.json

A Config is saved as config.json in every run folder and inside every checkpoint; the sections in
MODEL_SECTIONS (and the data fields in MODEL_DATA_FIELDS) define what the weights mean, so an existing
run refuses to change them.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from utils import UsageError

CLASS_NAMES = ("AD", "NC")  # label = CLASS_NAMES.index(name): AD=0, NC=1, never directory-listing order
DEFAULT_DATA_DIR = "data/ADNI/AD_NC"
DEMO_DATA_DIR = "data/demo/AD_NC"
# project_setup.py --demo-pairs: each demo test scan at the typical AD and NC severity, in this folder
# beside the demo's (data/demo/pairs/{AD,NC}/<scanID>_<slice>.jpeg), described by its manifest.
PAIRS_FOLDER = "pairs"
PAIRS_MANIFEST = "pairs.json"
# The demo's scan count: a train and a test scan per class at least; at most as many as its six-digit scan IDs.
DEMO_SCAN_LIMITS = (4, 900_000)
# Classifier-free guidance scales above this are refused, given or stored (run.guidance_scale, --guidance,
# --guidance-sweep): on a demo run every sample up to 30 was a brain on black, from 50 the background
# filled in, from 300 no brain was left (docs/reliability.md, "The guidance bound").
MAX_GUIDANCE = 30.0


# ============================================================================ the sections


@dataclass
class DataConfig:
    """Where the images are, how they are split and at what size the model sees them."""

    data_dir: str = DEFAULT_DATA_DIR
    image_size: int = 192  # multiple of 32: an 8x VAE plus two UNet downsamples
    val_fraction: float = 0.1  # of the training scans, per class
    split_seed: int = 0
    cache_dir: str | None = "data/cache"  # None: decode into memory only


@dataclass
class VAEConfig:
    """KL autoencoder; the downsampling factor f is 2 ** (len(channels) - 1). Its latent_channels are
    the latent space's, so the UNet takes them from here."""

    in_channels: int = 1
    latent_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 256, 256)
    num_res_blocks: int = 1
    middle_attention: bool = True
    recon_loss: str = "l1"  # "l1" | "mse"
    kl_weight: float = 1e-6  # on the per-image KL sum, beside the per-pixel mean reconstruction (as MONAI's LDM)
    ssim_weight: float = 0.2
    # Optional sharpness terms, off unless asked for (not measured better yet: see the README's Model section).
    fourier_weight: float = 0.0  # L1 between Fourier amplitude spectra: blur is missing high-frequency energy
    adversarial_weight: float = 0.0  # hinge loss of a PatchGAN discriminator on the reconstructions; 0 = none
    adversarial_start: int = 0  # VAE steps before the discriminator trains and its loss counts (as SD's autoencoder)
    discriminator_channels: int = 32  # its first layer's width, doubled at each of its next two layers

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass
class UNetConfig:
    """Latent UNet; attention_levels[i] puts transformer blocks at resolution level i (0 = full latent size)."""

    channels: tuple[int, ...] = (128, 256, 256)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (False, True, True)
    head_dim: int = 32
    context_dim: int = 256
    # Learned context tokens per label (and for "no label"). With one, cross-attention's softmax is 1 over it
    # and its query/key projections get no gradient; with several, each pixel weighs them. One by
    # measurement: four trained no better on the demo (README, "Several context tokens per label").
    label_tokens: int = 1
    # Also add a learned label embedding to the timestep embedding, which every ResBlock receives (as ADM
    # does), so the levels without attention see the label too; off, the label reaches the network only
    # through cross-attention at the attention levels. Off by measurement, for now: on the demo (two seeds)
    # it lowered the UNet's val loss 1.3-1.7% and raised the cortical anatomy effect (d 0.49 → 0.58-0.63 at
    # guidance 1.5), but moved Fréchet both ways (39x → 31x, 51x) (docs/training.md, issue 21).
    label_in_resblocks: bool = False
    num_classes: int = len(CLASS_NAMES)
    slice_conditioning: bool = False
    dropout: float = 0.0
    # Latent pixels per UNet position along each side (DiT's patch size): with 2 the UNet works on a 2x2-patched
    # grid, so an f = 2 VAE's 32x32 latents cost what f = 4's 16x16 do. Measured on the demo (docs/training.md,
    # issue 21): the second-lowest Fréchet distance of nine recipes, but blotchy samples, so no preset uses it.
    patch_size: int = 1


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # "linear" | "scaled_linear" | "cosine"
    beta_start: float = 0.0015  # MONAI's brain LDM values: sqrt(ᾱ_T) ≈ 0.012
    beta_end: float = 0.0195
    prediction_type: str = "v"  # "v" | "epsilon"; measured: see the README's "Model" section
    min_snr_gamma: float = 0.0  # 0 = plain (unweighted) loss
    clip_sample: float = 0.0  # clamp x0-estimates to [-c, c]; 0 = off (latents are not bounded)


@dataclass
class StageConfig:
    """Optimisation of one stage: AdamW with linear warm-up then cosine decay to `min_lr_ratio`."""

    epochs: int = 100
    images: int | None = None  # a schedule in training images instead: epochs = ceil(images / training-set size)
    batch_size: int = 32
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)  # AdamW's (beta1, beta2); the VAE's discriminator uses them too
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # Autocast to bf16 where the device computes it (utils.computes_bf16): CUDA, and CPUs with bf16 in hardware
    # (there the demo's UNet trained 1.4x faster to the same quality: docs/training.md, "bf16 on the CPU").
    bf16: bool = True


@dataclass
class UNetTrainConfig(StageConfig):
    """Stage 2 adds what only the diffusion stage needs."""

    label_dropout: float = 0.1  # p(condition → absent): teaches the unconditional model for guidance
    ema_decay: float = 0.9999
    cache_latents: bool = True  # encode the training set once instead of every step


@dataclass
class RunConfig:
    """How a run behaves, not what it learns: device, precision, logging and figures."""

    seed: int = 0
    device: str = "auto"
    channels_last: bool = True  # CUDA only
    compile: str = "none"  # torch.compile of the model being trained: one of COMPILE_MODES (modules.compile_model)
    log_every: int = 10  # steps between progress-bar updates (each one syncs with the device)
    sample_every: int = 5  # epochs between AD/NC sample grids
    # A UNet checkpoint of the adni preset is ~600 MB: writing one every epoch cost seconds per epoch.
    checkpoint_minutes: float = (
        10.0  # between mid-stage checkpoints (0: every epoch); a stage's end and a clean stop always write one
    )
    validate_every: int = 1  # epochs between validations; the last epoch is always validated
    grid_samples: int = 16  # per label
    # How every script samples unless told otherwise: the training grids, predict.py and evaluate.py.
    # Measured by `evaluate.py --sampler-sweep` on the demo run (docs/evaluation.md), 200 images per label,
    # seeds 0 and 1, paired per seed with DDIM 50: the fewest steps whose every metric (conditioning
    # accuracy, anatomy d, Fréchet, precision, coverage) lies within DDIM 50's seed-to-seed spread is
    # DPM-Solver++(2M) at 10 (differences 0.009, 0.05, 0.33, -0.004, -0.006 against spreads 0.01, 0.43,
    # 0.53, 0.025, 0.006); DDIM needs more than 20. 64 guided samples: 9.8 s against 46.1 s.
    # On the f = 2 demo recipe since (issue 21), 300 images per label, seeds 0, 1, 2 (docs/evaluation.md): 25 steps
    # lowered the Fréchet distance on every seed (12.0 / 14.2 / 14.3 times its floor against 17.7 / 20.6 / 20.5; DDIM
    # 50: 13.4 on seed 0), with precision and coverage no lower, for 2.3x the sampling time, so 25.
    sampler: str = "dpmpp_2m"  # one of modules.SAMPLERS
    sample_steps: int = 25
    # Measured by `evaluate.py --guidance-sweep` on the f = 4 demo run (docs/evaluation.md): at 2 generated AD and
    # NC differed in anatomy and separability about as much as real ones; 3 made a caricature (Cohen's d 3.0 vs 1.6).
    guidance_scale: float = 2.0
    tensorboard: bool = False  # also log scalars and figures to <run>/tensorboard/ (train.py)
    # UNet epochs between snapshots/unet_epochNNN.pt (the stage checkpoint of that epoch, EMA included), which
    # `evaluate.py --over-training` measures to draw quality against training time; 0 = none.
    keep_every: int = 0


@dataclass
class Config:
    preset: str = "adni"
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    vae_train: StageConfig = field(default_factory=StageConfig)
    unet_train: UNetTrainConfig = field(default_factory=UNetTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


# How torch.compile is applied (modules.compile_model): not at all, the whole model, each repeated
# block on its own, or the whole model with CUDA graphs.
COMPILE_MODES = ("none", "full", "regional", "reduce-overhead")

# Sections that define what a checkpoint's weights mean; a run cannot change them later.
MODEL_SECTIONS = ("vae", "unet", "scheduler")
MODEL_DATA_FIELDS = ("image_size", "val_fraction", "split_seed")


# ============================================================================ the preset table


def _adni() -> Config:
    """The 192 px model for one GPU: f = 8 → 24x24 latents, attention at 12x12 and 6x6."""
    return Config(
        preset="adni",
        # betas 0.5,0.9 as autoencoders commonly use: measured on 2 CPU cores (the adni VAE at 64 px with
        # channels 16-32-64-64, 270 steps) val MS-SSIM 0.906 against 0.865 with 0.9,0.999 (README "Training").
        vae_train=StageConfig(epochs=100, batch_size=32, lr=2e-4, warmup_steps=500, betas=(0.5, 0.9)),
        # The Fourier amplitude term: on the same CPU test 0.919 / 0.929 against 0.904 / 0.916 without
        # (two seeds); a discriminator switched on at half of those steps fell to 0.794 (README "Training").
        vae=VAEConfig(fourier_weight=0.5),
        unet_train=UNetTrainConfig(epochs=100, batch_size=64, lr=2e-4, warmup_steps=1000),
        # 100 epochs: a validation with every sample grid still draws 20 points per curve.
        run=RunConfig(validate_every=5),
    )


def _demo() -> Config:
    """64 px, f = 2 → 32x32 latents: trains in 10-18 minutes on 2 CPU cores, by the machine (docs/training.md)."""
    return Config(
        preset="demo",
        data=DataConfig(data_dir=DEMO_DATA_DIR, image_size=64),
        # f = 2: one latent vector per 2x2 pixels keeps the finest detail, which f = 4 cannot (validation
        # spectral energy above 1/4 cycle/px 0.86 after 3 epochs, f = 4 0.29 after 4, with 8 or 16 latent
        # channels at most 0.62); without the middle attention over its 1,024 latent positions it is nearly
        # as sharp and cheaper (docs/training.md, "Issue 21"). 3 epochs: the 4th added nothing (0.84).
        vae=VAEConfig(channels=(16, 32), num_res_blocks=1, middle_attention=False, fourier_weight=1.0),
        # The f = 4 UNet with a thin 16-channel level in front for the 32x32 latents: bench.py's training step
        # ran at 62 images/s against the f = 4 UNet's 89 (a 32-channel level costs 2.6x), which the cheaper f = 2
        # VAE pays for: Quickstart 1,061 s against the f = 4 recipe's 1,119 s, one machine. Measured by `evaluate.py
        # --over-training` (200 per label) after the same 45,312 training images against the f = 4 recipe:
        # Fréchet / floor 8.7 against 10.3, precision 0.66 / 0.53, coverage 0.23 / 0.16, samples' energy
        # above 1/4 cycle/px 0.60 / 0.26, conditioning accuracy 0.873 / 0.875 (docs/training.md, "Issue 21").
        unet=UNetConfig(
            channels=(16, 32, 64, 128), num_res_blocks=1, attention_levels=(False, False, True, True), context_dim=128
        ),
        # min-SNR γ = 5 (Hang et al. 2023), measured on the f = 4 recipe by `evaluate.py --over-training` (200 per
        # label) after the same 45,312 training images: Fréchet / floor 10.3 against 15.7 unweighted, conditioning
        # accuracy 0.875 against 0.833, precision 0.53 / 0.51, coverage 0.16 / 0.15; on the f = 2 recipe 8.7
        # against 7.1, but precision 0.66 / 0.61, coverage 0.23 / 0.21, conditioning 0.873 / 0.830.
        scheduler=SchedulerConfig(min_snr_gamma=5.0),
        # float32: in bf16 (1.7x faster on a CPU with bf16 in hardware) the VAE kept 0.80 of the validation slices'
        # spectral energy above 1/4 cycle/px against 0.83-0.84, on two seeds (docs/training.md, "bf16 on the CPU").
        vae_train=StageConfig(epochs=3, batch_size=16, lr=1e-3, warmup_steps=100, bf16=False),
        unet_train=UNetTrainConfig(epochs=12, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999),
        # `evaluate.py --guidance-sweep 1,1.5,2,3 --num-samples 200` on the f = 2 recipe's run: at 2 a caricature
        # (Cohen's d 2.64 against the real 1.63, conditioning accuracy 0.87 above the yardstick's 0.79 on real
        # slices); at 1.5 d 1.98 and accuracy 0.805, Fréchet distance 0.57 against 0.45 (docs/evaluation.md).
        run=RunConfig(sample_every=6, grid_samples=16, guidance_scale=1.5),
    )


def _tiny() -> Config:
    """32 px and a few thousand parameters: both stages in seconds on one CPU core, for tests and smoke checks."""
    config = _demo()
    config.preset = "tiny"
    config.data.image_size, config.data.cache_dir = 32, None
    config.vae = VAEConfig(channels=(8, 16, 16), num_res_blocks=1)
    config.unet = UNetConfig(channels=(16, 32), num_res_blocks=1, attention_levels=(False, True), head_dim=8, context_dim=16)
    config.scheduler = SchedulerConfig()  # the plain loss, whose value tests can work out by hand
    for stage in (config.vae_train, config.unet_train):
        stage.epochs, stage.batch_size, stage.warmup_steps = 2, 8, 2
    # float32 on every CPU, so a test's numbers do not depend on whether the CPU computes bf16.
    config.vae_train.bf16 = config.unet_train.bf16 = False
    # A checkpoint every epoch, so tests can stop a run after any epoch and resume it.
    config.run = RunConfig(sample_every=1, grid_samples=2, sample_steps=3, log_every=2, checkpoint_minutes=0)
    return config


PRESETS: dict[str, Callable[[], Config]] = {"demo": _demo, "adni": _adni, "tiny": _tiny}


def make_config(preset: str) -> Config:
    """A fresh Config of one of PRESETS."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]()


def pick_preset(requested: str | None) -> tuple[str, str]:
    """The preset of a new run and why, in one line: the one asked for; else, as users of the original run
    `python train.py` on a GPU workstation, `adni` when the ADNI folder exists, and `demo` when it does not."""
    if requested:
        return requested, f"preset {requested} (--preset)"
    if Path(DEFAULT_DATA_DIR).is_dir():
        return "adni", f"no --preset: training the adni preset (192 px, for a GPU) because {DEFAULT_DATA_DIR} exists"
    return "demo", (
        f"no --preset: training the demo preset (64 px, CPU minutes) on {DEMO_DATA_DIR}, because {DEFAULT_DATA_DIR} "
        "does not exist (python project_setup.py unpacks data/ADNI.zip there)"
    )


def resolve_schedule(config: Config, train_size: int) -> list[str]:
    """Turn each stage's schedule in training images (`images`, when set) into whole epochs over a
    training set of `train_size` images, so one setting means as much training on 2,000 images as on
    20,000; returns one line per stage so resolved, for the log."""
    resolved = []
    for name in ("vae_train", "unet_train"):
        stage = getattr(config, name)
        if stage.images is not None:
            stage.epochs = max(1, math.ceil(stage.images / max(1, train_size)))
            resolved.append(f"{name}: {stage.images} images = {stage.epochs} epochs of {train_size}")
    return resolved


def check_batches(config: Config, train_size: int, stages: tuple[str, ...], world_size: int = 1) -> None:
    """A UsageError for a stage whose batch (per process, times `world_size`) is larger than the
    `train_size` training images: every epoch drops its last incomplete batch, so it would train
    zero steps and still report done."""
    for name in stages:
        batch_size = getattr(config, f"{name}_train").batch_size
        if batch_size * world_size > train_size:
            processes = f" x {world_size} processes" if world_size > 1 else ""
            raise UsageError(
                f"--{name}_train.batch_size {batch_size}{processes} is larger than the training split ({train_size} "
                f"images): an epoch would train zero steps; lower --batch-size to at most {train_size // world_size} "
                "or add training images"
            )


def latent_shape(config: Config) -> tuple[int, int, int]:
    """(C_z, h, w) of the latents the UNet works on."""
    side = config.data.image_size // config.vae.downsample_factor
    return config.vae.latent_channels, side, side


# ============================================================================ text and JSON values


def field_types(section: object) -> dict[str, object]:
    return typing.get_type_hints(type(section))


def parse_value(text: str, hint: object) -> object:
    """Parse a command-line string into the type a config field is annotated with."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if args and type(None) in args:  # X | None
        if text.lower() in ("none", "null", ""):
            return None
        return parse_value(text, next(a for a in args if a is not type(None)))
    if origin is tuple:
        return tuple(parse_value(part.strip(), args[0]) for part in text.split(",") if part.strip())
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return hint(text)


def _from_json_value(value: object, hint: object) -> object:
    """A stored JSON value as the type a field is annotated with; ValueError naming what it should be
    when its JSON type is wrong (a string where widths belong, 64.5 where a count belongs)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if args and type(None) in args:  # X | None
        return None if value is None else _from_json_value(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        if not isinstance(value, list | tuple):  # a list in JSON, a tuple in a checkpoint
            raise ValueError(f"{json.dumps(value)} is not a list such as {_EXAMPLES[args[0]]}")
        return tuple(_from_json_value(item, args[0]) for item in value)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int and is_number and float(value).is_integer():
        return int(value)
    if (hint is float and is_number) or (hint in (bool, str) and isinstance(value, hint)):
        return hint(value)
    raise ValueError(f"{json.dumps(value)} is not {_type_name(hint)}")


def _type_name(hint: object) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


_EXAMPLES = {int: "[64, 128]", float: "[0.9, 0.999]", bool: "[false, true]"}

# Fields older versions wrote whose stored value the fields that replaced them take: run.bf16 became each stage's.
MOVED_FIELDS = {("run", "bf16"): (("vae_train", "bf16"), ("unet_train", "bf16"))}
# Fields older versions wrote that now live elsewhere: ignored when a stored config is read back (after a move).
# unet.latent_channels is vae.latent_channels (one definition of the latent space).
RETIRED_FIELDS = {("unet", "latent_channels"), *MOVED_FIELDS}
# Values older versions wrote for a field that now takes others: run.compile was true/false.
RETIRED_VALUES = {("run", "compile"): {False: "none", True: "full"}}
# Fields added later, with the value that a stored config without them meant, whatever the preset says now:
# an old run keeps its one label token (its weights have that shape), resumes with the betas it began with
# and samples as it did (DDIM, at its stored run.sample_steps).
ADDED_FIELDS = {
    ("unet", "label_tokens"): 1,
    ("unet", "label_in_resblocks"): False,
    ("vae", "fourier_weight"): 0.0,
    ("vae_train", "betas"): (0.9, 0.999),
    ("unet_train", "betas"): (0.9, 0.999),
    ("run", "tensorboard"): False,
    ("run", "sampler"): "ddim",
    ("vae_train", "bf16"): True,
    ("unet_train", "bf16"): True,
}


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from config.json or a checkpoint, through the same field checks as the command
    line (check_fields): a stored value is trusted no more than a typed one. Unknown fields mean
    another version; a value of the wrong JSON type or out of range is a UsageError naming the field."""
    config = make_config(str(data.get("preset", "adni")))
    for (section_name, name), value in ADDED_FIELDS.items():
        if isinstance(data.get(section_name), dict) and name not in data[section_name]:
            setattr(getattr(config, section_name), name, value)
    for (old_section, old_name), moved_to in MOVED_FIELDS.items():
        if isinstance(data.get(old_section), dict) and old_name in data[old_section]:
            data = copy.deepcopy(data)
            for section_name, name in moved_to:
                if isinstance(data.get(section_name), dict):
                    data[section_name].setdefault(name, data[old_section][old_name])
    for section_name, values in data.items():
        if section_name == "preset":
            continue
        section = getattr(config, section_name, None)
        if not dataclasses.is_dataclass(section) or not isinstance(values, dict):
            raise UsageError(f"config section {section_name!r} is unknown to this version of brainLDM")
        hints = field_types(section)
        for name, value in values.items():
            if (section_name, name) in RETIRED_FIELDS:
                continue
            if name not in hints:
                raise UsageError(f"config field {section_name}.{name} is unknown to this version of brainLDM")
            retired = RETIRED_VALUES.get((section_name, name), {})
            value = retired.get(value, value) if isinstance(value, bool) else value
            try:
                setattr(section, name, _from_json_value(value, hints[name]))
            except (ValueError, OverflowError) as error:
                raise UsageError(f"config field {section_name}.{name}: {error}") from None
    try:
        check_fields(config)
    except UsageError as error:
        raise UsageError(f"stored config field {str(error).removeprefix('--')}") from None
    return config


def read_config(run_dir: Path) -> Config:
    """A run's config.json, every field checked (config_from_dict)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no config.json: it is not a brainLDM run folder")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        return config_from_dict(data)
    except UsageError as error:
        raise UsageError(f"{path}: {error}: correct the value there, or start a new --run") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as error:
        raise UsageError(
            f"{path} is not a valid brainLDM config ({error}): use the run's own config.json or a new --run"
        ) from None


def config_differences(old: Config, new: Config) -> list[str]:
    """Fields that define the model (or its data) and differ between two configs."""
    changed = []
    for section_name in MODEL_SECTIONS:
        old_values = dataclasses.asdict(getattr(old, section_name))
        new_values = dataclasses.asdict(getattr(new, section_name))
        changed += [
            f"{section_name}.{k}: {old_values[k]} → {new_values.get(k)}" for k in old_values if old_values[k] != new_values.get(k)
        ]
    for name in MODEL_DATA_FIELDS:
        if getattr(old.data, name) != getattr(new.data, name):
            changed.append(f"data.{name}: {getattr(old.data, name)} → {getattr(new.data, name)}")
    return changed


# ============================================================================ the command line


def override_keys() -> list[str]:
    """Every `section.field` that `--section.field VALUE` can set."""
    template = Config()
    return [
        f"{section_name}.{name}"
        for section_name, section in vars(template).items()
        if dataclasses.is_dataclass(section)
        for name in field_types(section)
    ]


def collect_overrides(tokens: list[str]) -> dict[str, str]:
    """`--section.field value` / `--section.field=value` pairs → {"section.field": "value"};
    a ValueError names the first token that is not one."""
    known = set(override_keys())
    overrides: dict[str, str] = {}
    position = 0
    while position < len(tokens):
        token = tokens[position]
        key, _, inline_value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if key not in known:
            raise ValueError(f"unknown option {token}; see --help for the config fields")
        if inline_value:
            value = inline_value
        elif position + 1 < len(tokens):
            position += 1
            value = tokens[position]
        else:
            raise ValueError(f"{token} needs a value")
        overrides[key] = value
        position += 1
    return overrides


def apply_overrides(config: Config, overrides: dict[str, str]) -> None:
    for key, text in overrides.items():
        section_name, name = key.split(".", 1)
        section = getattr(config, section_name)
        try:
            setattr(section, name, parse_value(text, field_types(section)[name]))
        except (ValueError, TypeError) as error:
            raise UsageError(f"--{key} {text}: {error}") from None


def requested_config(preset: str | None, overrides: dict[str, str], run_dir: Path) -> tuple[Config, Config | None]:
    """The config asked for (the run's config.json with the command line's values, or for a new run
    the preset's: `preset`, else pick_preset's choice) and the stored one (None for a new run); every
    stored field checked, nothing else yet."""
    stored = read_config(run_dir) if (run_dir / "config.json").is_file() else None
    config = copy.deepcopy(stored) if stored is not None else make_config(pick_preset(preset)[0])
    apply_overrides(config, overrides)
    return config, stored


# ============================================================================ validation


# The range checks, one generator per concern, each yielding (field, whether it holds, what the field must
# be) in the order check_fields reports them; lazily, so a rule can rely on the rules before it.
Rule = tuple[str, bool, str]
GUIDANCE_RULE = f"must be a number from 0 to {MAX_GUIDANCE:g} (1 = no guidance; higher scales give no usable images)"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _data_rules(data: DataConfig, vae: VAEConfig) -> Iterator[Rule]:
    yield "data.data_dir", bool(data.data_dir), "must name the dataset folder"
    yield (
        "data.image_size",
        data.image_size >= 8 and data.image_size % vae.downsample_factor == 0,
        f"must be a positive multiple of the VAE's downsampling factor {vae.downsample_factor}",
    )
    yield "data.val_fraction", _finite(data.val_fraction) and 0 < data.val_fraction < 1, "must lie in (0, 1)"
    yield "data.split_seed", data.split_seed >= 0, "must be 0 or more"


def _model_rules(vae: VAEConfig, unet: UNetConfig, scheduler: SchedulerConfig) -> Iterator[Rule]:
    yield "vae.adversarial_start", vae.adversarial_start >= 0, "must be 0 or more (VAE steps)"
    for key, widths in (("vae.channels", vae.channels), ("unet.channels", unet.channels)):
        yield key, len(widths) >= 1 and all(w >= 4 for w in widths), "must be widths of at least 4, e.g. 32,64,128"
    for section, name in (
        *(("vae", name) for name in ("in_channels", "latent_channels", "num_res_blocks")),
        *(("unet", name) for name in ("num_res_blocks", "head_dim", "context_dim", "label_tokens", "patch_size")),
        ("vae", "discriminator_channels"),
    ):
        yield f"{section}.{name}", getattr(vae if section == "vae" else unet, name) >= 1, "must be at least 1"
    yield "vae.recon_loss", vae.recon_loss in ("l1", "mse"), "must be l1 or mse"
    for section, name in (
        *(("vae", name) for name in ("kl_weight", "ssim_weight", "fourier_weight", "adversarial_weight")),
        *(("scheduler", name) for name in ("min_snr_gamma", "clip_sample")),
    ):
        value = getattr(vae if section == "vae" else scheduler, name)
        yield f"{section}.{name}", _finite(value) and value >= 0, "must be a finite number, 0 or more"
    # Attention splits a width into max(1, width // head_dim) heads of equal size.
    yield (
        "unet.head_dim",
        unet.head_dim >= 1 and all(w % max(1, w // unet.head_dim) == 0 for w in unet.channels),
        f"must split every unet.channels width ({','.join(map(str, unet.channels))}) into equal heads, e.g. 32",
    )
    yield (
        "unet.attention_levels",
        len(unet.attention_levels) == len(unet.channels),
        f"needs one true/false per unet.channels level ({len(unet.channels)})",
    )
    yield "unet.num_classes", unet.num_classes == len(CLASS_NAMES), f"must be {len(CLASS_NAMES)} (AD, NC)"
    yield "unet.dropout", _finite(unet.dropout) and 0 <= unet.dropout < 1, "must lie in [0, 1)"


def _scheduler_rules(scheduler: SchedulerConfig) -> Iterator[Rule]:
    yield "scheduler.num_train_timesteps", 1 <= scheduler.num_train_timesteps <= 100_000, "must be 1 to 100000"
    yield (
        "scheduler.beta_schedule",
        scheduler.beta_schedule in ("linear", "scaled_linear", "cosine"),
        "must be linear, scaled_linear or cosine",
    )
    yield (
        "scheduler.beta_start",
        _finite(scheduler.beta_start) and _finite(scheduler.beta_end) and 0 < scheduler.beta_start < scheduler.beta_end < 1,
        f"must be above 0 and below scheduler.beta_end ({scheduler.beta_end}), which must be below 1",
    )
    yield "scheduler.prediction_type", scheduler.prediction_type in ("v", "epsilon"), "must be v or epsilon"


def _stage_rules(name: str, stage: StageConfig) -> Iterator[Rule]:
    yield f"{name}.epochs", stage.epochs >= 1, "must be at least 1"
    yield f"{name}.images", stage.images is None or stage.images >= 1, "must be at least 1, or none to count in epochs"
    yield f"{name}.batch_size", stage.batch_size >= 1, "must be at least 1"
    yield f"{name}.lr", _finite(stage.lr) and stage.lr > 0, "must be a finite number above 0"
    yield (
        f"{name}.betas",
        len(stage.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in stage.betas),
        "must be two numbers in [0, 1), e.g. 0.9,0.999",
    )
    yield f"{name}.weight_decay", _finite(stage.weight_decay) and stage.weight_decay >= 0, "must be 0 or more"
    yield f"{name}.warmup_steps", stage.warmup_steps >= 0, "must be 0 or more"
    yield f"{name}.min_lr_ratio", _finite(stage.min_lr_ratio) and 0 <= stage.min_lr_ratio <= 1, "must lie in [0, 1]"
    yield f"{name}.grad_clip", _finite(stage.grad_clip) and stage.grad_clip > 0, "must be a finite number above 0"
    if isinstance(stage, UNetTrainConfig):
        for field_name in ("label_dropout", "ema_decay"):
            value = getattr(stage, field_name)
            yield f"{name}.{field_name}", _finite(value) and 0 <= value < 1, "must lie in [0, 1)"


def _run_rules(run: RunConfig, scheduler: SchedulerConfig) -> Iterator[Rule]:
    yield "run.seed", 0 <= run.seed < 2**63, "must be 0 or more"
    yield "run.compile", run.compile in COMPILE_MODES, f"must be one of {', '.join(COMPILE_MODES)}"
    for name in ("log_every", "sample_every", "validate_every", "grid_samples"):
        yield f"run.{name}", getattr(run, name) >= 1, "must be at least 1"
    yield "run.keep_every", run.keep_every >= 0, "must be 0 (no snapshots) or more (UNet epochs between snapshots)"
    yield (
        "run.checkpoint_minutes",
        _finite(run.checkpoint_minutes) and run.checkpoint_minutes >= 0,
        "must be a finite number of minutes, 0 or more (0 = every epoch)",
    )
    yield (
        "run.sample_steps",
        1 <= run.sample_steps <= scheduler.num_train_timesteps,
        f"must be 1 to scheduler.num_train_timesteps ({scheduler.num_train_timesteps})",
    )
    yield "run.guidance_scale", _finite(run.guidance_scale) and 0 <= run.guidance_scale <= MAX_GUIDANCE, GUIDANCE_RULE


def _problems(config: Config) -> Iterator[str]:
    """Each field outside its range, as '--section.field VALUE: what it must be'."""
    rules = itertools.chain(
        _data_rules(config.data, config.vae),
        _model_rules(config.vae, config.unet, config.scheduler),
        _scheduler_rules(config.scheduler),
        _stage_rules("vae_train", config.vae_train),
        _stage_rules("unet_train", config.unet_train),
        _run_rules(config.run, config.scheduler),
    )
    for key, holds, rule in rules:
        if not holds:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            shown = ",".join(str(v).lower() for v in value) if isinstance(value, tuple) else value
            yield f"--{key} {shown}: {rule}"


def check_fields(config: Config) -> None:
    """Raise a UsageError naming the first field out of range and what it must be."""
    for problem in _problems(config):
        raise UsageError(problem)
