"""Get the data ready: working folders, unpack data/ADNI.zip, build the demo, convert NIfTI volumes, check and report.

    python project_setup.py                       # unpack data/ADNI.zip if needed, then check data/ADNI/AD_NC
    python project_setup.py --data-dir D          # check any folder in the ADNI layout
    python project_setup.py --demo                # build data/demo/AD_NC from the MNI152 template, then check it
    python project_setup.py --demo --scans 40 --seed 1 --data-dir /tmp/demo --figures results
    python project_setup.py --from-nifti scans/ --labels scans.csv   # your NIfTI volumes → data/mine/AD_NC, then check it

The report counts images, scans, slices per scan, sizes, modes, classes per split, skipped and
unreadable files, and scans filed in two places. Exit status 0 means the folder is usable; 2 comes
with a one-line reason. The dataset folder is only ever read; whatever this script writes (the
unpacked zip, the demo) is written into a temporary folder next to the target and renamed into place.

The demo is the ADNI layout filled with synthetic scans: each one the MNI ICBM152 2009 template
(shipped inside `nilearn`, so no download) under a random smooth deformation, with contrast, bias
field and noise jitter; AD scans add atrophy (larger ventricles, thinner cortex, smaller
hippocampi). AD and NC share the slice window and brightness statistics: they differ in anatomy only.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import multiprocessing
import os
import shutil
import signal
import stat
import sys
import time
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PureWindowsPath

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from config import DEMO_DATA_DIR, DEMO_SCAN_LIMITS, PAIRS_FOLDER, PAIRS_MANIFEST
from dataset import (
    CLASS_NAMES,
    DEFAULT_ROOT,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    SLICES_PER_SCAN,
    SPLITS,
    DatasetError,
    DatasetIndex,
    UnreadableImageError,
    brain_pixels,
    cohens_d,
    csf_dark_share,
    index_dataset,
    prepare_image,
    read_image,
    read_image_and_mode,
    scans_in_both,
    scans_in_both_classes,
    zero_spread,
)
from utils import (
    ArgumentParser,
    UsageError,
    available_cpus,
    check_output_paths,
    display_path,
    fail,
    fresh_sibling,
    remove_leftovers,
    remove_temporary_files,
    report_removed,
    save_image_grid,
    usage_errors_exit,
    write_json_atomic,
)
from volumes import convert_volumes

WORK_FOLDERS = (Path("data"), Path("runs"))
DEFAULT_ZIP = Path("data/ADNI.zip")
DEMO_ROOT = Path(DEMO_DATA_DIR)
NIFTI_ROOT = Path("data/mine/AD_NC")  # where --from-nifti writes without --out

# ----------------------------------------------------------------------------- demo geometry
DEMO_SCANS = 300
PIXELS_PER_MM = 1.1  # brains ~155 px wide and ~190 px long in the frame, as in ADNI
FIRST_SLICE = (58, 78)  # template z of a scan's first slice: basal ganglia up to the ventricle roofs
TEST_FRACTION = 0.3
JPEG_QUALITY = 90
ATLAS_Z = (28, 128)  # template planes any demo slice can reach, margin for tilt and warps included
BRAIN_CENTRE = (98.0, 117.0)  # template x, y (voxels) of the middle of the brain's bounding box
HIPPOCAMPI = ((73.0, 112.0, 60.0), (123.0, 112.0, 60.0))  # template voxels of MNI (±25, -22, -12)
CSF_LEVEL = 0.34  # template T1 intensity of CSF (GM ~0.65, WM ~0.87)
# Disease stage (0 none, 1 full atrophy) drawn per class: NC scans get a little of what AD has
# (ageing), so the classes overlap at the edges. The pairs render each test scan at each class's middle.
SEVERITY_RANGES = {"AD": (0.3, 1.0), "NC": (0.0, 0.3)}
TYPICAL_SEVERITY = {class_name: (low + high) / 2 for class_name, (low, high) in SEVERITY_RANGES.items()}

COARSE_STEP = 8  # pixels between the points where the warp is computed exactly; linear in between

# ----------------------------------------------------------------------------- unpacking limits
# ADNI's JPEGs barely compress (ratio ~1); text or blank images may reach 10-50. Beyond 100x on more
# than 1 GiB, an archive is a zip bomb: it would fill the disk from a small download.
ZIP_BOMB_RATIO = 100
ZIP_BOMB_MIN_BYTES = 2**30
# The methods Python's zipfile decodes; others (deflate64 = 9, zstd = 93, AES = 99) stop it mid-way.
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)

# ----------------------------------------------------------------------------- report thresholds
FIGURE_SCANS = 8


# ============================================================================ the demo dataset


@dataclass(frozen=True)
class Atlas:
    """Template volumes the demo scans are cut from, cropped to planes ATLAS_Z (1 mm voxels)."""

    t1: np.ndarray  # (X, Y, Z) float32 T1 in [0, 1], 0 outside the brain
    thinning: np.ndarray  # (X, Y, Z) how much each voxel darkens at full cortical atrophy
    ventricle_push: np.ndarray  # (3, X/2, Y/2, Z/2) 2 mm grid, unit-max field pointing into CSF spaces
    hippocampus_push: np.ndarray  # (3, X/2, Y/2, Z/2) 2 mm grid, unit-max field pointing into the hippocampi


@dataclass(frozen=True)
class DemoScan:
    index: int  # seeds this scan's random draws, so each scan is the same whatever the worker count
    scan_id: str
    split: str
    class_name: str


def _unit_push(weights: np.ndarray, sigma: float) -> np.ndarray:
    """Gradient of the blurred `weights` on a 2 mm grid, scaled to a maximum length of 1 (mm)."""
    field = np.stack(np.gradient(ndimage.gaussian_filter(weights.astype(np.float32), sigma)))
    field /= np.sqrt((field**2).sum(axis=0)).max()
    return np.ascontiguousarray(field[:, ::2, ::2, ::2])


@lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    """MNI ICBM152 2009 T1, grey and white matter maps from nilearn's own files, plus atrophy fields."""
    from nilearn import datasets  # slow to import, and only the demo needs it

    planes = slice(*ATLAS_Z)
    t1, grey, white, mask = (
        loader(resolution=1).get_fdata(dtype=np.float32)[:, :, planes]
        for loader in (
            datasets.load_mni152_template,
            datasets.load_mni152_gm_template,
            datasets.load_mni152_wm_template,
            datasets.load_mni152_brain_mask,
        )
    )
    csf = np.clip(mask - grey - white, 0, 1)
    # Cortical thinning: grey matter that touches CSF or the outside turns CSF-dark, which
    # widens sulci and thins the cortex the way atrophy does on a T1 slice.
    near_csf = ndimage.gaussian_filter(np.maximum(csf, 1 - mask), 1.0)
    rim = np.clip(2 * grey * near_csf, 0, 1) * mask
    thinning = (np.maximum(t1 - CSF_LEVEL, 0) * rim).astype(np.float32)
    # Ventricles (and the deep cisterns): CSF well inside the brain, thin sulci opened away.
    depth = ndimage.distance_transform_edt(mask > 0.5)
    ventricles = ndimage.binary_opening((csf > 0.5) & (depth > 8))
    grid = np.indices(t1.shape, dtype=np.float32)
    hippocampi = sum(
        np.exp(-((grid[0] - x) ** 2 + (grid[1] - y) ** 2 + (grid[2] - (z - ATLAS_Z[0])) ** 2) / (2 * 7.0**2))
        for x, y, z in HIPPOCAMPI
    )
    return Atlas(t1, thinning, _unit_push(ventricles, 4.0), _unit_push(hippocampi, 1.0))


def plan_demo(num_scans: int, seed: int) -> list[DemoScan]:
    """Scan IDs (unique 6-digit numbers), classes alternating, ~30% of each class in test."""
    rng = np.random.default_rng(seed)
    scan_ids = rng.choice(900_000, size=num_scans, replace=False) + 100_000
    per_class = [len(range(label, num_scans, len(CLASS_NAMES))) for label in range(len(CLASS_NAMES))]
    test_counts = [min(max(round(TEST_FRACTION * count), 1), count - 1) for count in per_class]
    plans = []
    for index, scan_id in enumerate(scan_ids):
        label, rank = index % len(CLASS_NAMES), index // len(CLASS_NAMES)
        split = "test" if rank < test_counts[label] else "train"
        plans.append(DemoScan(index, str(scan_id), split, CLASS_NAMES[label]))
    return plans


def _interpolation(size: int, coarse: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour and weight of the upper one, for `size` points spanning `coarse` samples."""
    position = np.linspace(0, coarse - 1, size)
    lower = np.minimum(position.astype(int), coarse - 2)
    return lower, position - lower


def _to_image_size(coarse: np.ndarray) -> np.ndarray:
    """Linear interpolation of (..., rows, cols) samples spanning the image corners to full size.

    Indexing, not a matrix product: BLAS threads inside several worker processes oversubscribe
    the cores (that made the build five times slower).
    """
    lower, weight = _interpolation(IMAGE_HEIGHT, coarse.shape[-2])
    rows = coarse[..., lower, :] * (1 - weight)[:, None] + coarse[..., lower + 1, :] * weight[:, None]
    lower, weight = _interpolation(IMAGE_WIDTH, coarse.shape[-1])
    return rows[..., lower] * (1 - weight) + rows[..., lower + 1] * weight


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], control: tuple[int, ...], scale: float) -> np.ndarray:
    """A smooth random field of `shape`: Gaussian values on a `control` grid, cubic-interpolated."""
    coarse = rng.normal(0.0, scale, size=control)
    return ndimage.zoom(coarse, np.divide(shape, control), order=3, mode="nearest", grid_mode=True)


def _rotation(degrees: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles (about x, y, z) in degrees."""
    a, b, c = np.radians(degrees)
    about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    about_z = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return about_z @ about_y @ about_x


def _template_coordinates(
    atlas: Atlas, rng: np.random.Generator, first_slice: int, ventricle_mm: float, hippocampus_mm: float
) -> np.ndarray:
    """(3, slices, height, width) template voxel coordinates of every output pixel.

    Computed exactly on a coarse grid (pose, elastic warp, atrophy warp) and interpolated
    linearly in between: every part is smooth, and this is ~60x fewer points.
    """
    coarse_shape = (SLICES_PER_SCAN, IMAGE_HEIGHT // COARSE_STEP + 1, IMAGE_WIDTH // COARSE_STEP + 1)
    k, row, col = np.meshgrid(
        np.arange(SLICES_PER_SCAN, dtype=float),
        np.linspace(0, IMAGE_HEIGHT - 1, coarse_shape[1]),
        np.linspace(0, IMAGE_WIDTH - 1, coarse_shape[2]),
        indexing="ij",
    )
    millimetres = np.stack(
        [
            (col - (IMAGE_WIDTH - 1) / 2) / PIXELS_PER_MM,
            ((IMAGE_HEIGHT - 1) / 2 - row) / PIXELS_PER_MM,  # anterior at the top, as in ADNI
            k - (SLICES_PER_SCAN - 1) / 2,
        ]
    )
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, size=3)
    pose = _rotation(rng.normal(0.0, [2.0, 2.0, 4.0])) / scale
    centre = np.array([*BRAIN_CENTRE, first_slice + (SLICES_PER_SCAN - 1) / 2 - ATLAS_Z[0]])
    centre[:2] += rng.normal(0.0, 3.0, size=2)
    coords = np.einsum("ij,jskc->iskc", pose, millimetres) + centre[:, None, None, None]
    for control, millimetres_sd in (((3, 4, 4), 2.0), ((4, 8, 8), 0.8)):  # head shape, then gyri
        coords += np.stack([_smooth_noise(rng, coarse_shape, control, millimetres_sd) for _ in range(3)])
    # Sampling the template nearer the CSF spaces enlarges them; sampling farther from the
    # hippocampi shrinks those.
    on_field_grid = coords.reshape(3, -1) / 2
    for field, millimetres_moved in ((atlas.ventricle_push, ventricle_mm), (atlas.hippocampus_push, -hippocampus_mm)):
        coords += millimetres_moved * np.stack(
            [ndimage.map_coordinates(component, on_field_grid, order=1).reshape(coarse_shape) for component in field]
        )
    return _to_image_size(coords)


def _sample_tissue(atlas: Atlas, coords: np.ndarray, thinning: float) -> np.ndarray:
    """T1 intensities at `coords` of the template with its cortex thinned by `thinning` (0 to 1)."""
    low = max(int(coords[2].min()) - 1, 0)  # only the planes the coordinates reach
    high = min(int(coords[2].max()) + 3, atlas.t1.shape[2])
    volume = atlas.t1[:, :, low:high] - thinning * atlas.thinning[:, :, low:high]
    on_volume = coords.reshape(3, -1) - np.array([[0.0], [0.0], [low]])
    return ndimage.map_coordinates(volume, on_volume, order=1, output=np.float32).reshape(coords.shape[1:])


def _acquire(tissue: np.ndarray, scanner: np.random.Generator, noise: np.random.Generator) -> np.ndarray:
    """What a scanner makes of `tissue`: contrast, bias field, Rician noise, brightness; uint8, black background."""
    brain = tissue > 0.1
    # The template is an average of 152 brains, blurrier than one scan: sharpen it in-plane.
    image = np.clip(tissue + 0.6 * (tissue - ndimage.gaussian_filter(tissue, (0, 1.5, 1.5))), 0, None)
    image = image ** scanner.uniform(1.2, 1.7)  # MPRAGE-like contrast: dark CSF, bright white matter
    image *= np.exp(_to_image_size(_smooth_noise(scanner, (SLICES_PER_SCAN, 4, 4), (3, 3, 3), 0.1)))
    sigma = scanner.uniform(0.01, 0.035)
    image = np.hypot(image + noise.normal(0.0, sigma, image.shape), noise.normal(0.0, sigma, image.shape))
    image[~brain] = 0.0
    # The mean brain intensity is set, not left to the anatomy: atrophy swaps tissue for dark CSF,
    # which would otherwise make AD scans darker, a label cue that has nothing to do with anatomy.
    image *= scanner.uniform(110.0, 140.0) / image[brain].mean()
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_scan(atlas: Atlas, scan: DemoScan, seed: int, severity: float | None = None) -> tuple[int, np.ndarray]:
    """(first slice index, (20, 240, 256) uint8 slices) of one synthetic scan; with `severity` (0 to 1)
    the same scan at that disease stage instead of its drawn one, every other draw unchanged (the
    stage is drawn either way): the true counterfactual."""
    anatomy = np.random.default_rng([seed, scan.index, 1])
    # Scans 2j (AD) and 2j+1 (NC) share the acquisition (slice window, contrast, bias, noise level,
    # brightness), as in a matched study: none of those can tell AD from NC, even in a tiny demo.
    scanner = np.random.default_rng([seed, scan.index // len(CLASS_NAMES), 2])
    first_slice = int(scanner.integers(FIRST_SLICE[0], FIRST_SLICE[1] + 1))
    drawn = anatomy.uniform(*SEVERITY_RANGES[scan.class_name])
    severity = drawn if severity is None else severity
    ventricle_mm = 4.0 * severity + anatomy.normal(0.0, 0.8)  # ventricle size varies among healthy people too
    coords = _template_coordinates(atlas, anatomy, first_slice, ventricle_mm, hippocampus_mm=3.0 * severity)
    tissue = _sample_tissue(atlas, coords, thinning=0.8 * severity)
    return first_slice, _acquire(tissue, scanner, anatomy)


_worker_atlas: Atlas | None = None  # set once per worker process by _start_worker
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _start_worker(atlas: Atlas, parent_pid: int) -> None:
    """Keep the atlas for _write_scan, and make this worker die with the build process.

    Without it a killed build (kill -9, an out-of-memory kill) leaves its workers running: they
    finish their scan into the abandoned temp folder, then wait forever for the next one.
    """
    global _worker_atlas
    _worker_atlas = atlas
    if sys.platform.startswith("linux"):
        # The signal comes when the thread that started the worker ends: build_demo submits from
        # the main thread, which ProcessPoolExecutor starts its workers from.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died before prctl took effect; then no signal will ever come.
        if os.getppid() != parent_pid:
            os._exit(1)


def _write_scan(scan: DemoScan, seed: int, root: Path, atlas: Atlas | None = None) -> None:
    """Render one scan and write its 20 slices as `<root>/<split>/<class>/<scanID>_<slice>.jpeg`."""
    first_slice, slices = render_scan(atlas or _worker_atlas, scan, seed)
    _write_slices(slices, first_slice, root / scan.split / scan.class_name, scan.scan_id)


def _write_pair(scan: DemoScan, seed: int, root: Path, atlas: Atlas | None = None) -> None:
    """Render one scan at each class's typical severity: `<root>/<class>/<scanID>_<slice>.jpeg`."""
    for class_name, severity in TYPICAL_SEVERITY.items():
        first_slice, slices = render_scan(atlas or _worker_atlas, scan, seed, severity)
        _write_slices(slices, first_slice, root / class_name, scan.scan_id)


def _write_slices(slices: np.ndarray, first_slice: int, folder: Path, scan_id: str) -> None:
    for offset, pixels in enumerate(slices):
        Image.fromarray(pixels).save(folder / f"{scan_id}_{first_slice + offset}.jpeg", quality=JPEG_QUALITY)


def _render_all(job, scans: list[DemoScan], seed: int, temp: Path, workers: int, description: str) -> None:
    """`job(scan, seed, temp)` for every scan, in `workers` processes. The bytes depend on the scans
    and the seed only: each scan draws from its own seeded generators, so the worker count and the
    order scans finish in change nothing."""
    atlas = load_atlas()
    with tqdm(total=len(scans), desc=description, unit="scan", disable=None) as progress:
        if workers == 1:
            for scan in scans:
                job(scan, seed, temp, atlas)
                progress.update()
            return
        # Forked on Linux (as Python 3.11 does anyway): the workers inherit the atlas without pickling
        # it, and are this process's children, which is what _start_worker's PR_SET_PDEATHSIG watches.
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        others = set(multiprocessing.active_children())
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(atlas, os.getpid()))
        finished = False
        try:
            for result in [pool.submit(job, scan, seed, temp) for scan in scans]:
                result.result()
                progress.update()
            finished = True
        finally:
            # After an error or a signal (SIGTERM, Ctrl-C) the queued scans are dropped and the running ones
            # stopped, instead of waited for (as the pool's exit, and Python's, would).
            pool.shutdown(wait=finished, cancel_futures=not finished)
            if not finished:
                for worker in set(multiprocessing.active_children()) - others:
                    worker.kill()


def _build_atomically(root: Path, folders: list[str], fill) -> None:
    """Make `folders` in a temporary sibling of `root` (which must not hold anything yet), let
    `fill(temp)` write into them, then rename it into place: an interrupted build leaves nothing."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UsageError(f"{root} already exists and is not empty: delete it or choose another --data-dir for the demo")
    temp = fresh_sibling(root, "building")
    try:
        for folder in folders:
            (temp / folder).mkdir(parents=True)
        fill(temp)
        if root.is_dir():
            root.rmdir()  # empty (checked above); replacing a folder needs it gone on some systems
        os.replace(temp, root)
    except OSError as error:
        raise UsageError(f"building the demo in {root} failed ({error}): check the free disk space") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _check_demo_size(num_scans: int) -> None:
    if not DEMO_SCAN_LIMITS[0] <= num_scans <= DEMO_SCAN_LIMITS[1]:
        raise UsageError(f"--scans {num_scans}: the demo takes {DEMO_SCAN_LIMITS[0]} to {DEMO_SCAN_LIMITS[1]:,} scans")


def build_demo(root: str | os.PathLike, num_scans: int = DEMO_SCANS, seed: int = 0, workers: int | None = None) -> None:
    """Write the demo dataset into `root` (which must not hold anything yet), atomically.

    The bytes depend on (num_scans, seed) only: each scan draws from its own seeded generator,
    so the worker count and the order scans finish in change nothing.
    """
    _check_demo_size(num_scans)
    scans = plan_demo(num_scans, seed)
    workers = min(workers or available_cpus(), num_scans)
    _build_atomically(
        Path(root),
        [f"{split}/{class_name}" for split in SPLITS for class_name in CLASS_NAMES],
        lambda temp: _render_all(_write_scan, scans, seed, temp, workers, "demo scans"),
    )


def build_demo_pairs(root: str | os.PathLike, num_scans: int = DEMO_SCANS, seed: int = 0, workers: int | None = None) -> None:
    """Write, for each test scan of the demo of (num_scans, seed), its slices at the typical AD and
    the typical NC severity (TYPICAL_SEVERITY), every other draw the scan's own, into
    `<root>/{AD,NC}/<scanID>_<slice>.jpeg` with PAIRS_MANIFEST; atomically, like build_demo. The
    same slice in both folders is one brain with two disease stages: the true counterfactual."""
    _check_demo_size(num_scans)
    scans = [scan for scan in plan_demo(num_scans, seed) if scan.split == "test"]
    workers = min(workers or available_cpus(), len(scans))
    manifest = {
        "seed": seed,
        "scans": num_scans,
        "severity": TYPICAL_SEVERITY,
        "test_scans": [{"scan_id": scan.scan_id, "class": scan.class_name} for scan in scans],
    }

    def fill(temp: Path) -> None:
        _render_all(_write_pair, scans, seed, temp, workers, "demo pairs")
        write_json_atomic(temp / PAIRS_MANIFEST, manifest)

    _build_atomically(Path(root), list(CLASS_NAMES), fill)


# ============================================================================ unpacking data/ADNI.zip


def _unsafe_member(member: zipfile.ZipInfo) -> bool:
    """True for names that could land outside the target: absolute, drive letters, `..`, symlinks."""
    is_symlink = stat.S_ISLNK(member.external_attr >> 16)
    name = PureWindowsPath(member.filename)  # reads both / and \ as separators, and drive letters
    return is_symlink or bool(name.anchor) or ".." in name.parts


def _find_layout_root(folder: Path) -> Path | None:
    """The shallowest folder (down to two levels) that holds both train/ and test/."""
    level = [folder]
    for _ in range(3):
        for candidate in level:
            if all((candidate / split).is_dir() for split in SPLITS):
                return candidate
        level = [child for parent in level for child in sorted(parent.iterdir()) if child.is_dir() and child.name != "__MACOSX"]
    return None


def _check_members(zip_path: Path, root: Path, members: list[zipfile.ZipInfo]) -> None:
    """UsageError, before anything is written, for an archive that cannot be unpacked safely and whole.

    The sizes checked are the declared ones, and they hold: zipfile never writes more than a
    member's declared size (and checks the CRC of what it wrote).
    """
    unsafe = [member.filename for member in members if _unsafe_member(member)]
    if unsafe:
        raise UsageError(
            f"{zip_path} has entries that could land outside {root} ({len(unsafe)}, e.g. {unsafe[0]!r}: "
            "an absolute path, '..' or a link): nothing unpacked; unpack a trusted copy yourself"
        )
    encrypted = [member.filename for member in members if member.flag_bits & 0x1]
    if encrypted:
        raise UsageError(
            f"{zip_path} is encrypted ({len(encrypted)} entries, e.g. {encrypted[0]!r}): nothing unpacked; "
            "unzip it with its password yourself and pass the folder with --data-dir"
        )
    unsupported = [member for member in members if member.compress_type not in ZIP_METHODS]
    if unsupported:
        raise UsageError(
            f"{zip_path} uses compression method {unsupported[0].compress_type} ({len(unsupported)} entries, e.g. "
            f"{unsupported[0].filename!r}), which Python cannot unpack: nothing unpacked; unzip it with 7-Zip or "
            "`unzip` yourself and pass the folder with --data-dir, or re-zip it with plain deflate"
        )
    # The target path, not the raw name: "a/b", "a\b" and "a/./b" all land on the same file.
    targets = Counter(PureWindowsPath(member.filename).parts for member in members)
    duplicates = sorted("/".join(parts) for parts, count in targets.items() if count > 1)
    if duplicates:
        raise UsageError(
            f"{zip_path} holds {len(duplicates)} paths more than once (e.g. {duplicates[0]!r}), so one copy would "
            "silently replace another: nothing unpacked; download the archive again or rebuild it without duplicates"
        )
    unpacked = sum(member.file_size for member in members)
    packed = sum(member.compress_size for member in members)
    if unpacked > ZIP_BOMB_MIN_BYTES and unpacked > ZIP_BOMB_RATIO * packed:
        raise UsageError(
            f"{zip_path} declares {_gib(unpacked)} from {_gib(packed)} compressed (over {ZIP_BOMB_RATIO}x: a zip bomb, "
            "not image slices): nothing unpacked; get the dataset from its original source"
        )
    existing = next(folder for folder in (root.parent, *root.parent.parents) if folder.is_dir())
    free = shutil.disk_usage(existing).free
    if unpacked > free:
        raise UsageError(
            f"{zip_path} unpacks to {_gib(unpacked)} but {existing} has {_gib(free)} free: nothing unpacked; "
            "free some space or unpack it elsewhere with --data-dir"
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def unpack_zip(zip_path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Unpack the dataset in `zip_path` (e.g. its top folder AD_NC/) so that it becomes `root`.

    Every member is checked before anything is written (_check_members): one that could land
    outside the target, an encrypted or undecodable one, a duplicate path, or sizes that do not
    fit the disk stop the whole unpacking with nothing extracted.
    """
    zip_path, root = Path(zip_path), Path(root)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as error:
        raise UsageError(f"cannot open {zip_path} as a zip file ({error}): download it again") from None
    with archive:
        members = archive.infolist()
        _check_members(zip_path, root, members)
        temp = fresh_sibling(root, "unpacking")
        try:
            for member in tqdm(members, desc=f"unpacking {zip_path.name}", unit="file", disable=None):
                target = temp.joinpath(*PureWindowsPath(member.filename).parts)
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "wb") as destination:
                    shutil.copyfileobj(source, destination)
            found = _find_layout_root(temp)
            if found is None:
                raise UsageError(
                    f"{zip_path} holds no train/ and test/ folders (at its top or in a top folder such as AD_NC/): "
                    "it is not the ADNI slice dataset"
                )
            os.replace(found, root)
        except (OSError, zipfile.BadZipFile) as error:
            raise UsageError(
                f"unpacking {zip_path} failed ({error}): nothing was kept; check the disk space or download it again"
            ) from None
        finally:
            shutil.rmtree(temp, ignore_errors=True)


# ============================================================================ checking and reporting


@dataclass(frozen=True)
class ImageFacts:
    """What the report needs from one image file; `problem` is set when it cannot be decoded."""

    size: str | None = None  # "256x240": width x height
    mode: str | None = None
    problem: str | None = None
    brain_mean: float = math.nan  # mean 8-bit intensity of the brain pixels
    dark_share: float = math.nan  # share of brain pixels as dark as CSF


def inspect_image(path: Path) -> ImageFacts:
    """Decode one image fully (a truncated file must show up here, not mid-training) and measure it."""
    try:
        pixels, mode = read_image_and_mode(path)
    except UnreadableImageError as error:
        return ImageFacts(problem=str(error))  # the message starts with the path
    height, width = pixels.shape
    size = f"{width}x{height}"
    brain = brain_pixels(pixels)
    if brain.size == 0:
        return ImageFacts(size, mode)
    return ImageFacts(size, mode, None, float(brain.mean()), csf_dark_share(brain))


@dataclass
class DatasetReport:
    index: DatasetIndex
    facts: list[ImageFacts]  # one per index.records, same order
    in_both_splits: set[str]
    in_both_classes: set[str]

    @property
    def readable(self) -> list[bool]:
        return [fact.problem is None for fact in self.facts]


def check_dataset(root: str | os.PathLike) -> DatasetReport:
    """List the dataset (DatasetError if its layout is unusable) and decode every image, read-only."""
    index = index_dataset(root)
    paths = [record.path for record in index.records]
    # Threads are enough: PIL decodes without holding the GIL.
    with ThreadPoolExecutor(max_workers=min(8, available_cpus())) as pool:
        facts = list(tqdm(pool.map(inspect_image, paths), total=len(paths), desc="checking images", unit="img", disable=None))
    return DatasetReport(index, facts, scans_in_both(index), scans_in_both_classes(index))


def per_scan_means(report: DatasetReport, attribute: str) -> dict[str, np.ndarray]:
    """Class name → one value per scan: the mean of `attribute` over the scan's readable slices."""
    values: dict[tuple[int, str], list[float]] = {}
    for record, fact in zip(report.index.records, report.facts):
        value = getattr(fact, attribute)
        if not math.isnan(value):
            values.setdefault((record.label, record.scan_id), []).append(value)
    return {
        name: np.array([np.mean(v) for (label, _), v in values.items() if label == class_label])
        for class_label, name in enumerate(CLASS_NAMES)
    }


def _compare_classes(report: DatasetReport, attribute: str, what: str, digits: int) -> str:
    """One line comparing the classes' per-scan means of `attribute`, or saying why it cannot."""
    by_class = per_scan_means(report, attribute)
    counts = ", ".join(f"{name} {len(values)}" for name, values in by_class.items())
    if min(len(values) for values in by_class.values()) < 2:
        return f"{what}, per scan: not compared (scans with brain pixels: {counts}; 2 per class needed)"
    (a_name, a), (b_name, b) = by_class.items()
    effect = "undefined: every scan of each class has the same value" if zero_spread(a, b) else f"{cohens_d(a, b):+.2f}"
    return (
        f"{what}, per scan: {a_name} {a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}, "
        f"{b_name} {b.mean():.{digits}f} ± {b.std(ddof=1):.{digits}f} (Cohen's d {effect})"
    )


def _listing(title: str, items: list[str], limit: int = 10) -> list[str]:
    lines = [f"{title}: {len(items) or 'none'}"]
    lines += [f"  {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return lines


def format_report(report: DatasetReport) -> list[str]:
    index, facts = report.index, report.facts
    readable = report.readable
    slices_per_scan = [len(records) for records in index.scans().values()]
    lines = [
        f"dataset {display_path(index.root)}",
        (
            f"images: {len(facts)} in {len(slices_per_scan)} scans, {sum(readable)} readable, "
            f"{len(facts) - sum(readable)} unreadable; {len(index.skipped)} other files skipped"
        ),
        f"slices per scan: min {min(slices_per_scan)}, median {np.median(slices_per_scan):g}, max {max(slices_per_scan)}",
        "image sizes (width x height): "
        + ", ".join(f"{k} {v}" for k, v in Counter(f.size for f in facts if f.size).most_common()),
        "image modes: " + ", ".join(f"{k} {v}" for k, v in Counter(f.mode for f in facts if f.mode).most_common()),
        f"  {'split':<6} {'class':<6} {'scans':>6} {'images':>7} {'readable':>9}  slice indices",
    ]
    for split in SPLITS:
        for label, class_name in enumerate(CLASS_NAMES):
            chosen = [i for i, r in enumerate(index.records) if r.split == split and r.label == label]
            slices = [index.records[i].slice_index for i in chosen]
            span = f"{min(slices)}-{max(slices)}" if slices else "-"
            scans = len({index.records[i].scan_id for i in chosen})
            lines.append(
                f"  {split:<6} {class_name:<6} {scans:>6} {len(chosen):>7} {sum(readable[i] for i in chosen):>9}  {span}"
            )
    lines.append(_compare_classes(report, "dark_share", "CSF-dark share of brain pixels", 3))
    lines.append(_compare_classes(report, "brain_mean", "mean brain intensity", 1))
    lines += _listing("other files skipped", [display_path(path) for path in index.skipped])
    lines += _listing("unreadable images", [fact.problem for fact in facts if fact.problem])
    lines += _listing("scan IDs in both train and test", sorted(report.in_both_splits))
    lines += _listing("scan IDs under both AD and NC", sorted(report.in_both_classes))
    return lines


def _some(ids: set[str], limit: int = 5) -> str:
    shown = sorted(ids)[:limit]
    return ", ".join(shown) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def find_problem(report: DatasetReport) -> str | None:
    """The one-line reason the dataset is unusable, or None when it is fine to train on."""
    index, readable = report.index, report.readable
    if report.in_both_splits:
        return (
            f"scan IDs {_some(report.in_both_splits)} appear in both train and test: a scan must be in one split "
            "only, or the test set leaks into training; move all of each scan's slices into one split"
        )
    if report.in_both_classes:
        return (
            f"scan IDs {_some(report.in_both_classes)} appear under both AD and NC: a scan has one diagnosis; "
            "move all of each scan's slices into one class folder"
        )
    if not any(readable):
        return (
            f"none of the {len(readable)} images under {index.root} can be decoded (listed above): "
            "copy or unpack the dataset again"
        )
    for split in SPLITS:
        for label, class_name in enumerate(CLASS_NAMES):
            if not any(ok for r, ok in zip(index.records, readable) if r.split == split and r.label == label):
                return (
                    f"{index.root / split / class_name} holds no readable images: "
                    "training and testing need AD and NC images in both train and test"
                )
    return None


def save_figures(report: DatasetReport, folder: str | os.PathLike, prefix: str) -> list[Path]:
    """`<folder>/<prefix>_AD.png` and `_NC.png`: one slice of each of a class's first few scans.

    Each scan shows its slice nearest the dataset's median slice index, so the tiles are cut at
    about the same height in the head (where the windows allow) and the classes can be compared.
    """
    middle = np.median([record.slice_index for record in report.index.records])
    readable = {record.path for record, fact in zip(report.index.records, report.facts) if fact.problem is None}
    paths = []
    for label, class_name in enumerate(CLASS_NAMES):
        tiles = []
        for records in report.index.scans().values():
            usable = [record for record in records if record.label == label and record.path in readable]
            if usable and len(tiles) < FIGURE_SCANS:
                nearest = min(usable, key=lambda record: abs(record.slice_index - middle))
                tiles.append(prepare_image(read_image(nearest.path), max(IMAGE_HEIGHT, IMAGE_WIDTH)))
        if tiles:
            paths.append(Path(folder) / f"{prefix}_{class_name}.png")
            save_image_grid(np.stack(tiles), paths[-1], ncols=4)
    return paths


# ============================================================================ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, help=f"dataset folder (default: {DEFAULT_ROOT}, or {DEMO_ROOT} with --demo)")
    parser.add_argument(
        "--demo", action="store_true", help="build the demo dataset into --data-dir first (it must not exist yet)"
    )
    parser.add_argument(
        "--demo-pairs",
        action="store_true",
        help=f"--demo, then also each test scan at the typical AD and NC severity in <data-dir>/../{PAIRS_FOLDER} "
        "(the true counterfactuals that evaluate.py --counterfactuals scores against)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="demo: random seed, the same seed gives the same bytes; --from-nifti: the split's seed (default 0)",
    )
    parser.add_argument("--scans", type=int, help=f"demo: number of scans, AD and NC alternating (default {DEMO_SCANS})")
    parser.add_argument("--zip", type=Path, help=f"zip to unpack when --data-dir is missing (default {DEFAULT_ZIP})")
    parser.add_argument(
        "--figures",
        type=Path,
        metavar="DIR",
        help="also write DIR/demo_AD.png and DIR/demo_NC.png (dataset_*.png without --demo): a slice of each class's first 8 scans",
    )
    nifti = parser.add_argument_group("your own volumes (volumes.py says how they are sliced)")
    nifti.add_argument(
        "--from-nifti", type=Path, metavar="DIR", help="convert the .nii/.nii.gz volumes under DIR, then check the result"
    )
    nifti.add_argument(
        "--labels", type=Path, metavar="TABLE", help="CSV with file, subject and diagnosis columns (visit optional)"
    )
    nifti.add_argument(
        "--out", type=Path, help=f"the layout to write (default {NIFTI_ROOT}); missing or empty, unless --overwrite"
    )
    nifti.add_argument("--slices", type=int, help=f"contiguous 1 mm slices per volume (default {SLICES_PER_SCAN}, as ADNI)")
    nifti.add_argument("--test-fraction", type=float, help="share of each class's subjects that go to test (default 0.3)")
    nifti.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at --out")
    args = parser.parse_args(argv)
    _check_combinations(parser, args)
    return args


def _check_combinations(parser: ArgumentParser, args: argparse.Namespace) -> None:
    args.demo = args.demo or args.demo_pairs  # the pairs are renders of the demo's test scans
    if not args.demo and args.from_nifti is None and (args.seed is not None or args.scans is not None):
        parser.error("--seed and --scans only apply with --demo (--seed also with --from-nifti)")
    low, high = DEMO_SCAN_LIMITS
    if args.scans is not None and not low <= args.scans <= high:
        parser.error(
            f"--scans must be {low} to {high:,} (a train and a test scan per class; six-digit scan IDs), got {args.scans}"
        )
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    if args.demo and args.zip is not None:
        parser.error("--zip does not apply with --demo, which builds its data")
    conversion = {"--labels": args.labels, "--out": args.out, "--slices": args.slices, "--test-fraction": args.test_fraction}
    given = [name for name, value in {**conversion, "--overwrite": args.overwrite or None}.items() if value is not None]
    if args.from_nifti is None and given:
        parser.error(f"{', '.join(given)} only apply with --from-nifti")
    clashing = {"--demo": args.demo or None, "--data-dir": args.data_dir, "--zip": args.zip, "--scans": args.scans}
    clashing = [name for name, value in clashing.items() if value is not None]
    if args.from_nifti is not None and clashing:
        parser.error(f"{', '.join(clashing)} do not apply with --from-nifti, which writes to --out")
    if args.from_nifti is not None and args.labels is None:
        parser.error("--from-nifti needs --labels TABLE: a CSV naming each volume's file, subject and diagnosis")


def prepare_folder(root: Path, zip_path: Path | None) -> None:
    """Unpack the zip into `root` when `root` is missing; say what to do when neither exists."""
    if root.exists():
        if zip_path is not None:
            print(f"{root} exists: {zip_path} not unpacked")
        return
    zip_path = zip_path or DEFAULT_ZIP
    if not zip_path.is_file():
        raise DatasetError(
            f"dataset folder {root} not found, nor {zip_path} to unpack: put the ADNI zip at {zip_path} or the images in "
            f"{root}/{{train,test}}/{{AD,NC}}/, or build the demo with `python project_setup.py --demo`"
        )
    print(f"unpacking {zip_path} into {root}")
    unpack_zip(zip_path, root)


def make_work_folders() -> None:
    for folder in WORK_FOLDERS:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create the working folder {folder} ({error}): run from a writable folder") from None


def make_demo_pairs(demo: DatasetIndex, pairs: Path, num_scans: int, seed: int) -> None:
    """Build the pairs of the demo indexed in `demo` into `pairs`, unless they are there already; the
    demo must be the one (num_scans, seed) builds, or the pairs would be of other brains."""
    removed = remove_leftovers(pairs)
    if removed:
        print(f"removed {len(removed)} folder(s) that a killed pairs build left next to {display_path(pairs)}")
    if pairs.is_dir() and any(pairs.iterdir()):
        print(f"{pairs} already holds the pairs: not rebuilding (delete it to build them anew)")
        return
    built = {(record.scan_id, record.split, CLASS_NAMES[record.label]) for record in demo.records}
    for scan in plan_demo(num_scans, seed):
        if (scan.scan_id, scan.split, scan.class_name) not in built:
            raise UsageError(
                f"{demo.root} is not the demo of --scans {num_scans} --seed {seed} (it lacks {scan.split} scan "
                f"{scan.scan_id}): pass the --scans and --seed it was built with"
            )
    started = time.perf_counter()
    build_demo_pairs(pairs, num_scans, seed)
    print(f"built the pairs: {len(list(pairs.rglob('*.jpeg')))} slices in {pairs} ({time.perf_counter() - started:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = (args.out or NIFTI_ROOT) if args.from_nifti else args.data_dir or (DEMO_ROOT if args.demo else DEFAULT_ROOT)
    with usage_errors_exit():
        check_output_paths([root], folders={"--figures": args.figures})
        make_work_folders()
        removed = remove_leftovers(root)
        if removed:
            print(
                f"removed {len(removed)} folder(s) that a killed demo build, unpacking or conversion left next to "
                f"{display_path(root)}: " + ", ".join(display_path(folder.name) for folder in removed)
            )
        pairs = root.parent / PAIRS_FOLDER if args.demo_pairs else None
        check_output_paths([root], folders={"the pairs folder": pairs})
        if args.demo and (root / "train").is_dir():
            print(f"{root} already holds a dataset: checking it, not rebuilding (delete it to build the demo anew)")
        elif args.demo:
            scans = DEMO_SCANS if args.scans is None else args.scans
            started = time.perf_counter()
            build_demo(root, scans, args.seed or 0)
            print(f"built the demo: {scans} scans x {SLICES_PER_SCAN} slices in {root} ({time.perf_counter() - started:.0f} s)")
        elif args.from_nifti:
            options = {"slices": args.slices, "test_fraction": args.test_fraction, "seed": args.seed}
            given = {name: value for name, value in options.items() if value is not None}
            print("\n".join(convert_volumes(args.from_nifti, args.labels, root, overwrite=args.overwrite, **given)))
        else:
            prepare_folder(root, args.zip)
        report = check_dataset(root)
    print("\n".join(format_report(report)))
    problem = find_problem(report)
    if problem:
        fail(problem)
    if pairs is not None:
        with usage_errors_exit():
            make_demo_pairs(report.index, pairs, DEMO_SCANS if args.scans is None else args.scans, args.seed or 0)
    if args.figures:
        with usage_errors_exit():
            report_removed(remove_temporary_files(args.figures), args.figures)
            for path in save_figures(report, args.figures, "demo" if args.demo else "dataset"):
                print(f"wrote {path}")
    print(f"usable: {sum(report.readable)} readable images in {len(report.index.scans())} scans")


if __name__ == "__main__":
    main()
