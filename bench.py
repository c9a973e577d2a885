"""Measure brainLDM's training and sampling speed and memory, beside Hugging Face diffusers' UNet.

    python bench.py                                    # demo preset on the best device → results/bench_<device>.md
    python bench.py --preset adni --device cuda        # the 192 px model on a GPU (bf16 autocast, channels_last)
    python bench.py --preset adni --compile regional --overwrite   # torch.compile: full (alone), regional, reduce-overhead
    python bench.py --preset adni --device cuda --profile           # torch.profiler: GPU busy share, kernels per step, host time

Figures, each the median (and min–max) of timed repeats after untimed warm-up steps:
VAE training images/s; UNet training images/s with cached latents and with latents encoded on the
fly by the frozen VAE encoder; guided DDIM sampling images/s; peak memory of each. The UNet figures
are measured again for diffusers' `UNet2DConditionModel` configured to our widths, depths, attention
levels and parameter count, sampled with its `DDIMScheduler`, in the same process on the same
machine, and the table gives ours / diffusers. diffusers is optional (`pip install -r
requirements-bench.txt`); without it only our column is measured. Random tensors stand in for the
data, so the figures are the models' speed, not the data pipeline's.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import resource
import shlex
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from config import COMPILE_MODES, PRESETS, Config, SchedulerConfig, UNetConfig, latent_shape, make_config
from modules import EMA, AutoencoderKL, Conditions, NoiseScheduler, make_optimizer, vae_loss
from pipeline import Pipeline, build_unet
from train import prepare_for_training, train_one_epoch
from utils import (
    ArgumentParser,
    Runtime,
    UsageError,
    check_output_paths,
    pick_device,
    remove_temporary_files,
    usage_errors_exit,
    write_text_atomic,
)

if TYPE_CHECKING:  # diffusers is optional: imported for real only inside import_diffusers
    from diffusers import DDIMScheduler

# ============================================================================ settings


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", choices=tuple(PRESETS), default="demo", help="model sizes and image size (default: demo; tiny is for tests)"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, help="training batch size of both stages (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (default: 5)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed warm-up steps (or 2-step sampling runs) first (default: 2)"
    )
    parser.add_argument("--train-steps", type=int, default=10, help="optimizer steps in one timed training repeat (default: 10)")
    parser.add_argument("--sample-count", type=int, default=64, help="images sampled in one batch (default: 64)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps per sample (default: 50)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table: torch.profiler over --train-steps UNet training steps and one guided sampling "
        "call (--sample-count x --sample-steps): device busy share, operations and host time per step, top kernels",
    )
    parser.add_argument(
        "--out", help="Markdown to write (default: results/bench_<cpu|cuda>.md, with --profile profile_<cpu|cuda>.md)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="full",
        default="none",
        choices=COMPILE_MODES,
        help="torch.compile the models being timed, ours and diffusers' (alone: full; default none)",
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("repeats", "train_steps", "sample_count", "sample_steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    return args


def bench_config(args: argparse.Namespace) -> Config:
    """The preset's model and batch sizes, with the run options bench.py sets."""
    config = make_config(args.preset)
    if args.batch_size is not None:
        config.vae_train.batch_size = config.unet_train.batch_size = args.batch_size
    config.run.compile = args.compile
    if not 1 <= args.sample_steps <= config.scheduler.num_train_timesteps:
        raise UsageError(f"--sample-steps must be at most {config.scheduler.num_train_timesteps}, got {args.sample_steps}")
    return config


# ============================================================================ timing and memory


@dataclass
class Measurement:
    """Images/s of each timed repeat, and the peak memory (MiB) while they ran."""

    rates: list[float]
    peak_mib: float

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def pooled(self, other: Measurement) -> Measurement:
        return Measurement(self.rates + other.rates, max(self.peak_mib, other.peak_mib))


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously: a timer read before the queue drains would time the launches only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux resets the process's RSS high-water mark (which getrusage reports) on this write, so each
    # figure is the peak during its own measurement; elsewhere it stays the peak since the process started.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: the most memory tensors held; CPU: the process's largest resident set (all of Python and torch)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def measure(timed: Callable[[], int], warm_up: Callable[[], object], runtime: Runtime, repeats: int, warmups: int) -> Measurement:
    """Run `warm_up` `warmups` times untimed (compilation, allocator, cuDNN choices), then `timed`
    (which returns the images it processed) `repeats` times, each timed alone."""
    for _ in range(warmups):
        warm_up()
    synchronize(runtime.device)
    reset_peak_memory(runtime.device)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        images = timed()
        synchronize(runtime.device)
        rates.append(images / (time.perf_counter() - started))
    return Measurement(rates, peak_memory_mib(runtime.device))


# ============================================================================ what is timed


def time_vae_training(vae: AutoencoderKL, config: Config, runtime: Runtime, args: argparse.Namespace) -> Measurement:
    """train.py's stage-1 step (forward, loss, backward, grad clip, AdamW) on random images."""
    stage = config.vae_train
    trained = prepare_for_training(vae, config, runtime)
    optimizer, lr_schedule = make_optimizer(vae, stage, args.train_steps)
    side = config.data.image_size
    images = torch.rand(stage.batch_size, config.vae.in_channels, side, side, device=runtime.device) * 2 - 1

    def compute_loss(batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        recon, mean, logvar = trained(batch)
        return vae_loss(batch, recon, mean, logvar, config.vae)[0], len(batch)

    def train(steps: int) -> int:
        train_one_epoch(
            "vae", trained, [images] * steps, steps, compute_loss, optimizer, lr_schedule, stage, runtime, log_every=steps
        )
        return steps * stage.batch_size

    return time_training(train, runtime, args)


def time_training(train: Callable[[int], int], runtime: Runtime, args: argparse.Namespace) -> Measurement:
    """Images/s of a training function (steps → images trained on) over --train-steps, after --warmup single steps."""
    return measure(lambda: train(args.train_steps), lambda: train(1), runtime, args.repeats, args.warmup)


def unet_training(
    unet: nn.Module,
    trained: nn.Module,
    vae: AutoencoderKL,
    scheduler: NoiseScheduler,
    config: Config,
    runtime: Runtime,
    args: argparse.Namespace,
    on_the_fly: bool,
) -> Callable[[int], int]:
    """train.py's stage-2 step (label dropout, loss, backward, grad clip, AdamW, EMA update) for any
    denoiser with our UNet's call signature, on cached posteriors or on images the frozen encoder
    encodes, as a function: steps → images trained on.

    `trained` is `unet` as prepare_for_training returned it (channels_last, compiled)."""
    stage = config.unet_train
    optimizer, lr_schedule = make_optimizer(unet, stage, args.train_steps)
    ema = EMA(unet, decay=stage.ema_decay)
    conditions = Conditions(torch.arange(stage.batch_size, device=runtime.device) % config.unet.num_classes)
    side = config.data.image_size
    if on_the_fly:
        batch = torch.rand(stage.batch_size, config.vae.in_channels, side, side, device=runtime.device) * 2 - 1
    else:  # what train.py caches: the encoder's posterior, from which each step draws a fresh latent
        mean = torch.randn(stage.batch_size, *latent_shape(config), device=runtime.device)
        batch = (mean, torch.full_like(mean, -6.0))
    scale = float(vae.scale_factor)

    def compute_loss(batch) -> tuple[torch.Tensor, int]:
        if on_the_fly:
            with torch.no_grad():
                batch = vae.encode(batch)
        latents = AutoencoderKL.sample_latent(*batch) * scale
        return scheduler.training_loss(trained, latents, conditions, condition_dropout=stage.label_dropout), len(latents)

    def train(steps: int) -> int:
        train_one_epoch(
            "unet",
            trained,
            [batch] * steps,
            steps,
            compute_loss,
            optimizer,
            lr_schedule,
            stage,
            runtime,
            log_every=steps,
            after_step=lambda: ema.update(unet),
        )
        return steps * stage.batch_size

    return train


def time_unet(
    unet: nn.Module,
    sample: Callable[..., torch.Tensor],
    sampling_scheduler: NoiseScheduler | DDIMScheduler,
    vae: AutoencoderKL,
    scheduler: NoiseScheduler,
    config: Config,
    runtime: Runtime,
    args: argparse.Namespace,
) -> dict[str, Measurement]:
    """Every UNet figure for one denoiser: training on cached and on freshly encoded latents, then
    sampling with `sample`, a function with sample_with_ours' signature, and its scheduler."""
    trained = prepare_for_training(unet, config, runtime)  # one compiled module for all three, so it compiles once
    figures = {}
    for key, on_the_fly in (("unet_cached", False), ("unet_on_the_fly", True)):
        print(f"  {key.replace('_', ' ')} training ...", flush=True)
        figures[key] = time_training(
            unet_training(unet, trained, vae, scheduler, config, runtime, args, on_the_fly), runtime, args
        )
    print("  sampling ...", flush=True)
    labels = torch.arange(args.sample_count, device=runtime.device) % config.unet.num_classes

    def run(steps: int) -> int:
        sample(
            trained,
            sampling_scheduler,
            config,
            labels,
            runtime,
            steps=steps,
            guidance_scale=config.run.guidance_scale,
            generator=torch.Generator(runtime.device).manual_seed(0),
        )
        return args.sample_count

    # A 2-step run exercises every shape and kernel of a full one, at a fraction of the cost on a CPU.
    figures["sampling"] = measure(
        lambda: run(args.sample_steps), lambda: run(min(2, args.sample_steps)), runtime, args.repeats, args.warmup
    )
    return figures


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ============================================================================ the profile

# Host-side events during which the host only waits for the device: a tensor read (.item()) or a synchronize.
WAITING_EVENTS = ("aten::_local_scalar_dense", "cudaDeviceSynchronize", "cudaStreamSynchronize")


@dataclass
class Profile:
    """What torch.profiler saw over `steps` steps: per step, the wall time, the host's own time (not
    waiting for the device), the device's busy share (None on a CPU) and its operations (kernels,
    copies; on a CPU the top-level aten ops), and the top operations by time as (name, count, ms)."""

    steps: int
    wall_ms: float
    host_ms: float
    device_busy: float | None
    operations: int
    top: list[tuple[str, int, float]]


def covered_length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    covered, reached = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reached:
            covered += end - max(start, reached)
            reached = end
    return covered


def profile_steps(run: Callable[[], object], steps: int, runtime: Runtime, top: int = 10) -> Profile:
    """torch.profiler around `run()` (`steps` steps of something), then its device queue drained."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = runtime.device.type == "cuda"
    synchronize(runtime.device)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as profiler:
        run()
        synchronize(runtime.device)
    events = list(profiler.events())
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)  # microseconds
    waited = covered_length([(e.time_range.start, e.time_range.end) for e in events if e.name in WAITING_EVENTS])
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    if device_events:
        operations = device_events
        busy = covered_length([(e.time_range.start, e.time_range.end) for e in device_events]) / span
        duration = {id(e): e.time_range.end - e.time_range.start for e in device_events}
    else:
        operations = [e for e in events if e.cpu_parent is None and e.name.startswith("aten::")]
        busy = None
        duration = {id(e): e.cpu_time_total for e in operations}
    by_name: dict[str, list[float]] = {}
    for event in operations:
        by_name.setdefault(event.name, []).append(duration[id(event)])
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return Profile(
        steps,
        span / steps / 1000,
        (span - waited) / steps / 1000,
        busy,
        round(len(operations) / steps),
        [(name, len(times), sum(times) / 1000) for name, times in ranked],
    )


def profile_report(
    config: Config, args: argparse.Namespace, argv: list[str], runtime: Runtime, profiles: dict[str, Profile]
) -> str:
    """The Markdown page of `--profile`: per-step figures of each profiled loop, then its top operations."""
    cuda = runtime.device.type == "cuda"
    header = " | ".join(
        [
            f"profile on {device_name(runtime.device)}",
            f"torch {torch.__version__}",
            f"preset {args.preset}",
            f"UNet batch {config.unet_train.batch_size}",
            f"bf16 autocast {'on' if runtime.bf16 else 'off'}",
            f"compile {args.compile}",
            f"`{shlex.join(['python', 'bench.py', *argv])}`",
        ]
    )
    names = list(profiles)
    rows = [
        ("wall time per step (ms)", [f"{p.wall_ms:.2f}" for p in profiles.values()]),
        ("host time per step, not waiting for the device (ms)", [f"{p.host_ms:.2f}" for p in profiles.values()]),
        ("device busy share", [f"{100 * p.device_busy:.0f}%" if p.device_busy is not None else "—" for p in profiles.values()]),
        (
            "device idle share",
            [f"{100 * (1 - p.device_busy):.0f}%" if p.device_busy is not None else "—" for p in profiles.values()],
        ),
        (
            "device operations per step (kernels, copies)" if cuda else "top-level CPU ops per step",
            [str(p.operations) for p in profiles.values()],
        ),
    ]
    lines = [header, "", "| per step | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
    for name, result in profiles.items():
        total = sum(ms for _, _, ms in result.top) or 1.0
        lines += ["", f"Top {'kernels' if cuda else 'CPU ops'}, {name} (per step; share of the top {len(result.top)})", ""]
        lines += ["| operation | calls | ms | share |", "|---|---:|---:|---:|"]
        lines += [
            f"| `{op[:80]}` | {count / result.steps:.1f} | {ms / result.steps:.3f} | {100 * ms / total:.0f}% |"
            for op, count, ms in result.top
        ]
    lines += [
        "",
        f"A training step is train.py's UNet step on cached latents ({args.train_steps} profiled after {args.warmup} "
        f"warm-up steps); a sampling step is one guided DDIM step of {args.sample_count} images (one call of "
        f"{args.sample_steps} steps, after a 2-step warm-up). Host time is the profiled span less the time the host "
        "spent waiting for the device (tensor reads, synchronize): close to the wall time, the step is bound by the "
        "host (Python, kernel launches); far below it, by the device.",
    ]
    return "\n".join(lines) + "\n"


def run_profile(config: Config, args: argparse.Namespace, argv: list[str], runtime: Runtime) -> str:
    """Profile our UNet's training step and guided sampling (`--profile`) and return the page."""
    torch.manual_seed(0)
    unet = build_unet(config).to(runtime.device)
    vae = AutoencoderKL(config.vae).to(runtime.device).eval().requires_grad_(False)
    scheduler = NoiseScheduler(config.scheduler)
    trained = prepare_for_training(unet, config, runtime)
    train = unet_training(unet, trained, vae, scheduler, config, runtime, args, on_the_fly=False)
    labels = torch.arange(args.sample_count, device=runtime.device) % config.unet.num_classes

    def sample(steps: int) -> None:
        generator = torch.Generator(runtime.device).manual_seed(0)
        guidance = config.run.guidance_scale
        sample_with_ours(trained, scheduler, config, labels, runtime, steps=steps, guidance_scale=guidance, generator=generator)

    print(f"profiling preset {args.preset} on {device_name(runtime.device)} ({runtime.device}) ...", flush=True)
    if args.warmup:
        train(args.warmup)
    profiles = {"UNet training": profile_steps(lambda: train(args.train_steps), args.train_steps, runtime)}
    sample(min(2, args.sample_steps))
    profiles["guided DDIM sampling"] = profile_steps(lambda: sample(args.sample_steps), args.sample_steps, runtime)
    return profile_report(config, args, argv, runtime, profiles)


# ============================================================================ the diffusers peer


def import_diffusers() -> types.ModuleType:
    """diffusers with the submodule bench.py needs; ImportError when it is not installed."""
    import diffusers
    import diffusers.models.attention

    return diffusers


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DConditionModel behind our UNet's call signature: the label becomes label_tokens
    context tokens from an embedding with an extra "no label" row, exactly as our UNet conditions itself,
    and it works on the same grid of patch_size x patch_size latent patches. It has no slice-position token."""

    def __init__(self, unet: nn.Module, config: UNetConfig):
        super().__init__()
        self.unet = unet
        self.null_label = config.num_classes
        self.tokens = config.label_tokens
        self.label_embedding = nn.Embedding(config.num_classes + 1, config.label_tokens * config.context_dim)
        self.patchify, self.unpatchify = nn.PixelUnshuffle(config.patch_size), nn.PixelShuffle(config.patch_size)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        labels = torch.where(conditions.labels == Conditions.ABSENT, self.null_label, conditions.labels)
        context = self.label_embedding(labels).unflatten(-1, (self.tokens, -1))  # (B, label_tokens, context_dim)
        return self.unpatchify(self.unet(self.patchify(x), timesteps, encoder_hidden_states=context).sample)


def build_peer(diffusers: types.ModuleType, config: UNetConfig, latent_channels: int, latent_side: int) -> DiffusersUNet:
    """UNet2DConditionModel with our widths, depth, attention levels, heads and parameter count."""
    unet = diffusers.UNet2DConditionModel(
        sample_size=latent_side // config.patch_size,
        in_channels=latent_channels * config.patch_size**2,
        out_channels=latent_channels * config.patch_size**2,
        block_out_channels=config.channels,
        layers_per_block=config.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if attention else "DownBlock2D" for attention in config.attention_levels),
        up_block_types=tuple(
            "CrossAttnUpBlock2D" if attention else "UpBlock2D" for attention in reversed(config.attention_levels)
        ),
        mid_block_type="UNetMidBlock2DCrossAttn",  # ours always has a transformer block in the middle
        cross_attention_dim=config.context_dim,
        # diffusers' attention_head_dim is, despite its name, the number of heads (its num_attention_heads is refused).
        attention_head_dim=tuple(width // config.head_dim for width in config.channels),
        use_linear_projection=True,  # our transformer blocks project in and out with Linear, not 1x1 convs
        # one group count for all levels, at least 4 channels per group like ours (which picks it per width)
        norm_num_groups=math.gcd(32, *(width // 4 for width in config.channels)),
        norm_eps=1e-6,
        dropout=config.dropout,
    )
    # Its transformer blocks' feed-forward is GEGLU (dim → 8 dim → dim), ours GELU (dim → 4 dim → dim);
    # diffusers' own GELU FeedForward in its place makes the parameter counts equal.
    for block in unet.modules():
        if isinstance(block, diffusers.models.attention.BasicTransformerBlock):
            block.ff = diffusers.models.attention.FeedForward(block.dim, activation_fn="gelu")
    return DiffusersUNet(unet, config)


def build_peer_scheduler(diffusers: types.ModuleType, config: SchedulerConfig) -> DDIMScheduler:
    """DDIMScheduler on our noise schedule, with our trailing timestep spacing and final ᾱ = 1."""
    beta_schedule = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}[config.beta_schedule]
    return diffusers.DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=beta_schedule,
        prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[config.prediction_type],
        clip_sample=config.clip_sample > 0,
        clip_sample_range=config.clip_sample or 1.0,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )


@torch.no_grad()
def sample_with_ours(
    unet: nn.Module,
    scheduler: NoiseScheduler,
    config: Config,
    labels: torch.Tensor,
    runtime: Runtime,
    *,
    steps: int,
    guidance_scale: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Our guided DDIM loop, as predict.py runs it (Pipeline.sample), on latents only."""
    pipe = Pipeline(config, None, unet, scheduler, runtime)
    return pipe.sample(pipe.conditions(labels), steps=steps, guidance_scale=guidance_scale, sampler="ddim", generator=generator)


@torch.no_grad()
def sample_with_peer(
    peer: nn.Module,
    ddim: DDIMScheduler,
    config: Config,
    labels: torch.Tensor,
    runtime: Runtime,
    *,
    steps: int,
    guidance_scale: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """diffusers' DDIM loop as its pipelines write it, with classifier-free guidance from one batched
    forward; the signature of sample_with_ours, with diffusers' DDIMScheduler in place of ours."""
    peer.eval()
    ddim.set_timesteps(steps, device=runtime.device)
    x = torch.randn((len(labels), *latent_shape(config)), device=runtime.device, generator=generator) * ddim.init_noise_sigma
    conditions = Conditions(labels)
    both = Conditions.cat(conditions, conditions.unconditional())
    with runtime.autocast():
        for t in ddim.timesteps:
            conditional, unconditional = peer(torch.cat([x, x]), t, both).float().chunk(2)
            x = ddim.step(unconditional + guidance_scale * (conditional - unconditional), t, x).prev_sample
    return x


# ============================================================================ the report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "CPU"


def number(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def spread(measurement: Measurement) -> str:
    return f"{number(measurement.median)} ({number(min(measurement.rates))}–{number(max(measurement.rates))})"


PEER_SKIPPED = "diffusers not installed: peer column skipped"


def table_rows(
    config: Config,
    args: argparse.Namespace,
    ours: dict[str, Measurement],
    peer: dict[str, Measurement] | None,
    parameters: dict[str, int],
) -> list[tuple[str, str, str, str]]:
    """(measurement, ours, diffusers, ours / diffusers) for each throughput, each peak memory and the sizes."""
    side = config.data.image_size
    figures = {
        "vae": f"VAE training, {side} px",
        "unet_cached": "UNet training, cached latents",
        "unet_on_the_fly": "UNet training, latents encoded on the fly",
        "sampling": f"DDIM sampling, {args.sample_count} images × {args.sample_steps} steps, guidance {config.run.guidance_scale:g}",
    }
    rows: list[tuple[str, str, str, str]] = []
    for key, name in figures.items():
        theirs = peer.get(key) if peer else None
        ratio = f"{ours[key].median / theirs.median:.2f}x" if theirs else "—"
        rows.append((f"{name} (images/s)", spread(ours[key]), spread(theirs) if theirs else "—", ratio))
    for key, name in figures.items():
        theirs = peer.get(key) if peer else None
        rows.append((f"peak memory, {name} (MiB)", f"{ours[key].peak_mib:.0f}", f"{theirs.peak_mib:.0f}" if theirs else "—", "—"))
    rows.append(("UNet parameters", f"{parameters['ours']:,}", f"{parameters['diffusers']:,}" if peer else "—", "—"))
    rows.append(("VAE parameters", f"{parameters['vae']:,}", "—", "—"))
    return rows


def header_line(config: Config, args: argparse.Namespace, argv: list[str], runtime: Runtime) -> str:
    """Where and how the page was measured, in one line, ending with the command that remakes it."""
    cuda = runtime.device.type == "cuda"
    return " | ".join(
        [
            f"device {device_name(runtime.device)}",
            f"torch {torch.__version__}",
            f"preset {args.preset}",
            f"batch size VAE {config.vae_train.batch_size}, UNet {config.unet_train.batch_size}",
            f"threads {torch.get_num_threads()}",
            f"bf16 autocast VAE {'on' if runtime.with_bf16(config.vae_train.bf16).bf16 else 'off'}, UNet {'on' if runtime.bf16 else 'off'}",
            f"channels_last {'on' if cuda and config.run.channels_last else 'off'}",
            f"compile {args.compile}",
            f"`{shlex.join(['python', 'bench.py', *argv])}`",
        ]
    )


def method_notes(args: argparse.Namespace, runtime: Runtime, with_peer: bool) -> str:
    """How each figure was measured: repeats, what a repeat is, what peak memory counts, what the peer is."""
    memory = (
        "the largest CUDA allocation"
        if runtime.device.type == "cuda"
        else "the largest resident set of the whole process (Python, torch and every model built so far)"
    )
    passes = "2 passes in the order ours, diffusers, diffusers, ours, each of " if with_peer else ""
    return (
        f"Throughput: median (min–max) of {passes}{args.repeats} timed repeats after {args.warmup} untimed warm-up steps. A training "
        f"repeat is {args.train_steps} steps of train.py's loop (autocast, loss, backward, grad clip, AdamW; EMA update for "
        f"the UNet); a sampling repeat is one batch of {args.sample_count} images, cond and uncond in one forward. Random "
        f"tensors stand in for the data. Peak memory: {memory} during the measurement. The peer is diffusers' "
        "UNet2DConditionModel matched to our UNet's widths, blocks, attention levels, heads and parameter count, trained "
        "with the same loop (on-the-fly latents from our frozen VAE encoder in both columns) and sampled with its "
        "DDIMScheduler (trailing spacing)."
    )


def report(
    config: Config,
    args: argparse.Namespace,
    argv: list[str],
    runtime: Runtime,
    ours: dict[str, Measurement],
    peer: dict[str, Measurement] | None,
    parameters: dict[str, int],
    diffusers_version: str | None,
) -> str:
    """The Markdown page: one header line, the table (ours, diffusers, ours / diffusers), how it was measured."""
    columns = ("measurement", "ours", f"diffusers {diffusers_version}", "ours / diffusers") if peer else ("measurement", "ours")
    lines = [
        header_line(config, args, argv, runtime),
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join(["---"] + ["---:"] * (len(columns) - 1)) + " |",
        *("| " + " | ".join(row[: len(columns)]) + " |" for row in table_rows(config, args, ours, peer, parameters)),
        "",
        method_notes(args, runtime, peer is not None),
    ]
    if not peer:
        lines += ["", PEER_SKIPPED + "."]
    return "\n".join(lines) + "\n"


# ============================================================================ main


def output_file(args: argparse.Namespace, config: Config, device: torch.device) -> Path:
    """--out (or its default), checked before anything is timed: outside the preset's dataset folder (not
    read here, but a table written into it would be taken for data), not a folder, replaced only with
    --overwrite; stopped bench.py runs' temporary files beside it removed."""
    out = Path(args.out or f"results/{'profile' if args.profile else 'bench'}_{device.type}.md")
    check_output_paths([config.data.data_dir], files={"--out": out})
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists: add --overwrite to replace it, or choose another --out")
    remove_temporary_files(out.parent)
    return out


Denoisers = dict[str, tuple[nn.Module, Callable[..., torch.Tensor], "NoiseScheduler | DDIMScheduler"]]


def build_denoisers(config: Config, diffusers: object | None) -> Denoisers:
    """Each denoiser, with the sampler and scheduler it is sampled with, built on the CPU (it goes to
    the device for its turn): ours, and diffusers' matched UNet where diffusers is installed."""
    torch.manual_seed(0)
    scheduler = NoiseScheduler(config.scheduler)
    unets: Denoisers = {"ours": (build_unet(config), sample_with_ours, scheduler)}
    if diffusers is not None:
        unets["diffusers"] = (
            build_peer(diffusers, config.unet, config.vae.latent_channels, latent_shape(config)[-1]),
            sample_with_peer,
            build_peer_scheduler(diffusers, config.scheduler),
        )
    return unets


def measure_denoisers(
    unets: Denoisers, vae: AutoencoderKL, config: Config, runtime: Runtime, args: argparse.Namespace
) -> dict[str, dict[str, Measurement]]:
    """Every figure of every denoiser: the VAE's training (ours only), then each UNet's training and sampling."""
    print("VAE training ...", flush=True)
    vae_runtime = runtime.with_bf16(config.vae_train.bf16)
    figures: dict[str, dict[str, Measurement]] = {"ours": {"vae": time_vae_training(vae, config, vae_runtime, args)}}
    vae.eval().requires_grad_(False)  # from here on the frozen encoder of the on-the-fly UNet figures
    scheduler = unets["ours"][2]
    # ABBA order (ours, diffusers, diffusers, ours), repeats pooled: a drift in the machine's speed
    # (clock boost, heat, allocator state) falls on both alike; measured one after the other, the
    # same two models came out 0.84x apart on this CPU, interleaved 1.0x.
    order = list(unets) + list(reversed(unets)) if len(unets) > 1 else list(unets)
    for name in order:
        print(f"{name}:", flush=True)
        unet, sample, sampling_scheduler = unets[name]
        measured = time_unet(unet.to(runtime.device), sample, sampling_scheduler, vae, scheduler, config, runtime, args)
        unet.to("cpu")  # so the other model's peak memory holds none of this one's weights
        gc.collect()
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
        earlier = figures.setdefault(name, {})
        earlier.update({key: earlier[key].pooled(m) if key in earlier else m for key, m in measured.items()})
    return figures


def publish(page: str, out: Path) -> None:
    print(page)
    with usage_errors_exit():
        write_text_atomic(out, page)
    print(f"saved {out}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with usage_errors_exit():
        config = bench_config(args)
        device = pick_device(args.device)
        out = output_file(args, config, device)
    runtime = Runtime(device).with_bf16(config.unet_train.bf16)  # the UNet's training and sampling; the VAE's is its own
    if args.profile:
        publish(run_profile(config, args, argv, runtime), out)
        return
    try:
        diffusers = import_diffusers()
    except ImportError:
        diffusers = None
        print(PEER_SKIPPED)
    unets = build_denoisers(config, diffusers)
    parameters = {name: count_parameters(unet) for name, (unet, _, _) in unets.items()}
    vae = AutoencoderKL(config.vae).to(device)
    parameters["vae"] = count_parameters(vae)
    print("UNet parameters: " + " | ".join(f"{name} {parameters[name]:,}" for name in unets))
    print(f"benchmarking preset {args.preset} on {device_name(device)} ({device}) ...", flush=True)
    figures = measure_denoisers(unets, vae, config, runtime, args)
    version = diffusers.__version__ if diffusers is not None else None
    publish(report(config, args, argv, runtime, figures["ours"], figures.get("diffusers"), parameters, version), out)


if __name__ == "__main__":
    main()
