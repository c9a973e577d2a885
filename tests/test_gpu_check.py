"""gpu_check.py: every stage end to end on a tiny demo set (CPU), its one summary line, its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check
from utils import usage_errors_exit

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_runs_and_the_last_line_sums_it_up(tmp_path: Path) -> None:
    tiny = ["--preset", "tiny", "--scans", "8", "--vae-images", "40", "--unet-images", "40"]
    sizes = ["--samples", "2", "--eval-samples", "4", "--steps", "2", "--device", "cpu", "--run.sample_steps", "2"]
    run_dir = tmp_path / "run"
    command = [sys.executable, "gpu_check.py", *tiny, *sizes, "--data-dir", str(tmp_path / "data/AD_NC"), "--run", str(run_dir)]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    last = finished.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu check: VAE val MS-SSIM ") and " | Fréchet " in last and "seconds: demo build " in last
    assert ", vae " in last and ", unet " in last and ", predict " in last and ", evaluate " in last
    assert len(list((run_dir / "generated/AD").glob("*.png"))) == 2 and (run_dir / "metrics.json").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["vae_train"]["images"], config["unet_train"]["images"], config["run"]["sample_steps"]) == (40, 40, 2)


def test_the_summary_line_reads_history_and_metrics(tmp_path: Path) -> None:
    sharpness = {"val_psnr": 31.26, "val_spectral_energy": {"low": 1.0, "mid": 0.97, "high": 0.834}}
    history = [
        {"stage": "vae", "val_ms_ssim": 0.5, "val_psnr": 20.0, "val_spectral_energy": {"high": 0.1}},
        {"stage": "vae", "train_loss": 0.1},
        {"stage": "vae", "val_ms_ssim": 0.9712, **sharpness},
        {"stage": "unet"},
    ]
    (tmp_path / "history.jsonl").write_text("\n".join(map(json.dumps, history)) + "\n")
    overall = {
        "frechet_distance": 0.01,
        "frechet_floor": 0.002,
        "conditioning_accuracy": 0.71,
        "reconstructed_test_accuracy": 0.7,
        "real_test_accuracy": 0.8,
    }
    anatomy = {"generated": {"cohens_d_AD_minus_NC": 1.5}, "real_test": {"cohens_d_AD_minus_NC": 1.63}}
    (tmp_path / "metrics.json").write_text(json.dumps({"groups": {"all": overall}, "anatomy": anatomy}))
    assert gpu_check.summary_line(tmp_path, {"vae": 100.2, "unet": 50}) == (
        "gpu check: VAE val MS-SSIM 0.9712, PSNR 31.3 dB, spectral energy kept above 1/4 cycle/px 0.83 | Fréchet 0.01 = 5.0x its floor 0.002 | conditioning accuracy 0.710 vs "
        "0.700 on reconstructions (0.800 on real) | anatomy d generated +1.50 vs real +1.63 | seconds: vae 100, unet 50, total 150"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samples", "0"], "error: --samples must be at least 1, got 0"),
        (["--unet-images", "-1"], "error: --unet-images must be at least 1, got -1"),
        (["--vae.chanels", "8"], "error: unknown option --vae.chanels"),
        (["--run", "{existing}"], "exists: the check trains a new run"),
        (["--eval-samples", "1"], "error: --eval-samples must be at least 2 (evaluate.py needs pairs and spreads), got 1"),
        (["--scans", "900001"], "error: --scans must be 4 to 900,000"),
        (["--steps", "1001"], "error: --steps 1001: the model has 1000 diffusion steps"),
        (["--run", "{data}/run"], "error: --run {data}/run lies inside the dataset folder {data}"),
        (["--run", "{tmp}/run", "--data-dir", "{tmp}/run/data"], "error: --data-dir {tmp}/run/data lies inside --run {tmp}/run"),
        (["--preset", "tiny", "--run.guidance_scale", "nan"], "error: --run.guidance_scale nan: must be a number from 0 to 30"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_any_work(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    def placed(text: str) -> str:
        return (
            text.replace("{existing}", str(tmp_path))
            .replace("{data}", str(tmp_path / "never_built"))
            .replace("{tmp}", str(tmp_path))
        )

    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--data-dir", str(tmp_path / "never_built"), *map(placed, argv)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert placed(message) in err and err.count("\n") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no demo built, no run started


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_gpu_is_refused_before_the_demo_build(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--device", "cuda", "--data-dir", str(tmp_path / "data"), "--run", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == "error: --device cuda asked for, but CUDA is not available; use --device cpu\n"
    assert not list(tmp_path.iterdir())


def test_batches_larger_than_the_training_split_are_refused_before_training(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    argv = ["--preset", "tiny", "--data-dir", str(tiny_dataset), "--run", str(tmp_path / "run"), "--unet_train.batch_size", "41"]
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --unet_train.batch_size 41 is larger than the training split (40 images)")
    assert not (tmp_path / "run").exists()


def test_a_failing_stage_adds_no_second_error_line(tmp_path: Path, capfd) -> None:
    with pytest.raises(SystemExit) as exit_info, usage_errors_exit():
        gpu_check.run_stage("predict", "predict.py", ["--run", str(tmp_path / "none"), "--label", "AD"], {})
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    assert out.startswith("gpu check: predict (python predict.py --run ")
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: run folder {tmp_path / 'none'} not found: pass --run runs/NAME"
    ]


def test_the_summary_line_of_a_degenerate_dataset_says_n_a(tmp_path: Path) -> None:
    """Identical slices: every real image the same, so the Fréchet floor is 0 and Cohen's d null in metrics.json."""
    entry = {"stage": "vae", "val_ms_ssim": 1.0, "val_psnr": float("inf"), "val_spectral_energy": {"high": 1.0}}
    (tmp_path / "history.jsonl").write_text(json.dumps(entry) + "\n")
    overall = {
        "frechet_distance": 0.5,
        "frechet_floor": 0.0,
        "conditioning_accuracy": 0.5,
        "reconstructed_test_accuracy": 1.0,
        "real_test_accuracy": 1.0,
    }
    anatomy = {"generated": {"cohens_d_AD_minus_NC": 0.2}, "real_test": {"cohens_d_AD_minus_NC": None}}
    (tmp_path / "metrics.json").write_text(json.dumps({"groups": {"all": overall}, "anatomy": anatomy}))
    line = gpu_check.summary_line(tmp_path, {"vae": 1})
    assert "PSNR n/a dB" in line and "| Fréchet 0.5, its floor 0 |" in line and "anatomy d generated +0.20 vs real n/a |" in line
