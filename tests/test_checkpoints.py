"""Checkpoints: atomic writes, weights_only loading, and train.py's stage checkpoint helpers."""

from __future__ import annotations

import io
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pipeline
import train
from config import Config, StageConfig, config_to_dict, make_config
from utils import (
    Runtime,
    UsageError,
    atomic_path,
    load_checkpoint,
    new_figure,
    save_checkpoint,
    save_figure,
    save_image_grid,
    save_png,
)


class Payload:
    """Unpickling this runs `exec(code)`: what a hostile .pt file would do under weights_only=False."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def write_payload(path: Path, marker: Path) -> None:
    torch.save({"model": {"weight": torch.zeros(2)}, "evil": Payload(f"open({str(marker)!r}, 'w').write('pwned')")}, path)


# ============================================================================ utils: atomic writes


def test_atomic_path_renames_a_sibling_temp_file_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "file.bin"  # missing parents are created
    old_mask = os.umask(0o027)
    try:
        with atomic_path(target) as temp:
            assert temp.parent == target.parent and temp.is_file()
            assert temp.name.startswith(".file.bin.") and temp.name.endswith(".tmp")
            assert not target.exists()
            temp.write_bytes(b"data")
            inode = temp.stat().st_ino
    finally:
        os.umask(old_mask)
    assert target.read_bytes() == b"data"
    assert target.stat().st_ino == inode, "the temp file must be renamed onto the target, not copied"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_atomic_path_failure_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as temp:
            temp.write_bytes(b"half")
            raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_crash_inside_torch_save_leaves_previous_checkpoint_byte_identical(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "vae.pt"
    save_checkpoint({"epoch": 1, "model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:20])  # half a file on disk, then the crash
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"epoch": 2, "model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vae.pt"], "a temporary file was left behind"
    monkeypatch.setattr(torch, "save", real_save)
    save_checkpoint({"epoch": 2, "model": {"w": torch.zeros(3)}}, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.zeros(3))


def test_crash_inside_a_png_write_leaves_the_earlier_png_intact(tmp_path: Path, monkeypatch) -> None:
    """Result images (samples, grids, figures) are written like checkpoints: a crash half-way through the
    PNG encoder leaves the earlier file byte-identical and no partial or temporary file."""
    from PIL import Image

    first, second = np.zeros((8, 8), np.uint8), np.full((8, 8), 200, np.uint8)
    Image.init()  # registers the PNG plugin
    real_png = Image.SAVE["PNG"]

    def crash_mid_write(image, handle, filename) -> None:
        buffer = io.BytesIO()
        real_png(image, buffer, filename)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError("encoder crashed")

    def crash_mid_savefig(path, **kwargs) -> None:
        Path(path).write_bytes(b"\x89PNG half a figure")
        raise OSError("encoder crashed")

    figure, _ = new_figure()
    writers = {
        "save_png": lambda path, pixels: save_png(pixels, path),
        "save_image_grid": lambda path, pixels: save_image_grid(pixels[None], path, caption=["a caption"]),
        "save_figure": lambda path, pixels: save_figure(figure, path),
    }
    for name, write in writers.items():
        folder = tmp_path / name
        folder.mkdir()
        write(folder / "result.png", first)
        before = (folder / "result.png").read_bytes()
        monkeypatch.setitem(Image.SAVE, "PNG", crash_mid_write)
        monkeypatch.setattr(figure, "savefig", crash_mid_savefig)
        with pytest.raises(OSError, match="encoder crashed"):
            write(folder / "result.png", second)
        monkeypatch.undo()
        assert (folder / "result.png").read_bytes() == before, f"{name}: a crash mid-write damaged the earlier PNG"
        assert [p.name for p in folder.iterdir()] == ["result.png"], f"{name}: a partial or temporary file was left"


# ============================================================================ utils: loading


def test_load_checkpoint_refuses_a_pickle_payload_without_running_it(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned.txt"
    write_payload(path, marker)
    with pytest.raises(UsageError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "not a readable brainLDM checkpoint" in message and str(path) in message and "\n" not in message
    assert not marker.exists(), "the pickled payload ran"
    torch.load(path, weights_only=False)  # the payload is real: a plain pickle load runs it
    assert marker.read_text() == "pwned"


def test_load_checkpoint_errors_are_one_line(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UsageError, match="checkpoint .*missing.pt not found"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    save_checkpoint({"w": torch.ones(100)}, garbage)
    whole = garbage.read_bytes()
    for content in (whole[: len(whole) // 2], b"", b"\0" * 100):  # truncated, empty, zeros
        garbage.write_bytes(content)
        with pytest.raises(UsageError, match="is not a readable brainLDM checkpoint") as info:
            load_checkpoint(garbage)
        assert "\n" not in str(info.value)

    def raising(error):
        def load(*args, **kwargs):
            raise error

        return load

    monkeypatch.setattr(torch, "load", raising(EOFError()))
    with pytest.raises(UsageError) as info:
        load_checkpoint(garbage)
    assert str(info.value).endswith("(EOFError)")
    monkeypatch.setattr(torch, "load", raising(ValueError("x" * 300 + "\nsecond line")))
    with pytest.raises(UsageError) as info:
        load_checkpoint(garbage)
    assert str(info.value) == f"{garbage} is not a readable brainLDM checkpoint ({'x' * 120})"
    monkeypatch.setattr(torch, "load", raising(pickle.UnpicklingError("  \nfirst\nsecond")))
    with pytest.raises(UsageError, match=r"\(first\)$"):
        load_checkpoint(garbage)


def test_load_checkpoint_refuses_a_text_file(tmp_path: Path) -> None:
    garbage = tmp_path / "notes.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UsageError, match="is not a readable brainLDM checkpoint"):
        load_checkpoint(garbage)


def test_load_checkpoint_passes_map_location(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint({"w": torch.ones(2)}, path)
    assert load_checkpoint(path)["w"].device.type == "cpu"
    assert load_checkpoint(path, map_location="meta")["w"].device.type == "meta"


# ============================================================================ train.py: stage checkpoints


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def trained_state(config: Config, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer, object, dict]:
    torch.manual_seed(0)
    model = tiny_model()
    optimizer, schedule = train.make_optimizer(model, config.vae_train, steps_per_epoch=10)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
        schedule.step()
    state = pipeline.checkpoint_state("vae", config, model, optimizer, schedule, 2, steps, [{"epoch": 1}, {"epoch": 2}], extra=7)
    return model, optimizer, schedule, state


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_checkpoint_state_holds_everything_a_resume_needs() -> None:
    config = make_config("demo")
    model, optimizer, schedule, state = trained_state(config)
    assert state.keys() == {"format", "stage", "config", "model", "optimizer", "lr_schedule", "epoch", "step", "history", "extra"}
    assert (state["format"], state["stage"], state["epoch"], state["step"], state["extra"]) == (
        pipeline.CHECKPOINT_FORMAT,
        "vae",
        2,
        3,
        7,
    )
    assert state["config"] == config_to_dict(config)
    assert_same(state["model"], model.state_dict())
    assert_same(state["optimizer"], optimizer.state_dict())
    assert state["lr_schedule"]["last_epoch"] == 3
    assert state["history"] == [{"epoch": 1}, {"epoch": 2}]


def test_restore_stage_loads_weights_optimizer_schedule_epoch_and_step(tmp_path: Path) -> None:
    config = make_config("demo")
    runtime = Runtime(torch.device("cpu"))
    _, _, _, state = trained_state(config)
    path = tmp_path / "vae.pt"
    save_checkpoint(state, path)

    torch.manual_seed(1)
    model = tiny_model()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, schedule = train.make_optimizer(model, config.vae_train, steps_per_epoch=10)
    assert train.restore_stage(path, "vae", False, config, runtime, model, optimizer, schedule) == (0, 0, [], {})
    assert train.restore_stage(tmp_path / "none.pt", "vae", True, config, runtime, model, optimizer, schedule) == (0, 0, [], {})
    assert_same(model.state_dict(), fresh)
    assert optimizer.state_dict()["state"] == {} and schedule.last_epoch == 0

    epoch, step, history, loaded = train.restore_stage(path, "vae", True, config, runtime, model, optimizer, schedule)
    assert (epoch, step, history) == (2, 3, [{"epoch": 1}, {"epoch": 2}])
    assert loaded["extra"] == 7
    assert_same(model.state_dict(), state["model"])
    assert_same(optimizer.state_dict(), state["optimizer"])
    assert schedule.last_epoch == 3 and schedule.get_last_lr() == state["lr_schedule"]["_last_lr"]


def test_load_stage_checkpoint_refuses_other_stage_format_config_and_payloads(tmp_path: Path) -> None:
    config = make_config("demo")
    device = torch.device("cpu")
    _, _, _, state = trained_state(config)
    path = tmp_path / "vae.pt"
    save_checkpoint(state, path)
    assert pipeline.load_stage_checkpoint(path, "vae", config, device)["step"] == 3
    with pytest.raises(UsageError, match="is not a unet checkpoint of this brainLDM version"):
        pipeline.load_stage_checkpoint(path, "unet", config, device)
    save_checkpoint({**state, "format": pipeline.CHECKPOINT_FORMAT + 1}, path)
    with pytest.raises(UsageError, match="is not a vae checkpoint"):
        pipeline.load_stage_checkpoint(path, "vae", config, device)
    save_checkpoint([1, 2], path)
    with pytest.raises(UsageError, match="is not a vae checkpoint"):
        pipeline.load_stage_checkpoint(path, "vae", config, device)
    save_checkpoint(state, path)
    other = make_config("demo")
    other.vae.channels = (8, 8, 16)
    other.data.image_size = 48
    with pytest.raises(UsageError, match=r"another config \(vae.channels: .*data.image_size: 64 → 48\)"):
        pipeline.load_stage_checkpoint(path, "vae", other, device)
    other = make_config("demo")
    other.vae_train.lr = 0.5  # optimisation settings may change on resume
    assert pipeline.load_stage_checkpoint(path, "vae", other, device)["epoch"] == 2
    marker = tmp_path / "pwned.txt"
    write_payload(path, marker)
    with pytest.raises(UsageError, match="not a readable brainLDM checkpoint"):
        pipeline.load_stage_checkpoint(path, "vae", config, device)
    assert not marker.exists()


def test_load_weights_mismatch_is_a_one_line_usage_error(monkeypatch) -> None:
    model = nn.Linear(3, 2)
    pipeline.load_weights(model, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, Path("x.pt"))
    assert torch.equal(model.weight, torch.ones(2, 3))
    with pytest.raises(UsageError, match=r"\(size mismatch for weight: .*\): start a new --run$"):  # one bad key: 2 lines
        pipeline.load_weights(model, {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}, Path("x.pt"))
    with pytest.raises(UsageError) as info:
        pipeline.load_weights(model, nn.Linear(3, 4).state_dict(), Path("x.pt"))
    message = str(info.value)
    assert message.startswith("x.pt does not fit this model (size mismatch for weight:") and message.endswith(
        ": start a new --run"
    )
    assert "\n" not in message
    monkeypatch.setattr(model, "load_state_dict", lambda weights: (_ for _ in ()).throw(RuntimeError("  boom  ")))
    with pytest.raises(UsageError, match=r"^x.pt does not fit this model \(boom\): start a new --run$"):
        pipeline.load_weights(model, {}, Path("x.pt"))


def test_evil_checkpoint_in_a_run_is_refused_in_one_line(trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    from conftest import run_train

    run_dir, marker = tmp_path / "evil", tmp_path / "pwned.txt"
    run_dir.mkdir()
    for name in ("config.json", "splits.json"):
        (run_dir / name).write_bytes((trained_run / name).read_bytes())
    write_payload(run_dir / "vae.pt", marker)
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, run_dir, "--stage", "vae", "--resume")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a readable brainLDM checkpoint" in err
    assert not marker.exists()


def test_damaged_and_foreign_checkpoints_name_exactly_what_is_wrong(tmp_path: Path, monkeypatch) -> None:
    config = make_config("demo")
    device = torch.device("cpu")
    model, _, _, state = trained_state(config)
    path = tmp_path / "vae.pt"
    save_checkpoint({key: value for key, value in state.items() if key not in ("step", "history")}, path)
    with pytest.raises(UsageError) as error:
        pipeline.load_stage_checkpoint(path, "vae", config, device)
    assert str(error.value) == f"{path} is damaged (no step, history): resume from a copy or start a new --run"
    save_checkpoint({**state, "config": "text"}, path)
    with pytest.raises(UsageError) as error:
        pipeline.load_stage_checkpoint(path, "vae", config, device)
    assert str(error.value) == f"{path} is damaged (config holds a str): resume from a copy or start a new --run"
    # Four model fields differ: the message names the first three, separated by "; ".
    save_checkpoint(state, path)
    other = make_config("demo")
    other.vae.channels, other.vae.num_res_blocks, other.vae.kl_weight, other.vae.ssim_weight = (8, 8, 16), 2, 0.5, 0.5
    with pytest.raises(UsageError) as error:
        pipeline.load_stage_checkpoint(path, "vae", other, device)
    assert "(vae.channels: (16, 32) → (8, 8, 16); vae.num_res_blocks: 1 → 2; vae.kl_weight: 1e-06 → 0.5)" in str(error.value)
    # A weight that does not fit names the checkpoint, also through restore_stage.
    save_checkpoint({**state, "model": {**state["model"], "bias": torch.zeros(7)}}, path)
    optimizer, schedule = train.make_optimizer(model, config.vae_train, 3)
    with pytest.raises(UsageError, match=f"{path} does not fit this model"):
        train.restore_stage(path, "vae", True, config, Runtime(device), model, optimizer, schedule)
    # The operating system's refusal to read is one line too.
    save_checkpoint(state, path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(UsageError) as error:
        load_checkpoint(path)
    assert str(error.value) == f"cannot read {path} (Permission denied): check the file's permissions"


@pytest.mark.parametrize(
    "epochs, steps, warmup, expected",
    [
        (1, 1, 5, [1.0, 0.1]),  # one step in all: no warm-up, then the floor
        (1, 3, 5, [1.0, 1.0, 0.55, 0.1]),  # warm-up capped at half the steps, rounded down
        (1, 2, 3, [1.0, 1.0, 0.1]),  # one step of decay left after the warm-up
    ],
)
def test_learning_rate_schedule_on_the_shortest_runs(epochs: int, steps: int, warmup: int, expected: list[float]) -> None:
    model = nn.Linear(2, 1)
    stage = StageConfig(epochs=epochs, lr=1.0, warmup_steps=warmup, min_lr_ratio=0.1)
    optimizer, schedule = train.make_optimizer(model, stage, steps)
    rates = []
    for _ in expected:
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx(expected)


def test_a_checkpoint_from_before_the_fused_qkv_loads_its_weights_but_refuses_to_resume_training(tmp_path: Path) -> None:
    """A VAE checkpoint in the old layout (separate to_q and to_kv, and an optimizer holding state for
    both): its weights load into today's VAE; resuming its training is refused in one line, as the
    optimizer's per-parameter state no longer matches the parameters."""
    from modules import AutoencoderKL, split_qkv

    config = make_config("tiny")
    runtime = Runtime(torch.device("cpu"))
    old_vae = AutoencoderKL(config.vae)
    old_weights = split_qkv(old_vae.state_dict())
    # The old optimizer: one more parameter per self-attention (to_q and to_kv rather than to_qkv).
    old_parameters = [nn.Parameter(tensor.clone()) for key, tensor in old_weights.items() if key != "scale_factor"]
    old_optimizer = torch.optim.AdamW(old_parameters)
    sum(p.sum() for p in old_parameters).backward()
    old_optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(old_optimizer, lambda step: 1.0)
    state = pipeline.checkpoint_state("vae", config, old_vae, old_optimizer, schedule, 1, 1, [])
    state["model"] = old_weights
    path = tmp_path / "vae.pt"
    save_checkpoint(state, path)

    vae = AutoencoderKL(config.vae)
    pipeline.load_weights(vae, load_checkpoint(path)["model"], path)
    assert_same(vae.state_dict(), old_vae.state_dict())
    optimizer, schedule = train.make_optimizer(vae, config.vae_train, steps_per_epoch=10)
    with pytest.raises(UsageError, match="older brainLDM with separate q/k/v projections.*new --run"):
        train.restore_stage(path, "vae", True, config, runtime, vae, optimizer, schedule)
