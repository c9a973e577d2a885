"""Generate AD or NC brain slices from a trained run, and show how (denoising sequence) and whether
the label conditioning works (UMAP of UNet bottleneck features with a label-swap control).

    python predict.py --label AD                          # 16 AD slices from the latest run
    python predict.py --label both --num-samples 64 --out results --sequence --umap --real

Sampling uses the EMA weights, batched classifier-free guidance and no autograd (bf16 on CUDA).
The same settings and seed give the same images; samples.json records them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset import CLASS_NAMES, index_dataset, prepare_image, read_image, to_model_range
from modules import EMA, AutoencoderKL, NoiseScheduler, UNet
from train import (
    Config,
    Runtime,
    decode_latents,
    latent_shape,
    load_stage_checkpoint,
    load_trained_vae,
    load_weights,
    normalise_slices,
    read_config,
    sample_latents,
)
from utils import (
    ArgumentParser,
    UsageError,
    new_figure,
    pick_device,
    save_figure,
    save_image_grid,
    save_png,
    to_uint8,
    usage_errors_exit,
    write_json_atomic,
)

UMAP_TIMESTEP = 250  # features of moderately noised latents: the image still dominates the input


@dataclass
class LoadedRun:
    """Everything needed to sample from a run: its config and frozen models (UNet with EMA weights)."""

    run_dir: Path
    config: Config
    vae: AutoencoderKL
    unet: UNet
    scheduler: NoiseScheduler
    slice_range: tuple[int, int]
    epoch: int


def latest_run(runs_root: Path = Path("runs")) -> Path:
    """The run folder whose unet.pt was written last."""
    candidates = sorted(runs_root.glob("*/unet.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UsageError(f"no trained run in {runs_root}/: train one with `python train.py --preset demo` or pass --run")
    return candidates[-1].parent


def load_run(run_dir: Path, device: torch.device) -> LoadedRun:
    """Load a finished run's config, VAE and EMA UNet; one-line errors for anything missing or foreign."""
    if not run_dir.is_dir():
        raise UsageError(f"run folder {run_dir} not found: pass --run runs/NAME")
    config = read_config(run_dir)
    vae = load_trained_vae(config, run_dir, device)
    path = run_dir / "unet.pt"
    if not path.is_file():
        raise UsageError(f"{run_dir} has no unet.pt: train stage 2 with `python train.py --run {run_dir} --stage unet`")
    state = load_stage_checkpoint(path, "unet", config, device)
    unet = UNet(config.unet).to(device)
    load_weights(unet, state["model"], path)
    ema = EMA(unet)
    ema.load_state_dict(state["ema"])
    ema.copy_to(unet)
    unet.eval().requires_grad_(False)
    return LoadedRun(run_dir, config, vae, unet, NoiseScheduler(config.scheduler), tuple(state["slice_range"]), state["epoch"])


def parse_label(text: str) -> list[int]:
    """`0`, `1`, `AD`, `NC` (any case) or `both` → label list."""
    key = text.strip().upper()
    if key == "BOTH":
        return list(range(len(CLASS_NAMES)))
    if key in CLASS_NAMES:
        return [CLASS_NAMES.index(key)]
    if key.isdigit() and int(key) < len(CLASS_NAMES):
        return [int(key)]
    raise UsageError(f"unknown label {text!r}: use 0 or AD (Alzheimer's), 1 or NC (normal control), or both")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", action="append", required=True, help="0/AD, 1/NC or both; repeatable")
    parser.add_argument("--run", type=Path, help="run folder (default: the run whose unet.pt is newest in runs/)")
    parser.add_argument("--num-samples", type=int, default=16, help="images per label (default 16)")
    parser.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 50 for DDIM, all T for DDPM)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--slice", type=int, help="slice index to condition on (runs trained with slice conditioning)")
    parser.add_argument("--out", type=Path, help="output folder (default: <run>/generated)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--sequence", action="store_true", help="also write denoising_sequence.png")
    parser.add_argument("--real", action="store_true", help="also write real test slices of each label (real_AD.png ...)")
    parser.add_argument("--umap", action="store_true", help="also write umap.png and umap_scores.json")
    parser.add_argument("--umap-count", type=int, default=200, help="real test slices per label in the UMAP (default 200)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist in --out")
    return parser


def check_arguments(args) -> list[int]:
    labels = list(dict.fromkeys(label for text in args.label for label in parse_label(text)))
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and args.guidance < 0:
        raise UsageError(f"--guidance must be 0 or more (1 = no guidance), got {args.guidance}")
    if not 0.0 <= args.eta <= 1.0:
        raise UsageError(f"--eta must be in [0, 1], got {args.eta}")
    for name in ("num_samples", "batch_size", "umap_count"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder: choose a folder path")
    return labels


def planned_outputs(args, labels: list[int], out: Path) -> list[Path]:
    names = ["samples.json"]
    for label in labels:
        name = CLASS_NAMES[label]
        names += [f"samples_{name}.png"] + [f"{name}/{name}_{i:04d}.png" for i in range(args.num_samples)]
        if args.real:
            names.append(f"real_{name}.png")
    if args.sequence:
        names.append("denoising_sequence.png")
    if args.umap:
        names += ["umap.png", "umap_scores.json"]
    return [out / name for name in names]


def batch_generator(seed: int, label: int, batch_index: int, device: torch.device) -> torch.Generator:
    """Each batch has its own seed, so any image is regenerated from (seed, label, batch size) alone."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + label * 10_007 + batch_index)


def generate_label(run: LoadedRun, label: int, args, runtime: Runtime, slice_position: float | None) -> torch.Tensor:
    """`args.num_samples` latents of one label, in batches (B, C_z, h, w)."""
    latents = []
    batches = range(0, args.num_samples, args.batch_size)
    for batch_index, start in enumerate(tqdm(batches, desc=f"sampling {CLASS_NAMES[label]}", leave=False)):
        count = min(args.batch_size, args.num_samples - start)
        labels = torch.full((count,), label, dtype=torch.long, device=runtime.device)
        positions = None if slice_position is None else torch.full((count,), slice_position, device=runtime.device)
        latents.append(sample_latents(run.unet, run.scheduler, run.config, labels, runtime, steps=args.steps,
                                      guidance_scale=args.guidance, sampler=args.sampler, eta=args.eta,
                                      slice_position=positions,
                                      generator=batch_generator(args.seed, label, batch_index, runtime.device)))
    return torch.cat(latents)


def save_denoising_sequence(run: LoadedRun, labels: list[int], args, runtime: Runtime, path: Path,
                            slice_position: float | None, columns: int = 8) -> None:
    """Rows: a few samples per label; columns: decoded x0-estimates from pure noise to the final image."""
    per_label = 2
    label_tensor = torch.tensor([label for label in labels for _ in range(per_label)], device=runtime.device)
    positions = None
    if run.config.unet.slice_conditioning:  # mid-range slice unless --slice chose one, as the sample grids do
        positions = torch.full((len(label_tensor),), 0.5 if slice_position is None else slice_position, device=runtime.device)
    generator = batch_generator(args.seed, len(CLASS_NAMES), 0, runtime.device)
    steps = list(run.scheduler.sample_steps(run.unet, (len(label_tensor), *latent_shape(run.config)), label_tensor,
                                            sampler=args.sampler, num_steps=args.steps, eta=args.eta,
                                            guidance_scale=args.guidance, slice_position=positions,
                                            generator=generator, device=runtime.device))
    shown = np.unique(np.linspace(0, len(steps) - 1, columns).round().astype(int))
    frames = [decode_latents(run.vae, steps[i][2].float(), runtime) for i in shown]  # x0-estimates
    frames[-1] = decode_latents(run.vae, steps[-1][1].float(), runtime)  # the final sample itself
    figure, axes = new_figure(len(label_tensor), len(shown), figsize=(1.6 * len(shown), 1.7 * len(label_tensor)), squeeze=False)
    for column, (index, frame) in enumerate(zip(shown, frames)):
        for row in range(len(label_tensor)):
            axes[row][column].imshow(to_uint8(frame[row : row + 1])[0], cmap="gray", vmin=0, vmax=255)
            axes[row][column].set_xticks([])
            axes[row][column].set_yticks([])
            if row == 0:
                axes[row][column].set_title(f"t={steps[index][0]}" if column < len(shown) - 1 else "final", fontsize=9)
            if column == 0:
                axes[row][column].set_ylabel(CLASS_NAMES[int(label_tensor[row])], fontsize=9)
    figure.suptitle(f"Denoising sequence ({args.sampler}, {args.steps} steps): decoded x0-estimates", fontsize=10)
    save_figure(figure, path)


def real_test_slices(config: Config, label: int, count: int, seed: int) -> torch.Tensor:
    """`count` random test slices of one label, prepared as in training: (N, 1, S, S) in [-1, 1]."""
    records = [r for r in index_dataset(config.data.data_dir).records if r.split == "test" and r.label == label]
    chosen = np.random.default_rng(seed).choice(len(records), size=min(count, len(records)), replace=False)
    pixels = np.stack([prepare_image(read_image(records[i].path), config.data.image_size) for i in sorted(chosen)])
    return to_model_range(torch.from_numpy(pixels).unsqueeze(1))


@torch.no_grad()
def bottleneck_features(run: LoadedRun, latents: torch.Tensor, labels: torch.Tensor, runtime: Runtime, seed: int) -> torch.Tensor:
    """UNet middle-block features (N, D) of latents noised to UMAP_TIMESTEP with fixed noise."""
    generator = torch.Generator(runtime.device).manual_seed(seed)
    features = []
    for chunk in torch.arange(len(latents)).split(128):
        z = latents[chunk].to(runtime.device)
        noise = torch.randn(z.shape, generator=generator, device=runtime.device)
        t = torch.full((len(z),), UMAP_TIMESTEP, device=runtime.device, dtype=torch.long)
        slices = torch.full((len(z),), 0.5, device=runtime.device) if run.config.unet.slice_conditioning else None
        with runtime.autocast():
            _, feature = run.unet(run.scheduler.add_noise(z, noise, t), t, labels[chunk].to(runtime.device), slices,
                                  return_features=True)
        features.append(feature.float().cpu())
    return torch.cat(features)


@torch.no_grad()
def encode_images(run: LoadedRun, images: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Images → scaled posterior-mean latents, as the UNet saw them in training."""
    latents = []
    for chunk in images.split(64):
        with runtime.autocast():
            mean, _ = run.vae.encode(chunk.to(runtime.device))
        latents.append(mean.float() * run.vae.scale_factor)
    return torch.cat(latents)


def umap_report(run: LoadedRun, generated: dict[int, torch.Tensor], args, runtime: Runtime, out: Path) -> dict:
    """UMAP of bottleneck features for real test latents (true labels), generated latents (asked-for
    labels) and, as a control, the same real latents with the labels swapped.

    If the control separates by the *passed* label as well as the real set does by the true one,
    the separation comes from the label token, not from the images (the original's flaw)."""
    import umap
    from sklearn.metrics import silhouette_score

    real_images, real_labels = [], []
    for label in range(len(CLASS_NAMES)):
        images = real_test_slices(run.config, label, args.umap_count, args.seed)
        real_images.append(images)
        real_labels.append(torch.full((len(images),), label, dtype=torch.long))
    real_latents, real_labels = encode_images(run, torch.cat(real_images), runtime), torch.cat(real_labels)
    generated_latents = torch.cat(list(generated.values()))
    generated_labels = torch.cat([torch.full((len(z),), label, dtype=torch.long) for label, z in generated.items()])
    groups = {
        "real (true label)": (real_latents, real_labels),
        "generated (asked-for label)": (generated_latents, generated_labels),
        "control: real, labels swapped": (real_latents, 1 - real_labels),
    }
    features = {name: bottleneck_features(run, z, labels, runtime, args.seed) for name, (z, labels) in groups.items()}
    stacked = torch.cat(list(features.values())).numpy()
    embedding = umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=args.seed).fit_transform(stacked)

    figure, axes = new_figure(1, len(groups), figsize=(5 * len(groups), 4.6), squeeze=False)
    scores, start = {}, 0
    for axis, (name, (_, labels)) in zip(axes[0], groups.items()):
        points = embedding[start : start + len(labels)]
        start += len(labels)
        labels_np = labels.numpy()
        separable = len(np.unique(labels_np)) > 1
        scores[name] = {
            "silhouette_umap": float(silhouette_score(points, labels_np)) if separable else None,
            "silhouette_features": float(silhouette_score(features[name].numpy(), labels_np)) if separable else None,
            "count": len(labels_np),
        }
        axis.scatter(embedding[:, 0], embedding[:, 1], s=3, c="lightgrey")
        for label, color in zip(range(len(CLASS_NAMES)), ("tab:red", "tab:blue")):
            chosen = points[labels_np == label]
            axis.scatter(chosen[:, 0], chosen[:, 1], s=6, c=color, label=f"{CLASS_NAMES[label]} (label {label})")
        silhouette = scores[name]["silhouette_umap"]
        axis.set_title(f"{name}\nsilhouette {silhouette:.2f}" if silhouette is not None else name, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(fontsize=8, loc="best")
    figure.suptitle(f"UNet bottleneck features at t={UMAP_TIMESTEP} (UMAP fit on all points; grey = all)", fontsize=11, y=1.04)
    save_figure(figure, out / "umap.png")
    report = {"timestep": UMAP_TIMESTEP, "groups": scores}
    write_json_atomic(out / "umap_scores.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with usage_errors_exit():
        labels = check_arguments(args)
        device = pick_device(args.device)
        runtime = Runtime(device, bf16=device.type == "cuda")
        run = load_run(args.run or latest_run(), device)
        args.steps = args.steps or (50 if args.sampler == "ddim" else run.scheduler.num_train_timesteps)
        args.guidance = run.config.run.guidance_scale if args.guidance is None else args.guidance
        slice_position = None
        if args.slice is not None:
            if not run.config.unet.slice_conditioning:
                raise UsageError(f"--slice: {run.run_dir} was trained without slice conditioning; drop --slice")
            slice_position = float(normalise_slices(torch.tensor([args.slice]), run.slice_range))
        out = args.out or run.run_dir / "generated"
        existing = [p for p in planned_outputs(args, labels, out) if p.exists()]
        if existing and not args.overwrite:
            raise UsageError(f"{existing[0]} already exists (and {len(existing) - 1} more): add --overwrite or choose another --out")
        if args.real or args.umap:
            index_dataset(run.config.data.data_dir)  # fail early, before sampling, if the data moved

    torch.manual_seed(args.seed)
    print(f"run {run.run_dir} (epoch {run.epoch}) | {args.sampler} {args.steps} steps | guidance {args.guidance} | device {device}")
    generated, records = {}, []
    started = time.perf_counter()
    for label in labels:
        latents = generate_label(run, label, args, runtime, slice_position)
        images = decode_latents(run.vae, latents, runtime).cpu()
        generated[label] = latents.cpu()
        name = CLASS_NAMES[label]
        save_image_grid(images[:64], out / f"samples_{name}.png", ncols=8)
        for index, image in enumerate(to_uint8(images)):
            save_png(image, out / name / f"{name}_{index:04d}.png")
            records.append({"file": f"{name}/{name}_{index:04d}.png", "label": label, "class": name,
                            "index": index, "batch": index // args.batch_size})
    elapsed = time.perf_counter() - started
    total = args.num_samples * len(labels)
    print(f"generated {total} images in {elapsed:.1f} s ({total / elapsed:.1f} images/s, decoding included) → {out}")
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    write_json_atomic(out / "samples.json", {"run": str(run.run_dir), "run_epoch": run.epoch, "settings": settings,
                                             "seconds": round(elapsed, 3), "images": records})
    if args.real:
        for label in labels:
            save_image_grid(real_test_slices(run.config, label, min(args.num_samples, 64), args.seed),
                            out / f"real_{CLASS_NAMES[label]}.png", ncols=8)
    if args.sequence:
        save_denoising_sequence(run, labels, args, runtime, out / "denoising_sequence.png", slice_position)
    if args.umap:
        report = umap_report(run, generated, args, runtime, out)
        for name, score in report["groups"].items():
            print(f"UMAP silhouette, {name}: {score['silhouette_umap']}")


if __name__ == "__main__":
    main()
