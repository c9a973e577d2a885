"""train.py: both stages end to end on a tiny config, resume, refusals, NaN guard, torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import TINY, run_train
from utils import load_checkpoint

REPO = Path(__file__).resolve().parents[1]

def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
        elif isinstance(a[name], dict):
            assert_same_weights(a[name], b[name])


def test_end_to_end_writes_every_promised_file(trained_run: Path) -> None:
    for name in ("config.json", "splits.json", "vae.pt", "unet.pt", "history.jsonl", "vae_loss.png",
                 "diffusion_loss.png", "vae_reconstructions.png", "samples/epoch001_AD.png",
                 "samples/epoch002_NC.png"):
        assert (trained_run / name).is_file(), name
    assert not list(trained_run.rglob("*.tmp")), "a temporary file was left behind"
    history = [json.loads(line) for line in (trained_run / "history.jsonl").read_text().splitlines()]
    assert [(h["stage"], h["epoch"]) for h in history] == [("vae", 1), ("vae", 2), ("unet", 1), ("unet", 2)]
    assert all(h["images_per_second"] > 0 and math.isfinite(h["train_loss"]) for h in history)
    config = train.read_config(trained_run)
    assert config.data.image_size == 32 and config.vae.channels == (8, 16, 16)
    unet = load_checkpoint(trained_run / "unet.pt")
    assert {"model", "ema", "optimizer", "lr_schedule", "epoch", "step", "config", "slice_range"} <= unet.keys()
    vae = load_checkpoint(trained_run / "vae.pt")
    assert float(vae["model"]["scale_factor"]) != 1.0, "latent scale factor was not set after stage 1"
    splits = json.loads((trained_run / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["val"])


def test_existing_run_is_not_overwritten(trained_run: Path, tiny_dataset: Path, capsys) -> None:
    before = (trained_run / "vae.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, trained_run)
    assert exit_info.value.code == 2
    assert "--resume" in capsys.readouterr().err
    assert (trained_run / "vae.pt").read_bytes() == before


def test_model_override_on_existing_run_is_refused(trained_run: Path, tiny_dataset: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, trained_run, "--resume", "--vae.channels", "8,8,16")
    assert exit_info.value.code == 2
    assert "vae.channels" in capsys.readouterr().err


def test_checkpoint_from_another_config_is_refused(trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    run_train(tiny_dataset, other, "--stage", "vae", "--vae.channels", "8,8,16", "--vae_train.epochs", "1")
    (other / "vae.pt").write_bytes((trained_run / "vae.pt").read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, other, "--stage", "unet", "--vae.channels", "8,8,16", "--vae_train.epochs", "1")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "another config" in err and "vae.channels" in err and "Traceback" not in err


def test_resume_equals_uninterrupted(trained_run: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """Kill the run during the second UNet epoch, resume it, and get bit-identical weights."""
    real_epoch = train.train_one_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # vae 1, vae 2, unet 1, then killed during unet 2
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    run_dir = tmp_path / "resumed"
    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_dataset, run_dir)
    assert load_checkpoint(run_dir / "unet.pt")["epoch"] == 1
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    run_train(tiny_dataset, run_dir, "--resume")

    for name in ("vae.pt", "unet.pt"):
        resumed, straight = load_checkpoint(run_dir / name), load_checkpoint(trained_run / name)
        assert resumed["epoch"] == straight["epoch"] == 2
        assert_same_weights(resumed["model"], straight["model"])
    assert_same_weights(load_checkpoint(run_dir / "unet.pt")["ema"], load_checkpoint(trained_run / "unet.pt")["ema"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    run_dir = tmp_path / "nan"
    run_train(tiny_dataset, run_dir, "--stage", "vae", "--vae_train.epochs", "1")
    good = (run_dir / "vae.pt").read_bytes()
    real_loss = train.vae_loss
    monkeypatch.setattr(train, "vae_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), {}))
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, run_dir, "--stage", "vae", "--resume", "--vae_train.epochs", "2")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "nan" in err and "intact" in err
    assert (run_dir / "vae.pt").read_bytes() == good


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vae.nonsense", "3"], "unknown option"),
        (["--vae_train.epochs", "three"], "invalid literal"),
    ],
)
def test_bad_arguments(tiny_dataset: Path, tmp_path: Path, argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, tmp_path / "bad", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_dataset_is_one_line_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "train.py", "--data-dir", str(tmp_path / "none"), "--run", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "project_setup.py --demo" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_torchrun_two_cpu_processes_only_rank0_writes(tiny_dataset: Path, tmp_path: Path) -> None:
    """gloo DDP with 2 processes; a sitecustomize logs every atomic rename with the writer's rank."""
    hook = tmp_path / "hook"
    hook.mkdir()
    log = tmp_path / "writes.log"
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "_replace = os.replace\n"
        "def _logged(src, dst, *a, **k):\n"
        f"    with open({str(log)!r}, 'a') as f: f.write(os.environ.get('RANK', '?') + ' ' + str(dst) + '\\n')\n"
        "    return _replace(src, dst, *a, **k)\n"
        "os.replace = _logged\n"
    )
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "train.py",
         "--preset", "demo", "--data-dir", str(tiny_dataset), "--run-dir", str(run_dir), "--device", "cpu", *TINY,
         "--vae_train.epochs", "1", "--unet_train.epochs", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    writers = {line.split()[0] for line in log.read_text().splitlines() if str(run_dir) in line}
    assert writers == {"0"}
    for name in ("vae.pt", "unet.pt", "history.jsonl", "diffusion_loss.png"):
        assert (run_dir / name).is_file()
    assert load_checkpoint(run_dir / "unet.pt")["epoch"] == 1
