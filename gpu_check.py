"""Check a new GPU workstation end to end in one short command, and print one summary line.

    python gpu_check.py                                   # the adni preset at 192 px on a 300-scan demo set
    python gpu_check.py --vae_train.lr 1e-3               # any train.py config override is passed on

It builds a demo set (project_setup.py; skipped when --data-dir already holds one), trains the chosen
preset's VAE and UNet on a short schedule given in training images (train.py, one stage at a time),
samples --samples images per label (predict.py) and evaluates --eval-samples per label (evaluate.py),
each as its own process, timed. The last line printed is the summary: VAE validation MS-SSIM, Fréchet
distance against its real-vs-real floor, conditioning accuracy against the classifier's accuracy on
VAE reconstructions, the AD-vs-NC anatomy effect (Cohen's d) generated vs real, and seconds per stage.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from config import CLASS_NAMES, DEMO_SCAN_LIMITS, Config, apply_overrides, check_batches, collect_overrides, make_config
from dataset import index_dataset, make_splits
from pipeline import MAX_IMAGES, validate
from utils import ArgumentParser, UsageError, check_output_paths, pick_device, usage_errors_exit

SCRIPTS = Path(__file__).resolve().parent
# Sized to fit one 8-minute command on one H100 with the adni preset (measured there: VAE 302 and UNet
# 889 training images/s, README "Benchmarks"): about 100 s of VAE and 110 s of UNet training.
DEFAULT_VAE_IMAGES = 30_000
DEFAULT_UNET_IMAGES = 100_000
DEFAULT_SCANS = 300


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="adni", help="train.py preset (default adni)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/gpu_check/AD_NC"), help="demo set, built if missing")
    parser.add_argument("--scans", type=int, default=DEFAULT_SCANS, help=f"demo scans to build (default {DEFAULT_SCANS})")
    parser.add_argument("--run", type=Path, default=Path("runs/gpu_check"), help="run folder; must not exist yet")
    parser.add_argument("--vae-images", type=int, default=DEFAULT_VAE_IMAGES, help="VAE training images")
    parser.add_argument("--unet-images", type=int, default=DEFAULT_UNET_IMAGES, help="UNet training images")
    parser.add_argument("--samples", type=int, default=64, help="predict.py images per label (default 64)")
    parser.add_argument("--eval-samples", type=int, default=200, help="evaluate.py images per label (default 200)")
    parser.add_argument("--steps", type=int, help="sampling steps for predict and evaluate (default: the run's run.sample_steps)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return parser


def run_stage(name: str, script: str, arguments: list[str], seconds: dict[str, float]) -> None:
    """Run `python <script> <arguments>` with its output shown, and record its wall time under `name`.
    A stage that fails has said why in its own one line: the check ends with its exit status, adding none."""
    print(f"gpu check: {name} (python {script} {' '.join(arguments)})", flush=True)
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, str(SCRIPTS / script), *arguments], check=False)
    seconds[name] = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(finished.returncode if finished.returncode > 0 else 128 - finished.returncode)


def shown(value: float | None, spec: str) -> str:
    """A figure of metrics.json (null where undefined) for the summary line."""
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def summary_line(run_dir: Path, seconds: dict[str, float]) -> str:
    """One line from the run's history.jsonl and metrics.json (evaluate.py's groups.all and anatomy keys)."""
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    vae = [entry for entry in history if entry["stage"] == "vae" and "val_ms_ssim" in entry][-1]
    sharpness = (
        f"PSNR {shown(vae['val_psnr'], '.1f')} dB, spectral energy kept above 1/4 cycle/px "
        f"{shown(vae['val_spectral_energy']['high'], '.2f')}"
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    overall, anatomy = metrics["groups"]["all"], metrics["anatomy"]
    frechet, floor = overall["frechet_distance"], overall["frechet_floor"]
    # A floor of 0 (real training and test images the same in the yardstick's features) has no multiple.
    ratio = f" = {frechet / floor:.1f}x" if frechet is not None and floor else ","
    times = ", ".join(f"{name} {value:.0f}" for name, value in seconds.items())
    return (
        f"gpu check: VAE val MS-SSIM {shown(vae['val_ms_ssim'], '.4f')}, {sharpness} | Fréchet {shown(frechet, '.4g')}{ratio} "
        f"its floor {shown(floor, '.4g')} | conditioning accuracy {shown(overall['conditioning_accuracy'], '.3f')} vs "
        f"{shown(overall['reconstructed_test_accuracy'], '.3f')} on reconstructions ({shown(overall['real_test_accuracy'], '.3f')} "
        f"on real) | anatomy d generated {shown(anatomy['generated']['cohens_d_AD_minus_NC'], '+.2f')} vs real "
        f"{shown(anatomy['real_test']['cohens_d_AD_minus_NC'], '+.2f')} | seconds: {times}, total {sum(seconds.values()):.0f}"
    )


def check_options(args: argparse.Namespace, overrides: dict[str, str]) -> Config:
    """Everything that can be checked before the demo build: each size in range for the script it goes
    to, the device, the train.py config the stages will use, and where they write. Returns that config."""
    for flag in ("vae_images", "unet_images", "samples", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.eval_samples < 2:
        raise UsageError(f"--eval-samples must be at least 2 (evaluate.py needs pairs and spreads), got {args.eval_samples}")
    for flag in ("samples", "eval_samples"):
        if getattr(args, flag) > MAX_IMAGES:
            raise UsageError(f"--{flag.replace('_', '-')} must be at most {MAX_IMAGES:,} per label, got {getattr(args, flag):,}")
    low, high = DEMO_SCAN_LIMITS
    if not low <= args.scans <= high and not args.data_dir.is_dir():
        raise UsageError(
            f"--scans must be {low} to {high:,} (a train and a test scan per class; six-digit scan IDs), got {args.scans}"
        )
    pick_device(args.device)
    config = make_config(args.preset)
    schedule = {"vae_train.images": str(args.vae_images), "unet_train.images": str(args.unet_images)}
    apply_overrides(config, {**schedule, **overrides, "data.data_dir": str(args.data_dir)})
    validate(config)
    if args.steps is not None and args.steps > config.scheduler.num_train_timesteps:
        raise UsageError(
            f"--steps {args.steps}: the model has {config.scheduler.num_train_timesteps} diffusion steps; use at most that many"
        )
    if args.run.exists():
        raise UsageError(f"{args.run} exists: the check trains a new run; delete it or pass another --run")
    check_output_paths([args.data_dir], folders={"--run": args.run, "--data.cache_dir": config.data.cache_dir})
    run, data = args.run.resolve(), args.data_dir.resolve()
    if run in data.parents:
        raise UsageError(
            f"--data-dir {args.data_dir} lies inside --run {args.run}, which must be a new run folder: choose one outside it"
        )
    return config


def check_data(config: Config, data_dir: Path) -> None:
    """Before any training: the batches fit the training split the run will get (train.py's split, from the
    same seed), and evaluate.py finds at least 2 test slices of each label."""
    index = index_dataset(data_dir)
    splits = make_splits(index, config.data.val_fraction, config.data.split_seed)
    train_scans = set(splits["train"])
    check_batches(config, sum(record.scan_id in train_scans for record in index.records), ("vae", "unet"))
    for label, name in enumerate(CLASS_NAMES):
        if sum(record.split == "test" and record.label == label for record in index.records) < 2:
            raise UsageError(
                f"{data_dir} has fewer than 2 {name} test slices for evaluate.py: add some to its test/{name} folder"
            )


def check(args: argparse.Namespace, overrides: list[str]) -> str:
    """Every stage in turn; returns the summary line."""
    config = check_options(args, collect_overrides(overrides))
    seconds: dict[str, float] = {}
    if not args.data_dir.is_dir():
        demo = ["--demo", "--scans", str(args.scans), "--data-dir", str(args.data_dir)]
        run_stage("demo build", "project_setup.py", demo, seconds)
    check_data(config, args.data_dir)
    common = ["--preset", args.preset, "--data-dir", str(args.data_dir), "--run", str(args.run), "--device", args.device]
    schedule = ["--vae_train.images", str(args.vae_images), "--unet_train.images", str(args.unet_images)]
    for stage in ("vae", "unet"):
        run_stage(stage, "train.py", [*common, *schedule, *overrides, "--stage", stage], seconds)
    sampling = ["--run", str(args.run), "--device", args.device, *(["--steps", str(args.steps)] if args.steps else [])]
    run_stage("predict", "predict.py", [*sampling, "--label", "both", "--num-samples", str(args.samples)], seconds)
    run_stage("evaluate", "evaluate.py", [*sampling, "--num-samples", str(args.eval_samples)], seconds)
    return summary_line(args.run, seconds)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        collect_overrides(overrides)  # checked now rather than after the demo build; train.py reads them
    except ValueError as error:
        parser.error(str(error))
    with usage_errors_exit():
        print(check(args, overrides), flush=True)


if __name__ == "__main__":
    main()
