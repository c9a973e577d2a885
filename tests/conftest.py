"""Shared fixtures: tiny datasets in the ADNI layout, made in temp folders."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SLICES_PER_SCAN = 4


def write_slice(path: Path, brightness: int, radius: float = 0.4, width: int = 256, height: int = 240) -> None:
    """A bright ellipse on black, like a skull-stripped slice, as an 8-bit JPEG."""
    yy, xx = np.mgrid[:height, :width]
    inside = ((xx - width / 2) / (width * radius)) ** 2 + ((yy - height / 2) / (height * radius * 1.1)) ** 2 <= 1
    pixels = np.where(inside, brightness, 0).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def make_tiny_dataset(root: Path, scans_per_class: dict[str, int]) -> Path:
    """`<root>/{train,test}/{AD,NC}/<scan>_<slice>.jpeg`, scan IDs unique; AD ellipses are smaller."""
    scan_number = 100000
    for key, count in scans_per_class.items():
        split, class_name = key.split("/")
        for _ in range(count):
            scan_number += 1
            for slice_index in range(70, 70 + SLICES_PER_SCAN):
                radius = 0.3 if class_name == "AD" else 0.42
                write_slice(root / split / class_name / f"{scan_number}_{slice_index}.jpeg", 100 + slice_index, radius)
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A read-only-by-convention tiny set shared by the training and generation tests."""
    return make_tiny_dataset(
        tmp_path_factory.mktemp("data") / "AD_NC", {"train/AD": 6, "train/NC": 6, "test/AD": 2, "test/NC": 2}
    )


# config.py's tiny preset: both stages of a 32 px model train in seconds on 2 CPU cores.
TINY = ["--preset", "tiny"]


def run_train(data_dir: Path, run_dir: Path, *extra: str) -> None:
    import train

    train.main([*TINY, "--data-dir", str(data_dir), "--run", str(run_dir), *extra])


def tree_fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    """Path → (content hash, mtime) of every file under root."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def trained_run(tiny_dataset: Path, tmp_path_factory) -> Path:
    """Both stages of the TINY model trained for 2 epochs each; checks the dataset stays untouched."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    before = tree_fingerprint(tiny_dataset)
    run_train(tiny_dataset, run_dir)
    assert tree_fingerprint(tiny_dataset) == before, "training changed the dataset folder"
    return run_dir


@pytest.fixture()
def run_setup(tmp_path: Path, monkeypatch, capsys):
    """Run project_setup.main(args) in a temp working folder → (exit code, stdout, stderr)."""
    import project_setup

    monkeypatch.chdir(tmp_path)

    def run(*args: str | Path) -> tuple[int, str, str]:
        try:
            project_setup.main([str(arg) for arg in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
