"""Generate AD or NC brain slices from a trained run, and show how (denoising sequence) and whether
the label conditioning works (UMAP of UNet bottleneck features with a label-swap control).

    python predict.py --label AD                          # 16 AD slices from the latest run
    python predict.py --label both --num-samples 64 --out results --sequence --umap --real
    python predict.py --counterfactual data/demo/AD_NC/test/NC --to AD --out cf   # the same slices as AD

Sampling uses the EMA weights, batched classifier-free guidance and no autograd (bf16 on CUDA).
The same settings and seed give the same images; samples.json records them.

--counterfactual shows given slices with the other diagnosis (counterfactual.py): per slice its
source, VAE reconstruction, counterfactual and signed difference map (counterfactual minus
reconstruction; blue darker, red brighter; one scale for all), one grid (counterfactuals.png) and
counterfactuals.json with every setting, the seed and each slice's CSF-dark share before and after.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from config import CLASS_NAMES, COMPILE_MODES, Config, latent_shape
from counterfactual import (
    DEFAULT_GUIDANCE,
    DEFAULT_METHOD,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    INVERSION_ITERATIONS,
    METHODS,
    check_strength,
    difference_colours,
    difference_maps,
    label_from_path,
    make_counterfactuals,
    read_originals,
    save_image_table,
    shared_scale,
    slice_files,
    slice_positions,
)
from counterfactual import Settings as CounterfactualSettings
from dataset import UnreadableImageError, csf_dark_shares, index_dataset, prepare_image, read_image, to_model_range
from modules import SAMPLERS, compile_model
from pipeline import (
    Pipeline,
    batch_generator,
    check_sampling_options,
    dataset_folders,
    load_run_for,
    normalise_slices,
    sampling_options,
)
from utils import (
    ArgumentParser,
    UsageError,
    check_output_paths,
    new_figure,
    remove_temporary_files,
    report_removed,
    save_figure,
    save_image_grid,
    save_png,
    to_uint8,
    umap_embedding,
    usage_errors_exit,
    write_json_atomic,
)

UMAP_TIMESTEP = 250  # features of moderately noised latents: the image still dominates the input


def parse_label(text: str) -> list[int]:
    """`0`, `1`, `AD`, `NC` (any case) or `both` → label list."""
    key = text.strip().upper()
    if key == "BOTH":
        return list(range(len(CLASS_NAMES)))
    if key in CLASS_NAMES:
        return [CLASS_NAMES.index(key)]
    if key.isascii() and key.isdigit() and int(key) < len(CLASS_NAMES):  # str.isdigit alone also takes "²"
        return [int(key)]
    raise UsageError(f"unknown label {text!r}: use 0 or AD (Alzheimer's), 1 or NC (normal control), or both")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", action="append", help="0/AD, 1/NC or both; repeatable (or --counterfactual)")
    parser.add_argument("--run", type=Path, help="run folder (default: the run whose unet.pt is newest in runs/)")
    parser.add_argument("--num-samples", type=int, default=16, help="images per label (default 16)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), help="how to sample (default: the run's run.sampler)")
    parser.add_argument(
        "--steps", type=int, help="sampling steps (default: the run's run.sample_steps; another --sampler: 50, ddpm all)"
    )
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the run's)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--slice", type=int, help="slice index to condition on (runs trained with slice conditioning)")
    parser.add_argument("--out", type=Path, help="output folder (default: <run>/generated)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="none",
        help="torch.compile the UNet for sampling (default none; reduce-overhead replays each step as a CUDA graph)",
    )
    parser.add_argument("--sequence", action="store_true", help="also write denoising_sequence.png")
    parser.add_argument("--real", action="store_true", help="also write real test slices of each label (real_AD.png ...)")
    parser.add_argument("--umap", action="store_true", help="also write umap.png and umap_scores.json")
    parser.add_argument("--umap-count", type=int, default=200, help="real test slices per label in the UMAP (default 200)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist in --out")
    edit = parser.add_argument_group(
        "counterfactuals: the same slices with another diagnosis (default --out <run>/counterfactuals)"
    )
    edit.add_argument(
        "--counterfactual", nargs="+", type=Path, metavar="PATH", help="slice files or folders of them, instead of --label"
    )
    edit.add_argument("--to", help="AD or NC: the diagnosis to show them with")
    edit.add_argument(
        "--from", dest="source", help="AD or NC: their own diagnosis (default: a folder named AD or NC, else unknown)"
    )
    edit.add_argument(
        "--strength", type=float, help=f"share of the noise schedule they are carried to, in (0, 1] (default {DEFAULT_STRENGTH})"
    )
    edit.add_argument(
        "--method",
        choices=METHODS,
        help=f"how they get there (default {DEFAULT_METHOD}); --guidance defaults to {DEFAULT_GUIDANCE:g}, --steps (DDIM) to {DEFAULT_STEPS}",
    )
    return parser


COUNTERFACTUAL_OPTIONS = {"--to": "to", "--from": "source", "--strength": "strength", "--method": "method"}
SAMPLING_ONLY = {"--label": "label", "--sequence": "sequence", "--real": "real", "--umap": "umap", "--slice": "slice"}


def parse_diagnosis(text: str, option: str) -> int:
    """`AD`/`0` or `NC`/`1` (any case) → label: parse_label's one-label answers."""
    try:
        labels = parse_label(text)
    except UsageError:
        labels = []
    if len(labels) != 1:
        raise UsageError(f"{option} {text!r}: use AD (or 0) or NC (or 1)")
    return labels[0]


def check_counterfactual_arguments(args) -> None:
    """--counterfactual's options only with it, sampling's only without; --to given; --from, --strength
    and --method resolved to their values or defaults."""
    given = [option for option, field in COUNTERFACTUAL_OPTIONS.items() if getattr(args, field) is not None]
    if args.counterfactual is None:
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --counterfactual PATH ...: add it, or drop them")
        return
    clashing = [option for option, field in SAMPLING_ONLY.items() if getattr(args, field) not in (None, False)]
    if clashing:
        raise UsageError(f"{', '.join(clashing)} do not apply with --counterfactual, which edits the slices it is given")
    if args.to is None:
        raise UsageError("--counterfactual needs --to AD or --to NC: the diagnosis to show the slices with")
    if args.sampler not in (None, "ddim") or args.eta != 0:
        raise UsageError(
            "counterfactuals denoise with deterministic DDIM (the inversion's mirror image): drop --sampler and --eta"
        )
    args.to = parse_diagnosis(args.to, "--to")
    args.source = None if args.source is None else parse_diagnosis(args.source, "--from")
    args.strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    check_strength(args.strength)
    args.method = args.method or DEFAULT_METHOD
    args.guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    args.steps = args.steps or DEFAULT_STEPS


def check_arguments(args) -> list[int]:
    check_counterfactual_arguments(args)
    if args.counterfactual is None and not args.label:
        raise UsageError("give --label AD, NC or both to sample, or --counterfactual PATH ... --to AD|NC to edit slices")
    labels = list(dict.fromkeys(label for text in args.label or [] for label in parse_label(text)))
    check_sampling_options(args)
    if not 0.0 <= args.eta <= 1.0:
        raise UsageError(f"--eta must be in [0, 1], got {args.eta}")
    if args.umap_count < 1:
        raise UsageError(f"--umap-count must be at least 1, got {args.umap_count}")
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


def check_outputs(pipe: Pipeline, args, labels: list[int], out: Path) -> None:
    """Before any sampling: the outputs (utils.check_output_paths: none inside the run's dataset, each
    a folder or a file as meant), none that exists unless --overwrite, and test slices of every
    label that --real or --umap shows."""
    planned = planned_outputs(args, labels, out)
    check_output_paths(
        dataset_folders(pipe.config),
        folders={"--out": out, **{f"--out's {CLASS_NAMES[label]} folder": out / CLASS_NAMES[label] for label in labels}},
        files={f"--out's {path.relative_to(out)}": path for path in planned},
    )
    existing = [path for path in planned if path.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]} already exists (and {len(existing) - 1} more): add --overwrite or choose another --out")
    if args.real or args.umap:
        records = index_dataset(pipe.config.data.data_dir).records
        for label in labels if not args.umap else range(len(CLASS_NAMES)):
            if not any(record.split == "test" and record.label == label for record in records):
                raise UsageError(
                    f"{pipe.config.data.data_dir} has no {CLASS_NAMES[label]} test slices to show beside the samples "
                    f"(--real, --umap): add them to its test/{CLASS_NAMES[label]} folder, or drop --real and --umap"
                )


def clear_single_images(out: Path, labels: list[int]) -> int:
    """With --overwrite: delete the single images an earlier call wrote for these labels, so a call
    with fewer samples leaves no stale ones behind. Returns how many were deleted."""
    stale = [path for label in labels for path in (out / CLASS_NAMES[label]).glob(f"{CLASS_NAMES[label]}_*.png")]
    for path in stale:
        path.unlink()
    return len(stale)


def save_denoising_sequence(
    pipe: Pipeline, labels: list[int], args, path: Path, slice_position: float | None, columns: int = 8
) -> None:
    """Rows: a few samples per label; columns: decoded x0-estimates from pure noise to the final image."""
    per_label = 2
    conditions = pipe.conditions(torch.tensor([label for label in labels for _ in range(per_label)]), slice_position)
    generator = batch_generator(args.seed, len(CLASS_NAMES), 0, pipe.runtime.device)
    steps = list(
        pipe.scheduler.sample_steps(
            pipe.unet,
            (len(conditions), *latent_shape(pipe.config)),
            conditions,
            sampler=args.sampler,
            num_steps=args.steps,
            eta=args.eta,
            guidance_scale=args.guidance,
            generator=generator,
            device=pipe.runtime.device,
        )
    )
    shown = np.unique(np.linspace(0, len(steps) - 1, columns).round().astype(int))
    frames = [pipe.decode(steps[i][2].float()) for i in shown]  # x0-estimates
    frames[-1] = pipe.decode(steps[-1][1].float())  # the final sample itself
    rows = len(conditions)
    figure, axes = new_figure(rows, len(shown), figsize=(1.6 * len(shown), 1.7 * rows), squeeze=False)
    for column, (index, frame) in enumerate(zip(shown, frames)):
        for row in range(rows):
            axes[row][column].imshow(to_uint8(frame[row : row + 1])[0], cmap="gray", vmin=0, vmax=255)
            axes[row][column].set_xticks([])
            axes[row][column].set_yticks([])
            if row == 0:
                axes[row][column].set_title(f"t={steps[index][0]}" if column < len(shown) - 1 else "final", fontsize=9)
            if column == 0:
                axes[row][column].set_ylabel(CLASS_NAMES[int(conditions.labels[row])], fontsize=9)
    figure.suptitle(f"Denoising sequence ({args.sampler}, {args.steps} steps): decoded x0-estimates", fontsize=10)
    save_figure(figure, path)


def real_test_slices(config: Config, label: int, count: int, seed: int) -> torch.Tensor:
    """Up to `count` random test slices of one label, prepared as in training: (N, 1, S, S) in [-1, 1];
    unreadable ones are reported and left out."""
    records = [r for r in index_dataset(config.data.data_dir).records if r.split == "test" and r.label == label]
    chosen = np.random.default_rng(seed).choice(len(records), size=min(count, len(records)), replace=False)
    pixels = []
    for position in sorted(chosen):
        try:
            pixels.append(prepare_image(read_image(records[position].path), config.data.image_size))
        except UnreadableImageError as error:
            print(f"skipped an unreadable test slice: {error}")
    if not pixels:
        raise UsageError(
            f"no readable {CLASS_NAMES[label]} test slices in {config.data.data_dir}: "
            f"check the dataset with python project_setup.py --data-dir {config.data.data_dir}"
        )
    return to_model_range(torch.from_numpy(np.stack(pixels)).unsqueeze(1))


@torch.no_grad()
def bottleneck_features(pipe: Pipeline, latents: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """UNet middle-block features (N, D) of latents noised to UMAP_TIMESTEP with fixed noise."""
    device = pipe.runtime.device
    generator = torch.Generator(device).manual_seed(seed)
    features = []
    for chunk in torch.arange(len(latents)).split(128):
        z = latents[chunk].to(device)
        noise = torch.randn(z.shape, generator=generator, device=device)
        t = torch.full((len(z),), UMAP_TIMESTEP, device=device, dtype=torch.long)
        with pipe.runtime.autocast():
            _, feature = pipe.unet(pipe.scheduler.add_noise(z, noise, t), t, pipe.conditions(labels[chunk]), return_features=True)
        features.append(feature.float().cpu())
    return torch.cat(features)


def umap_report(pipe: Pipeline, generated: dict[int, torch.Tensor], args, out: Path) -> dict:
    """UMAP of bottleneck features for real test latents (true labels), generated latents (asked-for
    labels) and, as a control, the same real latents with the labels swapped.

    If the control separates by the *passed* label as well as the real set does by the true one,
    the separation comes from the label token, not from the images (the original's flaw)."""
    from sklearn.metrics import silhouette_score

    real_images, real_labels = [], []
    for label in range(len(CLASS_NAMES)):
        images = real_test_slices(pipe.config, label, args.umap_count, args.seed)
        real_images.append(images)
        real_labels.append(torch.full((len(images),), label, dtype=torch.long))
    real_latents, real_labels = pipe.encode(torch.cat(real_images)), torch.cat(real_labels)
    generated_latents = torch.cat(list(generated.values()))
    generated_labels = torch.cat([torch.full((len(z),), label, dtype=torch.long) for label, z in generated.items()])
    groups = {
        "real (true label)": (real_latents, real_labels),
        "generated (asked-for label)": (generated_latents, generated_labels),
        "control: real, labels swapped": (real_latents, 1 - real_labels),
    }
    features = {name: bottleneck_features(pipe, z, labels, args.seed) for name, (z, labels) in groups.items()}
    stacked = torch.cat(list(features.values())).numpy()
    embedding = umap_embedding(stacked, args.seed)

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


def write_outputs(pipe: Pipeline, labels: list[int], args, out: Path, slice_position: float | None) -> None:
    """Generate, save and report everything the options ask for."""
    report_removed(sum(remove_temporary_files(folder) for folder in (out, *(out / CLASS_NAMES[label] for label in labels))), out)
    if args.overwrite and clear_single_images(out, labels):
        print(f"--overwrite: removed the earlier single images of {', '.join(CLASS_NAMES[label] for label in labels)} in {out}")
    torch.manual_seed(args.seed)
    print(
        f"run {pipe.run_dir} (epoch {pipe.epoch}) | {args.sampler} {args.steps} steps | guidance {args.guidance} | device {pipe.runtime.device}"
    )
    generated, records = {}, []
    started = time.perf_counter()
    for label in labels:
        latents = pipe.generate(label, args.num_samples, **sampling_options(args), eta=args.eta, slice_position=slice_position)
        images = pipe.decode(latents).cpu()
        generated[label] = latents.cpu()
        name = CLASS_NAMES[label]
        save_image_grid(images[:64], out / f"samples_{name}.png", ncols=8)
        for index, image in enumerate(to_uint8(images)):
            save_png(image, out / name / f"{name}_{index:04d}.png")
            records.append(
                {
                    "file": f"{name}/{name}_{index:04d}.png",
                    "label": label,
                    "class": name,
                    "index": index,
                    "batch": index // args.batch_size,
                }
            )
    elapsed = time.perf_counter() - started
    total = args.num_samples * len(labels)
    print(f"generated {total} images in {elapsed:.1f} s ({total / elapsed:.1f} images/s, decoding included) → {out}")
    editing = {"counterfactual", *COUNTERFACTUAL_OPTIONS.values()}  # --counterfactual's options, unused here
    settings = {
        key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items() if key not in editing
    }
    write_json_atomic(
        out / "samples.json",
        {
            "run": str(pipe.run_dir),
            "run_epoch": pipe.epoch,
            "settings": settings,
            "seconds": round(elapsed, 3),
            "images": records,
        },
    )
    if args.real:
        for label in labels:
            save_image_grid(
                real_test_slices(pipe.config, label, min(args.num_samples, 64), args.seed),
                out / f"real_{CLASS_NAMES[label]}.png",
                ncols=8,
            )
    if args.sequence:
        save_denoising_sequence(pipe, labels, args, out / "denoising_sequence.png", slice_position)
    if args.umap:
        report = umap_report(pipe, generated, args, out)
        for name, score in report["groups"].items():
            print(f"UMAP silhouette, {name}: {score['silhouette_umap']}")


COUNTERFACTUAL_KINDS = ("source", "reconstruction", "counterfactual", "difference")
GRID_SLICES = 32  # rows of counterfactuals.png; every slice has its own files


def slice_outputs(files: list[Path], out: Path) -> list[dict[str, Path]]:
    """Per input slice, kind → its file: <index>_<name>_<kind>.png (the index keeps same-named slices apart)."""
    return [
        {kind: out / f"{index:04d}_{path.stem}_{kind}.png" for kind in COUNTERFACTUAL_KINDS} for index, path in enumerate(files)
    ]


def check_counterfactual_outputs(pipe: Pipeline, files: list[Path], args, out: Path) -> None:
    """Before any editing: no output inside the run's dataset or the folders the slices come from,
    and none that exists unless --overwrite."""
    planned = [out / "counterfactuals.json", out / "counterfactuals.png"]
    planned += [path for outputs in slice_outputs(files, out) for path in outputs.values()]
    read = [*dataset_folders(pipe.config), *(path if path.is_dir() else path.parent for path in args.counterfactual)]
    check_output_paths(read, folders={"--out": out}, files={f"--out's {path.name}": path for path in planned})
    existing = [path for path in planned if path.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]} already exists (and {len(existing) - 1} more): add --overwrite or choose another --out")


def save_counterfactual_slices(
    files: list[Path], images: dict[str, np.ndarray], sources: list[int | None], args, out: Path
) -> list[dict]:
    """Each slice's four images (kind → uint8 (N, S, S), the difference (N, S, S, 3)) and its record."""
    shares = {kind: csf_dark_shares(images[kind]) for kind in COUNTERFACTUAL_KINDS[:3]}
    records = []
    for index, (path, outputs) in enumerate(zip(files, slice_outputs(files, out))):
        for kind, target in outputs.items():
            save_png(images[kind][index], target)
        records.append(
            {
                "input": str(path),
                "source_label": None if sources[index] is None else CLASS_NAMES[sources[index]],
                "source_from": "--from" if args.source is not None else "folder" if sources[index] is not None else "unknown",
                "files": {kind: target.name for kind, target in outputs.items()},
                "csf_dark_share": {
                    kind: None if math.isnan(values[index]) else float(values[index]) for kind, values in shares.items()
                },
                "batch": index // args.batch_size,
            }
        )
    return records


def write_counterfactuals(pipe: Pipeline, files: list[Path], originals: list[np.ndarray], args, out: Path) -> None:
    """Edit the slices to --to and write every output of the module docstring's --counterfactual."""
    report_removed(remove_temporary_files(out), out)
    if args.overwrite:
        for stale in (path for kind in COUNTERFACTUAL_KINDS for path in out.glob(f"[0-9][0-9][0-9][0-9]_*_{kind}.png")):
            stale.unlink()
    pixels = np.stack([prepare_image(image, pipe.config.data.image_size) for image in originals])
    sources = [args.source if args.source is not None else label_from_path(path) for path in files]
    settings = CounterfactualSettings(
        args.to, args.method, args.strength, args.steps, args.guidance, args.seed, args.batch_size, INVERSION_ITERATIONS
    )
    print(
        f"run {pipe.run_dir} (epoch {pipe.epoch}) | {len(files)} slices → {CLASS_NAMES[args.to]} | {args.method} at strength "
        f"{args.strength:g} | DDIM {args.steps} steps | guidance {args.guidance} | device {pipe.runtime.device}"
    )
    started = time.perf_counter()
    reconstructions, counterfactuals = make_counterfactuals(pipe, pixels, sources, settings, slice_positions(pipe, files))
    seconds = time.perf_counter() - started
    differences, masks = difference_maps(counterfactuals, reconstructions)
    scale = shared_scale(differences, masks)
    images = {"source": pixels, "reconstruction": reconstructions, "counterfactual": counterfactuals}
    images["difference"] = difference_colours(differences, masks, scale)
    records = save_counterfactual_slices(files, images, sources, args, out)
    shown = range(min(GRID_SLICES, len(files)))
    save_image_table(
        [[images[kind][index] for kind in COUNTERFACTUAL_KINDS] for index in shown],
        [files[index].name for index in shown],
        list(COUNTERFACTUAL_KINDS),
        out / "counterfactuals.png",
        f"→ {CLASS_NAMES[args.to]}, {args.method} at strength {args.strength:g}: blue = darker, red = brighter"
        + (f" (first {GRID_SLICES} of {len(files)} slices)" if len(files) > GRID_SLICES else ""),
        scale,
    )
    write_json_atomic(
        out / "counterfactuals.json",
        {
            "run": str(pipe.run_dir),
            "run_epoch": pipe.epoch,
            "settings": dataclasses.asdict(settings) | {"target": CLASS_NAMES[args.to], "sampler": "ddim", "eta": 0.0},
            "difference_scale_grey_levels": scale,
            "seconds": round(seconds, 3),
            "slices": records,
        },
    )
    before, after = (float(np.nanmean(csf_dark_shares(images[kind]))) for kind in ("reconstruction", "counterfactual"))
    print(
        f"CSF-dark share, mean over slices: {before:.4f} (reconstructions) → {after:.4f} (counterfactuals) in {seconds:.1f} s → {out}"
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with usage_errors_exit():
        labels = check_arguments(args)
        if args.counterfactual is not None:  # bad slices fail before the run loads
            files = slice_files(args.counterfactual)
            originals = read_originals(files)
        pipe = load_run_for(args)
        pipe.unet = compile_model(pipe.unet, args.compile)
        if args.counterfactual is not None:
            out = args.out or pipe.run_dir / "counterfactuals"
            check_counterfactual_outputs(pipe, files, args, out)
            write_counterfactuals(pipe, files, originals, args, out)
            return
        slice_position = None
        if args.slice is not None:
            if not pipe.config.unet.slice_conditioning:
                raise UsageError(f"--slice: {pipe.run_dir} was trained without slice conditioning; drop --slice")
            low, high = pipe.slice_range
            if not low <= args.slice <= high:
                raise UsageError(f"--slice {args.slice}: the run was trained on slices {low} to {high}; choose one of those")
            slice_position = float(normalise_slices(torch.tensor([args.slice]), pipe.slice_range))
        out = args.out or pipe.run_dir / "generated"
        check_outputs(pipe, args, labels, out)
        write_outputs(pipe, labels, args, out, slice_position)


if __name__ == "__main__":
    main()
