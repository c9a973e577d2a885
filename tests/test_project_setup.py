"""project_setup.py: the demo dataset, the report, damaged datasets and the zip, exit codes and messages."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import dataset
import project_setup
from conftest import tree_fingerprint
from dataset import CLASS_NAMES, SPLITS, parse_image_name

REPO = Path(__file__).resolve().parents[1]
TINY_SCANS = 8  # 4 per class: 3 train and 1 test each


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A tiny demo, built once; tests that damage it work on a copy."""
    root = tmp_path_factory.mktemp("demo") / "AD_NC"
    project_setup.build_demo(root, TINY_SCANS, seed=0, workers=1)
    return root


@pytest.fixture()
def copy_of_demo(demo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo, tmp_path / "copy" / "AD_NC"))


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


# ----------------------------------------------------------------------------- the demo dataset


def demo_scans(root: Path) -> dict[str, tuple[str, list[int]]]:
    """scan ID → ("<split>/<class>", its slice indices), from the file names alone."""
    scans: dict[str, tuple[str, list[int]]] = {}
    for path in sorted(root.rglob("*.jpeg")):
        scan_id, slice_index = parse_image_name(path.name)
        folder = f"{path.parent.parent.name}/{path.parent.name}"
        assert scans.setdefault(scan_id, (folder, []))[0] == folder, f"scan {scan_id} is in two folders"
        scans[scan_id][1].append(slice_index)
    return scans


def test_demo_layout_and_naming(demo: Path) -> None:
    assert sorted(str(p.relative_to(demo)) for p in demo.rglob("*") if p.is_dir()) == sorted(
        ["test", "train"] + [f"{split}/{name}" for split in SPLITS for name in CLASS_NAMES]
    )
    assert all(p.suffix == ".jpeg" for p in demo.rglob("*") if p.is_file())
    scans = demo_scans(demo)
    assert len(scans) == TINY_SCANS and all(len(scan_id) == 6 and scan_id.isdigit() for scan_id in scans)
    assert Counter(folder for folder, _ in scans.values()) == {"train/AD": 3, "train/NC": 3, "test/AD": 1, "test/NC": 1}
    for path in demo.rglob("*.jpeg"):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "L", (256, 240))


def test_demo_scans_have_20_contiguous_slices_in_a_shared_window(demo: Path) -> None:
    first_slices: dict[str, list[int]] = {name: [] for name in CLASS_NAMES}
    for folder, slices in demo_scans(demo).values():
        first = min(slices)
        assert sorted(slices) == list(range(first, first + 20))
        assert project_setup.FIRST_SLICE[0] <= first <= project_setup.FIRST_SLICE[1]
        first_slices[folder.split("/")[1]].append(first)
    # AD and NC scans come in pairs with the same window: slice position carries no label.
    assert sorted(first_slices["AD"]) == sorted(first_slices["NC"])


def test_demo_is_byte_identical_for_a_seed_whatever_the_worker_count(demo: Path, tmp_path: Path, run_setup) -> None:
    code, out, _ = run_setup("--demo", "--scans", TINY_SCANS, "--seed", 0, "--data-dir", tmp_path / "again")
    assert code == 0 and "built the demo" in out
    assert file_hashes(tmp_path / "again") == file_hashes(demo)
    project_setup.build_demo(tmp_path / "other", TINY_SCANS, seed=1, workers=2)
    assert set(file_hashes(tmp_path / "other").values()).isdisjoint(file_hashes(demo).values())


def test_demo_refuses_a_folder_that_holds_something(tmp_path: Path, run_setup) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, _, err = run_setup("--demo", "--scans", 4, "--data-dir", target)
    assert_one_line_error(code, err, "already exists and is not empty", "--data-dir")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken")], "temp folder left behind"


def test_demo_rerun_checks_the_existing_build(demo: Path, run_setup) -> None:
    """The Quickstart can be run twice: the second --demo reports on the data it built before."""
    before = file_hashes(demo)
    code, out, _ = run_setup("--demo", "--data-dir", demo)
    assert code == 0 and "not rebuilding" in out
    assert file_hashes(demo) == before


def test_interrupted_demo_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def broken_render(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(project_setup, "render_scan", broken_render)
    with pytest.raises(KeyboardInterrupt):
        project_setup.build_demo(tmp_path / "demo" / "AD_NC", 4, workers=1)
    assert list((tmp_path / "demo").iterdir()) == []


def test_demo_ad_differs_from_nc_in_anatomy_not_brightness(tmp_path: Path) -> None:
    root = tmp_path / "AD_NC"
    project_setup.build_demo(root, 40, seed=0, workers=2)
    report = project_setup.check_dataset(root)
    dark = project_setup.per_scan_means(report, "dark_share")
    brightness = project_setup.per_scan_means(report, "brain_mean")
    assert dataset.cohens_d(dark["AD"], dark["NC"]) > 0.8, "AD scans should show more CSF (atrophy)"
    assert abs(dataset.cohens_d(brightness["AD"], brightness["NC"])) < 0.1
    assert abs(brightness["AD"].mean() - brightness["NC"].mean()) < 1.0  # 8-bit grey levels


# ----------------------------------------------------------------------------- the true counterfactuals


# The first demo scan (8 scans, seed 0) as the mean grey level of each 48x64 block of each slice, recorded
# before render_scan took a severity: the demo's data is what it was. Not a hash of the bytes: numpy's
# vectorised float functions round differently on different CPUs, and one machine's bytes (same dataset
# statistics to three decimals) hashed differently; a changed pixel moves its block's mean by 1/3072 grey level.
# A deliberate change to the demo rewrites the record (`first_scan_blocks`, rounded to 3 decimals) in a
# commit that says why.
FIRST_SCAN_RECORD = Path(__file__).parent / "golden" / "first_demo_scan.json"


def first_scan_blocks(drawn: np.ndarray) -> np.ndarray:
    """(slices, 240, 256) uint8 → (slices, 5, 4) block means."""
    slices, height, width = drawn.shape
    return drawn.reshape(slices, 5, height // 5, 4, width // 4).mean(axis=(2, 4))


def test_a_scan_at_another_severity_differs_only_by_the_atrophy() -> None:
    atlas = project_setup.load_atlas()
    scan = project_setup.plan_demo(TINY_SCANS, 0)[0]
    first_slice, drawn = project_setup.render_scan(atlas, scan, 0)
    record = json.loads(FIRST_SCAN_RECORD.read_text())
    assert (list(drawn.shape), first_slice) == (record["shape"], record["first_slice"])
    np.testing.assert_allclose(first_scan_blocks(drawn), np.array(record["block_means"]), rtol=0, atol=0.05)
    # The severity is the scan's first anatomy draw; giving it back reproduces the scan exactly.
    severity = np.random.default_rng([0, scan.index, 1]).uniform(*project_setup.SEVERITY_RANGES[scan.class_name])
    assert np.array_equal(project_setup.render_scan(atlas, scan, 0, severity)[1], drawn)
    renders = {name: project_setup.render_scan(atlas, scan, 0, value) for name, value in project_setup.TYPICAL_SEVERITY.items()}
    assert renders["AD"][0] == renders["NC"][0] == first_slice  # the same slice window
    dark = {
        name: np.mean([dataset.csf_dark_share(dataset.brain_pixels(pixels)) for pixels in slices])
        for name, (_, slices) in renders.items()
    }
    assert dark["AD"] > dark["NC"] + 0.01, dark
    # Without atrophy fields the two severities give the same bytes: pose, warp, scanner and noise
    # draws are the same, and the severity acts through the atrophy alone.
    no_atrophy = dataclasses.replace(
        atlas,
        thinning=np.zeros_like(atlas.thinning),
        ventricle_push=np.zeros_like(atlas.ventricle_push),
        hippocampus_push=np.zeros_like(atlas.hippocampus_push),
    )
    mild, severe = (project_setup.render_scan(no_atrophy, scan, 0, value)[1] for value in (0.0, 1.0))
    assert np.array_equal(mild, severe)
    assert not np.array_equal(renders["AD"][1], renders["NC"][1])


def test_demo_pairs_render_each_test_scan_at_both_severities(copy_of_demo: Path, run_setup) -> None:
    before = file_hashes(copy_of_demo)
    code, out, _ = run_setup("--demo-pairs", "--scans", TINY_SCANS, "--data-dir", copy_of_demo)
    assert code == 0 and "built the pairs: 80 slices" in out
    pairs = copy_of_demo.parent / "pairs"
    assert file_hashes(copy_of_demo) == before, "the demo changed"
    test_slices = sorted(path.name for path in copy_of_demo.glob("test/*/*.jpeg"))
    for class_name in CLASS_NAMES:
        assert sorted(path.name for path in (pairs / class_name).iterdir()) == test_slices
    manifest = json.loads((pairs / "pairs.json").read_text())
    assert manifest["seed"] == 0 and manifest["scans"] == TINY_SCANS and manifest["severity"] == {"AD": 0.65, "NC": 0.15}
    assert sorted(scan["scan_id"] for scan in manifest["test_scans"]) == sorted({name.split("_")[0] for name in test_slices})
    built = file_hashes(pairs)
    code, out, _ = run_setup("--demo-pairs", "--scans", TINY_SCANS, "--data-dir", copy_of_demo)
    assert code == 0 and "already holds the pairs" in out and file_hashes(pairs) == built


def test_demo_pairs_of_another_build_are_refused(copy_of_demo: Path, run_setup) -> None:
    code, _, err = run_setup("--demo-pairs", "--scans", TINY_SCANS, "--seed", 1, "--data-dir", copy_of_demo)
    assert_one_line_error(
        code, err, f"is not the demo of --scans {TINY_SCANS} --seed 1", "pass the --scans and --seed it was built with"
    )
    assert not (copy_of_demo.parent / "pairs").exists()


# ----------------------------------------------------------------------------- the report


def test_report_leaves_the_dataset_untouched(demo: Path, run_setup) -> None:
    before = tree_fingerprint(demo)
    code, _, _ = run_setup("--data-dir", demo)
    assert code == 0
    assert tree_fingerprint(demo) == before
    assert sorted(p.name for p in demo.parent.iterdir()) == ["AD_NC"]


def test_report_numbers_on_a_known_set(copy_of_demo: Path, run_setup) -> None:
    # One extra scan of a single 100x80 RGB slice: sizes, modes and slices per scan all change.
    Image.new("RGB", (100, 80), (90, 90, 90)).save(copy_of_demo / "train" / "NC" / "999999_50.png")
    code, out, err = run_setup("--data-dir", copy_of_demo)
    assert code == 0, err
    assert "images: 161 in 9 scans, 161 readable, 0 unreadable; 0 other files skipped" in out
    assert "slices per scan: min 1, median 20, max 20" in out
    assert "image sizes (width x height): 256x240 160, 100x80 1" in out
    assert "image modes: L 160, RGB 1" in out
    rows = {tuple(line.split()[:5]) for line in out.splitlines() if line.startswith(("  train", "  test"))}
    assert rows == {
        ("train", "AD", "3", "60", "60"),
        ("train", "NC", "4", "61", "61"),
        ("test", "AD", "1", "20", "20"),
        ("test", "NC", "1", "20", "20"),
    }
    assert "CSF-dark share of brain pixels, per scan: AD" in out and "Cohen's d" in out
    assert "usable: 161 readable images in 9 scans" in out


def test_figures_show_each_class(demo: Path, tmp_path: Path, run_setup) -> None:
    code, out, _ = run_setup("--data-dir", demo, "--figures", tmp_path / "figures")
    assert code == 0
    for name in CLASS_NAMES:
        with Image.open(tmp_path / "figures" / f"dataset_{name}.png") as image:
            assert image.mode == "L" and image.width > 4 * 256  # 4 scans side by side
        assert f"dataset_{name}.png" in out


# ----------------------------------------------------------------------------- damaged datasets


def test_stray_files_are_counted_and_skipped(copy_of_demo: Path, run_setup) -> None:
    (copy_of_demo / "train" / "AD" / ".DS_Store").write_bytes(b"\0\0")
    (copy_of_demo / "test" / "NC" / "notes.txt").write_text("scanned on a Tuesday")
    code, out, _ = run_setup("--data-dir", copy_of_demo)
    assert code == 0
    assert "2 other files skipped" in out and "other files skipped: 2" in out
    assert str(copy_of_demo / "test" / "NC" / "notes.txt") in out


def test_truncated_image_is_reported_by_path(copy_of_demo: Path, run_setup) -> None:
    victim = sorted((copy_of_demo / "train" / "AD").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    code, out, _ = run_setup("--data-dir", copy_of_demo)
    assert code == 0
    assert "159 readable, 1 unreadable" in out and "unreadable images: 1" in out
    assert f"  {victim}" in out


def test_only_unreadable_images_is_an_error(copy_of_demo: Path, run_setup) -> None:
    for path in copy_of_demo.rglob("*.jpeg"):
        path.write_bytes(b"not a jpeg")
    code, out, err = run_setup("--data-dir", copy_of_demo)
    assert_one_line_error(code, err, "none of the 160 images", "can be decoded")
    assert "unreadable images: 160" in out


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: shutil.rmtree(root / "test" / "NC"), "test/NC is missing"),
        (lambda root: [shutil.rmtree(child) for child in root.iterdir()], "train/AD is missing"),
        (
            lambda root: [path.unlink() for path in (root / "train" / "AD").iterdir()],
            "train/AD holds no readable images",
        ),
        (lambda root: [path.rename(path.with_suffix(".txt")) for path in root.rglob("*.jpeg")], "no images named"),
    ],
    ids=["missing class folder", "empty dataset folder", "empty class folder", "no images at all"],
)
def test_unusable_layouts_exit_2(copy_of_demo: Path, run_setup, damage, message: str) -> None:
    damage(copy_of_demo)
    code, _, err = run_setup("--data-dir", copy_of_demo)
    assert_one_line_error(code, err, message)


def test_scan_in_train_and_test_is_an_error(copy_of_demo: Path, run_setup) -> None:
    leaked = sorted((copy_of_demo / "train" / "NC").iterdir())[:3]
    scan_id = parse_image_name(leaked[0].name)[0]
    for path in leaked:
        shutil.copy(path, copy_of_demo / "test" / "NC" / path.name)
    code, out, err = run_setup("--data-dir", copy_of_demo)
    assert_one_line_error(code, err, f"scan IDs {scan_id} appear in both train and test", "one split only")
    assert "scan IDs in both train and test: 1" in out and f"  {scan_id}" in out


def test_scan_under_both_classes_is_an_error(copy_of_demo: Path, run_setup) -> None:
    moved = min((copy_of_demo / "train" / "AD").iterdir())
    moved.rename(copy_of_demo / "train" / "NC" / moved.name)
    code, _, err = run_setup("--data-dir", copy_of_demo)
    assert_one_line_error(code, err, parse_image_name(moved.name)[0], "both AD and NC")


def test_missing_dataset_says_what_to_do(run_setup, tmp_path: Path) -> None:
    code, _, err = run_setup()
    assert_one_line_error(code, err, "data/ADNI/AD_NC not found", "data/ADNI.zip", "--demo")
    assert (tmp_path / "data").is_dir() and (tmp_path / "runs").is_dir()


def test_seed_without_demo_is_a_usage_error(run_setup) -> None:
    code, _, err = run_setup("--seed", 3)
    assert_one_line_error(code, err, "--seed and --scans only apply with --demo")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--scans", "900001"],
            "--scans must be 4 to 900,000 (a train and a test scan per class; six-digit scan IDs), got 900001",
        ),
        (["--scans", "3"], "--scans must be 4 to 900,000"),
        (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    ],
)
def test_demo_sizes_outside_what_it_can_build_are_refused_first(tmp_path: Path, run_setup, argv: list[str], message: str) -> None:
    code, _, err = run_setup("--demo", *argv, "--data-dir", tmp_path / "demo" / "AD_NC")
    assert_one_line_error(code, err, message)
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # not even the working folders


def test_figures_are_never_written_into_the_dataset(copy_of_demo: Path, tmp_path: Path, run_setup) -> None:
    before = tree_fingerprint(copy_of_demo)
    link = tmp_path / "link"
    link.symlink_to(copy_of_demo / "train")
    for figures in (copy_of_demo, copy_of_demo / "train" / "AD", link):
        code, _, err = run_setup("--data-dir", copy_of_demo, "--figures", figures)
        assert_one_line_error(code, err, f"--figures {figures} lies inside the dataset folder {copy_of_demo}")
    assert tree_fingerprint(copy_of_demo) == before


def test_a_degenerate_dataset_is_reported_in_words_not_numbers(copy_of_demo: Path, run_setup) -> None:
    """Every slice of a class one image: no spread between scans, so Cohen's d is undefined, not ~1e15."""
    for class_name in CLASS_NAMES:
        paths = sorted(copy_of_demo.glob(f"*/{class_name}/*.jpeg"))
        for path in paths[1:]:
            shutil.copyfile(paths[0], path)
    code, out, err = run_setup("--data-dir", copy_of_demo)
    assert code == 0, err
    assert "(Cohen's d undefined: every scan of each class has the same value)" in out
    assert "e+1" not in out


def test_bad_dataset_from_the_command_line_exits_2_without_traceback(copy_of_demo: Path, tmp_path: Path) -> None:
    shutil.rmtree(copy_of_demo / "train" / "AD")
    result = subprocess.run(
        [sys.executable, str(REPO / "project_setup.py"), "--data-dir", str(copy_of_demo)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: class folder") and result.stderr.count("\n") == 1, result.stderr


# ----------------------------------------------------------------------------- data/ADNI.zip


def zip_folder(folder: Path, zip_path: Path, extra: dict[str, bytes] | None = None) -> Path:
    """Zip `folder` as `AD_NC/...` (like the ADNI course zip), plus `extra` members by raw name."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, f"AD_NC/{path.relative_to(folder).as_posix()}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return zip_path


def test_zip_is_unpacked_when_the_folder_is_missing(demo: Path, tmp_path: Path, run_setup) -> None:
    zip_folder(demo, tmp_path / "data" / "ADNI.zip", extra={"AD_NC/README.txt": b"course copy", "__MACOSX/._x": b""})
    code, out, err = run_setup()
    assert code == 0, err
    assert "unpacking data/ADNI.zip into data/ADNI/AD_NC" in out
    unpacked = tmp_path / "data" / "ADNI" / "AD_NC"
    assert {k: v for k, v in file_hashes(unpacked).items() if k != "README.txt"} == file_hashes(demo)
    assert sorted(p.name for p in unpacked.parent.iterdir()) == ["AD_NC"], "temp folders left behind"
    code, out, _ = run_setup()  # second run: the folder exists, nothing is unpacked again
    assert code == 0 and "unpacking" not in out


@pytest.mark.parametrize(
    "evil_name",
    [
        "AD_NC/../../evil.txt",
        "../evil.txt",
        "/tmp/evil_absolute.txt",
        "AD_NC\\..\\..\\evil.txt",
        "C:evil.txt",
        "\\evil.txt",
    ],
)
def test_zip_with_escaping_names_is_refused_and_nothing_is_written(demo: Path, tmp_path: Path, run_setup, evil_name: str) -> None:
    zip_folder(demo, tmp_path / "data" / "ADNI.zip", extra={evil_name: b"gotcha"})
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code, _, err = run_setup()
    assert_one_line_error(code, err, "could land outside", "nothing unpacked", repr(evil_name))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == sorted(before + ["runs"])
    assert not Path("/tmp/evil_absolute.txt").exists()


def test_zip_with_a_symlink_is_refused(demo: Path, tmp_path: Path, run_setup) -> None:
    zip_path = zip_folder(demo, tmp_path / "data" / "ADNI.zip")
    link = zipfile.ZipInfo("AD_NC/train/AD/link.jpeg")
    link.external_attr = 0o120777 << 16  # a symlink entry, pointing anywhere
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr(link, "/etc/passwd")
    code, _, err = run_setup()
    assert_one_line_error(code, err, "a link")
    assert not (tmp_path / "data" / "ADNI").exists()


def test_zip_without_the_layout_is_refused_and_cleaned_up(tmp_path: Path, run_setup) -> None:
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("holiday/photo.jpeg", b"...")
    code, _, err = run_setup("--zip", tmp_path / "other.zip", "--data-dir", tmp_path / "unpacked" / "AD_NC")
    assert_one_line_error(code, err, "holds no train/ and test/ folders")
    assert list((tmp_path / "unpacked").iterdir()) == []


def test_free_space_is_compared_with_the_unpacked_size_not_the_packed_one(
    demo: Path, tmp_path: Path, run_setup, monkeypatch
) -> None:
    """The demo's slices (1.5 MiB) and 16 MiB of zeros that pack into a few KiB, on a disk with 4 MiB free:
    they do not fit once unpacked, although the packed bytes would; with 32 MiB free they unpack."""
    zip_path = tmp_path / "ADNI.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(demo.rglob("*")):
            archive.write(path, f"AD_NC/{path.relative_to(demo).as_posix()}")
        archive.writestr("AD_NC/README.txt", bytes(16 * 2**20))
    with zipfile.ZipFile(zip_path) as archive:
        unpacked = sum(member.file_size for member in archive.infolist())
        packed = sum(member.compress_size for member in archive.infolist())
    assert packed < 4 * 2**20 < unpacked < 32 * 2**20  # the case tells the two sizes apart
    for free, fits in ((4 * 2**20, False), (32 * 2**20, True)):
        monkeypatch.setattr(
            shutil, "disk_usage", lambda path, free=free: SimpleNamespace(total=10 * free, used=9 * free, free=free)
        )
        target = tmp_path / f"unpacked_{free}" / "AD_NC"
        code, _, err = run_setup("--zip", zip_path, "--data-dir", target)
        if fits:
            assert code == 0 and target.is_dir(), f"{_mib(unpacked)} unpacked with {_mib(free)} free was refused: {err}"
        else:
            assert code == 2 and "unpacks to" in err and not target.exists(), (
                f"a zip of {_mib(packed)} packed, {_mib(unpacked)} unpacked was let onto a disk with {_mib(free)} free: "
                f"the free-space check compared the packed size ({err.strip() or 'no error'})"
            )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
