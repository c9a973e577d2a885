"""Bad input to train.py, predict.py and evaluate.py: refused in one line with exit 2 before any work,
and nothing lost or left behind (run lock, VAE fingerprint, stale temporary files, --overwrite)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
import predict
import utils
from conftest import make_tiny_dataset, run_train, tree_fingerprint
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


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_only_the_temporary_files_of_dead_writers_are_removed_on_the_next_start(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    host, dead = socket.gethostname(), dead_pid()
    leftovers = [
        run_dir / f".unet.pt.{host}-{dead}-x1y2z3ab.tmp",
        run_dir / "samples" / f".epoch002_AD.png.{host}-{dead}-abcd1234.tmp",
    ]
    writer = subprocess.Popen(["sleep", "60"])  # a predict.py still writing into the run's generated/ folder
    try:
        kept = [
            run_dir / "generated" / "AD" / f".AD_0241.png.{host}-{writer.pid}-abcd1234.tmp",
            run_dir / f".config.json.another-host-{dead}-abcd1234.tmp",  # its writer is out of sight
        ]
        for path in leftovers + kept:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half a file")
        run_train(tiny_dataset, run_dir, "--resume")  # both stages are finished: nothing to train
    finally:
        writer.kill()
        writer.wait()
    assert "removed 2 temporary file(s) that stopped writers left in" in capsys.readouterr().out
    assert not any(path.exists() for path in leftovers) and all(path.exists() for path in kept)


def test_temporary_files_name_their_writer(tmp_path: Path) -> None:
    with utils.atomic_path(tmp_path / "metrics.json") as temp_path:
        assert re.fullmatch(rf"\.metrics\.json\.{re.escape(socket.gethostname())}-{os.getpid()}-[a-z0-9_]+\.tmp", temp_path.name)
        temp_path.write_text("{}")
        assert utils.remove_temporary_files(tmp_path) == 0  # its writer is alive: this process
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]


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
        (["--guidance", "nan"], "--guidance nan: must be a number from 0 to 30 (1 = no guidance"),
        (["--guidance", "inf"], "--guidance inf: must be a number from 0 to 30"),
        (["--guidance", "1e30"], "--guidance 1e+30: must be a number from 0 to 30"),
        (["--guidance", "-3"], "--guidance -3.0: must be a number from 0 to 30"),
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


@pytest.mark.parametrize("damage", ["no_config", "no_ema", "tensor", "epoch", "slice_range", "history"])
def test_a_wrongly_shaped_checkpoint_is_one_line(trained_run: Path, tmp_path: Path, capsys, damage: str) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    state = load_checkpoint(run_dir / "unet.pt")
    if damage == "tensor":
        state = torch.zeros(3)
    elif damage in ("epoch", "slice_range", "history"):  # a stored value of the wrong type
        state[damage] = {"epoch": "two", "slice_range": "abc", "history": None}[damage]
    else:
        del state["config" if damage == "no_config" else "ema"]
    save_checkpoint(state, run_dir / "unet.pt")
    err = exits_2(capsys, predict.main, ["--run", str(run_dir), "--label", "AD", "--device", "cpu"])
    assert "unet.pt" in err and ("damaged" in err or "is not a unet checkpoint" in err)


# ----------------------------------------------------------------------------- nothing is ever written into a dataset


def test_no_command_writes_into_the_dataset_it_reads(trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data" / "AD_NC"))
    run_dir = copy_run(trained_run, tmp_path)
    inside = Path(shutil.copytree(run_dir, data / "train" / "AD" / "old_run"))  # a run folder some older code put there
    for folder in (run_dir, inside):
        config = json.loads((folder / "config.json").read_text())
        config["data"]["data_dir"] = str(data)
        (folder / "config.json").write_text(json.dumps(config))
    link = tmp_path / "link"
    link.symlink_to(data / "test")  # outside the dataset, but resolving into it
    before = tree_fingerprint(data)
    sampling = ["--device", "cpu", "--steps", "2", "--num-samples", "2"]
    cases = [
        (predict.main, ["--run", str(run_dir), "--label", "both", "--out", str(data / "train"), *sampling], "--out"),
        (predict.main, ["--run", str(run_dir), "--label", "AD", "--out", str(link / "samples"), *sampling], "--out"),
        (predict.main, ["--run", str(inside), "--label", "AD", *sampling], "--out"),  # its default: <run>/generated
        (evaluate.main, ["--run", str(inside), *sampling], "--run"),
        (run_train, (data, data / "train" / "AD" / "myrun"), "--run"),
        (run_train, (data, link / "myrun"), "--run"),
        (run_train, (data, tmp_path / "new", "--data.cache_dir", str(link)), "--data.cache_dir"),
    ]
    for call, args, option in cases:
        err = exits_2(capsys, call, *(args if isinstance(args, tuple) else (args,)))
        assert f"error: {option} " in err and f"lies inside the dataset folder {data}, which brainLDM only ever reads" in err
    assert tree_fingerprint(data) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "link", "run"]


def test_a_link_to_a_run_folder_takes_the_lock_of_the_folder(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    before = {path.name: path.read_bytes() for path in run_dir.glob("*.pt")}
    with folder_lock(run_dir):  # another train.py holds the run under its own name
        err = exits_2(capsys, run_train, tiny_dataset, link, "--resume", "--unet_train.epochs", "3")
    assert f"{run_dir} is in use by process {os.getpid()}" in err
    assert {path.name: path.read_bytes() for path in run_dir.glob("*.pt")} == before


def test_a_refusal_under_the_lock_leaves_neither_folder_nor_lock_file(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    """The refusal comes after the lock is taken (the data must be read first); the lock file goes with it."""
    runs = tmp_path / "runs"
    err = exits_2(capsys, run_train, tiny_dataset, runs / "run", "--batch-size", "100")
    assert "larger than the training split" in err
    assert list(runs.iterdir()) == []


# ----------------------------------------------------------------------------- stored settings are checked when read


def _store(run_dir: Path, where: str, section: str, name: str, value: object) -> None:
    if where == "config.json":
        config = json.loads((run_dir / "config.json").read_text())
        config[section][name] = value
        (run_dir / "config.json").write_text(json.dumps(config))
    else:
        state = load_checkpoint(run_dir / where)
        state["config"][section][name] = value
        save_checkpoint(state, run_dir / where)


@pytest.mark.parametrize(
    "where, section, name, value, message",
    [
        ("config.json", "run", "guidance_scale", float("nan"), "run.guidance_scale nan: must be a number from 0 to 30"),
        ("config.json", "run", "guidance_scale", -3, "run.guidance_scale -3.0: must be a number from 0 to 30"),
        ("config.json", "run", "guidance_scale", 1e30, "run.guidance_scale 1e+30: must be a number from 0 to 30"),
        ("config.json", "unet", "channels", "abc", 'unet.channels: "abc" is not a list such as [64, 128]'),
        ("config.json", "vae", "num_res_blocks", 1.5, "vae.num_res_blocks: 1.5 is not an integer"),
        ("unet.pt", "unet", "channels", "abc", 'unet.pt holds a damaged config (config field unet.channels: "abc" is not a list'),
        (
            "vae.pt",
            "run",
            "guidance_scale",
            float("inf"),
            "vae.pt holds a damaged config (stored config field run.guidance_scale inf",
        ),
    ],
)
@pytest.mark.parametrize("script", ["predict", "evaluate"])
def test_stored_settings_are_checked_like_typed_ones(
    trained_run: Path, tmp_path: Path, capsys, script: str, where: str, section: str, name: str, value: object, message: str
) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    _store(run_dir, where, section, name, value)
    before = sorted(path.name for path in run_dir.iterdir())
    if script == "predict":
        err = exits_2(capsys, predict.main, ["--run", str(run_dir), "--label", "AD", "--device", "cpu", "--steps", "2"])
    else:
        err = exits_2(capsys, evaluate.main, ["--run", str(run_dir), "--device", "cpu", "--steps", "2"])
    assert message in err
    assert sorted(path.name for path in run_dir.iterdir()) == before  # no generated/, metrics or classifier.pt


# ----------------------------------------------------------------------------- every refusal before the work


def test_an_output_that_is_a_folder_where_a_file_is_meant_is_refused_first(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    (out / "samples_AD.png").mkdir(parents=True)
    argv = ["--run", str(trained_run), "--label", "AD", "--out", str(out), "--device", "cpu", "--overwrite"]
    err = exits_2(capsys, predict.main, argv)
    assert f"--out's samples_AD.png {out / 'samples_AD.png'} is a folder, where a file is to be written" in err
    assert sorted(path.name for path in out.iterdir()) == ["samples_AD.png"]
    run_dir = copy_run(trained_run, tmp_path)
    (run_dir / "metrics.json").mkdir()
    err = exits_2(capsys, evaluate.main, ["--run", str(run_dir), "--device", "cpu", "--overwrite"])
    assert f"the run's metrics.json {run_dir / 'metrics.json'} is a folder, where a file is to be written" in err
    assert not (run_dir / "classifier.pt").exists()


def _without_test_images(run_dir: Path, tiny_dataset: Path, tmp_path: Path, keep: int) -> Path:
    """The run, reading a copy of its dataset whose test/AD folder keeps `keep` slices."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data" / "AD_NC"))
    for path in sorted((data / "test" / "AD").iterdir())[keep:]:
        path.unlink()
    config = json.loads((run_dir / "config.json").read_text())
    config["data"]["data_dir"] = str(data)
    (run_dir / "config.json").write_text(json.dumps(config))
    return data


@pytest.mark.parametrize("keep", [0, 1])
def test_evaluate_and_predict_real_refuse_too_few_test_slices_before_sampling(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys, keep: int
) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    _without_test_images(run_dir, tiny_dataset, tmp_path, keep)
    before = sorted(path.name for path in run_dir.iterdir())
    err = exits_2(capsys, evaluate.main, ["--run", str(run_dir), "--device", "cpu", "--steps", "2", "--num-samples", "2"])
    assert f"the test split of {tmp_path / 'data' / 'AD_NC'} has {keep} readable AD slice(s)" in err
    assert sorted(path.name for path in run_dir.iterdir()) == before  # no yardstick trained, nothing sampled
    out = tmp_path / "out"
    argv = ["--run", str(run_dir), "--label", "both", "--real", "--out", str(out), "--device", "cpu", "--steps", "2"]
    if keep == 0:
        err = exits_2(capsys, predict.main, argv)
        assert "has no AD test slices to show beside the samples (--real, --umap): add them to its test/AD folder" in err
        assert not out.exists()
    else:
        predict.main(argv)  # one real slice is enough to show
        assert (out / "real_AD.png").is_file()


def test_a_full_disk_while_saving_a_checkpoint_names_the_file_and_the_free_space(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    run_dir = copy_run(trained_run, tmp_path)
    before = (run_dir / "unet.pt").read_bytes()

    def full_disk(state, path):  # what torch.save raises on ENOSPC, after writing part of the file
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(utils.torch, "save", full_disk)
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**10, 10**10 - 5 * 2**20, 5 * 2**20))
    err = exits_2(capsys, run_train, tiny_dataset, run_dir, "--resume", "--unet_train.epochs", "3")
    assert (
        f"writing the checkpoint {run_dir / 'unet.pt'} failed ([enforce fail at inline_container.cc:672] . unexpected pos "
        "576 vs 534) with 5.0 MiB free on its disk: free some disk space" in err
    )
    assert (run_dir / "unet.pt").read_bytes() == before and not list(run_dir.rglob("*.tmp"))


def test_a_control_character_in_a_path_stays_on_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "predict.py", "--run", str(tmp_path / "a\nb\x1b[31m"), "--label", "AD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"error: run folder {tmp_path}/a\\nb\\x1b[31m not found" in result.stderr


# ----------------------------------------------------------------------------- a stopped writer leaves no temporary file

SLOW_WRITE = """
import sys, time
import PIL.Image
import predict

real_save = PIL.Image.Image.save


def save_then_hang(self, fp, *args, **kwargs):
    real_save(self, fp, *args, **kwargs)
    if "AD_0001.png" in str(fp):  # its temporary file is written, not yet renamed into place
        print("writing", flush=True)
        # Short sleeps: the kernel may deliver SIGTERM to one of torch's threads, which does not cut
        # the main thread's sleep short, and Python runs the handler only when the main thread wakes.
        for _ in range(600):
            time.sleep(0.1)


PIL.Image.Image.save = save_then_hang
predict.main(sys.argv[1:])
"""


def test_sigterm_mid_write_leaves_no_temporary_file(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        "--run",
        str(trained_run),
        "--label",
        "AD",
        "--num-samples",
        "3",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    writer = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITE, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in writer.stdout:
            if line.strip() == "writing":
                break
        assert list((out / "AD").glob(".AD_0001.png.*.tmp")), "the temporary file should exist mid-write"
        writer.send_signal(signal.SIGTERM)
        _, err = writer.communicate(timeout=60)
    finally:
        writer.kill()
    assert writer.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "stopped by SIGTERM; no half-written file is left"
    assert not list(out.rglob("*.tmp")) and (out / "AD" / "AD_0000.png").is_file()


def test_predict_removes_a_dead_writers_temporary_file_on_the_next_start(trained_run: Path, tmp_path: Path, capsys) -> None:
    leftover = tmp_path / "out" / "AD" / f".AD_0001.png.{socket.gethostname()}-{dead_pid()}-abcd1234.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a PNG")
    predict.main(
        [
            "--run",
            str(trained_run),
            "--label",
            "AD",
            "--num-samples",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert "removed 1 temporary file(s) that stopped writers left in" in capsys.readouterr().out
    assert not leftover.exists() and sorted(path.name for path in leftover.parent.iterdir()) == ["AD_0000.png", "AD_0001.png"]
