"""train.py's loop overhead: where a stage's time goes, checkpoints on a minute cadence (resumed
exactly from one written mid-stage), validation every k epochs, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from test_train import assert_same

import pipeline
import train
import utils
from conftest import run_train
from utils import load_checkpoint

SPAN_KEYS = {*utils.TIME_CATEGORIES, "other", "total"}


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_breakdown_counts_every_second_once() -> None:
    clock = FakeClock()
    breakdown = utils.TimeBreakdown(clock)
    clock.now += 1  # start-up: other
    with breakdown.measure("train_steps"):
        clock.now += 2
        with breakdown.measure("data"):  # nested: taken out of the training steps
            clock.now += 0.5
    with breakdown.measure("validation"):
        clock.now += 0.25
    first = breakdown.close()
    assert first == {
        **dict.fromkeys(utils.TIME_CATEGORIES, 0.0),
        "train_steps": 2.0,
        "data": 0.5,
        "validation": 0.25,
        "other": 1.0,
        "total": 3.75,
    }
    with breakdown.measure("checkpoints"):
        clock.now += 4
    clock.now += 1
    second = breakdown.close()
    assert second["checkpoints"] == 4 and second["other"] == 1 and second["total"] == 5 and second["train_steps"] == 0
    clock.now += 3  # after the last record: only in the summary
    summary = breakdown.summary()
    assert summary["total"] == 11.75 and summary["other"] == 5 and summary["train_steps"] == 2 and summary["checkpoints"] == 4
    line = utils.describe_time("unet", summary)
    assert line.startswith("unet time 11.8 s: train steps 2.0 s (17%)") and "\n" not in line


def test_every_epoch_records_where_its_time_went(trained_run: Path) -> None:
    """The tiny preset checkpoints, validates and samples every epoch: each category shows up in the
    epoch it happens in (a checkpoint's write in the next epoch), and each record adds up."""
    history = [json.loads(line) for line in (trained_run / "history.jsonl").read_text().splitlines()]
    for entry in history:
        seconds = entry["seconds"]
        assert seconds.keys() == SPAN_KEYS
        assert all(value >= -1e-3 for value in seconds.values()), seconds
        assert sum(seconds[key] for key in (*utils.TIME_CATEGORIES, "other")) == pytest.approx(seconds["total"], abs=1e-3)
        assert seconds["train_steps"] > 0 and seconds["data"] > 0 and seconds["validation"] > 0 and seconds["sample_grids"] > 0
    vae, unet = history[:2], history[2:]
    assert vae[0]["seconds"]["checkpoints"] == 0 < vae[1]["seconds"]["checkpoints"]
    assert unet[0]["seconds"]["latent_encoding"] > 0 and unet[1]["seconds"]["latent_encoding"] == 0
    assert vae[1]["seconds"]["latent_encoding"] > 0  # the latent scale factor, after the last VAE epoch


def test_minute_cadence_checkpoint_mid_stage_resumes_bit_identical(
    tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Each epoch takes 3 fake minutes and checkpoints are due every 5: the UNet's epoch 2 is
    checkpointed mid-stage, its epoch 1 is not. Killed during epoch 3, the run resumes from the
    epoch-2 checkpoint and ends bit-identical to an uninterrupted run. Validation every 2 epochs
    validates epochs 2 and 3 (the last) only."""
    clock = FakeClock()
    real_cadence, real_epoch, real_save = train.CheckpointCadence, train.train_one_epoch, train.save_checkpoint
    saved: list[tuple[str, int]] = []
    stop_at: list[str] = []

    def slow_epoch(name, *args, **kwargs):
        if name in stop_at:
            raise KeyboardInterrupt
        clock.now += 180
        return real_epoch(name, *args, **kwargs)

    def recorded_save(state: dict, path: Path) -> None:
        saved.append((Path(path).name, state["epoch"]))
        real_save(state, path)

    monkeypatch.setattr(train, "CheckpointCadence", lambda minutes: real_cadence(minutes, clock=clock))
    monkeypatch.setattr(train, "train_one_epoch", slow_epoch)
    monkeypatch.setattr(train, "save_checkpoint", recorded_save)
    options = [
        "--vae_train.epochs",
        "1",
        "--unet_train.epochs",
        "3",
        "--run.checkpoint_minutes",
        "5",
        "--run.validate_every",
        "2",
    ]

    straight = tmp_path / "straight"
    run_train(tiny_dataset, straight, *options)
    assert saved == [("vae.pt", 1), ("unet.pt", 2), ("unet.pt", 3)]
    history = [json.loads(line) for line in (straight / "history.jsonl").read_text().splitlines()]
    assert [(h["stage"], h["epoch"], "val_loss" in h) for h in history] == [
        ("vae", 1, True),
        ("unet", 1, False),
        ("unet", 2, True),
        ("unet", 3, True),
    ]
    assert (straight / "diffusion_loss.png").is_file()

    resumed = tmp_path / "resumed"
    saved.clear()
    stop_at.append("unet 3/3")
    with pytest.raises(SystemExit, match="^130$"):  # a kill mid-epoch: Ctrl-C ends train.py with 128 + SIGINT
        run_train(tiny_dataset, resumed, *options)
    assert saved == [("vae.pt", 1), ("unet.pt", 2)]
    assert load_checkpoint(resumed / "unet.pt")["epoch"] == 2
    stop_at.clear()
    capsys.readouterr()
    run_train(tiny_dataset, resumed, "--resume")
    out = capsys.readouterr().out
    for name in ("vae.pt", "unet.pt"):
        mine, theirs = load_checkpoint(resumed / name), load_checkpoint(straight / name)
        for key in ("model", "optimizer", "lr_schedule", "step", "epoch") + (("ema",) if name == "unet.pt" else ()):
            assert_same(mine[key], theirs[key], f"{name} {key}")
    # The resumed stage prints where its time went, its one epoch record included. Not "most of it": how
    # long loading and the run's setup take beside a tiny epoch depends on the machine (0.64 of 1.3 s on one).
    (line,) = [line for line in out.splitlines() if line.startswith("unet time ")]
    printed_total = float(line.split()[2])
    last = json.loads((resumed / "history.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 3 and last["seconds"]["latent_encoding"] > 0
    assert 0 < last["seconds"]["total"] <= printed_total + 0.05


def test_sigterm_stops_cleanly_after_the_epoch_with_a_checkpoint(tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A SIGTERM during VAE epoch 1 of 2, with no checkpoint due for an hour: the epoch finishes, its
    checkpoint is written, and train.py exits 143 (128 + 15) naming --resume; the signal handlers
    are restored."""
    real_epoch = train.train_one_epoch
    before = signal.getsignal(signal.SIGTERM)

    def signalled_epoch(name, *args, **kwargs):
        result = real_epoch(name, *args, **kwargs)
        if name == "vae 1/2":
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train, "train_one_epoch", signalled_epoch)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, run_dir, "--stage", "vae", "--vae_train.epochs", "2", "--run.checkpoint_minutes", "60")
    assert exit_info.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after vae epoch 1/2" in err and "--resume" in err
    assert load_checkpoint(run_dir / "vae.pt")["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) is before


def test_snapshots_keep_every_kth_unet_epoch_and_load_as_that_epoch(tiny_dataset: Path, tmp_path: Path) -> None:
    """--run.keep_every 2 over 4 UNet epochs keeps epochs 2 and 4 (not the VAE's); a snapshot loads as a
    run at its epoch, and the last one holds the same EMA weights as unet.pt."""
    run_dir = tmp_path / "kept"
    run_train(tiny_dataset, run_dir, "--unet_train.epochs", "4", "--run.keep_every", "2")
    kept = pipeline.snapshots(run_dir)
    assert [path.name for path in kept] == ["unet_epoch002.pt", "unet_epoch004.pt"], kept
    runtime = utils.Runtime(torch.device("cpu"))
    middle, final = (pipeline.load_run(run_dir, runtime, path) for path in kept)
    assert (middle.epoch, final.epoch) == (2, 4)
    finished = pipeline.load_run(run_dir, runtime)
    for name, weight in finished.unet.state_dict().items():
        assert torch.equal(final.unet.state_dict()[name], weight), f"the epoch-4 snapshot's {name} is not unet.pt's"
    assert any(not torch.equal(middle.unet.state_dict()[name], weight) for name, weight in finished.unet.state_dict().items()), (
        "the epoch-2 snapshot holds the final weights"
    )
