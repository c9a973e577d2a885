"""Hostile input to dataset.py and project_setup.py: one clear line (or a counted skip), never a traceback,
and the dataset folder never written."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import dataset
import project_setup
from conftest import make_tiny_dataset, tree_fingerprint
from dataset import (
    DatasetError,
    UnreadableImageError,
    decode_images,
    index_dataset,
    load_splits,
    parse_image_name,
    read_image,
)
from utils import usage_errors_exit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tiny_root(tmp_path: Path) -> Path:
    return make_tiny_dataset(tmp_path / "AD_NC", {"train/AD": 2, "train/NC": 2, "test/AD": 1, "test/NC": 1})


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def run_script(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """project_setup.py in a fresh interpreter whose stdout is strict UTF-8, as under an en_US.UTF-8 locale."""
    return subprocess.run(
        [sys.executable, str(REPO / "project_setup.py"), *map(str, args)],
        cwd=cwd,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- 1. image files


@pytest.mark.parametrize(
    "width, height, warnings_as",
    [(20_000, 10_000, "default"), (10_000, 10_000, "ignore"), (10_000, 10_000, "error")],
    ids=["200MP-bomb-error", "100MP-bomb-warning", "100MP-under--W-error"],
)
def test_decompression_bomb_is_unreadable(tmp_path: Path, width: int, height: int, warnings_as: str) -> None:
    path = tmp_path / "1_1.png"
    path.write_bytes(png_declaring(width, height))
    with warnings.catch_warnings():
        warnings.simplefilter(warnings_as, Image.DecompressionBombWarning)
        with pytest.raises(UnreadableImageError, match=rf"^{re.escape(str(path))}: .*decompression.bomb"):
            read_image(path)


@pytest.mark.parametrize("error", [struct.error("unpack requires a buffer"), EOFError(), IndexError("x"), KeyError(1)])
def test_any_decoder_exception_is_unreadable(tmp_path: Path, monkeypatch, error: Exception) -> None:
    path = tmp_path / "1_1.png"
    Image.new("L", (8, 8)).save(path)

    def broken_load(self):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(UnreadableImageError, match=rf"^{re.escape(str(path))}: \S"):
        read_image(path)


def test_bomb_is_skipped_counted_and_reported(tiny_root: Path, tmp_path: Path, capsys) -> None:
    bomb = tiny_root / "train" / "AD" / "100001_99.png"
    bomb.write_bytes(png_declaring(20_000, 10_000))
    before = tree_fingerprint(tiny_root)
    config = dataset.DataConfig(data_dir=str(tiny_root), image_size=16, cache_dir=str(tmp_path / "cache"))
    datasets, _ = dataset.load_split_datasets(config)
    assert "skipped 1 unreadable images" in capsys.readouterr().out
    assert sum(len(d) for d in datasets.values()) == len(index_dataset(tiny_root).records) - 1
    facts = project_setup.inspect_image(bomb)
    assert facts.problem.startswith(f"{bomb}: ") and facts.size is None
    assert tree_fingerprint(tiny_root) == before


# ----------------------------------------------------------------------------- 2. file names


@pytest.mark.parametrize(
    "name",
    [
        "9_².jpeg",
        "١٢_3.jpeg",
        "12_٣.jpeg",
        "1_\u2075.png",
        "123_99999999999999999999999.jpeg",
        "1_1000001.jpeg",
        "a b_1.jpeg",
        "x\n_1.jpeg",
        "abc_\udcff.jpeg",
        "\udcff_1.jpeg",
    ],
)
def test_non_ascii_and_huge_names_are_not_images(name: str) -> None:
    assert parse_image_name(name) is None


def test_parse_still_takes_plain_names() -> None:
    assert parse_image_name("1_1000000.jpeg") == ("1", 10**6)
    assert parse_image_name("S_12-3.a_007.PNG") == ("S_12-3.a", 7)


def test_odd_names_are_skipped_and_reported_without_traceback(tiny_root: Path, tmp_path: Path) -> None:
    """Non-ASCII digits, a 23-digit slice, names that are not UTF-8, and a decompression bomb, end to end."""
    folder = tiny_root / "train" / "AD"
    for name in ("9_².jpeg", "١٢_3.jpeg", "123_99999999999999999999999.jpeg"):
        (folder / name).write_bytes(b"\xff\xd8")
    for raw in (b"abc_\xff.jpeg", b"\xfe\xff_1.jpeg"):
        with open(os.fsencode(folder) + b"/" + raw, "wb") as handle:
            handle.write(b"\xff\xd8")
    (folder / "100001_99.png").write_bytes(png_declaring(20_000, 10_000))
    before = tree_fingerprint(tiny_root)
    index = index_dataset(tiny_root)
    assert len(index.skipped) == 5 and all(r.path.name.isascii() for r in index.records)
    result = run_script("--data-dir", tiny_root, cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "5 other files skipped" in result.stdout and "1 unreadable" in result.stdout
    assert "abc_\\xff.jpeg" in result.stdout and "\\xfe\\xff_1.jpeg" in result.stdout
    assert "100001_99.png: Image size (200000000 pixels) exceeds limit" in result.stdout
    assert tree_fingerprint(tiny_root) == before


# ----------------------------------------------------------------------------- 3. unreadable class folder


def test_unreadable_class_folder_is_one_line(tiny_root: Path, monkeypatch, run_setup) -> None:
    locked = tiny_root / "train" / "AD"
    real_iterdir = Path.iterdir

    def iterdir(self: Path):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    message = rf"^cannot read the folder {re.escape(str(locked))} \(Permission denied\): .*chmod"
    with pytest.raises(DatasetError, match=message):
        index_dataset(tiny_root)
    code, _, err = run_setup("--data-dir", tiny_root)
    assert_one_line_error(code, err, f"cannot read the folder {locked}", "chmod -R u+rX")


def test_unsearchable_class_folder_is_one_line(tiny_root: Path, monkeypatch) -> None:
    """A folder that lists but whose entries cannot be stat'ed (r without x) fails on is_file."""
    locked = tiny_root / "test" / "NC"
    real_is_file = Path.is_file

    def is_file(self: Path) -> bool:
        if self.parent == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    with pytest.raises(DatasetError, match=rf"^cannot read the folder {re.escape(str(locked))} "):
        index_dataset(tiny_root)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads a chmod 000 folder anyway")
def test_chmod_000_class_folder_is_one_line(tiny_root: Path) -> None:
    locked = tiny_root / "train" / "AD"
    locked.chmod(0)
    try:
        with pytest.raises(DatasetError, match=f"cannot read the folder {re.escape(str(locked))}"):
            index_dataset(tiny_root)
    finally:
        locked.chmod(0o755)


# ----------------------------------------------------------------------------- 4. damaged decode cache


def _garbage(path: Path) -> None:
    path.write_bytes(b"garbage")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_shape(path: Path) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, pixels=np.zeros((3, 8, 8), np.uint8), readable=np.ones(3, bool), unreadable=np.array([], str))


def _plain_npy(path: Path) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.zeros(4))


@pytest.mark.parametrize(
    "damage",
    [_truncate, _wrong_shape, _plain_npy, _garbage, _empty],
    ids=["truncated", "wrong-shape", "plain-npy", "garbage", "empty"],
)
def test_damaged_decode_cache_is_rebuilt(tiny_root: Path, tmp_path: Path, capsys, damage) -> None:
    records = index_dataset(tiny_root).records
    cache = tmp_path / "cache"
    first = decode_images(records, 16, cache)
    (cache_file,) = cache.glob("*.npz")
    damage(cache_file)
    (cache / "images_index.json").write_text("{not json")  # a stray file beside it changes nothing
    capsys.readouterr()
    before = tree_fingerprint(tiny_root)
    again = decode_images(records, 16, cache)
    out = capsys.readouterr().out
    assert out.startswith(f"the decode cache {cache_file} is damaged (") and out.endswith(": rebuilding it\n")
    assert out.count("\n") == 1
    np.testing.assert_array_equal(again.pixels, first.pixels)
    third = decode_images(records, 16, cache)  # rebuilt: read back silently
    assert capsys.readouterr().out == "" and third.readable.all()
    assert tree_fingerprint(tiny_root) == before


def test_unwritable_decode_cache_is_a_note(tiny_root: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    decoded = decode_images(index_dataset(tiny_root).records, 16, blocker)
    assert decoded.readable.all()
    assert capsys.readouterr().out.startswith("could not write the decode cache ")


# ----------------------------------------------------------------------------- 5. splits.json


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"this is not json", "Expecting value"),
        (b"\xff\xfe\x00garbage", "codec can't decode"),
        (b'["1", "2"]', "a JSON list, not an object"),
        (b'{"train": ["1"], "val": []}', '"test" is not a list'),
        (b'{"train": [1, 2], "val": [], "test": []}', '"train" is not a list of scan IDs'),
        (b'{"train": "123", "val": [], "test": []}', '"train" is not a list'),
        (b'{"train": ["1"], "val": ["2"], "test": ["1"]}', "scan 1 is in both the train and test splits"),
        (b'{"train": ["1", "1"], "val": [], "test": []}', "scan 1 is twice in the train split"),
    ],
)
def test_damaged_splits_file_is_one_line(tmp_path: Path, capsys, content: bytes, reason: str) -> None:
    path = tmp_path / "run" / "splits.json"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_, usage_errors_exit():
        load_splits(path)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {path} is damaged (") and reason in err and "start a new run" in err


def test_good_splits_file_loads(tmp_path: Path) -> None:
    dataset.save_splits(tmp_path / "splits.json", {"train": ["1"], "val": ["2"], "test": ["3"]}, 0.1, 0)
    assert load_splits(tmp_path / "splits.json") == {"train": ["1"], "val": ["2"], "test": ["3"]}


# ----------------------------------------------------------------------------- 6. zip hygiene


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def patch_headers(path: Path, flag_bits: int | None = None, method: int | None = None) -> None:
    """Set the flag bits / compression method of every entry, in local and central headers alike."""
    data = bytearray(path.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = data.find(signature)
        while start >= 0:
            if flag_bits is not None:
                data[start + flags_at : start + flags_at + 2] = struct.pack("<H", flag_bits)
            if method is not None:
                data[start + flags_at + 2 : start + flags_at + 4] = struct.pack("<H", method)
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))


# One (not decodable) slice per class folder: enough for the checks, which come before any layout test.
SLICES = {f"AD_NC/{split}/{name}/10_1.jpeg": b"\xff\xd8" for split in ("train", "test") for name in ("AD", "NC")}


def unpack_refused(run_setup, tmp_path: Path, zip_path: Path, *fragments: str) -> None:
    code, _, err = run_setup("--zip", zip_path, "--data-dir", tmp_path / "unpacked" / "AD_NC")
    assert_one_line_error(code, err, "nothing unpacked", *fragments)
    assert not (tmp_path / "unpacked").exists(), "something was left behind"


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("second", ["AD_NC/train/AD/10_1.jpeg", "AD_NC\\train\\AD\\10_1.jpeg", "AD_NC/train/./AD/10_1.jpeg"])
def test_zip_with_duplicate_paths_is_refused(tmp_path: Path, run_setup, second: str) -> None:
    zip_path = write_zip(tmp_path / "d.zip", SLICES)
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr(second, b"another slice")
    unpack_refused(run_setup, tmp_path, zip_path, "1 paths more than once", "'AD_NC/train/AD/10_1.jpeg'")


def test_zip_bomb_is_refused(tmp_path: Path, run_setup, monkeypatch) -> None:
    monkeypatch.setattr(project_setup, "ZIP_BOMB_MIN_BYTES", 2**20)  # the rule at a test's scale
    zip_path = write_zip(tmp_path / "b.zip", {**SLICES, "AD_NC/zeros.bin": bytes(4 * 2**20)}, zipfile.ZIP_DEFLATED)
    unpack_refused(run_setup, tmp_path, zip_path, "a zip bomb")


def test_zip_larger_than_the_free_space_is_refused(tmp_path: Path, run_setup, monkeypatch) -> None:
    zip_path = write_zip(tmp_path / "s.zip", SLICES)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5, 5))
    unpack_refused(run_setup, tmp_path, zip_path, "GiB free", "free some space")


def test_zip_of_normal_compression_is_accepted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(project_setup, "ZIP_BOMB_MIN_BYTES", 2**20)
    noise = np.random.default_rng(0).integers(0, 256, 2 * 2**20, dtype=np.uint8).tobytes()
    zip_path = write_zip(tmp_path / "n.zip", {**SLICES, "AD_NC/noise.bin": noise}, zipfile.ZIP_DEFLATED)
    project_setup.unpack_zip(zip_path, tmp_path / "out" / "AD_NC")
    assert (tmp_path / "out" / "AD_NC" / "noise.bin").read_bytes() == noise


def test_encrypted_zip_is_refused(tmp_path: Path, run_setup) -> None:
    zip_path = write_zip(tmp_path / "e.zip", SLICES)
    patch_headers(zip_path, flag_bits=0x1)
    unpack_refused(run_setup, tmp_path, zip_path, "is encrypted", "password")


def test_deflate64_zip_is_refused(tmp_path: Path, run_setup) -> None:
    zip_path = write_zip(tmp_path / "d64.zip", SLICES)
    patch_headers(zip_path, method=9)
    with zipfile.ZipFile(zip_path) as archive, pytest.raises(NotImplementedError):
        archive.read(archive.infolist()[0])  # what unpacking used to meet half-way through
    unpack_refused(run_setup, tmp_path, zip_path, "compression method 9", "7-Zip")


def test_encrypted_zip_from_the_command_line_has_no_traceback(tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "e.zip", SLICES)
    patch_headers(zip_path, flag_bits=0x1)
    result = run_script("--zip", zip_path, "--data-dir", tmp_path / "unpacked" / "AD_NC", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and "is encrypted" in result.stderr
    assert not (tmp_path / "unpacked").exists()


# ----------------------------------------------------------------------------- 7. residue of killed runs


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_processes_are_removed(tiny_root: Path, run_setup) -> None:
    host, dead = socket.gethostname(), dead_pid()
    leftovers = [
        tiny_root.parent / f".AD_NC.{purpose}-{host}-{dead}-0123abcd"
        for purpose in ("building", "unpacking", "converting", "replaced")
    ]
    kept = [
        tiny_root.parent / f".AD_NC.building-{host}-{os.getpid()}-0123abcd",  # a live build
        tiny_root.parent / f".AD_NC.building-other-host-{dead}-0123abcd",  # its process is out of sight
        tiny_root.parent / f".OTHER.building-{host}-{dead}-0123abcd",  # not this dataset's
    ]
    for folder in leftovers + kept:
        (folder / "train" / "AD").mkdir(parents=True)
        (folder / "train" / "AD" / "1_1.jpeg").write_bytes(b"\xff\xd8")
    code, out, err = run_setup("--data-dir", tiny_root)
    assert code == 0, err
    (note,) = [line for line in out.splitlines() if line.startswith("removed")]
    assert note.startswith("removed 4 folder(s) that a killed demo build, unpacking or conversion left next to ")
    assert not any(folder.exists() for folder in leftovers) and all(folder.exists() for folder in kept)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, waiting for its new parent to reap it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


KILLED_BUILD = """
import os, sys, time
sys.path.insert(0, sys.argv[3])
import project_setup

def slow_scan(scan, seed, root, atlas=None):
    open(os.path.join(sys.argv[2], str(os.getpid())), "w").close()
    time.sleep(120)

project_setup.load_atlas = lambda: None
project_setup._write_scan = slow_scan
project_setup.build_demo(sys.argv[1], 4, seed=0, workers=2)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_demo_build_takes_its_workers_along_and_is_cleaned_up(tmp_path: Path) -> None:
    root, pids = tmp_path / "demo" / "AD_NC", tmp_path / "pids"
    pids.mkdir()
    build = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(root), str(pids), str(REPO)])
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(workers) < 2 and time.monotonic() < deadline and build.poll() is None:
            time.sleep(0.1)
            workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2, "the workers never started"
        build.send_signal(signal.SIGKILL)
        build.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "workers outlived the killed build"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    (leftover,) = root.parent.iterdir()
    assert leftover.name.startswith(".AD_NC.building-")
    assert project_setup.remove_leftovers(root) == [leftover] and not leftover.exists()


# ----------------------------------------------------------------------------- 8. more than the machine can hold


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is how the test sets a memory limit")
def test_images_too_large_for_the_memory_limit_are_refused_before_decoding(tiny_root: Path, tmp_path: Path) -> None:
    """16384 px slices would need 6 GiB for 24 decoded images: one line under a 4 GiB limit, not numpy's traceback."""
    import resource

    limit = 4 * 2**30

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--preset", "tiny", "--data-dir", str(tiny_root), "--run", str(tmp_path / "run")]
        + ["--data.image_size", "16384"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=set_limit,
    )
    assert_one_line_error(
        result.returncode,
        result.stderr,
        "the 24 decoded images at 16384 px need 6.0 GiB of memory, more than the 4.0 GiB this process may use",
        "lower --data.image_size",
    )
    assert not (tmp_path / "run").exists()


def test_an_allocation_that_fails_anyway_is_one_line(capsys) -> None:
    def allocate() -> None:
        raise MemoryError("Unable to allocate 40.0 GiB for an array with shape (64, 16384, 16384) and data type uint8")

    with pytest.raises(SystemExit) as exit_, usage_errors_exit():
        allocate()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: out of memory (Unable to allocate 40.0 GiB for an array") and "lower --batch-size" in err


# ----------------------------------------------------------------------------- 9. one line, whatever a path holds


def test_an_error_line_shows_control_characters_and_undecodable_bytes_escaped(capsys) -> None:
    with pytest.raises(SystemExit), usage_errors_exit():
        raise dataset.DatasetError("dataset folder /data/a\nb\r\x1b[2J\udcff\u2028c not found")
    assert capsys.readouterr().err == "error: dataset folder /data/a\\nb\\r\\x1b[2J\\xff\\u2028c not found\n"


TERMINATED_BUILD = """
import os, sys, time
sys.path.insert(0, sys.argv[3])
import project_setup
from utils import usage_errors_exit

def slow_scan(scan, seed, root, atlas=None):
    open(os.path.join(sys.argv[2], str(os.getpid())), "w").close()
    time.sleep(120)

project_setup.load_atlas = lambda: None
project_setup._write_scan = slow_scan
with usage_errors_exit():
    project_setup.build_demo(sys.argv[1], 6, seed=0, workers=2)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigterm_stops_a_demo_build_at_once_and_leaves_nothing(tmp_path: Path) -> None:
    """The queued scans are dropped, not waited for; the half-built folder goes; the workers die with the build."""
    root, pids = tmp_path / "demo" / "AD_NC", tmp_path / "pids"
    pids.mkdir()
    build = subprocess.Popen(
        [sys.executable, "-c", TERMINATED_BUILD, str(root), str(pids), str(REPO)], stderr=subprocess.PIPE, text=True
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(workers) < 2 and time.monotonic() < deadline and build.poll() is None:
            time.sleep(0.1)
            workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2, "the workers never started"
        build.send_signal(signal.SIGTERM)
        _, err = build.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "workers outlived the stopped build"
    finally:
        build.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert build.returncode == 128 + signal.SIGTERM and err.strip().endswith("stopped by SIGTERM; no half-written file is left")
    assert list(root.parent.iterdir()) == []
