"""Brain-slice data: find the images, parse scan IDs, split by scan, transform, cache, load.

The layout is `<root>/{train,test}/{AD,NC}/<scanID>_<slice>.<jpeg|jpg|png>` (ADNI's course copy,
or the demo that `project_setup.py --demo` builds). AD is label 0 and NC label 1, fixed by name.
The provided test set stays the test set; validation is carved from train by scan ID, so no scan
(20 contiguous slices of one MRI) is ever in two splits. The dataset folder is only ever read.

Images are decoded once into a uint8 array (and optionally an on-disk cache keyed by the file
list and the transform), so an epoch costs no JPEG decoding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile
from scipy import ndimage
from torch.utils.data import BatchSampler, DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from config import CLASS_NAMES, DEFAULT_DATA_DIR, DataConfig
from utils import (
    UsageError,
    atomic_path,
    check_memory,
    check_output_paths,
    display_path,
    remove_temporary_files,
    write_json_atomic,
)

SPLITS = ("train", "test")
DEFAULT_ROOT = Path(DEFAULT_DATA_DIR)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# ADNI's slices: 256 wide x 240 high, 20 contiguous per scan; the demo and --from-nifti write the same.
IMAGE_HEIGHT, IMAGE_WIDTH = 240, 256
SLICES_PER_SCAN = 20
TRANSFORM_VERSION = 1  # bump when prepare_image changes, so stale disk caches are not reused
# A larger "slice number" is a mistyped or hostile name, not a position in a scan.
MAX_SLICE_INDEX = 10**6

# A truncated JPEG must be reported as unreadable, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DatasetError(UsageError):
    """The dataset folder cannot be used as it is; the message says why and what to do."""


class UnreadableImageError(Exception):
    """An image file that exists but cannot be decoded (truncated, corrupt, not an image)."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    split: str
    label: int
    scan_id: str
    slice_index: int


@dataclass
class DatasetIndex:
    root: Path
    records: list[ImageRecord]  # sorted by (split, label, scan_id, slice_index)
    skipped: list[Path] = field(default_factory=list)  # files that are not <scanID>_<slice> images

    def scans(self, split: str | None = None) -> dict[str, list[ImageRecord]]:
        """scan ID → its records sorted by slice index, for one split or all."""
        grouped: dict[str, list[ImageRecord]] = {}
        for record in self.records:
            if split is None or record.split == split:
                grouped.setdefault(record.scan_id, []).append(record)
        return grouped


def parse_image_name(name: str) -> tuple[str, int] | None:
    """`"123456_78.jpeg"` → `("123456", 78)`; None for anything else.

    The scan ID is everything before the last underscore, so IDs that contain underscores work.
    Only ASCII is accepted: `str.isdigit` also takes "²" (which int() rejects) and "١٢" (which it
    reads as 12), and a non-ASCII scan ID can be stored in two Unicode forms (macOS decomposes
    accents), so one scan could get two IDs. Undecodable bytes in a name arrive as surrogates,
    which are not ASCII either.
    """
    stem, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix.lower()}" not in IMAGE_SUFFIXES:
        return None
    scan_id, underscore, slice_text = stem.rpartition("_")
    if not underscore or not _is_scan_id(scan_id) or not (slice_text.isascii() and slice_text.isdigit()):
        return None
    # The length test first: int() of thousands of digits is slow, and refused past 4300.
    if len(slice_text) > len(str(MAX_SLICE_INDEX)) or int(slice_text) > MAX_SLICE_INDEX:
        return None
    return scan_id, int(slice_text)


def _is_scan_id(text: str) -> bool:
    """Visible ASCII only: no spaces, control characters or non-ASCII letters and digits."""
    return bool(text) and text.isascii() and text.isprintable() and " " not in text


def index_dataset(root: str | os.PathLike) -> DatasetIndex:
    """List every image under `root` without opening any; raise DatasetError if unusable."""
    root = Path(root)
    shown = display_path(root)
    if not _is_folder(root):
        raise DatasetError(
            f"dataset folder {shown} not found: put the images in {shown}/{{train,test}}/{{AD,NC}}/ "
            "or build the demo with `python project_setup.py --demo`"
        )
    records: list[ImageRecord] = []
    skipped: list[Path] = []
    for split in SPLITS:
        for label, class_name in enumerate(CLASS_NAMES):
            folder = root / split / class_name
            if not _is_folder(folder):
                raise DatasetError(
                    f"class folder {display_path(folder)} is missing: the layout must be {shown}/{{train,test}}/{{AD,NC}}/"
                )
            for path, is_file in _list_folder(folder):
                parsed = parse_image_name(path.name) if is_file else None
                if parsed is None:
                    skipped.append(path)
                    continue
                scan_id, slice_index = parsed
                records.append(ImageRecord(path, split, label, scan_id, slice_index))
    if not records:
        raise DatasetError(f"no images named <scanID>_<slice>.jpeg found under {shown}/{{train,test}}/{{AD,NC}}/")
    records.sort(key=lambda r: (SPLITS.index(r.split), r.label, r.scan_id, r.slice_index))
    return DatasetIndex(root, records, skipped)


def _unreadable_folder(folder: Path, error: OSError) -> DatasetError:
    return DatasetError(
        f"cannot read the folder {display_path(folder)} ({error.strerror or error}): give your user read access "
        f"to it (e.g. `chmod -R u+rX {display_path(folder)}`) or copy the dataset somewhere readable"
    )


def _is_folder(path: Path) -> bool:
    """Path.is_dir, but a folder that may not be looked into (a parent without x) is a DatasetError."""
    try:
        return path.is_dir()
    except OSError as error:
        raise _unreadable_folder(path.parent, error) from None


def _list_folder(folder: Path) -> list[tuple[Path, bool]]:
    """(entry, is a regular file) for everything in `folder`, sorted; DatasetError if it cannot be read."""
    try:
        return [(path, path.is_file()) for path in sorted(folder.iterdir())]
    except OSError as error:
        raise _unreadable_folder(folder, error) from None


def scans_in_both(index: DatasetIndex) -> set[str]:
    """Scan IDs that appear in both the train and the test folders (a leak between splits)."""
    return set(index.scans("train")) & set(index.scans("test"))


def scans_in_both_classes(index: DatasetIndex) -> set[str]:
    """Scan IDs filed under both AD and NC (a scan has one diagnosis)."""
    labels: dict[str, set[int]] = {}
    for record in index.records:
        labels.setdefault(record.scan_id, set()).add(record.label)
    return {scan_id for scan_id, found in labels.items() if len(found) > 1}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode one file to an 8-bit grayscale (H, W) array; UnreadableImageError if it can't be."""
    return read_image_and_mode(path)[0]


def read_image_and_mode(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """read_image, plus the file's PIL mode ("L", "RGB", "I;16", ...) for reports."""
    try:
        with Image.open(path) as image:
            # PIL only warns between its limit and twice it, then decodes anyway: an image that
            # declares ~100 megapixels would take gigabytes. No brain slice is anywhere near it.
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise UnreadableImageError(
                    f"{display_path(path)}: declares {image.width}x{image.height} pixels, over PIL's "
                    f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS}"
                )
            image.load()
            if image.mode in ("I;16", "I;16B", "I"):
                pixels = np.asarray(image, dtype=np.float64)
                peak = pixels.max() or 1.0
                return np.round(pixels * (255.0 / peak)).astype(np.uint8), image.mode
            return np.asarray(image.convert("L"), dtype=np.uint8), image.mode
    except UnreadableImageError:
        raise
    # Any exception: PIL's decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error,
    # DecompressionBombError (and the warning, under -W error) and more for damaged files, and
    # whichever it is, this one file cannot be used while the rest can.
    except Exception as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise UnreadableImageError(f"{display_path(path)}: {reason}") from error


def prepare_image(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Resize an (H, W) uint8 slice to fit in image_size², then centre it on black: (S, S) uint8.

    Fitting the longer side (rather than cropping the shorter) guarantees no part of the brain is
    cut off; ADNI's 256x240 slices become 192x180 plus 6 black rows top and bottom.
    """
    height, width = pixels.shape
    scale = image_size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(Image.fromarray(pixels).resize((new_width, new_height), Image.Resampling.BICUBIC), dtype=np.uint8)
    canvas = np.zeros((image_size, image_size), dtype=np.uint8)
    top, left = (image_size - new_height) // 2, (image_size - new_width) // 2
    canvas[top : top + new_height, left : left + new_width] = resized
    return canvas


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [0, 255] → float [-1, 1], the range the VAE sees."""
    return images.float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------- splits


# The anatomy measure: how much of the brain is as dark as CSF. AD widens ventricles and sulci, so
# AD slices have more of it; project_setup.py reports it for a dataset, evaluate.py for generated images.
BRAIN_LEVEL = 10  # 8-bit: above JPEG ringing on the black background
DARK_FRACTION = 0.6  # of a slice's median brain intensity: CSF is below it, grey matter well above


def brain_mask(pixels: np.ndarray) -> np.ndarray:
    """Where a uint8 slice (..., H, W) shows brain: above BRAIN_LEVEL (bool, same shape)."""
    return pixels > BRAIN_LEVEL


def brain_pixels(pixels: np.ndarray) -> np.ndarray:
    """The values of a uint8 slice's brain pixels (brain_mask), flattened."""
    return pixels[brain_mask(pixels)]


def csf_dark_share(brain: np.ndarray) -> float:
    """Share of brain pixel values below DARK_FRACTION x their median: relative to the slice's own
    median, so brightness and contrast do not count. NaN for a slice without brain."""
    if brain.size == 0:
        return math.nan
    return float(np.mean(brain < DARK_FRACTION * np.median(brain)))


def csf_dark_shares(pixels: np.ndarray) -> np.ndarray:
    """csf_dark_share of each uint8 slice's brain pixels (N, H, W) → (N,); NaN for a slice without brain."""
    return np.array([csf_dark_share(brain_pixels(image)) for image in pixels])


# Where the CSF is: the brain's outer band (cortex and sulci, which thin and widen in AD) and the deep brain
# inside it (the ventricles, which grow). A model can learn one of the two without the other.
CSF_REGIONS = ("cortex_band", "deep")
CORTEX_BAND = 5 / 64  # the outer band's depth as a share of the image width: 5 px at 64 px, 15 at 192


def csf_dark_shares_by_region(pixels: np.ndarray) -> np.ndarray:
    """CSF-dark share of each uint8 slice (N, H, W) in each of CSF_REGIONS → (N, 2): brain pixels within
    CORTEX_BAND of the (hole-filled) brain's edge, then those deeper; dark is relative to the whole
    brain's median, as csf_dark_share. NaN where a region holds no brain pixel."""
    shares = np.full((len(pixels), len(CSF_REGIONS)), math.nan)
    for index, image in enumerate(pixels):
        brain = brain_mask(image)
        if not brain.any():
            continue
        depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(brain))
        dark = image < DARK_FRACTION * np.median(image[brain])
        in_band = depth <= CORTEX_BAND * image.shape[-1]
        for column, region in enumerate((brain & in_band, brain & ~in_band)):
            if region.any():
                shares[index, column] = dark[region].mean()
    return shares


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """Difference of means in units of the pooled standard deviation; NaN when that is zero (every
    value of each group the same: `zero_spread`), where the ratio means nothing."""
    if zero_spread(a, b):
        return math.nan  # the rounding error of var() would otherwise divide the difference into ~1e15
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    return float((a.mean() - b.mean()) / math.sqrt(pooled)) if pooled > 0 else math.nan


def zero_spread(*groups: np.ndarray) -> bool:
    """Whether every group holds one value only (exactly), so a pooled standard deviation is zero."""
    return all(np.ptp(group) == 0 for group in groups if len(group))


def make_splits(index: DatasetIndex, val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[str]]:
    """Scan IDs per split: test = the provided test set; val = a seeded, per-class share of train.

    Deterministic from (file list, val_fraction, seed); stratified, so val holds both classes.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    leaked = scans_in_both(index)
    if leaked:
        raise DatasetError(
            f"{len(leaked)} scan IDs are in both train and test (e.g. {', '.join(sorted(leaked)[:3])}): "
            "each scan must be in one split only; run `python project_setup.py` for the full list"
        )
    mixed = scans_in_both_classes(index)
    if mixed:
        raise DatasetError(
            f"{len(mixed)} scan IDs are filed under both AD and NC (e.g. {', '.join(sorted(mixed)[:3])}): "
            "a scan has one diagnosis; move its slices into one class folder"
        )
    rng = np.random.default_rng(seed)
    train_scans = index.scans("train")
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": sorted(index.scans("test"))}
    for label in range(len(CLASS_NAMES)):
        scan_ids = sorted(s for s, records in train_scans.items() if records[0].label == label)
        shuffled = [scan_ids[i] for i in rng.permutation(len(scan_ids))]
        val_count = round(len(scan_ids) * val_fraction)
        if val_fraction > 0 and len(scan_ids) >= 2:
            val_count = min(max(val_count, 1), len(scan_ids) - 1)
        splits["val"] += shuffled[:val_count]
        splits["train"] += shuffled[val_count:]
    splits = {name: sorted(ids) for name, ids in splits.items()}
    check_disjoint(splits)
    return splits


def check_disjoint(splits: dict[str, list[str]]) -> None:
    """Raise DatasetError if any scan ID is in two splits (or twice in one)."""
    seen: dict[str, str] = {}
    for name, scan_ids in splits.items():
        for scan_id in scan_ids:
            if scan_id in seen:
                first = seen[scan_id]
                where = f"twice in the {name} split" if first == name else f"in both the {first} and {name} splits"
                raise DatasetError(f"scan {scan_id} is {where}")
            seen[scan_id] = name


def save_splits(path: str | os.PathLike, splits: dict[str, list[str]], val_fraction: float, seed: int) -> None:
    write_json_atomic(path, {"val_fraction": val_fraction, "seed": seed, **splits})


def load_splits(path: str | os.PathLike) -> dict[str, list[str]]:
    """The scan IDs per split that save_splits wrote; DatasetError naming the file if it is not that.

    A run's checkpoints were trained and validated on exactly these splits, so a damaged file
    cannot be repaired by guessing: the only safe fix is a new run.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    # UnicodeDecodeError and json.JSONDecodeError are ValueErrors.
    except (OSError, ValueError) as error:
        raise _damaged_splits(path, " ".join(str(error).split())) from None
    if not isinstance(data, dict):
        raise _damaged_splits(path, f"a JSON {type(data).__name__}, not an object")
    for name in ("train", "val", "test"):
        if not isinstance(data.get(name), list) or not all(isinstance(scan_id, str) for scan_id in data[name]):
            raise _damaged_splits(path, f'"{name}" is not a list of scan IDs (strings)')
    splits = {name: list(data[name]) for name in ("train", "val", "test")}
    try:
        check_disjoint(splits)
    except DatasetError as error:
        raise _damaged_splits(path, str(error)) from None
    return splits


def _damaged_splits(path: Path, reason: str) -> DatasetError:
    return DatasetError(
        f"{display_path(path)} is damaged ({reason}): this run's train/val/test split is lost; "
        "start a new run (train.py with another --run folder)"
    )


# ----------------------------------------------------------------------------- decoded cache


@dataclass
class DecodedImages:
    """Every listed image decoded and transformed once."""

    pixels: np.ndarray  # (N, S, S) uint8; zeros where unreadable
    readable: np.ndarray  # (N,) bool
    unreadable: list[str]  # "path: reason" for each image that could not be decoded


def _cache_key(records: list[ImageRecord], image_size: int) -> str:
    digest = hashlib.sha256(f"v{TRANSFORM_VERSION} size={image_size}\n".encode())
    for record in records:
        stat = record.path.stat()
        digest.update(f"{record.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode_one(path: Path, image_size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return prepare_image(read_image(path), image_size), None
    except UnreadableImageError as error:
        return None, str(error)


def decode_images(records: list[ImageRecord], image_size: int, cache_dir: str | os.PathLike | None = None) -> DecodedImages:
    """Decode and transform `records` (threads: PIL decodes without the GIL); reuse a disk cache.

    The cache file is named by a hash of the paths, sizes, mtimes and transform, so any change to
    the dataset or `image_size` makes a new one instead of serving stale pixels. A cache file that
    cannot be read back as exactly that (truncated by a full disk, replaced, edited) is rebuilt:
    it only ever holds what the dataset folder can give again.
    """
    check_memory(len(records) * image_size**2, f"the {len(records)} decoded images at {image_size} px")
    cache_file = Path(cache_dir) / f"images_{_cache_key(records, image_size)}.npz" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        try:
            return _read_cache(cache_file, len(records), image_size)
        # What np.load and the zip reader raise for a damaged file, and _read_cache for a wrong one.
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            print(f"the decode cache {display_path(cache_file)} is damaged ({reason[:200]}): rebuilding it")

    pixels = np.zeros((len(records), image_size, image_size), dtype=np.uint8)
    readable = np.zeros(len(records), dtype=bool)
    unreadable: list[str] = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda record: _decode_one(record.path, image_size), records)
        for position, (image, problem) in enumerate(results):
            if image is None:
                unreadable.append(problem)
            else:
                pixels[position], readable[position] = image, True
    if cache_file is not None:
        remove_temporary_files(cache_file.parent)  # of decoders stopped while writing a cache
        try:
            with atomic_path(cache_file) as temp_path:
                with open(temp_path, "wb") as handle:
                    np.savez(handle, pixels=pixels, readable=readable, unreadable=np.array(unreadable, dtype=str))
        # The cache only saves time: a full disk or a read-only cache folder must not stop a run.
        except OSError as error:
            print(
                f"could not write the decode cache {display_path(cache_file)} ({error.strerror or error}): continuing without it"
            )
    return DecodedImages(pixels, readable, unreadable)


def _read_cache(cache_file: Path, count: int, image_size: int) -> DecodedImages:
    """The DecodedImages that decode_images saved for `count` images; ValueError if it is not one."""
    loaded = np.load(cache_file, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    with loaded:
        pixels, readable, unreadable = loaded["pixels"], loaded["readable"], loaded["unreadable"]
    if pixels.shape != (count, image_size, image_size) or pixels.dtype != np.uint8:
        raise ValueError(f"pixels are {pixels.dtype} {pixels.shape}, expected uint8 {(count, image_size, image_size)}")
    if readable.shape != (count,) or readable.dtype != bool:
        raise ValueError(f"readable flags are {readable.dtype} {readable.shape}, expected bool ({count},)")
    if unreadable.ndim != 1 or unreadable.dtype.kind != "U" or len(unreadable) != count - readable.sum():
        raise ValueError(f"{len(unreadable)} unreadable reasons for {count - readable.sum()} unreadable images")
    return DecodedImages(pixels, readable, list(unreadable))


# ----------------------------------------------------------------------------- torch datasets


class SliceDataset(Dataset):
    """In-memory slices of one split. Indexed by a list of positions, it returns a whole batch.

    Items: image (1, S, S) float in [-1, 1], label (long), and with `return_slice=True` the slice
    index (long) too: slice position is a confound between AD and NC that later code must see.
    """

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, slice_indices: np.ndarray, return_slice: bool = False):
        self.pixels = torch.from_numpy(np.ascontiguousarray(pixels))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.slice_indices = torch.from_numpy(np.asarray(slice_indices, dtype=np.int64))
        self.return_slice = return_slice

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        image = to_model_range(self.pixels[index].unsqueeze(-3))
        if self.return_slice:
            return image, self.labels[index], self.slice_indices[index]
        return image, self.labels[index]


def load_split_datasets(
    config: DataConfig, splits: dict[str, list[str]] | None = None, return_slice: bool = False, verbose: bool = True
) -> tuple[dict[str, SliceDataset], dict[str, list[str]]]:
    """Index, split (or apply the given `splits`), decode once, and build train/val/test datasets.

    Unreadable images are reported by path and left out, never met mid-epoch.
    """
    check_output_paths([config.data_dir], folders={"--data.cache_dir": config.cache_dir})
    index = index_dataset(config.data_dir)
    if splits is None:
        splits = make_splits(index, config.val_fraction, config.split_seed)
    split_of = {scan_id: name for name, scan_ids in splits.items() for scan_id in scan_ids}
    unknown = {r.scan_id for r in index.records} - set(split_of)
    if unknown:
        raise DatasetError(
            f"{len(unknown)} scans in {config.data_dir} are not in this run's splits.json "
            f"(e.g. {sorted(unknown)[0]}): the dataset changed since the run started; start a new run"
        )
    decoded = decode_images(index.records, config.image_size, config.cache_dir)
    if decoded.unreadable and verbose:
        print(f"skipped {len(decoded.unreadable)} unreadable images:")
        for problem in decoded.unreadable[:10]:
            print(f"  {problem}")
    datasets = {}
    for name in ("train", "val", "test"):
        keep = [
            position
            for position, record in enumerate(index.records)
            if split_of[record.scan_id] == name and decoded.readable[position]
        ]
        records = [index.records[position] for position in keep]
        datasets[name] = SliceDataset(
            decoded.pixels[keep],
            np.array([r.label for r in records]),
            np.array([r.slice_index for r in records]),
            return_slice,
        )
    if len(datasets["train"]) == 0:
        raise DatasetError(f"no readable training images in {config.data_dir}")
    return datasets, splits


def check_classes(datasets: dict[str, SliceDataset]) -> None:
    """Both AD and NC in the training and validation splits: a model trained on one class would
    sample it for either label without a word."""
    for name in ("train", "val"):
        present = set(datasets[name].labels.tolist())
        missing = [class_name for label, class_name in enumerate(CLASS_NAMES) if label not in present]
        if missing:
            raise UsageError(
                f"the {name} split has no {' or '.join(missing)} images: a conditional model needs both "
                "classes; add them to the dataset's train folder (or raise --data.val_fraction)"
            )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches from an in-memory dataset indexed by a list of positions (one fancy-index per batch).

    Workers would only copy already-decoded pixels between processes, so 0 is the fast choice here.
    The order is a function of (seed, epoch) alone, so a resumed run sees the same batches as an
    uninterrupted one: call `set_loader_epoch(loader, epoch)` before each epoch. With
    `world_size > 1` each rank gets its own shard.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(
        dataset,
        sampler=BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last),
        batch_size=None,
        num_workers=0,
        pin_memory=pin_memory,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a `make_loader` loader for `epoch` (deterministically)."""
    loader.sampler.sampler.set_epoch(epoch)
