"""`--run.tensorboard true`: per-epoch scalars and figures in runs/NAME/tensorboard/, read back from the event files."""

from __future__ import annotations

import json
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_train

pytest.importorskip("tensorboard")


def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def logged_run(tiny_dataset: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "board"
    run_train(tiny_dataset, run_dir, "--run.tensorboard", "true", "--run.sample_every", "2")
    return run_dir


def test_every_number_of_the_history_is_a_scalar_per_epoch(logged_run: Path) -> None:
    history = [json.loads(line) for line in (logged_run / "history.jsonl").read_text().splitlines()]
    for stage in ("vae", "unet"):
        events = read_events(logged_run / "tensorboard" / stage)
        entries = [entry for entry in history if entry["stage"] == stage]
        expected = {f"{stage}/{name}" for name in ("train_loss", "lr", "images_per_second", "val_loss")}
        expected |= {f"{stage}/seconds/{category}" for category in entries[0]["seconds"]}
        if stage == "vae":
            expected |= {f"vae/{name}" for name in ("val_ms_ssim", "val_ssim", "val_psnr")}
            expected |= {f"vae/val_spectral_energy/{band}" for band in ("low", "mid", "high")}
        assert set(events.Tags()["scalars"]) == expected
        assert f"{stage}/seconds/train_steps" in expected and f"{stage}/seconds/total" in expected
        for tag in expected:
            *_, name = tag.split("/")
            logged = [(event.step, event.value) for event in events.Scalars(tag)]
            section = tag.split("/")[1] if tag.count("/") == 2 else None  # seconds/..., val_spectral_energy/...
            values = [entry[section][name] if section else entry[name] for entry in entries]
            assert logged == [(entry["epoch"], pytest.approx(value, rel=1e-6)) for entry, value in zip(entries, values)], tag


def test_reconstructions_and_sample_grids_are_images(logged_run: Path) -> None:
    vae, unet = (read_events(logged_run / "tensorboard" / stage) for stage in ("vae", "unet"))
    assert vae.Tags()["images"] == ["vae/reconstructions"]
    assert [event.step for event in vae.Images("vae/reconstructions")] == [1, 2]  # validated every epoch
    assert sorted(unet.Tags()["images"]) == ["unet/samples_AD", "unet/samples_NC"]
    for class_name in ("AD", "NC"):
        logged = unet.Images(f"unet/samples_{class_name}")
        assert [event.step for event in logged] == [2]  # sample_every 2 of 2 epochs
        with Image.open(logged_run / "samples" / f"epoch002_{class_name}.png") as saved:
            expected = np.asarray(saved.convert("L"))
        with Image.open(BytesIO(logged[-1].encoded_image_string)) as image:
            assert np.array_equal(np.asarray(image.convert("L")), expected)


def test_no_tensorboard_folder_unless_asked(trained_run: Path) -> None:
    assert not (trained_run / "tensorboard").exists()


def test_missing_package_is_one_line_before_anything_is_written(tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a machine without the package sees
    with pytest.raises(SystemExit) as exit_:
        run_train(tiny_dataset, tmp_path / "run", "--run.tensorboard", "true")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: --run.tensorboard true needs the tensorboard package: pip install tensorboard\n"
    assert not (tmp_path / "run").exists()


def test_a_resumed_stage_replaces_what_the_killed_run_logged_after_its_checkpoint(tmp_path: Path) -> None:
    """Killed after epoch 3's log but before its checkpoint, a run resumes at epoch 3: one line, the new values."""
    from utils import TensorBoardLog

    first = TensorBoardLog(tmp_path / "vae")
    for epoch in (1, 2, 3):
        first.epoch(
            {"stage": "vae", "epoch": epoch, "step": 10 * epoch, "train_loss": float(epoch), "seconds": {"total": 1.0}}, "vae"
        )
    first.close()
    resumed = TensorBoardLog(tmp_path / "vae", first_epoch=3)
    for epoch in (3, 4):
        resumed.epoch(
            {"stage": "vae", "epoch": epoch, "step": 10 * epoch, "train_loss": epoch + 0.5, "seconds": {"total": 2.0}}, "vae"
        )
    resumed.close()
    events = read_events(tmp_path / "vae")
    assert set(events.Tags()["scalars"]) == {"vae/train_loss", "vae/seconds/total"}
    assert [(e.step, e.value) for e in events.Scalars("vae/train_loss")] == [(1, 1.0), (2, 2.0), (3, 3.5), (4, 4.5)]


def test_a_disabled_log_writes_nothing(tmp_path: Path) -> None:
    from utils import TensorBoardLog

    log = TensorBoardLog(tmp_path / "off", enabled=False)
    log.epoch({"stage": "vae", "epoch": 1, "train_loss": 1.0}, "vae")
    log.close()
    assert not (tmp_path / "off").exists()
