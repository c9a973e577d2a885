"""Train the latent diffusion model: stage 1 the KL-VAE, stage 2 the label-conditioned UNet on its latents.

    python train.py --preset demo                       # both stages on the demo data (CPU, minutes)
    python train.py --preset adni --run runs/adni        # the full 192 px model on one GPU
    torchrun --nproc_per_node=4 train.py --preset adni   # several GPUs (or CPU processes with gloo)
    python train.py --run runs/adni --resume             # continue after a crash or a kill

Every config field can be set from the command line as `--section.field value` (see --help).
The run folder gets config.json, splits.json, vae.pt, unet.pt, history.jsonl, the loss curves,
reconstruction and AD/NC sample grids. Only rank 0 writes; every file is written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataset import (
    CLASS_NAMES,
    DataConfig,
    SliceDataset,
    load_split_datasets,
    load_splits,
    make_loader,
    save_splits,
    set_loader_epoch,
)
from modules import (
    EMA,
    AutoencoderKL,
    NoiseScheduler,
    SchedulerConfig,
    UNet,
    UNetConfig,
    VAEConfig,
    model_presets,
    ms_ssim,
    vae_loss,
)
from utils import (
    ArgumentParser,
    UsageError,
    load_checkpoint,
    pick_device,
    plot_curves,
    save_checkpoint,
    save_image_grid,
    usage_errors_exit,
    write_json_atomic,
    write_text_atomic,
)

CHECKPOINT_FORMAT = 1


# ============================================================================ configuration


@dataclass
class StageConfig:
    """Optimisation of one stage: AdamW with linear warm-up then cosine decay to `min_lr_ratio`."""

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class UNetTrainConfig(StageConfig):
    """Stage 2 adds what only the diffusion stage needs."""

    label_dropout: float = 0.1  # p(label → null label): teaches the unconditional model for guidance
    ema_decay: float = 0.9999
    cache_latents: bool = True  # encode the training set once instead of every step


@dataclass
class RunConfig:
    """How a run behaves, not what it learns: device, precision, logging and figures."""

    seed: int = 0
    device: str = "auto"
    bf16: bool = True  # autocast on CUDA; CPU always runs float32
    channels_last: bool = True  # CUDA only
    compile: bool = False
    log_every: int = 10  # steps between progress-bar updates (each one syncs with the device)
    sample_every: int = 5  # epochs between AD/NC sample grids
    grid_samples: int = 16  # per label
    sample_steps: int = 50  # DDIM steps for the grids
    guidance_scale: float = 3.0


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


# Sections that define what a checkpoint's weights mean; a run cannot change them later.
MODEL_SECTIONS = ("vae", "unet", "scheduler")
MODEL_DATA_FIELDS = ("image_size", "val_fraction", "split_seed")


def make_config(preset: str) -> Config:
    """The `demo` preset trains in minutes on 2 CPU cores at 64 px; `adni` is the 192 px GPU model."""
    vae, unet, scheduler = model_presets(preset)
    if preset == "demo":
        return Config(
            preset="demo",
            data=DataConfig(data_dir="data/demo/AD_NC", image_size=64),
            vae=vae,
            unet=unet,
            scheduler=scheduler,
            vae_train=StageConfig(epochs=4, batch_size=16, lr=1e-3, warmup_steps=100),
            unet_train=UNetTrainConfig(epochs=12, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999),
            run=RunConfig(sample_every=6, grid_samples=16, sample_steps=50),
        )
    return Config(
        preset="adni",
        data=DataConfig(image_size=192),
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        vae_train=StageConfig(epochs=100, batch_size=32, lr=2e-4, warmup_steps=500),
        unet_train=UNetTrainConfig(epochs=100, batch_size=64, lr=2e-4, warmup_steps=1000),
    )


PRESETS = ("demo", "adni")


def _field_types(section: object) -> dict[str, object]:
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
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if args and type(None) in args:
        return _from_json_value(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        return tuple(_from_json_value(v, args[0]) for v in value)
    return hint(value)


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from config.json; unknown or missing fields mean another version."""
    config = make_config(data.get("preset", "adni"))
    for section_name, values in data.items():
        if section_name == "preset":
            continue
        section = getattr(config, section_name, None)
        if not dataclasses.is_dataclass(section) or not isinstance(values, dict):
            raise UsageError(f"config section {section_name!r} is unknown to this version of brainLDM")
        hints = _field_types(section)
        for name, value in values.items():
            if name not in hints:
                raise UsageError(f"config field {section_name}.{name} is unknown to this version of brainLDM")
            setattr(section, name, _from_json_value(value, hints[name]))
    return config


def read_config(run_dir: Path) -> Config:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no config.json: it is not a brainLDM run folder")
    try:
        return config_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise UsageError(f"{path} is not a valid brainLDM config ({error})") from None


def apply_overrides(config: Config, overrides: dict[str, str]) -> None:
    for key, text in overrides.items():
        section_name, name = key.split(".", 1)
        section = getattr(config, section_name)
        try:
            setattr(section, name, parse_value(text, _field_types(section)[name]))
        except (ValueError, TypeError) as error:
            raise UsageError(f"--{key} {text}: {error}") from None


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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (override any as --section.field VALUE; tuples as 64,128,256):\n"
        + "\n".join(
            f"  --{section_name}.{name}"
            for section_name, section in vars(Config()).items()
            if dataclasses.is_dataclass(section)
            for name in _field_types(section)
        ),
    )
    parser.add_argument("--preset", choices=PRESETS, help="config preset for a new run (default: demo)")
    parser.add_argument("--data-dir", help="dataset root with {train,test}/{AD,NC}/ (sets data.data_dir)")
    parser.add_argument("--run", "--run-dir", dest="run",
                        help="run folder (default: runs/<preset>); under torchrun write --run-dir, as torchrun claims --run")
    parser.add_argument("--stage", choices=("vae", "unet", "all"), default="all")
    parser.add_argument("--epochs", type=int, help="epochs of the stage(s) being trained")
    parser.add_argument("--batch-size", type=int, help="per-process batch size of the stage(s) being trained")
    parser.add_argument("--lr", type=float, help="peak learning rate of the stage(s) being trained")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ... (sets run.device)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model being trained")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run from its checkpoints")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    """Known flags through argparse; `--section.field value` pairs collected as overrides."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "preset"}
    template = Config()
    overrides: dict[str, str] = {}
    position = 0
    while position < len(rest):
        token = rest[position]
        key, _, inline_value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        section_name, _, field_name = key.partition(".")
        if section_name not in sections or field_name not in _field_types(getattr(template, section_name)):
            parser.error(f"unknown option {token}; see --help for the config fields")
        if inline_value:
            value = inline_value
        elif position + 1 < len(rest):
            position += 1
            value = rest[position]
        else:
            parser.error(f"{token} needs a value")
        overrides[key] = value
        position += 1
    stages = ("vae_train", "unet_train") if args.stage == "all" else (f"{args.stage}_train",)
    for flag, name in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr")):
        if getattr(args, flag) is not None:
            for stage in stages:
                overrides[f"{stage}.{name}"] = str(getattr(args, flag))
    if args.data_dir is not None:
        overrides["data.data_dir"] = args.data_dir
    if args.device is not None:
        overrides["run.device"] = args.device
    if args.compile:
        overrides["run.compile"] = "true"
    return args, overrides


# ============================================================================ processes and devices


@dataclass
class Runtime:
    """Where this process runs and who it is among the torchrun processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    bf16: bool = False

    def __post_init__(self) -> None:
        # Every training batch has the same shape, so cuDNN's one-off search for the fastest kernels pays off.
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value


def start_runtime(config: RunConfig) -> Runtime:
    """Join torchrun's process group when launched by it (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        device = pick_device(config.device)
        return Runtime(device, bf16=config.bf16 and device.type == "cuda")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    use_cuda = config.device != "cpu" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(device, rank, world_size, bf16=config.bf16 and use_cuda)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed from (seed, epoch, rank): a run resumed at an epoch boundary draws the same noise as
    an uninterrupted one, with no RNG state to carry in the checkpoint, and ranks draw differently."""
    torch.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)


def prepare_for_training(model: nn.Module, config: Config, runtime: Runtime) -> nn.Module:
    """The module the training step calls: channels-last, DDP-wrapped and compiled as configured.

    Checkpoints always save the plain `model`, so they load anywhere."""
    if runtime.device.type == "cuda" and config.run.channels_last:
        model.to(memory_format=torch.channels_last)
    trained: nn.Module = model
    if runtime.world_size > 1:
        trained = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if config.run.compile:
        trained = torch.compile(trained)
    return trained


def make_optimizer(model: nn.Module, stage: StageConfig, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on norms and biases) with linear warm-up and cosine decay over all epochs."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=stage.lr,
        betas=(0.9, 0.999),
        # One kernel for all parameters: 4x (demo UNet) and 6.5x (adni UNet) faster than the default on a CPU.
        fused=next(model.parameters()).device.type in ("cpu", "cuda"),
    )
    total_steps = max(1, stage.epochs * steps_per_epoch)
    warmup = min(stage.warmup_steps, total_steps // 2)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


# ============================================================================ the shared epoch loop


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good state."""


def train_one_epoch(
    name: str,
    model: nn.Module,
    batches: typing.Iterable,
    num_batches: int,
    compute_loss: Callable[[object], tuple[torch.Tensor, int]],
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LambdaLR,
    stage: StageConfig,
    runtime: Runtime,
    log_every: int,
    after_step: Callable[[], None] = lambda: None,
) -> tuple[float, float]:
    """One pass over `batches`; returns the mean training loss across ranks and the images per
    second of all ranks together (a first compiled epoch includes its compilation).

    The running loss stays on the device and is read only every `log_every` steps, so the loop
    never waits for the GPU except when it logs; a non-finite loss is caught at that read.
    """
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)
    images_seen, started = 0, time.perf_counter()
    bar = tqdm(batches, total=num_batches, desc=name, disable=not runtime.is_main, leave=False, dynamic_ncols=True)
    for step_in_epoch, batch in enumerate(bar, start=1):
        with runtime.autocast():
            loss, batch_size = compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
        optimizer.step()
        lr_schedule.step()
        after_step()
        loss_sum += loss.detach().float()
        images_seen += batch_size * runtime.world_size
        if step_in_epoch % log_every == 0 or step_in_epoch == num_batches:
            mean_loss = loss_sum.item() / step_in_epoch
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(f"{name}: loss became {mean_loss} at step {step_in_epoch} of the epoch")
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_seen / (time.perf_counter() - started):.0f}")
    mean_loss = float(runtime.mean_across_ranks(loss_sum / max(1, num_batches)))  # waits for the device
    images_per_second = images_seen / (time.perf_counter() - started)
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(f"{name}: loss became {mean_loss}")
    return mean_loss, images_per_second


# ============================================================================ checkpoints and history


def checkpoint_state(stage: str, config: Config, model: nn.Module, optimizer, lr_schedule, epoch: int, step: int, history: list[dict], **extra) -> dict:
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
    changed = config_differences(config_from_dict(state["config"]), config)
    if changed:
        raise UsageError(
            f"{path} was trained with another config ({'; '.join(changed[:3])}): use the run's own config.json or a new --run"
        )
    return state


def restore_stage(path: Path, stage: str, resume: bool, config: Config, runtime: Runtime, model: nn.Module,
                  optimizer: torch.optim.Optimizer, lr_schedule: torch.optim.lr_scheduler.LambdaLR) -> tuple[int, int, list[dict], dict]:
    """With --resume and a checkpoint at `path`: load model, optimizer and LR schedule, and return
    (epochs done, steps done, history, the checkpoint); otherwise a fresh start (0, 0, [], {})."""
    if not (resume and path.is_file()):
        return 0, 0, [], {}
    state = load_stage_checkpoint(path, stage, config, runtime.device)
    load_weights(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    return state["epoch"], state["step"], state["history"], state


def load_weights(model: nn.Module, weights: dict, path: Path) -> None:
    """load_state_dict, with a one-line error instead of a wall of shape mismatches."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise UsageError(f"{path} does not fit this model ({first[1].strip() if len(first) > 1 else first[0]}): start a new --run") from None


def write_history(run_dir: Path, vae_history: list[dict], unet_history: list[dict]) -> None:
    """history.jsonl: one line per epoch of each stage, rewritten whole from the checkpoints."""
    lines = [json.dumps(entry) for entry in vae_history + unet_history]
    write_text_atomic(run_dir / "history.jsonl", "\n".join(lines) + "\n")


def plot_history(history: list[dict], path: Path, title: str) -> None:
    epochs = [entry["epoch"] for entry in history]
    plot_curves(
        {
            "train": (epochs, [entry["train_loss"] for entry in history]),
            "validation": (epochs, [entry["val_loss"] for entry in history]),
        },
        path,
        title,
    )


# ============================================================================ stage 1: VAE


def evaluate_vae(vae: AutoencoderKL, loader, config: Config, runtime: Runtime) -> tuple[float, float]:
    """Validation loss (posterior mean, no sampling noise) and reconstruction MS-SSIM."""
    vae.eval()
    totals = torch.zeros(3, device=runtime.device)  # loss sum, MS-SSIM sum, image count
    with torch.no_grad(), runtime.autocast():
        for images, *_ in loader:
            images = images.to(runtime.device, non_blocking=True)
            recon, mean, logvar = vae(images, sample_posterior=False)
            loss, _ = vae_loss(images, recon, mean, logvar, config.vae)
            totals[0] += loss.float() * len(images)
            totals[1] += ms_ssim(recon.float().clamp(-1, 1), images).sum()
            totals[2] += len(images)
    totals = runtime.mean_across_ranks(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def train_vae(config: Config, run_dir: Path, datasets: dict[str, SliceDataset], runtime: Runtime, resume: bool) -> AutoencoderKL:
    stage = config.vae_train
    path = run_dir / "vae.pt"
    torch.manual_seed(config.run.seed)
    vae = AutoencoderKL(config.vae).to(runtime.device)
    train_loader = make_loader(datasets["train"], stage.batch_size, shuffle=True, drop_last=True, seed=config.run.seed,
                               rank=runtime.rank, world_size=runtime.world_size, pin_memory=runtime.device.type == "cuda")
    val_loader = make_loader(datasets["val"], stage.batch_size, shuffle=False, rank=runtime.rank, world_size=runtime.world_size)
    optimizer, lr_schedule = make_optimizer(vae, stage, len(train_loader))
    start_epoch, step, history, _ = restore_stage(path, "vae", resume, config, runtime, vae, optimizer, lr_schedule)
    trained = prepare_for_training(vae, config, runtime)
    preview = datasets["val"][torch.linspace(0, len(datasets["val"]) - 1, 8).long().tolist()][0]

    def compute_loss(batch) -> tuple[torch.Tensor, int]:
        images = batch[0].to(runtime.device, non_blocking=True)
        recon, mean, logvar = trained(images)
        return vae_loss(images, recon, mean, logvar, config.vae)[0], len(images)

    for epoch in range(start_epoch, stage.epochs):
        seed_epoch(config.run.seed, epoch, runtime.rank)
        set_loader_epoch(train_loader, epoch)
        name = f"vae {epoch + 1}/{stage.epochs}"
        train_loss, images_per_second = train_one_epoch(name, trained, train_loader, len(train_loader), compute_loss,
                                                        optimizer, lr_schedule, stage, runtime, config.run.log_every)
        step += len(train_loader)
        val_loss, val_ms_ssim = evaluate_vae(vae, val_loader, config, runtime)
        history.append({"stage": "vae", "epoch": epoch + 1, "step": step, "train_loss": train_loss,
                        "val_loss": val_loss, "val_ms_ssim": val_ms_ssim, "lr": lr_schedule.get_last_lr()[0],
                        "images_per_second": images_per_second})
        if runtime.is_main:
            print(f"{name}: train {train_loss:.4f}  val {val_loss:.4f}  val MS-SSIM {val_ms_ssim:.4f}  "
                  f"{images_per_second:.0f} images/s")
            if epoch + 1 == stage.epochs:
                set_latent_scale(vae, datasets["train"], stage.batch_size, runtime)
            save_checkpoint(checkpoint_state("vae", config, vae, optimizer, lr_schedule, epoch + 1, step, history), path)
            write_history(run_dir, history, [])
            plot_history(history, run_dir / "vae_loss.png", "VAE loss")
            save_reconstructions(vae, preview, run_dir / "vae_reconstructions.png", runtime)
        runtime.barrier()
    if start_epoch == stage.epochs and runtime.is_main:
        print(f"vae: already trained for {stage.epochs} epochs in {path}")
    if runtime.world_size > 1:
        dist.broadcast(vae.scale_factor, src=0)
    return vae


def set_latent_scale(vae: AutoencoderKL, train_set: SliceDataset, batch_size: int, runtime: Runtime, max_images: int = 4096) -> None:
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


def save_reconstructions(vae: AutoencoderKL, images: torch.Tensor, path: Path, runtime: Runtime) -> None:
    """Top row: validation slices; bottom row: their reconstructions (posterior mean)."""
    vae.eval()
    with torch.no_grad():
        recon = vae(images.to(runtime.device), sample_posterior=False)[0].float().clamp(-1, 1).cpu()
    save_image_grid(torch.cat([images, recon]), path, ncols=len(images))


# ============================================================================ stage 2: latent UNet


class LatentDataset(torch.utils.data.Dataset):
    """Encoder posteriors of a split, kept on the device: a fresh latent is drawn every step
    (z = μ + σ·ε), as on-the-fly encoding would, without running the encoder again."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, labels: torch.Tensor, slice_positions: torch.Tensor):
        self.mean, self.logvar, self.labels, self.slice_positions = mean, logvar, labels, slice_positions

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.mean[index], self.logvar[index], self.labels[index], self.slice_positions[index]


def encode_split(vae: AutoencoderKL, images: SliceDataset, batch_size: int, runtime: Runtime, slice_range: tuple[int, int]) -> LatentDataset:
    vae.eval()
    means, logvars = [], []
    with torch.no_grad(), runtime.autocast():
        for chunk in torch.arange(len(images)).split(batch_size * 4):
            mean, logvar = vae.encode(images[chunk.tolist()][0].to(runtime.device))
            means.append(mean.float())
            logvars.append(logvar.float())
    device = runtime.device
    return LatentDataset(torch.cat(means), torch.cat(logvars), images.labels.to(device),
                         normalise_slices(images.slice_indices, slice_range).to(device))


def normalise_slices(slice_indices: torch.Tensor, slice_range: tuple[int, int]) -> torch.Tensor:
    """Slice index → [0, 1] over the training set's range (the slice-position context token)."""
    low, high = slice_range
    return ((slice_indices.float() - low) / max(1, high - low)).clamp(0, 1)


def diffusion_loss(unet: nn.Module, scheduler: NoiseScheduler, latents: torch.Tensor, labels: torch.Tensor,
                   slice_position: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ho et al.'s simple loss on a random timestep per sample, with the scheduler's weighting."""
    noise = torch.randn(latents.shape, device=latents.device, generator=generator)
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (len(latents),), device=latents.device, generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, labels, slice_position)
    per_sample = F.mse_loss(prediction.float(), scheduler.training_target(latents, noise, timesteps), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * scheduler.loss_weights(timesteps)).mean()


def drop_conditions(labels: torch.Tensor, slice_position: torch.Tensor | None, null_label: int, p: float):
    """Replace the condition by the null token with probability p (classifier-free guidance)."""
    dropped = torch.rand(len(labels), device=labels.device) < p
    labels = torch.where(dropped, torch.full_like(labels, null_label), labels)
    if slice_position is not None:
        slice_position = torch.where(dropped, torch.full_like(slice_position, -1.0), slice_position)
    return labels, slice_position


def evaluate_unet(unet: nn.Module, scheduler: NoiseScheduler, latents: LatentDataset, scale: float, config: Config, runtime: Runtime) -> float:
    """Validation loss with a fixed draw of latents, timesteps and noise, so epochs compare fairly."""
    unet.eval()
    generator = torch.Generator(runtime.device).manual_seed(1234 + runtime.rank)
    loader = make_loader(latents, config.unet_train.batch_size, shuffle=False, rank=runtime.rank, world_size=runtime.world_size)
    totals = torch.zeros(2, device=runtime.device)
    with torch.no_grad(), runtime.autocast():
        for mean, logvar, labels, slices in loader:
            z = AutoencoderKL.sample_latent(mean, logvar, generator=generator) * scale
            slice_position = slices if config.unet.slice_conditioning else None
            totals[0] += diffusion_loss(unet, scheduler, z, labels, slice_position, generator).float() * len(labels)
            totals[1] += len(labels)
    totals = runtime.mean_across_ranks(totals)
    return float(totals[0] / totals[1])


def latent_shape(config: Config) -> tuple[int, int, int]:
    """(C_z, h, w) of the latents the UNet works on."""
    side = config.data.image_size // config.vae.downsample_factor
    return config.unet.latent_channels, side, side


@torch.no_grad()
def sample_latents(unet: nn.Module, scheduler: NoiseScheduler, config: Config, labels: torch.Tensor, runtime: Runtime,
                   *, steps: int, guidance_scale: float, sampler: str = "ddim", eta: float = 0.0,
                   slice_position: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Labels (B,) → scaled latents (B, C_z, h, w) by reverse diffusion with classifier-free guidance."""
    unet.eval()
    if config.unet.slice_conditioning and slice_position is None:
        slice_position = torch.full((len(labels),), 0.5, device=runtime.device)
    with runtime.autocast():
        latents = scheduler.sample(unet, (len(labels), *latent_shape(config)), labels.to(runtime.device),
                                   sampler=sampler, num_steps=steps, eta=eta, guidance_scale=guidance_scale,
                                   slice_position=slice_position, generator=generator, device=runtime.device)
    return latents.float()


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Scaled latents (B, C_z, h, w) → images (B, 1, H, W) in [-1, 1]."""
    vae.eval()
    with runtime.autocast():
        images = vae.decode(latents / vae.scale_factor)
    return images.float().clamp(-1, 1)


def save_sample_grids(unet: nn.Module, vae: AutoencoderKL, scheduler: NoiseScheduler, config: Config, folder: Path,
                      tag: str, runtime: Runtime) -> None:
    """`<folder>/<tag>_AD.png` and `_NC.png`: a fixed seed, so grids from different epochs compare."""
    for label, class_name in enumerate(CLASS_NAMES):
        generator = torch.Generator(runtime.device).manual_seed(config.run.seed + label)
        labels = torch.full((config.run.grid_samples,), label, dtype=torch.long)
        latents = sample_latents(unet, scheduler, config, labels, runtime, steps=config.run.sample_steps,
                                 guidance_scale=config.run.guidance_scale, generator=generator)
        images = decode_latents(vae, latents, runtime)
        save_image_grid(images.cpu(), folder / f"{tag}_{class_name}.png", ncols=8)


def load_trained_vae(config: Config, run_dir: Path, device: torch.device) -> AutoencoderKL:
    """The finished stage-1 VAE of a run, frozen."""
    path = run_dir / "vae.pt"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no vae.pt: train stage 1 first (python train.py --run {run_dir} --stage vae)")
    state = load_stage_checkpoint(path, "vae", config, device)
    if state["epoch"] < config.vae_train.epochs:
        raise UsageError(f"the VAE in {path} stopped at epoch {state['epoch']} of {config.vae_train.epochs}: "
                         f"finish it with python train.py --run {run_dir} --stage vae --resume")
    vae = AutoencoderKL(config.vae).to(device)
    load_weights(vae, state["model"], path)
    vae.eval().requires_grad_(False)
    return vae


def train_unet(config: Config, run_dir: Path, datasets: dict[str, SliceDataset], runtime: Runtime, resume: bool) -> None:
    stage = config.unet_train
    path = run_dir / "unet.pt"
    vae = load_trained_vae(config, run_dir, runtime.device)
    scale = float(vae.scale_factor)
    scheduler = NoiseScheduler(config.scheduler)
    torch.manual_seed(config.run.seed)
    unet = UNet(config.unet).to(runtime.device)
    ema = EMA(unet, decay=stage.ema_decay)
    train_slices = datasets["train"].slice_indices
    slice_range = (int(train_slices.min()), int(train_slices.max()))
    train_latents = encode_split(vae, datasets["train"], stage.batch_size, runtime, slice_range)
    val_latents = encode_split(vae, datasets["val"], stage.batch_size, runtime, slice_range)
    train_loader = make_loader(train_latents, stage.batch_size, shuffle=True, drop_last=True, seed=config.run.seed,
                               rank=runtime.rank, world_size=runtime.world_size)
    optimizer, lr_schedule = make_optimizer(unet, stage, len(train_loader))
    start_epoch, step, history, state = restore_stage(path, "unet", resume, config, runtime, unet, optimizer, lr_schedule)
    if state:
        ema.load_state_dict(state["ema"])
    vae_history = load_checkpoint(run_dir / "vae.pt")["history"] if runtime.is_main else []
    trained = prepare_for_training(unet, config, runtime)

    def compute_loss(batch) -> tuple[torch.Tensor, int]:
        mean, logvar, labels, slices = batch
        latents = AutoencoderKL.sample_latent(mean, logvar) * scale
        slice_position = slices if config.unet.slice_conditioning else None
        labels, slice_position = drop_conditions(labels, slice_position, unet.null_label, stage.label_dropout)
        return diffusion_loss(trained, scheduler, latents, labels, slice_position), len(labels)

    for epoch in range(start_epoch, stage.epochs):
        seed_epoch(config.run.seed, epoch, runtime.rank)
        set_loader_epoch(train_loader, epoch)
        name = f"unet {epoch + 1}/{stage.epochs}"
        train_loss, images_per_second = train_one_epoch(name, trained, train_loader, len(train_loader), compute_loss,
                                                        optimizer, lr_schedule, stage, runtime, config.run.log_every,
                                                        after_step=lambda: ema.update(unet))
        step += len(train_loader)
        val_loss = evaluate_unet(ema.model, scheduler, val_latents, scale, config, runtime)
        history.append({"stage": "unet", "epoch": epoch + 1, "step": step, "train_loss": train_loss,
                        "val_loss": val_loss, "lr": lr_schedule.get_last_lr()[0], "images_per_second": images_per_second})
        if runtime.is_main:
            print(f"{name}: train {train_loss:.4f}  val (EMA) {val_loss:.4f}  {images_per_second:.0f} images/s")
            save_checkpoint(checkpoint_state("unet", config, unet, optimizer, lr_schedule, epoch + 1, step, history,
                                             ema=ema.state_dict(), slice_range=list(slice_range), latent_scale=scale), path)
            write_history(run_dir, vae_history, history)
            plot_history(history, run_dir / "diffusion_loss.png", "Diffusion loss (validation with EMA weights)")
            if (epoch + 1) % config.run.sample_every == 0 or epoch + 1 == stage.epochs:
                save_sample_grids(ema.model, vae, scheduler, config, run_dir / "samples", f"epoch{epoch + 1:03d}", runtime)
        runtime.barrier()
    if start_epoch == stage.epochs and runtime.is_main:
        print(f"unet: already trained for {stage.epochs} epochs in {path}")


# ============================================================================ command line


def prepare_run(args: argparse.Namespace, overrides: dict[str, str]) -> tuple[Config, Path]:
    """The run's config: new from a preset, or the run's own config.json (which CLI values may not
    contradict where they define the model). Refuses to overwrite finished work without --resume."""
    preset = args.preset or "demo"
    run_dir = Path(args.run or f"runs/{args.preset or 'demo'}")
    if (run_dir / "config.json").is_file():
        stored = read_config(run_dir)
        if args.preset and args.preset != stored.preset:
            raise UsageError(f"{run_dir} is a {stored.preset!r} run, not {args.preset!r}: drop --preset or choose another --run")
        config = copy.deepcopy(stored)
        apply_overrides(config, overrides)
        changed = config_differences(stored, config)
        if changed:
            raise UsageError(f"{run_dir} was made with {'; '.join(changed[:3])}: these define the model and cannot "
                             "change in an existing run; choose a new --run")
    else:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"{run_dir} exists and is not a brainLDM run folder: choose another --run")
        if args.resume:
            raise UsageError(f"--resume: {run_dir} holds no run to resume; drop --resume to start one")
        config = make_config(preset)
        apply_overrides(config, overrides)
    stages = ("vae", "unet") if args.stage == "all" else (args.stage,)
    for stage in stages:
        if (run_dir / f"{stage}.pt").is_file() and not args.resume:
            raise UsageError(f"{run_dir / (stage + '.pt')} exists: add --resume to continue it (or raise "
                             f"--{stage}_train.epochs to train longer), or choose a new --run")
    if "vae" in stages and (run_dir / "unet.pt").is_file():
        vae_epochs = load_checkpoint(run_dir / "vae.pt")["epoch"] if (run_dir / "vae.pt").is_file() else 0
        if vae_epochs < config.vae_train.epochs:
            raise UsageError(f"{run_dir} already has a UNet trained on its VAE; training the VAE further would "
                             "invalidate it: choose a new --run")
    if config.unet.num_classes != len(CLASS_NAMES):
        raise UsageError(f"unet.num_classes must be {len(CLASS_NAMES)} (AD, NC)")
    return config, run_dir


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    with usage_errors_exit():
        config, run_dir = prepare_run(args, overrides)
        runtime = start_runtime(config.run)
        if runtime.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_dir / "config.json", config_to_dict(config))
        splits = load_splits(run_dir / "splits.json") if (run_dir / "splits.json").is_file() else None
        datasets, splits = load_split_datasets(config.data, splits, return_slice=True, verbose=runtime.is_main)
        if len(datasets["val"]) == 0:
            raise UsageError("the validation split is empty: set --data.val_fraction above 0 (default 0.1)")
        if runtime.is_main:
            save_splits(run_dir / "splits.json", splits, config.data.val_fraction, config.data.split_seed)
            counts = ", ".join(f"{name} {len(d)}" for name, d in datasets.items())
            print(f"run {run_dir} | preset {config.preset} | device {runtime.device} x{runtime.world_size} | images: {counts}")
        try:
            if args.stage in ("vae", "all"):
                train_vae(config, run_dir, datasets, runtime, args.resume)
            if args.stage in ("unet", "all"):
                train_unet(config, run_dir, datasets, runtime, args.resume)
        except TrainingDiverged as error:
            print(f"error: {error}; the last good checkpoint in {run_dir} is intact: lower --lr or resume from it",
                  file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    if runtime.is_main:
        print(f"done: {run_dir}")


if __name__ == "__main__":
    main()
