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
import math
import os
import signal
import sys
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from config import (
    COMPILE_MODES,
    DEFAULT_DATA_DIR,
    PRESETS,
    Config,
    StageConfig,
    check_batches,
    collect_overrides,
    config_differences,
    config_to_dict,
    override_keys,
    pick_preset,
    requested_config,
    resolve_schedule,
)
from dataset import SliceDataset, check_classes, load_split_datasets, load_splits, make_loader, save_splits, set_loader_epoch
from modules import EMA, AutoencoderKL, Critic, NoiseScheduler, compile_model, make_optimizer, vae_loss
from pipeline import (
    Pipeline,
    build_unet,
    check_run_outputs,
    check_trained_on,
    check_vae_is_final,
    checkpoint_state,
    describe_reconstructions,
    encode_split,
    fingerprint,
    load_trained_vae,
    load_weights,
    restore_stage,
    save_reconstructions,
    save_sample_grids,
    set_latent_scale,
    snapshot_path,
    unet_validation_loss,
    vae_validation_scores,
    validate,
)
from utils import (
    ArgumentParser,
    CheckpointCadence,
    Runtime,
    StopRequest,
    TensorBoardLog,
    TimeBreakdown,
    TrainingStopped,
    UsageError,
    describe_time,
    folder_lock,
    load_checkpoint,
    plot_history,
    remove_temporary_files,
    report_removed,
    require_tensorboard,
    save_checkpoint,
    start_runtime,
    usage_errors_exit,
    write_history,
    write_json_atomic,
)

# ============================================================================ command line


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (override any as --section.field VALUE; tuples as 64,128,256):\n"
        + "\n".join(f"  --{key}" for key in override_keys()),
    )
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help=f"config preset for a new run (default: adni when {DEFAULT_DATA_DIR} exists, else demo)",
    )
    parser.add_argument("--data-dir", help="dataset root with {train,test}/{AD,NC}/ (sets data.data_dir)")
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        help="run folder (default: runs/<preset>); under torchrun write --run-dir, as torchrun claims --run",
    )
    parser.add_argument("--stage", choices=("vae", "unet", "all"), default="all")
    parser.add_argument("--epochs", type=int, help="epochs of the stage(s) being trained (replaces a schedule in images)")
    parser.add_argument("--batch-size", type=int, help="per-process batch size of the stage(s) being trained")
    parser.add_argument("--lr", type=float, help="peak learning rate of the stage(s) being trained")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ... (sets run.device)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="full",
        choices=COMPILE_MODES,
        help="torch.compile the model being trained: full (alone: --compile), regional or reduce-overhead (sets run.compile)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --run from its checkpoints")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    """Known flags through argparse; `--section.field value` pairs collected as overrides."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = collect_overrides(rest)
    except ValueError as error:
        parser.error(str(error))
    stages = ("vae_train", "unet_train") if args.stage == "all" else (f"{args.stage}_train",)
    for flag in ("epochs", "batch_size", "lr"):
        if getattr(args, flag) is not None:
            for stage in stages:
                overrides[f"{stage}.{flag}"] = str(getattr(args, flag))
    for stage in ("vae_train", "unet_train"):
        if f"{stage}.epochs" in overrides:
            if f"{stage}.images" in overrides:
                parser.error(f"--{stage}.epochs and --{stage}.images both set the schedule: give one of them")
            # An epoch count asked for replaces a schedule in images that the preset or the run had.
            overrides[f"{stage}.images"] = "none"
    if args.data_dir is not None:
        overrides["data.data_dir"] = args.data_dir
    if args.device is not None:
        overrides["run.device"] = args.device
    if args.compile is not None:
        overrides["run.compile"] = args.compile
    return args, overrides


# ============================================================================ seeds and devices


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed from (seed, epoch, rank): a run resumed at an epoch boundary draws the same noise as
    an uninterrupted one, with no RNG state to carry in the checkpoint, and ranks draw differently."""
    torch.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)


def prepare_for_training(model: nn.Module, config: Config, runtime: Runtime) -> nn.Module:
    """The module the training step calls: channels-last, DDP-wrapped and compiled as run.compile
    says (modules.compile_model; regional compiles the blocks inside DDP, the others wrap it).

    Checkpoints always save the plain `model`, so they load anywhere."""
    if runtime.device.type == "cuda" and config.run.channels_last:
        model.to(memory_format=torch.channels_last)
    regional = config.run.compile == "regional"
    trained: nn.Module = compile_model(model, "regional") if regional else model
    if runtime.world_size > 1:
        trained = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    return trained if regional else compile_model(trained, config.run.compile)


# ============================================================================ the shared epoch loop


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good state."""


def train_one_epoch(
    name: str,
    model: nn.Module,
    batches: typing.Iterable,
    num_batches: int,
    compute_loss: Callable[[object], tuple[torch.Tensor, int]],
    optimizer: Optimizer,
    lr_schedule: LambdaLR,
    stage: StageConfig,
    runtime: Runtime,
    log_every: int,
    after_step: Callable[[], None] = lambda: None,
    clock: TimeBreakdown | None = None,
) -> tuple[float, float]:
    """One pass over `batches`; returns the mean training loss across ranks and the images per
    second of all ranks together (a first compiled epoch includes its compilation). With a
    `clock`, the epoch's time is counted there as data (waiting for batches) and training steps.

    The running loss stays on the device and is read only every `log_every` steps, so the loop
    never waits for the GPU except when it logs; a non-finite loss is caught at that read.
    """
    clock = clock or TimeBreakdown()
    with clock.measure("train_steps"):
        model.train()
        loss_sum = torch.zeros((), device=runtime.device)
        images_seen, started = 0, time.perf_counter()
        bar = tqdm(batches, total=num_batches, desc=name, disable=not runtime.is_main, leave=False, dynamic_ncols=True)
        waiting_since = clock.clock()
        for step_in_epoch, batch in enumerate(bar, start=1):
            clock.add("data", clock.clock() - waiting_since)  # from the end of the last step to this batch
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
            waiting_since = clock.clock()
        clock.add("data", clock.clock() - waiting_since)  # the iterator's last call, which ends it
        mean_loss = float(runtime.mean_across_ranks(loss_sum / max(1, num_batches)))  # waits for the device
        images_per_second = images_seen / (time.perf_counter() - started)
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(f"{name}: loss became {mean_loss}")
    return mean_loss, images_per_second


# ============================================================================ a stage: its state, its epochs, its checkpoints


@dataclass
class Stage:
    """One stage's training state: the plain model (what checkpoints save), the module the step calls
    (channels-last, DDP, compiled), the loader, optimizer and LR schedule, the progress restored
    from the stage's checkpoint (`restored`, {} on a fresh start), where its time goes, when its
    next checkpoint is due and whether a clean stop was asked for."""

    name: str  # "vae" or "unet"
    settings: StageConfig
    model: nn.Module
    trained: nn.Module
    loader: DataLoader
    optimizer: Optimizer
    lr_schedule: LambdaLR
    start_epoch: int
    step: int
    history: list[dict]
    restored: dict
    clock: TimeBreakdown
    cadence: CheckpointCadence
    stop: StopRequest

    def checkpoint(self, config: Config, epoch: int, **extra) -> dict:
        return checkpoint_state(
            self.name, config, self.model, self.optimizer, self.lr_schedule, epoch, self.step, self.history, **extra
        )


def start_stage(
    name: str,
    model: nn.Module,
    train_set: Dataset,
    config: Config,
    runtime: Runtime,
    resume: bool,
    path: Path,
    clock: TimeBreakdown | None = None,
    stop: StopRequest | None = None,
) -> Stage:
    """The loader, optimizer and schedule of stage `name`, restored from `path` with --resume;
    `clock` is the stage's time since it started (a new one by default)."""
    settings = getattr(config, f"{name}_train")
    loader = make_loader(
        train_set,
        settings.batch_size,
        shuffle=True,
        drop_last=True,
        seed=config.run.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
        pin_memory=runtime.device.type == "cuda" and isinstance(train_set, SliceDataset),
    )
    optimizer, lr_schedule = make_optimizer(model, settings, len(loader))
    start_epoch, step, history, state = restore_stage(path, name, resume, config, runtime, model, optimizer, lr_schedule)
    trained = prepare_for_training(model, config, runtime)
    return Stage(
        name,
        settings,
        model,
        trained,
        loader,
        optimizer,
        lr_schedule,
        start_epoch,
        step,
        history,
        state,
        clock or TimeBreakdown(),
        CheckpointCadence(config.run.checkpoint_minutes),
        stop or StopRequest(),
    )


def run_epochs(
    stage: Stage,
    config: Config,
    runtime: Runtime,
    compute_loss: Callable[[object], tuple[torch.Tensor, int]],
    after_step: Callable[[], None] = lambda: None,
) -> Iterator[dict]:
    """Train the stage's remaining epochs; after each, yield its history entry for the caller to
    complete (validation, figures) and pass to `finish_epoch`, then wait for all ranks. At the end,
    print where the stage's time went."""
    for epoch in range(stage.start_epoch, stage.settings.epochs):
        seed_epoch(config.run.seed, epoch, runtime.rank)
        set_loader_epoch(stage.loader, epoch)
        name = f"{stage.name} {epoch + 1}/{stage.settings.epochs}"
        train_loss, images_per_second = train_one_epoch(
            name,
            stage.trained,
            stage.loader,
            len(stage.loader),
            compute_loss,
            stage.optimizer,
            stage.lr_schedule,
            stage.settings,
            runtime,
            config.run.log_every,
            after_step=after_step,
            clock=stage.clock,
        )
        stage.step += len(stage.loader)
        yield {
            "stage": stage.name,
            "epoch": epoch + 1,
            "step": stage.step,
            "train_loss": train_loss,
            "lr": stage.lr_schedule.get_last_lr()[0],
            "images_per_second": images_per_second,
        }
        runtime.barrier()
    if runtime.is_main:
        if stage.start_epoch == stage.settings.epochs:
            print(f"{stage.name}: already trained for {stage.settings.epochs} epochs")
        else:
            print(describe_time(stage.name, stage.clock.summary()))


def validating(epoch: int, stage: Stage, config: Config) -> bool:
    """Whether `epoch` (1-based) is validated: every run.validate_every epochs and always the last."""
    return epoch % config.run.validate_every == 0 or epoch == stage.settings.epochs


def finish_epoch(
    stage: Stage,
    entry: dict,
    runtime: Runtime,
    path: Path,
    checkpoint: Callable[[int], dict],
    write_logs: Callable[[], None],
    keep_every: int = 0,
) -> None:
    """Close the epoch's record (`seconds`: its time by category, since the previous record closed,
    so a checkpoint's write counts in the next epoch), add it to the history, write the checkpoint
    when due (the stage's last epoch, a clean stop, or run.checkpoint_minutes after the last one) and
    a snapshot every `keep_every` epochs, then the logs; after a clean stop's checkpoint, raise TrainingStopped."""
    stopping = stage.stop.agreed(runtime)
    entry["seconds"] = stage.clock.close()
    stage.history.append(entry)
    last = entry["epoch"] == stage.settings.epochs
    if runtime.is_main:
        if last or stopping or stage.cadence.due():
            with stage.clock.measure("checkpoints"):
                save_checkpoint(checkpoint(entry["epoch"]), path)
            stage.cadence.written()
        if keep_every and entry["epoch"] % keep_every == 0:
            with stage.clock.measure("checkpoints"):
                save_checkpoint(checkpoint(entry["epoch"]), snapshot_path(path.parent, stage.name, entry["epoch"]))
        write_logs()
    if stopping and not last:
        raise TrainingStopped(
            f"stopped by {signal.Signals(stage.stop.signal_number or signal.SIGTERM).name} after {stage.name} epoch "
            f"{entry['epoch']}/{stage.settings.epochs}, its checkpoint written",
            stage.stop.signal_number or signal.SIGTERM,
        )


# ============================================================================ stage 1: VAE


def make_critic(config: Config, runtime: Runtime, restored: dict, path: Path) -> Critic | None:
    """The VAE's discriminator when vae.adversarial_weight > 0 (modules.Critic), restored from the
    stage's checkpoint `restored` on --resume, its step run as the VAE's is (DDP, compiled, autocast)."""
    if config.vae.adversarial_weight <= 0:
        return None
    critic = Critic(config.vae, config.vae_train.lr, config.vae_train.betas, runtime.device)
    if restored:
        if "discriminator" not in restored or "discriminator_optimizer" not in restored:
            raise UsageError(f"{path} holds no discriminator to resume: resume from a copy or start a new --run")
        load_weights(critic.model, restored["discriminator"], path)
        critic.optimizer.load_state_dict(restored["discriminator_optimizer"])
    critic.trained, critic.autocast = prepare_for_training(critic.model, config, runtime), runtime.autocast
    return critic


def train_vae(
    config: Config, run_dir: Path, datasets: dict[str, SliceDataset], runtime: Runtime, resume: bool, stop: StopRequest
) -> AutoencoderKL:
    clock = TimeBreakdown()
    torch.manual_seed(config.run.seed)
    vae = AutoencoderKL(config.vae).to(runtime.device)
    stage = start_stage("vae", vae, datasets["train"], config, runtime, resume, run_dir / "vae.pt", clock, stop)
    critic = make_critic(config, runtime, stage.restored, run_dir / "vae.pt")
    val_loader = make_loader(
        datasets["val"], stage.settings.batch_size, shuffle=False, rank=runtime.rank, world_size=runtime.world_size
    )
    preview = datasets["val"][torch.linspace(0, len(datasets["val"]) - 1, 8).long().tolist()][0]
    board = TensorBoardLog(run_dir / "tensorboard" / "vae", config.run.tensorboard and runtime.is_main, stage.start_epoch + 1)

    def compute_loss(batch) -> tuple[torch.Tensor, int]:
        images = batch[0].to(runtime.device, non_blocking=True)
        recon, mean, logvar = stage.trained(images)
        loss = vae_loss(images, recon, mean, logvar, config.vae)[0]
        adversarial = None if critic is None else critic.generator_loss(images, recon, stage.lr_schedule.last_epoch)
        return (loss if adversarial is None else loss + adversarial), len(images)

    def write_logs() -> None:
        write_history(run_dir, stage.history, [])
        plot_history(stage.history, run_dir / "vae_loss.png", "VAE loss")
        board.epoch(stage.history[-1], "vae")

    def checkpoint(epoch: int) -> dict:
        return stage.checkpoint(config, epoch, **(critic.state_dict() if critic is not None else {}))

    after_step = critic.step if critic is not None else lambda: None
    for entry in run_epochs(stage, config, runtime, compute_loss, after_step=after_step):
        validated = validating(entry["epoch"], stage, config)
        if validated:
            with stage.clock.measure("validation"):
                entry.update(vae_validation_scores(vae, val_loader, config, runtime))
        if runtime.is_main:
            scores = f"val {entry['val_loss']:.4f}  {'  '.join(describe_reconstructions(entry))}  " if validated else ""
            print(
                f"vae {entry['epoch']}/{stage.settings.epochs}: train {entry['train_loss']:.4f}  {scores}"
                f"{entry['images_per_second']:.0f} images/s"
            )
            if entry["epoch"] == stage.settings.epochs:
                with stage.clock.measure("latent_encoding"):
                    set_latent_scale(vae, datasets["train"], stage.settings.batch_size, runtime)
            if validated:
                with stage.clock.measure("sample_grids"):
                    caption = [f"top: validation slices; bottom: reconstructions (epoch {entry['epoch']})"]
                    caption += describe_reconstructions(entry)
                    save_reconstructions(vae, preview, run_dir / "vae_reconstructions.png", runtime, caption)
                    board.image("vae/reconstructions", run_dir / "vae_reconstructions.png", entry["epoch"])
        finish_epoch(stage, entry, runtime, run_dir / "vae.pt", checkpoint, write_logs)
    board.close()
    if runtime.world_size > 1:
        dist.broadcast(vae.scale_factor, src=0)
    return vae


# ============================================================================ stage 2: latent UNet


def train_unet(
    config: Config, run_dir: Path, datasets: dict[str, SliceDataset], runtime: Runtime, resume: bool, stop: StopRequest
) -> None:
    clock = TimeBreakdown()
    vae = load_trained_vae(config, run_dir, runtime.device)
    vae_fingerprint, scale = fingerprint(vae), float(vae.scale_factor)
    scheduler = NoiseScheduler(config.scheduler)
    torch.manual_seed(config.run.seed)
    unet = build_unet(config).to(runtime.device)
    ema = EMA(unet, decay=config.unet_train.ema_decay)
    train_slices = datasets["train"].slice_indices
    slice_range = (int(train_slices.min()), int(train_slices.max()))
    with clock.measure("latent_encoding"):
        train_latents = encode_split(vae, datasets["train"], config, runtime, slice_range)
        val_latents = encode_split(vae, datasets["val"], config, runtime, slice_range)
    stage = start_stage("unet", unet, train_latents, config, runtime, resume, run_dir / "unet.pt", clock, stop)
    if stage.restored:
        check_trained_on(stage.restored, vae_fingerprint, run_dir / "unet.pt")
        ema.load_state_dict(stage.restored["ema"])
    vae_history = load_checkpoint(run_dir / "vae.pt")["history"] if runtime.is_main else []
    grids = Pipeline(config, vae, ema.model, scheduler, runtime)
    board = TensorBoardLog(run_dir / "tensorboard" / "unet", config.run.tensorboard and runtime.is_main, stage.start_epoch + 1)

    def compute_loss(batch) -> tuple[torch.Tensor, int]:
        mean, logvar, conditions = batch
        latents = AutoencoderKL.sample_latent(mean, logvar) * scale
        dropout = stage.settings.label_dropout
        return scheduler.training_loss(stage.trained, latents, conditions, condition_dropout=dropout), len(latents)

    def checkpoint(epoch: int) -> dict:
        extra = {
            "ema": ema.state_dict(),
            "slice_range": list(slice_range),
            "latent_scale": scale,
            "vae_fingerprint": vae_fingerprint,
        }
        return stage.checkpoint(config, epoch, **extra)

    def write_logs() -> None:
        write_history(run_dir, vae_history, stage.history)
        plot_history(stage.history, run_dir / "diffusion_loss.png", "Diffusion loss (validation with EMA weights)")
        board.epoch(stage.history[-1], "unet")

    for entry in run_epochs(stage, config, runtime, compute_loss, after_step=lambda: ema.update(unet)):
        validated = validating(entry["epoch"], stage, config)
        if validated:
            with stage.clock.measure("validation"):
                entry["val_loss"] = unet_validation_loss(ema.model, scheduler, val_latents, scale, config, runtime)
        if runtime.is_main:
            scores = f"val (EMA) {entry['val_loss']:.4f}  " if validated else ""
            print(
                f"unet {entry['epoch']}/{stage.settings.epochs}: train {entry['train_loss']:.4f}  {scores}"
                f"{entry['images_per_second']:.0f} images/s"
            )
            if entry["epoch"] % config.run.sample_every == 0 or entry["epoch"] == stage.settings.epochs:
                with stage.clock.measure("sample_grids"):
                    for class_name, path in save_sample_grids(grids, run_dir / "samples", f"epoch{entry['epoch']:03d}"):
                        board.image(f"unet/samples_{class_name}", path, entry["epoch"])
        finish_epoch(stage, entry, runtime, run_dir / "unet.pt", checkpoint, write_logs, config.run.keep_every)
    board.close()


# ============================================================================ a run


def prepare_run(args: argparse.Namespace, overrides: dict[str, str], run_dir: Path) -> Config:
    """The run's config, validated: new from a preset, or the run's own config.json (which CLI values
    may not contradict where they define the model). Refuses to overwrite finished work without --resume."""
    config, stored = requested_config(args.preset, overrides, run_dir)
    if stored is not None:
        if args.preset and args.preset != stored.preset:
            raise UsageError(f"{run_dir} is a {stored.preset!r} run, not {args.preset!r}: drop --preset or choose another --run")
        changed = config_differences(stored, config)
        if changed:
            raise UsageError(
                f"{run_dir} was made with {'; '.join(changed[:3])}: these define the model and cannot "
                "change in an existing run; choose a new --run"
            )
    else:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"{run_dir} exists and is not a brainLDM run folder: choose another --run")
        if args.resume:
            raise UsageError(f"--resume: {run_dir} holds no run to resume; drop --resume to start one")
    stages = ("vae", "unet") if args.stage == "all" else (args.stage,)
    for stage in stages:
        if (run_dir / f"{stage}.pt").is_file() and not args.resume:
            raise UsageError(
                f"{run_dir / (stage + '.pt')} exists: add --resume to continue it (or raise "
                f"--{stage}_train.epochs to train longer), or choose a new --run"
            )
    validate(config)
    return config


def train(args: argparse.Namespace, overrides: dict[str, str], run_dir: Path) -> None:
    """Validate, load the data, write the run's config and splits, then train the asked-for stages."""
    config = prepare_run(args, overrides, run_dir)
    if config.run.tensorboard:
        require_tensorboard()  # now, not after a stage of training
    runtime = start_runtime(config.run.device)
    stage_runtimes = {name: runtime.with_bf16(getattr(config, f"{name}_train").bf16) for name in ("vae", "unet")}
    splits = load_splits(run_dir / "splits.json") if (run_dir / "splits.json").is_file() else None
    datasets, splits = load_split_datasets(config.data, splits, return_slice=True, verbose=runtime.is_main)
    check_classes(datasets)
    resolved = resolve_schedule(config, len(datasets["train"]))
    check_batches(config, len(datasets["train"]), ("vae", "unet") if args.stage == "all" else (args.stage,), runtime.world_size)
    check_vae_is_final(config, run_dir, args.stage)
    # Only now, with the config and the data known to be usable, does the run folder get written.
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        report_removed(remove_temporary_files(run_dir, recursive=True), run_dir)
        write_json_atomic(run_dir / "config.json", config_to_dict(config))
        save_splits(run_dir / "splits.json", splits, config.data.val_fraction, config.data.split_seed)
        counts = ", ".join(f"{name} {len(d)}" for name, d in datasets.items())
        precision = ", ".join(f"{name} {'bf16 autocast' if r.bf16 else 'float32'}" for name, r in stage_runtimes.items())
        print(
            f"run {run_dir} | preset {config.preset} | device {runtime.device} x{runtime.world_size} ({precision}) | images: {counts}"
        )
        for line in resolved:
            print(line)
    try:
        with StopRequest() as stop:
            if args.stage in ("vae", "all"):
                train_vae(config, run_dir, datasets, stage_runtimes["vae"], args.resume, stop)
            if args.stage in ("unet", "all"):
                train_unet(config, run_dir, datasets, stage_runtimes["unet"], args.resume, stop)
    except TrainingDiverged as error:
        print(f"error: {error}; the last good checkpoint in {run_dir} is intact: lower --lr or resume from it", file=sys.stderr)
        raise SystemExit(1) from None
    except TrainingStopped as stopped:
        if runtime.is_main:
            print(f"{stopped}: continue with --resume", file=sys.stderr)
        raise SystemExit(128 + stopped.signal_number) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if runtime.is_main:
        print(f"done: {run_dir}")


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    preset, reason = pick_preset(args.preset)
    run_dir = Path(args.run or f"runs/{preset}")
    if args.preset is None and not (run_dir / "config.json").is_file() and int(os.environ.get("RANK", "0")) == 0:
        print(reason)  # the first line: which model a bare `python train.py` is about to train, and why
    with usage_errors_exit():
        check_run_outputs(requested_config(args.preset, overrides, run_dir)[0], run_dir)
        # One writer per run folder: torchrun's rank 0 holds the lock for all ranks of its job.
        with folder_lock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
            train(args, overrides, run_dir)


if __name__ == "__main__":
    main()
