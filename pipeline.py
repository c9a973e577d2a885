"""A run as objects: its folder's checks, checkpoints in and out, the frozen models, encode/decode with
the latent scale factor, the validation figures train.py takes of them, and the one seeded generation
loop that predict.py, evaluate.py and train.py share.

    pipe = load_run(Path("runs/demo"), Runtime(torch.device("cpu")))
    latents = pipe.generate(label=0, count=16, seed=0)     # AD
    images = pipe.decode(latents)                          # (16, 1, 64, 64) in [-1, 1]
"""

from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from config import (
    CLASS_NAMES,
    GUIDANCE_RULE,
    MAX_GUIDANCE,
    Config,
    check_fields,
    config_differences,
    config_from_dict,
    config_to_dict,
    latent_shape,
    read_config,
)
from dataset import SliceDataset, make_loader
from metrics import BAND_LABELS, SPECTRAL_BANDS, band_energy, energy_ratio, psnr
from modules import EMA, SAMPLERS, AutoencoderKL, Conditions, NoiseScheduler, UNet, ms_ssim, split_qkv, ssim, vae_loss
from utils import Runtime, UsageError, check_output_paths, load_checkpoint, lock_path, pick_device, save_image_grid

CHECKPOINT_FORMAT = 1
_COMMON_KEYS = ("config", "model", "optimizer", "lr_schedule", "epoch", "step", "history")
STAGE_KEYS = {"vae": _COMMON_KEYS, "unet": (*_COMMON_KEYS, "ema", "slice_range")}  # what each stage's checkpoint holds
STORED_TYPES = {key: dict for key in ("config", "model", "optimizer", "lr_schedule", "ema")} | {
    "epoch": int,
    "step": int,
    "history": list,
    "slice_range": tuple,
}
DEFAULT_SLICE_POSITION = 0.5  # mid-range of the training slices, for slice-conditioned runs sampled without --slice


# ============================================================================ checkpoints


def checkpoint_state(
    stage: str, config: Config, model: nn.Module, optimizer, lr_schedule, epoch: int, step: int, history: list[dict], **extra
) -> dict:
    """What vae.pt / unet.pt hold: state dicts, the config, progress and history, never a pickled module."""
    return {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "config": config_to_dict(config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "epoch": epoch,
        "step": step,
        "history": history,
        **extra,
    }


def load_stage_checkpoint(path: Path, stage: str, config: Config, device: torch.device) -> dict:
    """Load `path` and check it belongs to this stage, format and model config."""
    state = load_checkpoint(path, map_location=device)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("stage") != stage:
        raise UsageError(f"{path} is not a {stage} checkpoint of this brainLDM version: start a new --run")
    missing = [key for key in STAGE_KEYS[stage] if key not in state]
    if missing:
        raise UsageError(f"{path} is damaged (no {', '.join(missing)}): resume from a copy or start a new --run")
    wrong = [key for key in STAGE_KEYS[stage] if not _holds(state[key], STORED_TYPES[key])]
    if wrong:
        raise UsageError(
            f"{path} is damaged ({wrong[0]} holds a {type(state[wrong[0]]).__name__}): resume from a copy or start a new --run"
        )
    try:
        stored = config_from_dict(state["config"])
    except UsageError as error:
        raise UsageError(f"{path} holds a damaged config ({error}): resume from a copy or start a new --run") from None
    changed = config_differences(stored, config)
    if changed:
        raise UsageError(
            f"{path} was trained with another config ({'; '.join(changed[:3])}): use the run's own config.json or a new --run"
        )
    return state


def restore_stage(
    path: Path,
    stage: str,
    resume: bool,
    config: Config,
    runtime: Runtime,
    model: nn.Module,
    optimizer: Optimizer,
    lr_schedule: LambdaLR,
) -> tuple[int, int, list[dict], dict]:
    """With --resume and a checkpoint at `path`: load model, optimizer and LR schedule, and return
    (epochs done, steps done, history, the checkpoint); otherwise a fresh start (0, 0, [], {})."""
    if not (resume and path.is_file()):
        return 0, 0, [], {}
    state = load_stage_checkpoint(path, stage, config, runtime.device)
    load_weights(model, state["model"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError:  # the weights load (modules.join_qkv), the optimizer's per-parameter state cannot
        raise UsageError(
            f"{path} was written by an older brainLDM with separate q/k/v projections: its weights still load "
            "for sampling, but its training cannot resume; train it again in a new --run"
        ) from None
    lr_schedule.load_state_dict(state["lr_schedule"])
    return state["epoch"], state["step"], state["history"], state


def _holds(value: object, kind: type) -> bool:
    """Whether a checkpoint's `value` is of the stored `kind`: an int that is not a bool, a pair of ints
    for the slice range (a list or tuple), or an instance."""
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, list | tuple) and len(value) == 2 and all(_holds(item, int) for item in value)
    return isinstance(value, kind)


def load_weights(model: nn.Module, weights: dict, path: Path) -> None:
    """load_state_dict, with a one-line error instead of a wall of shape mismatches."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise UsageError(
            f"{path} does not fit this model ({first[1].strip() if len(first) > 1 else first[0]}): start a new --run"
        ) from None


def load_trained_vae(config: Config, run_dir: Path, device: torch.device) -> AutoencoderKL:
    """The finished stage-1 VAE of a run, frozen."""
    path = run_dir / "vae.pt"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no vae.pt: train stage 1 first (python train.py --run {run_dir} --stage vae)")
    state = load_stage_checkpoint(path, "vae", config, device)
    if state["epoch"] < config.vae_train.epochs:
        raise UsageError(
            f"the VAE in {path} stopped at epoch {state['epoch']} of {config.vae_train.epochs}: "
            f"finish it with python train.py --run {run_dir} --stage vae --resume"
        )
    vae = AutoencoderKL(config.vae).to(device)
    load_weights(vae, state["model"], path)
    vae.eval().requires_grad_(False)
    return vae


def fingerprint(model: nn.Module) -> str:
    """sha256 of a model's weights (state dict in key order): which VAE a UNet was trained on.

    Hashed in the layout before self-attention fused its q/k/v projections (`split_qkv`), so the
    fingerprints that UNet checkpoints recorded then still match their VAE."""
    digest = hashlib.sha256()
    for name, tensor in split_qkv(model.state_dict()).items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_trained_on(state: dict, vae_fingerprint: str, path: Path) -> None:
    """A UNet checkpoint must come from the VAE beside it (`fingerprint(vae)`): its latents mean nothing
    to another one. Checkpoints written before fingerprints existed carry none and are taken on trust."""
    recorded = state.get("vae_fingerprint")
    if recorded is not None and recorded != vae_fingerprint:
        raise UsageError(
            f"{path} was trained on another VAE than the vae.pt beside it (was a stage retrained by "
            "another process?): train stage 2 again with --stage unet in a new --run"
        )


def build_unet(config: Config) -> UNet:
    """The UNet of a config, on the VAE's latent channels."""
    return UNet(config.unet, config.vae.latent_channels)


def dataset_folders(config: Config) -> list[str]:
    """The folders a run reads its images from, which nothing may write into (utils.check_output_paths)."""
    return [config.data.data_dir]


# What train.py writes in a run folder, beside the sample grids in samples/.
RUN_FILES = (
    "config.json",
    "splits.json",
    "vae.pt",
    "unet.pt",
    "history.jsonl",
    "vae_loss.png",
    "diffusion_loss.png",
    "vae_reconstructions.png",
)


SNAPSHOTS = "snapshots"  # the folder of a run's kept UNet epochs (run.keep_every)


def snapshot_path(run_dir: Path, stage: str, epoch: int) -> Path:
    """Where the checkpoint of `stage` after `epoch` (1-based) is kept: snapshots/unet_epoch012.pt."""
    return run_dir / SNAPSHOTS / f"{stage}_epoch{epoch:03d}.pt"


def snapshots(run_dir: Path) -> list[Path]:
    """The run's kept UNet checkpoints, oldest epoch first."""
    return sorted((run_dir / SNAPSHOTS).glob("unet_epoch[0-9][0-9][0-9].pt"))


def check_run_outputs(config: Config, run_dir: Path) -> None:
    """The run folder, its lock file, its files and the decode cache: none inside the dataset (resolved
    through symlinks), each a folder or a file as it is meant to be, before the lock file is written."""
    check_output_paths(
        dataset_folders(config),
        folders={
            "--run": run_dir,
            "--run's samples folder": run_dir / "samples",
            "--run's snapshots folder": run_dir / SNAPSHOTS,
            "--data.cache_dir": config.data.cache_dir,
        },
        files={"the run's lock file": lock_path(run_dir), **{f"the run's {name}": run_dir / name for name in RUN_FILES}},
    )


def check_vae_is_final(config: Config, run_dir: Path, stage: str) -> None:
    """A run whose UNet is trained on its VAE cannot train that VAE further (epochs as resolved)."""
    if stage in ("vae", "all") and (run_dir / "unet.pt").is_file():
        vae_epochs = load_checkpoint(run_dir / "vae.pt")["epoch"] if (run_dir / "vae.pt").is_file() else 0
        if vae_epochs < config.vae_train.epochs:
            raise UsageError(
                f"{run_dir} already has a UNet trained on its VAE; training the VAE further would "
                "invalidate it: choose a new --run"
            )


def validate(config: Config) -> None:
    """Every field in range (config.check_fields), then both models built and run once on the meta
    device (no memory, no compute), so a config whose parts do not fit together fails in a second
    with one line, before a run folder is written or an hour of VAE training is spent."""
    check_fields(config)
    if config.run.sampler not in SAMPLERS:  # checked here, where the samplers are known
        raise UsageError(f"--run.sampler {config.run.sampler!r}: must be one of {', '.join(SAMPLERS)}")
    side = config.data.image_size
    try:
        with torch.device("meta"):
            vae = AutoencoderKL(config.vae)
            images = torch.zeros(1, config.vae.in_channels, side, side)
            reconstruction = vae(images, sample_posterior=False)[0]
            latents = torch.zeros(1, *latent_shape(config))
            labels = torch.zeros(1, dtype=torch.long)
            conditions = Conditions(labels, torch.zeros(1) if config.unet.slice_conditioning else None)
            prediction = build_unet(config)(latents, labels, conditions)
    except (RuntimeError, ValueError) as error:
        raise UsageError(
            f"the model config does not fit together ({str(error).splitlines()[0][:160]}): "
            "check --vae.* and --unet.* against --data.image_size"
        ) from None
    if reconstruction.shape != images.shape or prediction.shape != latents.shape:
        raise UsageError(
            f"--data.image_size {side} does not survive the VAE's {config.vae.downsample_factor}x "
            "downsampling and the UNet's levels: choose a multiple of "
            f"{config.vae.downsample_factor * config.unet.patch_size * 2 ** (len(config.unet.channels) - 1)}"
        )


def normalise_slices(slice_indices: torch.Tensor, slice_range: tuple[int, int]) -> torch.Tensor:
    """Slice index → [0, 1] over the training set's range (the slice-position condition)."""
    low, high = slice_range
    return ((slice_indices.float() - low) / max(1, high - low)).clamp(0, 1)


class LatentDataset(torch.utils.data.Dataset):
    """Encoder posteriors of a split with their conditions, kept on the device: a fresh latent is
    drawn every step (z = μ + σ·ε), as on-the-fly encoding would, without running the encoder again.
    Indexed by a list of positions, it returns a whole batch (mean, logvar, Conditions)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, conditions: Conditions):
        self.mean, self.logvar, self.conditions = mean, logvar, conditions

    def __len__(self) -> int:
        return len(self.conditions)

    def __getitem__(self, index) -> tuple[torch.Tensor, torch.Tensor, Conditions]:
        # A Python list would index the device tensors through a blocking copy, a wait for the GPU
        # every step; one non-blocking copy of the positions does not wait.
        positions = torch.as_tensor(index).to(self.mean.device, non_blocking=True)
        return self.mean[positions], self.logvar[positions], self.conditions[positions]


def encode_split(
    vae: AutoencoderKL, images: SliceDataset, config: Config, runtime: Runtime, slice_range: tuple[int, int]
) -> LatentDataset:
    """A split's encoder posteriors and conditions, computed once before the UNet trains on them."""
    vae.eval()
    means, logvars = [], []
    with torch.no_grad(), runtime.autocast():
        for chunk in torch.arange(len(images)).split(config.unet_train.batch_size * 4):
            mean, logvar = vae.encode(images[chunk.tolist()][0].to(runtime.device))
            means.append(mean.float())
            logvars.append(logvar.float())
    slice_position = None
    if config.unet.slice_conditioning:
        slice_position = normalise_slices(images.slice_indices, slice_range).to(runtime.device)
    return LatentDataset(torch.cat(means), torch.cat(logvars), Conditions(images.labels.to(runtime.device), slice_position))


def set_latent_scale(
    vae: AutoencoderKL, train_set: SliceDataset, batch_size: int, runtime: Runtime, max_images: int = 4096
) -> None:
    """Scale latents to unit variance (Rombach et al. 2022), from up to `max_images` training images."""
    vae.eval()
    count = min(len(train_set), max_images)
    positions = torch.linspace(0, len(train_set) - 1, count).long()
    latents = []
    with torch.no_grad():
        for chunk in positions.split(batch_size):
            mean, logvar = vae.encode(train_set[chunk.tolist()][0].to(runtime.device))
            latents.append(AutoencoderKL.sample_latent(mean, logvar).float())
    vae.set_scale_factor(torch.cat(latents))


# ============================================================================ validation while training


def vae_validation_scores(vae: AutoencoderKL, loader, config: Config, runtime: Runtime) -> dict:
    """Validation figures of the reconstructions (posterior mean, no sampling noise): loss, MS-SSIM,
    SSIM, PSNR and the spectral energy kept per band (metrics.SPECTRAL_BANDS), whose top band sees
    the fine blur that MS-SSIM at 64 px cannot."""
    vae.eval()
    bands = len(SPECTRAL_BANDS)
    # loss, MS-SSIM, SSIM and PSNR sums, image count, then the band energies of reconstructions and slices
    totals = torch.zeros(5 + 2 * bands, dtype=torch.float64, device=runtime.device)
    with torch.no_grad(), runtime.autocast():
        for images, *_ in loader:
            images = images.to(runtime.device, non_blocking=True)
            recon, mean, logvar = vae(images, sample_posterior=False)
            loss, _ = vae_loss(images, recon, mean, logvar, config.vae)
            recon = recon.float().clamp(-1, 1)
            scores = [
                loss.double() * len(images),
                ms_ssim(recon, images).sum(),
                ssim(recon, images).sum(),
                psnr(recon, images).sum(),
            ]
            totals[:4] += torch.stack([score.double() for score in scores])
            totals[4] += len(images)
            totals[5:] += torch.cat([band_energy(recon), band_energy(images)])
    totals = runtime.mean_across_ranks(totals)
    count = float(totals[4])
    return {
        "val_loss": float(totals[0]) / count,
        "val_ms_ssim": float(totals[1]) / count,
        "val_ssim": float(totals[2]) / count,
        "val_psnr": float(totals[3]) / count,
        "val_spectral_energy": energy_ratio(totals[5 : 5 + bands], count, totals[5 + bands :], count),
    }


def describe_reconstructions(entry: dict) -> list[str]:
    """The validation figures of a VAE epoch as caption lines for vae_reconstructions.png and the log."""
    kept = "  ".join(f"{BAND_LABELS[band]} {value:.2f}" for band, value in entry["val_spectral_energy"].items())
    return [
        f"MS-SSIM {entry['val_ms_ssim']:.4f}  SSIM {entry['val_ssim']:.3f}  PSNR {entry['val_psnr']:.1f} dB",
        f"spectral energy kept (cycles/px): {kept}",
    ]


def unet_validation_loss(
    unet: nn.Module, scheduler: NoiseScheduler, latents: LatentDataset, scale: float, config: Config, runtime: Runtime
) -> float:
    """Validation loss with a fixed draw of latents, timesteps and noise, so epochs compare fairly."""
    unet.eval()
    generator = torch.Generator(runtime.device).manual_seed(1234 + runtime.rank)
    loader = make_loader(latents, config.unet_train.batch_size, shuffle=False, rank=runtime.rank, world_size=runtime.world_size)
    totals = torch.zeros(2, device=runtime.device)
    with torch.no_grad(), runtime.autocast():
        for mean, logvar, conditions in loader:
            z = AutoencoderKL.sample_latent(mean, logvar, generator=generator) * scale
            totals[0] += scheduler.training_loss(unet, z, conditions, generator=generator).float() * len(conditions)
            totals[1] += len(conditions)
    totals = runtime.mean_across_ranks(totals)
    return float(totals[0] / totals[1])


def save_reconstructions(vae: AutoencoderKL, images: torch.Tensor, path: Path, runtime: Runtime, caption: list[str]) -> None:
    """Top row: validation slices; bottom row: their reconstructions (posterior mean); the caption beneath."""
    vae.eval()
    with torch.no_grad():
        recon = vae(images.to(runtime.device), sample_posterior=False)[0].float().clamp(-1, 1).cpu()
    save_image_grid(torch.cat([images, recon]), path, ncols=len(images), caption=caption)


def save_sample_grids(pipe: Pipeline, folder: Path, tag: str) -> list[tuple[str, Path]]:
    """`<folder>/<tag>_AD.png` and `_NC.png`: a fixed seed, so grids from different epochs compare; (class, path) of each."""
    run = pipe.config.run
    for label, class_name in enumerate(CLASS_NAMES):
        generator = torch.Generator(pipe.runtime.device).manual_seed(run.seed + label)
        conditions = pipe.conditions(torch.full((run.grid_samples,), label, dtype=torch.long))
        latents = pipe.sample(conditions, steps=run.sample_steps, guidance_scale=run.guidance_scale, generator=generator)
        save_image_grid(pipe.decode(latents).cpu(), folder / f"{tag}_{class_name}.png", ncols=8)
    return [(class_name, folder / f"{tag}_{class_name}.png") for class_name in CLASS_NAMES]


# ============================================================================ sampling options


MAX_SEED = 2**32 - 1  # batch seeds are seed * 1_000_003 + ..., which must stay inside torch's 64-bit seed
MAX_IMAGES = 1_000_000  # per label: a typo's extra zeros should not fill the disk for hours


def check_sampling_options(args: argparse.Namespace, num_train_timesteps: int | None = None) -> None:
    """The sampling options predict.py and evaluate.py share (--steps, --guidance, --seed,
    --num-samples, --batch-size), as one-line UsageErrors; --steps is checked against the run's T
    once the run is loaded (pass num_train_timesteps then)."""
    steps, guidance, seed, num_samples = args.steps, args.guidance, args.seed, args.num_samples
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if steps is not None and num_train_timesteps is not None and steps > num_train_timesteps:
        raise UsageError(f"--steps {steps}: the run has {num_train_timesteps} diffusion steps; use at most that many")
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise UsageError(f"--guidance {guidance}: {GUIDANCE_RULE}")
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be 0 to {MAX_SEED}, got {seed}")
    if num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {num_samples}")
    if num_samples > MAX_IMAGES:
        raise UsageError(f"--num-samples must be at most {MAX_IMAGES:,} per label, got {num_samples:,}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")


def load_run_for(args: argparse.Namespace) -> Pipeline:
    """The run a sampling script's options name (--run, else the newest), on --device, with its
    options checked against it and --guidance, --sampler and --steps defaulting to the run's own
    run.guidance_scale, run.sampler and run.sample_steps."""
    device = pick_device(args.device)
    pipe = load_run(args.run or latest_run(), Runtime(device, bf16=device.type == "cuda"))
    check_sampling_options(args, pipe.scheduler.num_train_timesteps)
    run = pipe.config.run
    args.guidance = run.guidance_scale if args.guidance is None else args.guidance
    args.sampler = args.sampler or run.sampler
    args.steps = args.steps or default_steps(args.sampler, pipe.config)
    return pipe


# Steps of a sampler other than the run's, when --steps is not given: DDIM's customary 50 (the default
# before DPM-Solver++); DDPM is itself only with every one of the run's diffusion steps.
OTHER_SAMPLER_STEPS = 50


def default_steps(sampler: str, config: Config) -> int:
    """--steps when not given: the run's run.sample_steps for the run's own sampler, all diffusion steps
    for DDPM, else OTHER_SAMPLER_STEPS."""
    if sampler == config.run.sampler:
        return config.run.sample_steps
    if sampler == "ddpm":
        return config.scheduler.num_train_timesteps
    return min(OTHER_SAMPLER_STEPS, config.scheduler.num_train_timesteps)


def sampling_options(args: argparse.Namespace) -> dict:
    """What Pipeline.generate takes from the shared command-line options."""
    return {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "sampler": args.sampler,
    }


def batch_generator(seed: int, label: int, batch_index: int, device: torch.device) -> torch.Generator:
    """Each batch has its own seed, so any image is regenerated from (seed, label, batch size) alone."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + label * 10_007 + batch_index)


# ============================================================================ a run's models


@dataclass
class Pipeline:
    """A frozen VAE and (EMA) UNet with their config and scheduler: latents in, images out.

    Latents are scaled (unit variance, Rombach et al. 2022): `encode` applies the VAE's scale factor
    and `decode` removes it, nowhere else. Without a VAE (None) it samples latents only."""

    config: Config
    vae: AutoencoderKL | None
    unet: nn.Module
    scheduler: NoiseScheduler
    runtime: Runtime
    slice_range: tuple[int, int] = (0, 1)
    run_dir: Path | None = None
    epoch: int = 0

    def conditions(self, labels: torch.Tensor, slice_position: float | torch.Tensor | None = None) -> Conditions:
        """Conditions for labels (B,); slice-conditioned UNets get `slice_position` in [0, 1]
        (default: mid-range), others none."""
        labels = labels.to(self.runtime.device)
        if not self.config.unet.slice_conditioning:
            return Conditions(labels)
        position = DEFAULT_SLICE_POSITION if slice_position is None else slice_position
        if isinstance(position, torch.Tensor):
            return Conditions(labels, position.to(self.runtime.device))
        return Conditions(labels, torch.full((len(labels),), float(position), device=self.runtime.device))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Images (N, 1, H, W) in [-1, 1] → scaled posterior-mean latents (N, C_z, h, w), as the UNet saw them."""
        self.vae.eval()
        latents = []
        for part in images.split(chunk):
            with self.runtime.autocast():
                mean, _ = self.vae.encode(part.to(self.runtime.device))
            latents.append(mean.float() * self.vae.scale_factor)
        return torch.cat(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C_z, h, w) → images (B, 1, H, W) in [-1, 1]."""
        self.vae.eval()
        with self.runtime.autocast():
            images = self.vae.decode(latents.to(self.runtime.device) / self.vae.scale_factor)
        return images.float().clamp(-1, 1)

    @torch.no_grad()
    def sample(
        self,
        conditions: Conditions,
        *,
        steps: int,
        guidance_scale: float,
        sampler: str | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        start: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """One batch: conditions (B) → scaled latents (B, C_z, h, w) by guided reverse diffusion with
        `sampler` (default: the run's run.sampler), from noise, or with `start` (B, C_z, h, w) from latents
        at noise level `strength` (the schedule's last steps only: NoiseScheduler.timesteps)."""
        self.unet.eval()
        with self.runtime.autocast():
            latents = self.scheduler.sample(
                self.unet,
                (len(conditions), *latent_shape(self.config)),
                conditions,
                sampler=sampler or self.config.run.sampler,
                num_steps=steps,
                eta=eta,
                guidance_scale=guidance_scale,
                generator=generator,
                device=self.runtime.device,
                x_T=start,
                strength=strength,
            )
        return latents.float()

    def generate(
        self,
        label: int,
        count: int,
        *,
        seed: int,
        batch_size: int = 64,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        eta: float = 0.0,
        slice_position: float | None = None,
        progress: str = "sampling",
    ) -> torch.Tensor:
        """`count` latents of one label (count, C_z, h, w), in batches seeded by `batch_generator`,
        so the same (seed, label, batch_size) gives the same images on any call. Steps, guidance and
        sampler default to the run's (run.sample_steps, run.guidance_scale, run.sampler)."""
        guidance_scale = self.config.run.guidance_scale if guidance_scale is None else guidance_scale
        steps = steps or self.config.run.sample_steps
        latents = []
        batches = range(0, count, batch_size)
        for batch_index, start in enumerate(tqdm(batches, desc=f"{progress} {CLASS_NAMES[label]}", leave=False)):
            labels = torch.full((min(batch_size, count - start),), label, dtype=torch.long)
            latents.append(
                self.sample(
                    self.conditions(labels, slice_position),
                    steps=steps,
                    guidance_scale=guidance_scale,
                    sampler=sampler,
                    eta=eta,
                    generator=batch_generator(seed, label, batch_index, self.runtime.device),
                )
            )
        return torch.cat(latents)


def latest_run(runs_root: Path = Path("runs")) -> Path:
    """The run folder whose unet.pt was written last."""
    candidates = sorted(runs_root.glob("*/unet.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UsageError(f"no trained run in {runs_root}/: train one with `python train.py --preset demo` or pass --run")
    return candidates[-1].parent


def load_run(run_dir: Path, runtime: Runtime, unet_checkpoint: Path | None = None) -> Pipeline:
    """A finished run's config, VAE and EMA UNet (from `unet_checkpoint`, e.g. one of its snapshots,
    instead of unet.pt when given); one-line errors for anything missing or foreign."""
    if not run_dir.is_dir():
        raise UsageError(f"run folder {run_dir} not found: pass --run runs/NAME")
    config = read_config(run_dir)
    validate(config)
    vae = load_trained_vae(config, run_dir, runtime.device)
    path = unet_checkpoint or run_dir / "unet.pt"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no unet.pt: train stage 2 with `python train.py --run {run_dir} --stage unet`")
    state = load_stage_checkpoint(path, "unet", config, runtime.device)
    check_trained_on(state, fingerprint(vae), path)
    unet = build_unet(config).to(runtime.device)
    load_weights(unet, state["model"], path)
    ema = EMA(unet)
    ema.load_state_dict(state["ema"])
    ema.copy_to(unet)
    unet.eval().requires_grad_(False)
    return Pipeline(
        config, vae, unet, NoiseScheduler(config.scheduler), runtime, tuple(state["slice_range"]), run_dir, state["epoch"]
    )
