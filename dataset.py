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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import BatchSampler, DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from config import CLASS_NAMES, DEFAULT_DATA_DIR, DataConfig
from utils import UsageError, atomic_path, write_json_atomic

SPLITS = ("train", "test")
DEFAULT_ROOT = Path(DEFAULT_DATA_DIR)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
TRANSFORM_VERSION = 1  # bump when prepare_image changes, so stale disk caches are not reused

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
    """
    stem, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix.lower()}" not in IMAGE_SUFFIXES:
        return None
    scan_id, underscore, slice_text = stem.rpartition("_")
    if not underscore or not scan_id or not slice_text.isdigit():
        return None
    return scan_id, int(slice_text)


def index_dataset(root: str | os.PathLike) -> DatasetIndex:
    """List every image under `root` without opening any; raise DatasetError if unusable."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} not found: put the images in {root}/{{train,test}}/{{AD,NC}}/ "
            "or build the demo with `python project_setup.py --demo`"
        )
    records: list[ImageRecord] = []
    skipped: list[Path] = []
    for split in SPLITS:
        for label, class_name in enumerate(CLASS_NAMES):
            folder = root / split / class_name
            if not folder.is_dir():
                raise DatasetError(
                    f"class folder {folder} is missing: the layout must be {root}/{{train,test}}/{{AD,NC}}/"
                )
            for path in sorted(folder.iterdir()):
                parsed = parse_image_name(path.name) if path.is_file() else None
                if parsed is None:
                    skipped.append(path)
                    continue
                scan_id, slice_index = parsed
                records.append(ImageRecord(path, split, label, scan_id, slice_index))
    if not records:
        raise DatasetError(
            f"no images named <scanID>_<slice>.jpeg found under {root}/{{train,test}}/{{AD,NC}}/"
        )
    records.sort(key=lambda r: (SPLITS.index(r.split), r.label, r.scan_id, r.slice_index))
    return DatasetIndex(root, records, skipped)


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
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I"):
                pixels = np.asarray(image, dtype=np.float64)
                peak = pixels.max() or 1.0
                return np.round(pixels * (255.0 / peak)).astype(np.uint8)
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(f"{path}: {error}") from error


def prepare_image(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Resize an (H, W) uint8 slice to fit in image_size², then centre it on black: (S, S) uint8.

    Fitting the longer side (rather than cropping the shorter) guarantees no part of the brain is
    cut off; ADNI's 256x240 slices become 192x180 plus 6 black rows top and bottom.
    """
    height, width = pixels.shape
    scale = image_size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(
        Image.fromarray(pixels).resize((new_width, new_height), Image.Resampling.BICUBIC), dtype=np.uint8
    )
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


def brain_pixels(pixels: np.ndarray) -> np.ndarray:
    """The values of a uint8 slice's brain pixels (above BRAIN_LEVEL), flattened."""
    return pixels[pixels > BRAIN_LEVEL]


def csf_dark_share(brain: np.ndarray) -> float:
    """Share of brain pixel values below DARK_FRACTION x their median: relative to the slice's own
    median, so brightness and contrast do not count. NaN for a slice without brain."""
    if brain.size == 0:
        return math.nan
    return float(np.mean(brain < DARK_FRACTION * np.median(brain)))


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """Difference of means in units of the pooled standard deviation."""
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    return float((a.mean() - b.mean()) / math.sqrt(pooled)) if pooled > 0 else math.nan


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
    """Raise DatasetError if any scan ID is in two splits."""
    seen: dict[str, str] = {}
    for name, scan_ids in splits.items():
        for scan_id in scan_ids:
            if scan_id in seen:
                raise DatasetError(f"scan {scan_id} is in both the {seen[scan_id]} and {name} splits")
            seen[scan_id] = name


def save_splits(path: str | os.PathLike, splits: dict[str, list[str]], val_fraction: float, seed: int) -> None:
    write_json_atomic(path, {"val_fraction": val_fraction, "seed": seed, **splits})


def load_splits(path: str | os.PathLike) -> dict[str, list[str]]:
    data = json.loads(Path(path).read_text())
    splits = {name: list(data[name]) for name in ("train", "val", "test")}
    check_disjoint(splits)
    return splits


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


def decode_images(
    records: list[ImageRecord], image_size: int, cache_dir: str | os.PathLike | None = None
) -> DecodedImages:
    """Decode and transform `records` (threads: PIL decodes without the GIL); reuse a disk cache.

    The cache file is named by a hash of the paths, sizes, mtimes and transform, so any change to
    the dataset or `image_size` makes a new one instead of serving stale pixels.
    """
    cache_file = Path(cache_dir) / f"images_{_cache_key(records, image_size)}.npz" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as cached:
            return DecodedImages(cached["pixels"], cached["readable"], list(cached["unreadable"]))

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
        with atomic_path(cache_file) as temp_path:
            with open(temp_path, "wb") as handle:
                np.savez(handle, pixels=pixels, readable=readable, unreadable=np.array(unreadable, dtype=str))
    return DecodedImages(pixels, readable, unreadable)


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
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
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
