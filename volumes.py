"""NIfTI volumes and a diagnosis table → the slice layout (`python project_setup.py --from-nifti DIR --labels TABLE`).

Every volume goes through the same steps, so the choices a home-made slicer hides are made once:
- read with nibabel (`.nii`, `.nii.gz`), turned to the closest canonical orientation (RAS+) and
  resampled (trilinear) to 1 mm on axes aligned with the world's, so files stored LAS, LPS, sagittal
  or a little oblique give the same axial slices;
- a head mask: the volume smoothed by a 1 mm Gaussian, above a BET-style threshold (2nd percentile + 15%
  of the 2nd-98th range), largest connected part;
- the axial window by the head, not by index: N contiguous 1 mm planes centred 64.5 mm (WINDOW_BELOW_TOP)
  below the top of the mask, numbered as the MNI template's planes (README "Your own volumes" says why
  that matches ADNI's windows);
- intensities scaled per scan, the mask's 0.5th and 99.5th percentiles to 0 and 255;
- 8-bit PNG slices, 256 wide x 240 high as ADNI's, anterior up, the head centred;
- a split by subject, stratified by diagnosis, seeded, so repeat visits never straddle train and test.

The table names each volume's file, subject and diagnosis (and, optionally, visit). Anything wrong
with the table or any volume stops the whole conversion before the output exists: it is written into
a hidden sibling folder and renamed into place at the end, with a `manifest.csv` of what came from where.
"""

from __future__ import annotations

import contextlib
import csv
import math
import multiprocessing
import os
import re
import shutil
import sys
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from config import CLASS_NAMES
from dataset import IMAGE_HEIGHT, IMAGE_WIDTH, SLICES_PER_SCAN, SPLITS, display_path
from utils import UsageError, available_cpus, check_output_paths, fresh_sibling

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("scan", "source", "subject", "visit", "diagnosis", "class", "split", "slices", "orientation", "voxel_mm")
MAX_SLICES = 100

# Column names the table may use for each role, compared lower-case with spaces and hyphens as "_".
COLUMNS = {
    "file": ("file", "filename", "file_name", "path", "filepath", "file_path", "image", "image_file", "volume", "nifti"),
    "subject": ("subject", "subject_id", "subjectid", "participant", "participant_id", "ptid", "patient", "patient_id"),
    "diagnosis": ("diagnosis", "dx", "dx_bl", "group", "research_group", "label", "class"),
    "visit": ("visit", "visit_code", "viscode", "session", "session_id", "ses"),
}
REQUIRED_COLUMNS = ("file", "subject", "diagnosis")
# Diagnoses as written in tables, lower-cased, apostrophes dropped. "dementia" is ADNIMERGE's DX for AD;
# everything else (MCI, EMCI, SMC, numbers, empty cells) is skipped and counted.
DIAGNOSES = {
    "AD": {"ad", "alzheimers disease", "alzheimer disease", "alzheimers", "alzheimer", "dementia"},
    "NC": {"nc", "cn", "control", "controls", "normal control", "healthy control", "hc", "cognitively normal"},
}

# The head mask: a threshold in the manner of FSL BET's (Smith 2002: 2nd percentile + 10% of the 2nd-98th
# range), on the volume smoothed by a 1 mm Gaussian and at 15%: on the MNI template under Rician noise of
# sigma 6, 8 and 10 (white matter ~90), BET's own threshold moved the top of the head up 6, 34 and 34 mm (the
# noise joined the head up to the edge of the field of view); this one by 0, 0 and 1 mm.
MASK_PERCENTILES = (2.0, 98.0)
MASK_FRACTION = 0.15
MASK_SMOOTHING_MM = 1.0
# ADNI's slice indices span about 67-114 (DESIGN.md), read as planes of a 1 mm MNI-like volume: MNI
# z = -5 to +42 mm, centred on plane 90.5 (z = +18.5, the bodies of the lateral ventricles). In
# nilearn's 1 mm MNI152 template that centre lies 64.5 mm below the top of this module's head mask
# (plane 155): every scan's window is centred that far below the top of its own head, and its planes are
# numbered as the template's, so the slice names read like ADNI's (81-100 for 20 slices).
REFERENCE_TOP = 155
WINDOW_CENTRE = 90.5
WINDOW_BELOW_TOP = REFERENCE_TOP - WINDOW_CENTRE
INTENSITY_PERCENTILES = (0.5, 99.5)
# An axis counts as aligned with the world when its tilt moves no voxel of the volume by more than this.
ALIGNED_MM = 0.01


@dataclass(frozen=True)
class Volume:
    """One volume file joined to its table row."""

    path: Path
    source: str  # path relative to the NIfTI folder, with "/"
    scan_id: str
    subject: str = ""
    visit: str = ""
    diagnosis: str = ""  # as the table writes it
    class_name: str = ""  # AD or NC
    split: str = ""


@dataclass(frozen=True)
class Plan:
    """The volumes to convert, each with its class and split, and the table rows skipped by diagnosis."""

    volumes: list[Volume]
    skipped: Counter


# ============================================================================ the table and the files


def _some(items: Iterable[str], limit: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _without_suffix(name: str) -> str:
    return next((name[: -len(suffix)] for suffix in NIFTI_SUFFIXES if name.lower().endswith(suffix)), name)


def find_volumes(folder: Path) -> list[Volume]:
    """Every `.nii` / `.nii.gz` under `folder` (hidden files and folders, such as macOS's `._x.nii`, left out)."""
    if not folder.is_dir():
        raise UsageError(
            f"--from-nifti {display_path(folder)} is not a folder: give the folder that holds the .nii/.nii.gz files"
        )
    volumes, scan_ids = [], {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if not path.name.lower().endswith(NIFTI_SUFFIXES):
            continue
        source = relative.as_posix()
        # A scan ID the layout accepts: visible ASCII without spaces or "/", from the file's relative path.
        scan_id = re.sub(r"[^A-Za-z0-9._-]", "-", _without_suffix(source))
        if scan_id in scan_ids:
            raise UsageError(
                f"{display_path(source)} and {display_path(scan_ids[scan_id])} both become scan ID {scan_id}: rename one"
            )
        scan_ids[scan_id] = source
        volumes.append(Volume(path, source, scan_id))
    if not volumes:
        raise UsageError(f"no .nii or .nii.gz files under {display_path(folder)}: give the folder that holds the volumes")
    return volumes


def _column_key(name: str) -> str:
    return re.sub(r"[\s-]+", "_", name.strip().lower())


def _find_columns(table: Path, header: list[str]) -> dict[str, str]:
    """Role → the table's column name; UsageError for a missing required role or an ambiguous one."""
    found = {}
    for role, names in COLUMNS.items():
        matches = [column for column in header if _column_key(column) in names]
        if len(matches) > 1:
            raise UsageError(
                f"{display_path(table)} has several {role} columns ({', '.join(matches)}): keep one, rename the others"
            )
        if matches:
            found[role] = matches[0]
    missing = [role for role in REQUIRED_COLUMNS if role not in found]
    if missing:
        wanted = "; ".join(f"{role}: one of {', '.join(COLUMNS[role][:4])}, ..." for role in missing)
        raise UsageError(
            f"{display_path(table)} has no column for the {' and the '.join(missing)} ({wanted}); "
            f"its columns are: {', '.join(header) or 'none'}"
        )
    return found


def read_table(table: Path) -> list[dict[str, str]]:
    """The table's rows as role → cell text (file, subject, diagnosis, visit); comma, semicolon or tab separated."""
    try:
        text = table.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read the table {display_path(table)} ({error}): give a CSV file in UTF-8") from None
    lines = text.splitlines()
    if not lines:
        raise UsageError(f"the table {display_path(table)} is empty: it needs a header row and one row per volume")
    delimiter = max(",;\t", key=lines[0].count)
    reader = csv.reader(lines, delimiter=delimiter)
    header = next(reader)
    columns = _find_columns(table, header)
    positions = {role: header.index(column) for role, column in columns.items()}
    rows = []
    for cells in reader:
        if any(cell.strip() for cell in cells):
            rows.append({role: (cells[at].strip() if at < len(cells) else "") for role, at in positions.items()})
    return rows


def diagnosis_class(diagnosis: str) -> str | None:
    """ "AD" or "NC" for the spellings in DIAGNOSES (any case), None for anything else."""
    key = " ".join(diagnosis.lower().replace("'", "").replace("’", "").split())
    return next((name for name, spellings in DIAGNOSES.items() if key in spellings), None)


def _volume_keys(volume: Volume) -> set[str]:
    """The ways a table may name the volume: its relative path or its name, each with or without the suffix."""
    name = volume.source.rsplit("/", 1)[-1]
    return {volume.source, _without_suffix(volume.source), name, _without_suffix(name)}


def match_rows(folder: Path, table: Path, volumes: list[Volume], rows: list[dict[str, str]]) -> Plan:
    """Join rows to volumes; every volume needs one row and every row one volume (UsageError listing them)."""
    by_key: dict[str, list[Volume]] = {}
    for volume in volumes:
        for key in _volume_keys(volume):
            by_key.setdefault(key, []).append(volume)
    named: dict[str, tuple[int, dict[str, str]]] = {}  # source → (row number, row)
    without_volume = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        value = row["file"].replace("\\", "/")
        if Path(value).is_absolute() and Path(value).resolve().is_relative_to(folder.resolve()):
            value = Path(value).resolve().relative_to(folder.resolve()).as_posix()
        found = by_key.get(value, [])
        if len(found) > 1:
            raise UsageError(
                f"row {number} of {display_path(table)} names {value!r}, which fits {_some(v.source for v in found)}: "
                "write the path relative to the NIfTI folder"
            )
        if not found:
            without_volume.append(f"{value or '(empty)'} (row {number})")
            continue
        if found[0].source in named:
            raise UsageError(
                f"{display_path(found[0].source)} is named by rows {named[found[0].source][0]} and {number} of "
                f"{display_path(table)}: give each volume one row"
            )
        named[found[0].source] = (number, row)
    if without_volume:
        raise UsageError(
            f"{_count(len(without_volume), 'row')} of {display_path(table)} name no volume under {display_path(folder)}: "
            f"{_some(without_volume)}; fix the names or remove the rows"
        )
    unnamed = [volume.source for volume in volumes if volume.source not in named]
    if unnamed:
        raise UsageError(
            f"{_count(len(unnamed), 'volume')} under {display_path(folder)} have no row in {display_path(table)}: {_some(unnamed)}; "
            "add their rows (diagnosis MCI, say, to skip them) or move them out of the folder"
        )
    return _classify(table, volumes, named)


def _classify(table: Path, volumes: list[Volume], named: dict[str, tuple[int, dict[str, str]]]) -> Plan:
    """Keep the AD and NC volumes (others counted by diagnosis); one diagnosis per subject."""
    kept, skipped = [], Counter()
    for volume in volumes:
        number, row = named[volume.source]
        if not row["subject"]:
            raise UsageError(f"row {number} of {display_path(table)} has no subject: every volume needs one")
        class_name = diagnosis_class(row["diagnosis"])
        if class_name is None:
            skipped[row["diagnosis"] or "(empty)"] += 1
            continue
        kept.append(
            replace(volume, subject=row["subject"], visit=row.get("visit", ""), diagnosis=row["diagnosis"], class_name=class_name)
        )
    classes: dict[str, set[str]] = {}
    for volume in kept:
        classes.setdefault(volume.subject, set()).add(volume.class_name)
    mixed = sorted(subject for subject, found in classes.items() if len(found) > 1)
    if mixed:
        raise UsageError(
            f"subjects {_some(mixed)} have both AD and NC volumes in {display_path(table)}: a subject-level split "
            "needs one diagnosis per subject; keep the visits of one diagnosis (e.g. drop those after a conversion)"
        )
    return Plan(kept, skipped)


def split_by_subject(plan: Plan, test_fraction: float, seed: int) -> Plan:
    """Give each subject's volumes one split: per class, a seeded `test_fraction` of the subjects (at least
    one, never all) go to test. UsageError when a class has fewer than two subjects."""
    subjects = {name: sorted({v.subject for v in plan.volumes if v.class_name == name}) for name in CLASS_NAMES}
    skipped = f"; skipped: {_some(f'{k} {n}' for k, n in plan.skipped.most_common())}" if plan.skipped else ""
    for name, ids in subjects.items():
        if len(ids) < 2:
            raise UsageError(
                f"{_count(len(ids), name + ' subject')} in the table: the split needs at least 2 per class (one in train, one "
                f"in test){skipped}; diagnoses read as AD: {', '.join(sorted(DIAGNOSES['AD']))}; as NC: "
                f"{', '.join(sorted(DIAGNOSES['NC']))}"
            )
    rng = np.random.default_rng(seed)
    split_of = {}
    for name in CLASS_NAMES:
        ids = subjects[name]
        shuffled = [ids[i] for i in rng.permutation(len(ids))]
        test_count = min(max(round(test_fraction * len(ids)), 1), len(ids) - 1)
        split_of.update({subject: ("test" if rank < test_count else "train") for rank, subject in enumerate(shuffled)})
    return Plan([replace(v, split=split_of[v.subject]) for v in plan.volumes], plan.skipped)


# ============================================================================ one volume


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def open_volume(volume: Volume):
    """The nibabel image (header read, data not yet); UsageError unless it is one 3-D NIfTI volume."""
    import nibabel as nib

    try:
        image = nib.load(volume.path)
    except (
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
        OSError,
        EOFError,
        ValueError,
        zlib.error,
    ) as error:
        raise UsageError(
            f"{display_path(volume.source)} is not a readable NIfTI file ({_first_line(error)}): convert it again or remove it"
        ) from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise UsageError(f"{display_path(volume.source)} is a {type(image).__name__}, not NIfTI: convert it to .nii or remove it")
    shape = image.shape
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1): one volume stored 4-D
        shape = shape[:-1]
    if len(shape) > 3:
        raise UsageError(
            f"{display_path(volume.source)} is {len(shape)}-D ({'x'.join(map(str, shape))}): give one 3-D volume per "
            "file (e.g. split it with fslsplit and keep the structural one)"
        )
    if len(shape) < 3 or min(shape) < 2:
        raise UsageError(
            f"{display_path(volume.source)} is 2-D ({'x'.join(map(str, shape))}): brainLDM needs a 3-D volume of the head"
        )
    return image


def canonical_data(volume: Volume) -> tuple[np.ndarray, np.ndarray, str]:
    """(data (X, Y, Z) float32 in the closest RAS+ orientation, its voxel-to-world 3x3 matrix in mm, the
    file's own orientation code such as "LAS"). Flips and axis swaps only: no interpolation yet."""
    import nibabel as nib

    image = open_volume(volume)
    orientation = "".join(nib.aff2axcodes(image.affine))
    matrix = image.affine[:3, :3]
    if not np.isfinite(matrix).all() or abs(np.linalg.det(matrix)) < 1e-6:
        raise UsageError(f"{display_path(volume.source)} has no usable voxel size (its affine is singular): fix its header")
    try:
        image = nib.as_closest_canonical(nib.funcs.squeeze_image(image))
        data = image.get_fdata(dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise UsageError(
            f"cannot read the voxels of {display_path(volume.source)} ({_first_line(error)}): the file is damaged "
            "or truncated; copy it again"
        ) from None
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise UsageError(
            f"{display_path(volume.source)} has {bad} NaN or infinite voxels: replace them (e.g. `fslmaths in -nan out`) "
            "or remove the file"
        )
    return data, image.affine[:3, :3], orientation


def _linear_along(data: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of `data` at fractional `positions` along one axis (all within the axis)."""
    lower = np.minimum(np.floor(positions).astype(np.int64), data.shape[axis] - 2)
    weight = (positions - lower).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(data.ndim)])
    below, above = np.take(data, lower, axis=axis), np.take(data, lower + 1, axis=axis)
    return below + (above - below) * weight


def resample_to_1mm(data: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Trilinear resampling of a canonical volume onto 1 mm voxels on the world's axes.

    The output's first voxel sits at the lowest corner of the volume's extent, so a voxel k of the
    output is k mm from it along each axis. Voxels smaller than 1 mm are blurred first (Gaussian,
    sigma (1/size - 1)/2 voxels) so that thin structures do not alias. Axis-aligned volumes (nearly all)
    take a separable path; tilted ones go through scipy's affine_transform: the same trilinear values.
    """
    sizes = np.sqrt((matrix**2).sum(axis=0))
    if (sizes < 1).any():
        data = ndimage.gaussian_filter(data, np.maximum(1 / sizes - 1, 0) / 2)
    corners = matrix @ np.array(list(product(*[(0, n - 1) for n in data.shape]))).T
    low, high = corners.min(axis=1), corners.max(axis=1)
    shape = tuple(int(n) for n in np.floor(high - low + 1e-6) + 1)
    tilt = np.abs(matrix - np.diag(np.diag(matrix))).max() * max(data.shape)
    if tilt <= ALIGNED_MM:
        if np.array_equal(matrix, np.eye(3)):
            return data
        for axis in range(3):
            data = _linear_along(data, axis, np.arange(shape[axis]) / matrix[axis, axis])
        return data
    inverse = np.linalg.inv(matrix)
    background = float(data.min())
    return ndimage.affine_transform(data, inverse, offset=inverse @ low, output_shape=shape, order=1, cval=background)


def head_mask(volume: np.ndarray) -> np.ndarray:
    """The smoothed volume above the threshold (see MASK_FRACTION), largest connected part: noise and
    specks apart from the head do not count."""
    low, high = np.percentile(volume[::2, ::2, ::2], MASK_PERCENTILES)
    smoothed = ndimage.gaussian_filter(volume, MASK_SMOOTHING_MM)
    labels, count = ndimage.label(smoothed > low + MASK_FRACTION * (high - low))
    if count == 0:
        return np.zeros(volume.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def window_numbers(slices: int) -> range:
    """The slice numbers a window of `slices` planes gets: centred on WINDOW_CENTRE, as the template's planes."""
    first = math.floor(WINDOW_CENTRE - (slices - 1) / 2 + 0.5)
    return range(first, first + slices)


def _window_planes(volume: Volume, mask: np.ndarray, numbers: range) -> list[int]:
    """The output's axial planes for slice numbers `numbers` (UsageError when the head is not all there)."""
    planes = np.flatnonzero(mask.any(axis=(0, 1)))
    if planes.size == 0:
        raise UsageError(f"{display_path(volume.source)} shows no head: its voxels are (nearly) all equal; remove it")
    top = int(planes[-1])
    if top == mask.shape[2] - 1:
        raise UsageError(
            f"the head reaches the top of {display_path(volume.source)}'s field of view: the window is placed below the "
            "top of the head, so the scan must show all of it; remove this volume"
        )
    chosen = [top - (REFERENCE_TOP - number) for number in numbers]
    if chosen[0] < 0:
        raise UsageError(
            f"{display_path(volume.source)} ends {top} mm below the top of the head; its {len(numbers)}-slice window "
            f"reaches {REFERENCE_TOP - numbers[0]} mm down: remove this volume or ask for fewer --slices"
        )
    return chosen


def _frame(volume: Volume, planes: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, 240, 256) views of the planes (X, Y, N): anterior up, the subject's right on the right, the head centred."""
    columns, rows = np.flatnonzero(mask.any(axis=(1, 2))), np.flatnonzero(mask.any(axis=(0, 2)))
    width, height = columns[-1] - columns[0] + 1, rows[-1] - rows[0] + 1
    if width > IMAGE_WIDTH or height > IMAGE_HEIGHT:
        raise UsageError(
            f"the head in {display_path(volume.source)} is {width} x {height} mm across, more than the {IMAGE_WIDTH} x "
            f"{IMAGE_HEIGHT} mm slice: check the voxel sizes in its header"
        )
    starts = []
    for found, size in ((columns, IMAGE_WIDTH), (rows, IMAGE_HEIGHT)):
        start = int(round((found[0] + found[-1]) / 2 - (size - 1) / 2))
        starts.append(min(max(start, found[-1] - size + 1), found[0]))  # never cut the head off
    framed = np.zeros((IMAGE_WIDTH, IMAGE_HEIGHT, planes.shape[2]), dtype=planes.dtype)
    x, y = starts
    source = planes[max(x, 0) : x + IMAGE_WIDTH, max(y, 0) : y + IMAGE_HEIGHT]
    framed[max(-x, 0) : max(-x, 0) + source.shape[0], max(-y, 0) : max(-y, 0) + source.shape[1]] = source
    return np.ascontiguousarray(np.rot90(framed).transpose(2, 0, 1))


def intensity_range(volume: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The values that become 0 and 255: the head mask's INTENSITY_PERCENTILES."""
    low, high = np.percentile(volume[mask], INTENSITY_PERCENTILES)
    return float(low), float(high)


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """`low` → 0, `high` → 255, linear in between, clipped (all 0 when high <= low)."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def slice_volume(volume: Volume, slices: int) -> tuple[np.ndarray, dict[str, str]]:
    """((slices, 240, 256) uint8, facts for the manifest) of one volume, by the module's rules."""
    data, matrix, orientation = canonical_data(volume)
    resampled = resample_to_1mm(data, matrix)
    mask = head_mask(resampled)
    planes = _window_planes(volume, mask, window_numbers(slices))
    # Scaled by the whole head, so a scan's pixels do not depend on how many slices are asked for.
    pixels = to_uint8(resampled[:, :, planes], *intensity_range(resampled, mask))
    sizes = np.sqrt((matrix**2).sum(axis=0))
    facts = {"orientation": orientation, "voxel_mm": "x".join(f"{size:g}" for size in np.round(sizes, 3))}
    return _frame(volume, pixels, mask[:, :, planes]), facts


# ============================================================================ the whole conversion


def check_output(out: Path, folder: Path, table: Path, overwrite: bool) -> None:
    """Refuse an output inside the input, an existing one without --overwrite, and an --overwrite that
    would delete something this command did not write (or the inputs themselves)."""
    check_output_paths([folder], folders={"--out": out})  # the NIfTI folder is read, never written
    out_real, folder_real = out.resolve(), folder.resolve()
    if not (out.exists() or out.is_symlink()) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        return  # nothing there, or an empty folder: nothing to lose
    if not overwrite:
        raise UsageError(f"{display_path(out)} already exists: add --overwrite to replace it, or choose another --out")
    if out.is_symlink() or not out.is_dir() or not (out / MANIFEST).is_file():
        raise UsageError(
            f"{display_path(out)} is not a folder that --from-nifti wrote (no {MANIFEST} in it): --overwrite replaces "
            "only those; choose another --out"
        )
    for inside, what in ((folder_real, "the NIfTI folder"), (table.resolve(), "the table")):
        if inside.is_relative_to(out_real):
            raise UsageError(
                f"{what} {display_path(inside)} is inside {display_path(out)}, which --overwrite would delete: move it out first"
            )


def plan_conversion(folder: Path, table: Path, test_fraction: float, seed: int) -> Plan:
    """Every check that needs no voxels: the files, the table, their join, the split, each volume's header."""
    volumes = find_volumes(folder)
    plan = split_by_subject(match_rows(folder, table, volumes, read_table(table)), test_fraction, seed)
    for volume in plan.volumes:
        open_volume(volume)  # the header only: a 4-D, 2-D or non-NIfTI file stops us before any voxel is read
    return plan


def _sliced(volumes: list[Volume], slices: int, workers: int) -> Iterator[tuple[np.ndarray, dict[str, str]]]:
    """slice_volume of each volume, in order, computed by `workers` processes (at most two each ahead)."""
    if workers <= 1:
        for volume in volumes:
            yield slice_volume(volume, slices)
        return
    # Forked on Linux, as the demo's workers: they only compute; this process writes every file.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    pool = ProcessPoolExecutor(workers, mp_context=context)
    ahead = 2 * workers
    try:
        pending = deque(pool.submit(slice_volume, volume, slices) for volume in volumes[:ahead])
        for following in volumes[ahead:]:
            result = pending.popleft().result()
            pending.append(pool.submit(slice_volume, following, slices))
            yield result
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_slices(plan: Plan, slices: int, temp: Path, workers: int) -> list[dict[str, str]]:
    """Write every volume's slices under `temp` in the layout; the manifest rows."""
    for split in SPLITS:
        for class_name in CLASS_NAMES:
            (temp / split / class_name).mkdir(parents=True)
    numbers = window_numbers(slices)
    rows = []
    results = _sliced(plan.volumes, slices, workers)
    for volume, (pixels, facts) in tqdm(
        zip(plan.volumes, results), total=len(plan.volumes), desc="volumes", unit="vol", disable=None
    ):
        folder = temp / volume.split / volume.class_name
        for number, image in zip(numbers, pixels):
            Image.fromarray(image).save(folder / f"{volume.scan_id}_{number}.png", format="PNG")
        rows.append(
            {
                "scan": volume.scan_id,
                "source": volume.source,
                "subject": volume.subject,
                "visit": volume.visit,
                "diagnosis": volume.diagnosis,
                "class": volume.class_name,
                "split": volume.split,
                "slices": f"{numbers[0]}-{numbers[-1]}",
                **facts,
            }
        )
    return rows


def _move_into_place(temp: Path, out: Path) -> None:
    """Rename `temp` onto `out`; an earlier conversion there (check_output allowed it) is moved aside first."""
    if not out.exists():
        os.replace(temp, out)
        return
    aside = fresh_sibling(out, "replaced")
    os.replace(out, aside)
    os.replace(temp, out)
    shutil.rmtree(aside, ignore_errors=True)


def convert_volumes(
    folder: Path,
    table: Path,
    out: Path,
    slices: int = SLICES_PER_SCAN,
    test_fraction: float = 0.3,
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
) -> list[str]:
    """Turn the volumes under `folder` named in `table` into the slice layout at `out`, all or nothing.
    Returns the lines of a summary to print."""
    folder, table, out = Path(folder), Path(table), Path(out)
    if not 1 <= slices <= MAX_SLICES:
        raise UsageError(f"--slices {slices}: give 1 to {MAX_SLICES} (ADNI has {SLICES_PER_SCAN})")
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction {test_fraction}: give a fraction between 0 and 1, such as 0.3")
    check_output(out, folder, table, overwrite)
    plan = plan_conversion(folder, table, test_fraction, seed)
    workers = min(workers or available_cpus(), len(plan.volumes))
    made = [parent for parent in out.absolute().parents if not parent.exists()]  # by fresh_sibling, deepest first
    temp = fresh_sibling(out, "converting")
    try:
        rows = _write_slices(plan, slices, temp, workers)
        with open(temp / MANIFEST, "w", newline="") as handle:
            writer = csv.DictWriter(handle, MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        _move_into_place(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        for parent in made:  # nothing of a failed conversion stays, not even the folders made for it
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    return summarise(plan, slices, out)


def summarise(plan: Plan, slices: int, out: Path) -> list[str]:
    """What was kept, skipped and written, per split and class, in a few lines."""
    lines = []
    skipped = sum(plan.skipped.values())
    if skipped:
        lines.append(
            f"skipped {_count(skipped, 'volume')} by diagnosis: {_some(f'{k} {n}' for k, n in plan.skipped.most_common())}"
        )
    for split in SPLITS:
        parts = []
        for name in CLASS_NAMES:
            chosen = [v for v in plan.volumes if v.split == split and v.class_name == name]
            parts.append(f"{name} {len(chosen)} volumes of {len({v.subject for v in chosen})} subjects")
        lines.append(f"{split}: {', '.join(parts)}")
    numbers = window_numbers(slices)
    lines.append(
        f"wrote {len(plan.volumes)} volumes x {slices} slices ({numbers[0]}-{numbers[-1]}, centred "
        f"{WINDOW_BELOW_TOP:g} mm below the top of each head) to {display_path(out)}, listed in {MANIFEST}"
    )
    return lines
