"""What a bare command does: `python train.py` picks the preset from the data it finds, `predict.py`
picks the newest run; and schedules given in training images instead of epochs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import predict
import train
from config import make_config, resolve_schedule
from conftest import run_train


@pytest.fixture
def recorded_train(tmp_path: Path, monkeypatch) -> list:
    """train.main in an empty working folder, with the training itself replaced by a recorder of the
    prepared config and run folder."""
    monkeypatch.chdir(tmp_path)
    calls = []

    def record(args, overrides, run_dir: Path) -> None:
        calls.append((train.prepare_run(args, overrides, run_dir), run_dir))

    monkeypatch.setattr(train, "train", record)
    return calls


def test_bare_train_picks_adni_when_the_adni_folder_exists(tmp_path: Path, recorded_train: list, capsys) -> None:
    (tmp_path / "data/ADNI/AD_NC").mkdir(parents=True)
    train.main([])
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("no --preset: training the adni preset") and "data/ADNI/AD_NC exists" in first_line
    ((config, run_dir),) = recorded_train
    assert (config.preset, config.data.data_dir, config.data.image_size) == ("adni", "data/ADNI/AD_NC", 192)
    assert run_dir == Path("runs/adni")


def test_bare_train_falls_back_to_the_demo_without_adni(recorded_train: list, capsys) -> None:
    train.main([])
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("no --preset: training the demo preset") and "on data/demo/AD_NC" in first_line
    assert "data/ADNI/AD_NC does not exist" in first_line
    ((config, run_dir),) = recorded_train
    assert (config.preset, config.data.data_dir, run_dir) == ("demo", "data/demo/AD_NC", Path("runs/demo"))


def test_a_chosen_preset_or_an_existing_run_prints_no_choice(tmp_path: Path, recorded_train: list, capsys) -> None:
    (tmp_path / "data/ADNI/AD_NC").mkdir(parents=True)
    train.main(["--preset", "tiny"])
    run_dir = tmp_path / "runs/mine"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"preset": "tiny"}))
    train.main(["--run", str(run_dir)])  # resumes its own preset, whatever data exists
    assert "no --preset" not in capsys.readouterr().out
    assert [config.preset for config, _ in recorded_train] == ["tiny", "tiny"]


def test_predict_without_run_samples_the_newest_trained_run(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    runs = tmp_path / "runs"
    for name, age in (("a_newest", 0), ("b_older", 100)):  # names sort against age: the order is not the name's
        shutil.copytree(trained_run, runs / name)
        stamp = (runs / name / "unet.pt").stat().st_mtime - age
        os.utime(runs / name / "unet.pt", (stamp, stamp))
    (runs / "c_unfinished").mkdir()
    (runs / "c_unfinished/config.json").write_text("{}")  # newer, but no unet.pt: not a trained run
    monkeypatch.chdir(tmp_path)
    predict.main(["--label", "0", "--num-samples", "2", "--steps", "2", "--device", "cpu"])
    assert (runs / "a_newest/generated/samples_AD.png").is_file()
    assert not (runs / "b_older/generated").exists() and not (runs / "c_unfinished/generated").exists()


def test_a_schedule_in_images_becomes_whole_epochs_of_the_training_set() -> None:
    config = make_config("adni")
    config.vae_train.images, config.unet_train.epochs = 60_000, 7
    assert resolve_schedule(config, 21_520) == ["vae_train: 60000 images = 3 epochs of 21520"]
    assert (config.vae_train.epochs, config.unet_train.epochs) == (3, 7)
    config.vae_train.images = 10
    resolve_schedule(config, 21_520)
    assert config.vae_train.epochs == 1, "a few images still train one epoch"


def test_train_with_a_schedule_in_images(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_train(tiny_dataset, run_dir, "--stage", "vae", "--vae_train.images", "50")
    train_size = len(json.loads((run_dir / "splits.json").read_text())["train"]) * 4  # 4 slices per scan in tiny_dataset
    epochs = -(-50 // train_size)
    assert epochs == 2, "the tiny set should need two epochs for 50 images"
    assert f"vae_train: 50 images = {epochs} epochs of {train_size}" in capsys.readouterr().out
    stored = json.loads((run_dir / "config.json").read_text())["vae_train"]
    assert (stored["images"], stored["epochs"]) == (50, epochs)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in history] == list(range(1, epochs + 1))


def test_an_epoch_count_replaces_a_schedule_in_images(capsys) -> None:
    _, overrides = train.parse_args(["--vae_train.epochs", "3"])
    assert overrides["vae_train.images"] == "none"
    _, overrides = train.parse_args(["--stage", "unet", "--epochs", "3"])
    assert overrides["unet_train.images"] == "none" and "vae_train.images" not in overrides
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--unet_train.images", "1000", "--epochs", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --unet_train.epochs and --unet_train.images both set the schedule") and err.count("\n") == 1
