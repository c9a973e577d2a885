"""Bad input to train.py, predict.py and evaluate.py: refused in one line with exit 2 before any work,
and nothing lost or left behind (run lock, VAE fingerprint, stale temporary files, --overwrite)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
import predict
from conftest import make_tiny_dataset, run_train
from utils import folder_lock, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def exits_2(capsys, call, *args) -> str:
    """Run `call(*args)`, expect SystemExit(2), return the one error line (progress bars aside)."""
    with pytest.raises(SystemExit) as exit_info:
        call(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


# ----------------------------------------------------------------------------- train.py, before any work


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vae_train.epochs", "0"], "--vae_train.epochs 0: must be at least 1"),
        (["--epochs", "0"], "--vae_train.epochs 0: must be at least 1"),
        (["--batch-size", "0"], "--vae_train.batch_size 0"),
        (["--lr", "nan"], "--vae_train.lr nan"),
        (["--unet.attention_levels", "true"], "--unet.attention_levels true: needs one true/false per unet.channels level"),
        (["--unet.channels", ","], "--unet.channels : must be widths"),
        (["--scheduler.prediction_type", "x0"], "--scheduler.prediction_type x0"),
        (["--run.sample_every", "0"], "--run.sample_every 0"),
        (["--data.image_size", "63"], "--data.image_size 63"),
        (["--device", "bogus"], "--device bogus"),
        (["--device", "tpu"], "--device tpu"),
    ],
)
def test_invalid_settings_write_nothing(tiny_dataset: Path, tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    """Refused before the dataset is read or a run folder exists, so the corrected retry just works."""
    err = exits_2(capsys, run_train, tiny_dataset, tmp_path / "bad", *argv)
    assert message in err
    assert not (tmp_path / "bad").exists()


def test_a_class_missing_from_training_is_refused(tmp_path: Path, capsys) -> None:
    only_ad = make_tiny_dataset(tmp_path / "AD_NC", {"train/AD": 4, "test/AD": 1, "test/NC": 1})
    (only_ad / "train" / "NC").mkdir()  # the layout is there, its NC images are not
    err = exits_2(capsys, run_train, only_ad, tmp_path / "run")
    assert "the train split has no NC images" in err
    assert not (tmp_path / "run").exists()


def test_a_second_writer_is_refused_with_the_holders_pid(trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    before = {path.name: path.read_bytes() for path in run_dir.glob("*.pt")}
    with folder_lock(run_dir):  # another train.py holds the run
        err = exits_2(capsys, run_train, tiny_dataset, run_dir, "--resume", "--unet_train.epochs", "3")
    assert f"{run_dir} is in use by process {os.getpid()}" in err
    assert {path.name: path.read_bytes() for path in run_dir.glob("*.pt")} == before


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    """flock dies with its process, even on kill -9: no stale lock blocks the next run."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from utils import folder_lock\n"
            f"with folder_lock({str(tmp_path / 'run')!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=f"in use by process {holder.pid}"), folder_lock(tmp_path / "run"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path / "run"):
        pass


def test_temporary_files_of_a_killed_run_are_removed_on_the_next_start(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    leftovers = [run_dir / ".unet.pt.x1y2z3.tmp", run_dir / "samples" / ".epoch002_AD.png.abc.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    run_train(tiny_dataset, run_dir, "--resume")  # both stages are finished: nothing to train
    assert "removed 2 temporary file(s)" in capsys.readouterr().out
    assert not any(path.exists() for path in leftovers)


# ----------------------------------------------------------------------------- a UNet belongs to its VAE


def test_a_unet_paired_with_another_vae_is_refused(trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    state = load_checkpoint(run_dir / "vae.pt")
    state["model"] = {key: value + 0.01 if value.is_floating_point() else value for key, value in state["model"].items()}
    save_checkpoint(state, run_dir / "vae.pt")
    for call, args in (
        (predict.main, ["--run", str(run_dir), "--label", "AD", "--device", "cpu"]),
        (evaluate.main, ["--run", str(run_dir), "--device", "cpu"]),
        (run_train, (tiny_dataset, run_dir, "--resume", "--unet_train.epochs", "3")),
    ):
        err = exits_2(capsys, call, *(args if isinstance(args, tuple) else (args,)))
        assert "unet.pt was trained on another VAE than the vae.pt beside it" in err


# ----------------------------------------------------------------------------- predict.py and evaluate.py options


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--guidance", "nan"], "--guidance must be 0 or more (1 = no guidance), got nan"),
        (["--guidance", "inf"], "--guidance must be 0 or more (1 = no guidance), got inf"),
        (["--steps", "1001"], "--steps 1001: the run has 1000 diffusion steps"),
        (["--seed", "-1"], "--seed must be 0 to"),
        (["--seed", str(2**40)], "--seed must be 0 to"),
        (["--num-samples", "10000000"], "--num-samples must be at most 1,000,000 per label"),
        (["--device", "cuda:7x"], "--device cuda:7x"),
    ],
)
@pytest.mark.parametrize("script", ["predict", "evaluate"])
def test_sampling_options_are_checked(
    trained_run: Path, tmp_path: Path, capsys, script: str, argv: list[str], message: str
) -> None:
    if script == "predict":
        err = exits_2(capsys, predict.main, ["--run", str(trained_run), "--label", "AD", "--out", str(tmp_path / "out"), *argv])
    else:
        err = exits_2(capsys, evaluate.main, ["--run", str(trained_run), *argv])
    assert message in err
    assert not (tmp_path / "out").exists() and not (trained_run / "metrics.json").exists()


def test_overwrite_replaces_the_earlier_images(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ["--run", str(trained_run), "--out", str(out), "--steps", "2", "--device", "cpu", "--label", "AD"]
    predict.main([*common, "--num-samples", "3"])
    assert len(list((out / "AD").glob("*.png"))) == 3
    predict.main([*common, "--num-samples", "1", "--overwrite"])
    assert sorted(path.name for path in (out / "AD").glob("*.png")) == ["AD_0000.png"]
    with Image.open(out / "AD" / "AD_0000.png") as image:
        assert image.size == (32, 32)


# ----------------------------------------------------------------------------- the machine says no


@pytest.mark.parametrize(
    "error, message",
    [
        (OSError(28, "No space left on device"), "no space left on the device writing"),
        (OSError(30, "Read-only file system"), "cannot write or read"),
        (PermissionError(13, "Permission denied"), "cannot write or read"),
    ],
)
def test_a_full_disk_or_read_only_folder_is_one_line_and_keeps_the_checkpoint(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch, error: OSError, message: str
) -> None:
    """Root ignores permissions here, so the refusal is simulated where the bytes would be written."""
    import utils

    run_dir = copy_run(trained_run, tmp_path)
    before = (run_dir / "unet.pt").read_bytes()

    def refuse(state, path):
        error.filename = str(path)
        raise error

    monkeypatch.setattr(utils.torch, "save", refuse)
    err = exits_2(capsys, run_train, tiny_dataset, run_dir, "--resume", "--unet_train.epochs", "3")
    assert message in err and str(run_dir) in err
    assert (run_dir / "unet.pt").read_bytes() == before
    assert not list(run_dir.rglob("*.tmp"))


def test_predict_into_a_folder_it_cannot_write_is_one_line(trained_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import utils

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(utils.tempfile, "mkstemp", refuse)
    err = exits_2(
        capsys,
        predict.main,
        [
            "--run",
            str(trained_run),
            "--label",
            "AD",
            "--num-samples",
            "1",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert "cannot write or read" in err and str(tmp_path / "out") in err


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b"\xff\xfe", b'{"preset": "adni", "unet": 3}'])
def test_a_damaged_config_json_is_one_line(trained_run: Path, tmp_path: Path, capsys, content: bytes) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    (run_dir / "config.json").write_bytes(content)
    err = exits_2(capsys, predict.main, ["--run", str(run_dir), "--label", "AD", "--device", "cpu"])
    assert "config" in err and str(run_dir) in err


@pytest.mark.parametrize("damage", ["no_config", "no_ema", "tensor"])
def test_a_wrongly_shaped_checkpoint_is_one_line(trained_run: Path, tmp_path: Path, capsys, damage: str) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    state = load_checkpoint(run_dir / "unet.pt")
    if damage == "tensor":
        state = torch.zeros(3)
    else:
        del state["config" if damage == "no_config" else "ema"]
    save_checkpoint(state, run_dir / "unet.pt")
    err = exits_2(capsys, predict.main, ["--run", str(run_dir), "--label", "AD", "--device", "cpu"])
    assert "unet.pt" in err and ("damaged" in err or "is not a unet checkpoint" in err)
