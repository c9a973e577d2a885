"""dataset.py: indexing, naming, scan-aware splits, transform, cache, loaders, read-only dataset."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
from config import DataConfig
from conftest import SLICES_PER_SCAN, make_tiny_dataset, tree_fingerprint, write_slice
from dataset import (
    DatasetError,
    UnreadableImageError,
    decode_images,
    index_dataset,
    load_split_datasets,
    make_loader,
    make_splits,
    parse_image_name,
    prepare_image,
    read_image,
    set_loader_epoch,
)
from utils import UsageError


@pytest.fixture()
def tiny_root(tmp_path: Path) -> Path:
    return make_tiny_dataset(tmp_path / "AD_NC", {"train/AD": 10, "train/NC": 10, "test/AD": 3, "test/NC": 3})


def test_parse_image_name() -> None:
    assert parse_image_name("123456_78.jpeg") == ("123456", 78)
    assert parse_image_name("S_12_3_100.JPG") == ("S_12_3", 100)
    assert parse_image_name("9_1.png") == ("9", 1)
    for stray in (".DS_Store", "Thumbs.db", "notes.txt", "123456.jpeg", "_5.jpeg", "abc_x.jpeg", "1_2.gif"):
        assert parse_image_name(stray) is None


def test_index_counts_labels_and_skips(tiny_root: Path) -> None:
    (tiny_root / "train" / "AD" / ".DS_Store").write_bytes(b"\0")
    (tiny_root / "test" / "NC" / "notes.txt").write_text("hello")
    index = index_dataset(tiny_root)
    assert len(index.records) == 26 * SLICES_PER_SCAN
    assert sorted(p.name for p in index.skipped) == [".DS_Store", "notes.txt"]
    for record in index.records:
        assert record.label == dataset.CLASS_NAMES.index(record.path.parent.name)
        assert record.split == record.path.parent.parent.name
    assert all(len(records) == SLICES_PER_SCAN for records in index.scans().values())


def test_label_mapping_does_not_depend_on_listing_order(tiny_root: Path, monkeypatch) -> None:
    """AD=0 and NC=1 by name even if the file system lists NC first."""
    real_iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: reversed(list(real_iterdir(self))))
    index = index_dataset(tiny_root)
    assert {r.label for r in index.records if r.path.parent.name == "AD"} == {0}
    assert {r.label for r in index.records if r.path.parent.name == "NC"} == {1}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: None, None),
        (
            lambda root: [p.unlink() for p in (root / "test" / "NC").iterdir()] and (root / "test" / "NC").rmdir(),
            "test/NC is missing",
        ),
        (lambda root: [p.unlink() for p in root.rglob("*.jpeg")], "no images"),
    ],
)
def test_index_errors(tiny_root: Path, damage, message) -> None:
    damage(tiny_root)
    if message is None:
        index_dataset(tiny_root)
        return
    with pytest.raises(DatasetError, match=message):
        index_dataset(tiny_root)


def test_missing_root_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="project_setup.py --demo"):
        index_dataset(tmp_path / "nowhere")


def test_splits_are_disjoint_stratified_deterministic(tiny_root: Path) -> None:
    index = index_dataset(tiny_root)
    splits = make_splits(index, val_fraction=0.2, seed=3)
    assert splits == make_splits(index, val_fraction=0.2, seed=3)
    assert splits != make_splits(index, val_fraction=0.2, seed=4)
    sets = {name: set(ids) for name, ids in splits.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["test"] == set(index.scans("test"))
    assert sets["train"] | sets["val"] == set(index.scans("train"))
    label_of = {r.scan_id: r.label for r in index.records}
    assert sorted(label_of[s] for s in splits["val"]) == [0, 0, 1, 1]  # 20% of 10 per class


def test_tiny_val_fraction_still_gives_both_classes(tiny_root: Path) -> None:
    splits = make_splits(index_dataset(tiny_root), val_fraction=0.01, seed=0)
    label_of = {r.scan_id: r.label for r in index_dataset(tiny_root).records}
    assert sorted(label_of[s] for s in splits["val"]) == [0, 1]


def test_scan_in_train_and_test_is_an_error(tiny_root: Path) -> None:
    index = index_dataset(tiny_root)
    leaked = index.records[0]
    write_slice(tiny_root / "test" / "AD" / leaked.path.name, 120)
    with pytest.raises(DatasetError, match="both train and test"):
        make_splits(index_dataset(tiny_root))


def test_scan_in_both_classes_is_an_error(tiny_root: Path) -> None:
    first = index_dataset(tiny_root).records[0]
    write_slice(tiny_root / "train" / "NC" / f"{first.scan_id}_99.jpeg", 120)
    with pytest.raises(DatasetError, match="both AD and NC"):
        make_splits(index_dataset(tiny_root))


def test_prepare_image_fits_without_cutting(tiny_root: Path) -> None:
    pixels = np.full((240, 256), 200, dtype=np.uint8)
    out = prepare_image(pixels, 192)
    assert out.shape == (192, 192) and out.dtype == np.uint8
    # 256x240 → 192x180: the whole input is kept, padded by 6 black rows top and bottom
    assert (out[:6] == 0).all() and (out[-6:] == 0).all()
    assert (out[6:-6] == 200).all()
    assert prepare_image(pixels, 64).shape == (64, 64)
    # A tall slice is centred left-right: 256x128 → 32x16 with 8 black columns each side.
    tall = prepare_image(np.full((256, 128), 200, dtype=np.uint8), 32)
    assert (tall[:, :8] == 0).all() and (tall[:, -8:] == 0).all() and (tall[:, 8:24] == 200).all()
    # A line one pixel thin stays one pixel thin (at least 1, never 0), in either direction.
    assert (prepare_image(np.full((1, 256), 200, dtype=np.uint8), 32) > 0).sum(0).tolist() == [1] * 32
    assert (prepare_image(np.full((256, 1), 200, dtype=np.uint8), 32) > 0).sum(1).tolist() == [1] * 32


def test_read_image_rejects_truncated(tiny_root: Path) -> None:
    path = next(tiny_root.rglob("*.jpeg"))
    good = read_image(path)
    assert good.dtype == np.uint8 and good.shape == (240, 256)
    broken = path.parent / "999999_1.jpeg"
    broken.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UnreadableImageError):
        read_image(broken)


def test_decode_skips_unreadable_and_caches(tiny_root: Path, tmp_path: Path) -> None:
    path = next(tiny_root.rglob("*.jpeg"))
    path.write_bytes(path.read_bytes()[:300])
    records = index_dataset(tiny_root).records
    cache = tmp_path / "cache"
    first = decode_images(records, 32, cache)
    assert first.readable.sum() == len(records) - 1
    assert len(first.unreadable) == 1 and str(path) in first.unreadable[0]
    assert len(list(cache.glob("*.npz"))) == 1
    second = decode_images(records, 32, cache)
    np.testing.assert_array_equal(first.pixels, second.pixels)
    assert second.unreadable == first.unreadable
    decode_images(records, 64, cache)  # another transform gets its own cache file
    assert len(list(cache.glob("*.npz"))) == 2


def test_loading_leaves_dataset_untouched(tiny_root: Path, tmp_path: Path) -> None:
    before = tree_fingerprint(tiny_root)
    config = DataConfig(data_dir=str(tiny_root), image_size=32, cache_dir=str(tmp_path / "cache"))
    datasets, _ = load_split_datasets(config, verbose=False)
    assert sum(len(labels) for _, labels in make_loader(datasets["train"], 8, shuffle=True)) == len(datasets["train"])
    assert tree_fingerprint(tiny_root) == before


def test_datasets_and_loader(tiny_root: Path) -> None:
    config = DataConfig(data_dir=str(tiny_root), image_size=32, val_fraction=0.2, cache_dir=None)
    datasets, _ = load_split_datasets(config, return_slice=True, verbose=False)
    assert {name: len(d) for name, d in datasets.items()} == {
        "train": 16 * SLICES_PER_SCAN,
        "val": 4 * SLICES_PER_SCAN,
        "test": 6 * SLICES_PER_SCAN,
    }
    images, labels, slices = next(iter(make_loader(datasets["train"], 8, shuffle=True, drop_last=True)))
    assert images.shape == (8, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.max() > 0
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1}
    assert ((slices >= 70) & (slices < 70 + SLICES_PER_SCAN)).all()


def test_loader_order_depends_only_on_seed_and_epoch(tiny_root: Path) -> None:
    config = DataConfig(data_dir=str(tiny_root), image_size=16, cache_dir=None)
    train = load_split_datasets(config, verbose=False)[0]["train"]

    def epoch_labels(epoch: int) -> list[float]:
        loader = make_loader(train, 4, shuffle=True, seed=1)
        set_loader_epoch(loader, epoch)
        return [float(images.sum()) for images, _ in loader]

    assert epoch_labels(2) == epoch_labels(2)
    assert epoch_labels(2) != epoch_labels(3)


def test_ranks_get_disjoint_shards(tiny_root: Path) -> None:
    config = DataConfig(data_dir=str(tiny_root), image_size=16, cache_dir=None)
    train = load_split_datasets(config, verbose=False)[0]["train"]
    shards = [set(make_loader(train, 4, shuffle=True, rank=rank, world_size=2).sampler.sampler) for rank in range(2)]
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(len(train)))


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "import dataset, os; print(sorted(os.listdir('.')))"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(dataset.__file__).parent)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the decode cache


@pytest.fixture()
def decoded_paths(monkeypatch) -> list[Path]:
    """Every file decode_images actually decodes (dataset.read_image calls), in call order."""
    calls: list[Path] = []
    real_read_image = dataset.read_image

    def counting_read_image(path):
        calls.append(Path(path))
        return real_read_image(path)

    monkeypatch.setattr(dataset, "read_image", counting_read_image)
    return calls


def test_cache_is_reused_without_decoding_again(tiny_root: Path, tmp_path: Path, decoded_paths: list[Path]) -> None:
    records = index_dataset(tiny_root).records
    cache = tmp_path / "cache"
    first = decode_images(records, 32, cache)
    assert sorted(decoded_paths) == sorted(r.path for r in records)  # each file decoded once
    (cache_file,) = cache.iterdir()
    assert cache_file.name == f"images_{dataset._cache_key(records, 32)}.npz"
    written = cache_file.stat().st_mtime_ns

    decoded_paths.clear()
    second = decode_images(records, 32, cache)
    assert decoded_paths == []  # served from the cache
    np.testing.assert_array_equal(second.pixels, first.pixels)
    np.testing.assert_array_equal(second.readable, first.readable)
    assert list(cache.iterdir()) == [cache_file] and cache_file.stat().st_mtime_ns == written  # not rewritten

    # Through load_split_datasets as training does: the second load decodes nothing either.
    config = DataConfig(data_dir=str(tiny_root), image_size=32, cache_dir=str(cache))
    decoded_paths.clear()
    datasets, _ = load_split_datasets(config, verbose=False)
    assert decoded_paths == [] and list(cache.iterdir()) == [cache_file]
    assert sum(len(d) for d in datasets.values()) == len(records)


def change_one_file(root: Path, change: str) -> None:
    path = min((root / "train" / "AD").iterdir())
    if change == "file added":
        write_slice(root / "train" / "NC" / "999999_70.jpeg", 150)
    elif change == "file removed":
        path.unlink()
    elif change == "file modified":
        # Another image of exactly the same byte count (a smaller JPEG padded after its end marker, which
        # decoders ignore), so only the mtime tells the change: an edit moves it on; set it explicitly so a
        # coarse file-system clock cannot hide it.
        before, size = path.stat().st_mtime_ns, path.stat().st_size
        write_slice(path, 250, radius=0.2)
        smaller = path.read_bytes()
        assert len(smaller) < size
        path.write_bytes(smaller + bytes(size - len(smaller)))
        assert path.stat().st_size == size
        os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


@pytest.mark.parametrize("change", ["file added", "file removed", "file modified", "image_size"])
def test_cache_is_rebuilt_when_the_dataset_or_size_changes(
    tiny_root: Path, tmp_path: Path, decoded_paths: list[Path], change: str
) -> None:
    cache = tmp_path / "cache"
    old = decode_images(index_dataset(tiny_root).records, 32, cache)
    size = 48 if change == "image_size" else 32
    change_one_file(tiny_root, change)
    records = index_dataset(tiny_root).records
    decoded_paths.clear()
    new = decode_images(records, size, cache)
    assert sorted(decoded_paths) == sorted(r.path for r in records)  # decoded afresh, every file
    assert len(list(cache.glob("images_*.npz"))) == 2  # a new cache file beside the old one
    fresh = decode_images(records, size, None)  # no cache at all: what the files hold now
    np.testing.assert_array_equal(new.pixels, fresh.pixels)
    if change == "file modified":
        assert not np.array_equal(new.pixels, old.pixels)  # the edited image is not served stale
    # And the rebuilt cache is what the next load reuses.
    decoded_paths.clear()
    np.testing.assert_array_equal(decode_images(records, size, cache).pixels, fresh.pixels)
    assert decoded_paths == []


def test_default_cache_is_written_outside_the_dataset_folder(tiny_root: Path, tmp_path: Path, monkeypatch) -> None:
    """The default cache_dir (data/cache) is relative to the working directory, never the dataset folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree_fingerprint(tiny_root)
    config = DataConfig(data_dir=str(tiny_root), image_size=32)
    assert config.cache_dir == "data/cache"
    load_split_datasets(config, verbose=False)
    load_split_datasets(config, verbose=False)
    assert [p.name for p in (work / "data" / "cache").iterdir()] == [
        f"images_{dataset._cache_key(index_dataset(tiny_root).records, 32)}.npz"
    ]
    assert tree_fingerprint(tiny_root) == before
    assert not list(tiny_root.rglob("*.npz"))


def test_splits_file_holds_the_settings_and_the_scan_lists(tmp_path: Path) -> None:
    splits = {"train": ["1", "2"], "val": ["3"], "test": ["4"]}
    dataset.save_splits(tmp_path / "splits.json", splits, 0.2, 7)
    assert json.loads((tmp_path / "splits.json").read_text()) == {"val_fraction": 0.2, "seed": 7, **splits}
    assert dataset.load_splits(tmp_path / "splits.json") == splits
    (tmp_path / "splits.json").write_text("[]")
    with pytest.raises(DatasetError) as error:
        dataset.load_splits(tmp_path / "splits.json")
    assert str(error.value).endswith(
        "splits.json is damaged (a JSON list, not an object): this run's train/val/test split is lost; "
        "start a new run (train.py with another --run folder)"
    )


def test_cache_files_are_named_by_a_20_digit_key(tiny_root: Path, tmp_path: Path) -> None:
    decode_images(index_dataset(tiny_root).records, 32, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").iterdir()
    assert re.fullmatch(r"images_[0-9a-f]{20}\.npz", cache_file.name), cache_file.name


def write_cache(path: Path, pixels: np.ndarray, readable: np.ndarray, unreadable: list[str] | np.ndarray) -> None:
    """A decode cache as decode_images writes one; `unreadable` as given when an array (any dtype)."""
    reasons = unreadable if isinstance(unreadable, np.ndarray) else np.array(unreadable, dtype=str)
    with open(path, "wb") as handle:
        np.savez(handle, pixels=pixels, readable=readable, unreadable=reasons)


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("pixels dtype", "pixels are int16 (N, 32, 32), expected uint8 (N, 32, 32)"),
        ("pixels shape", "pixels are uint8 (N, 32, 31), expected uint8 (N, 32, 32)"),
        ("readable dtype", "readable flags are int64 (N,), expected bool (N,)"),
        ("readable shape", "readable flags are bool (N1,), expected bool (N,)"),
        ("reasons shape", "0 unreadable reasons for 0 unreadable images"),
        ("reasons dtype", "1 unreadable reasons for 1 unreadable images"),
        ("reasons count", "1 unreadable reasons for 0 unreadable images"),
        ("not an npz", "not an .npz archive"),
    ],
)
def test_a_cache_that_is_not_what_decode_images_wrote_is_rebuilt(
    tiny_root: Path, tmp_path: Path, capsys, damage: str, reason: str
) -> None:
    """Each check of _read_cache on its own: one field wrong, everything else as written."""
    records = index_dataset(tiny_root).records
    count = len(records)
    fresh = decode_images(records, 32, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").iterdir()
    pixels, readable, unreadable = fresh.pixels, fresh.readable, []
    if damage == "pixels dtype":
        pixels = pixels.astype(np.int16)
    elif damage == "pixels shape":
        pixels = pixels[:, :, :31]
    elif damage == "readable dtype":
        readable = readable.astype(np.int64)
    elif damage == "readable shape":
        readable = np.append(readable, True)
    elif damage == "reasons shape":
        unreadable = np.zeros((0, 0), dtype=str)
    elif damage == "reasons dtype":
        readable = readable.copy()
        readable[0] = False
        unreadable = np.array([1])
    elif damage == "reasons count":
        unreadable = ["a.jpeg: truncated"]
    if damage == "not an npz":
        np.save(cache_file.with_suffix(".npy"), pixels)
        cache_file.with_suffix(".npy").rename(cache_file)
    else:
        write_cache(cache_file, pixels, readable, unreadable)
    rebuilt = decode_images(records, 32, tmp_path / "cache")
    expected = reason.replace("(N1,)", f"({count + 1},)").replace("N", str(count))
    assert f"is damaged ({expected}): rebuilding it" in capsys.readouterr().out
    np.testing.assert_array_equal(rebuilt.pixels, fresh.pixels)
    np.testing.assert_array_equal(rebuilt.readable, fresh.readable)


# ----------------------------------------------------------------------------- edges the library mutation run found


def test_pixels_map_onto_minus_one_to_one_exactly() -> None:
    assert dataset.to_model_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def test_slice_datasets_hold_long_labels_and_give_slices_only_when_asked() -> None:
    pixels = np.zeros((2, 4, 4), np.uint8)
    plain = dataset.SliceDataset(pixels, np.array([0, 1], np.int32), np.array([70, 71], np.int32))
    assert plain.labels.dtype == plain.slice_indices.dtype == torch.long
    assert len(plain[[0, 1]]) == 2 and len(dataset.SliceDataset(pixels, [0, 1], [70, 71], return_slice=True)[[0]]) == 3


def scan_index(root: Path, scans: dict[str, int]) -> dataset.DatasetIndex:
    return index_dataset(make_tiny_dataset(root, scans))


@pytest.mark.parametrize(
    "scans_per_class, val_fraction, val_per_class",
    [(2, 0.1, 1), (2, 0.9, 1), (3, 0.9, 2), (5, 0.0, 0), (5, 0.5, 2)],  # at least 1, at most all but 1 (0 → none)
)
def test_val_takes_a_rounded_share_of_each_class_but_never_all(
    tmp_path: Path, scans_per_class: int, val_fraction: float, val_per_class: int
) -> None:
    index = scan_index(tmp_path / "AD_NC", {"train/AD": scans_per_class, "train/NC": scans_per_class, "test/AD": 1, "test/NC": 1})
    splits = make_splits(index, val_fraction=val_fraction)
    label_of = {r.scan_id: r.label for r in index.records}
    assert sorted(label_of[s] for s in splits["val"]) == [0] * val_per_class + [1] * val_per_class
    assert splits == make_splits(index, val_fraction=val_fraction, seed=0), "the default seed is 0"


@pytest.mark.parametrize("val_fraction", [1.0, 2.0, -0.1])
def test_a_val_fraction_outside_zero_to_one_is_refused(tiny_root: Path, val_fraction: float) -> None:
    with pytest.raises(UsageError) as error:
        make_splits(index_dataset(tiny_root), val_fraction=val_fraction)
    assert str(error.value) == f"val_fraction must be in [0, 1), got {val_fraction}"


def test_leaked_and_mixed_scans_are_counted_and_the_first_three_named(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "AD_NC", {"train/AD": 4, "train/NC": 4, "test/AD": 1, "test/NC": 1})
    index = index_dataset(root)
    train_ad = sorted({r.scan_id for r in index.records if r.split == "train" and r.label == 0})
    for scan_id in train_ad:  # all four AD training scans also in the test folder
        write_slice(root / "test" / "AD" / f"{scan_id}_70.jpeg", 120)
    with pytest.raises(DatasetError) as error:
        make_splits(index_dataset(root))
    assert str(error.value) == (
        f"4 scan IDs are in both train and test (e.g. {', '.join(train_ad[:3])}): each scan must be in one split only; "
        "run `python project_setup.py` for the full list"
    )
    for scan_id in train_ad:
        (root / "test" / "AD" / f"{scan_id}_70.jpeg").unlink()
        write_slice(root / "train" / "NC" / f"{scan_id}_99.jpeg", 120)
    with pytest.raises(DatasetError) as error:
        make_splits(index_dataset(root))
    assert str(error.value) == (
        f"4 scan IDs are filed under both AD and NC (e.g. {', '.join(train_ad[:3])}): a scan has one diagnosis; "
        "move its slices into one class folder"
    )


def test_loading_uses_the_split_seed_and_refuses_scans_outside_the_runs_splits(tiny_root: Path) -> None:
    config = DataConfig(data_dir=str(tiny_root), image_size=32, val_fraction=0.2, split_seed=5, cache_dir=None)
    _, splits = load_split_datasets(config, verbose=False)
    assert splits == make_splits(index_dataset(tiny_root), 0.2, 5)
    missing = sorted(splits["train"])[0]
    without = {name: [s for s in scan_ids if s != missing] for name, scan_ids in splits.items()}
    with pytest.raises(DatasetError) as error:
        load_split_datasets(config, without, verbose=False)
    assert str(error.value) == (
        f"1 scans in {tiny_root} are not in this run's splits.json (e.g. {missing}): the dataset changed since the run "
        "started; start a new run"
    )


def test_loading_refuses_a_cache_inside_the_dataset(tiny_root: Path) -> None:
    config = DataConfig(data_dir=str(tiny_root), image_size=32, cache_dir=str(tiny_root / "cache"))
    with pytest.raises(UsageError) as error:
        load_split_datasets(config, verbose=False)
    assert str(error.value).startswith(f"--data.cache_dir {tiny_root / 'cache'} lies inside the dataset folder {tiny_root}")
    assert not (tiny_root / "cache").exists()


def test_unreadable_images_are_listed_up_to_ten_and_only_when_verbose(tiny_root: Path, capsys) -> None:
    broken = sorted((tiny_root / "train" / "NC").iterdir())[:11]
    for path in broken:
        path.write_bytes(path.read_bytes()[:100])  # truncated JPEGs
    config = DataConfig(data_dir=str(tiny_root), image_size=32, cache_dir=None)
    load_split_datasets(config, verbose=False)
    assert capsys.readouterr().out == ""
    load_split_datasets(config, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "skipped 11 unreadable images:" and len(lines) == 11
    assert all(line.startswith("  ") and ".jpeg" in line for line in lines[1:])
    quiet = DataConfig(data_dir=str(tiny_root), image_size=32, cache_dir=None)
    for path in tiny_root.rglob("*.jpeg"):
        if path.parts[-3] == "train":
            path.write_bytes(b"")
    with pytest.raises(DatasetError) as error:
        load_split_datasets(quiet, verbose=False)
    assert str(error.value) == f"no readable training images in {tiny_root}"


def test_decoding_asks_for_the_memory_of_the_decoded_images(tiny_root: Path, monkeypatch) -> None:
    asked = []
    monkeypatch.setattr(dataset, "check_memory", lambda needed, what: asked.append((needed, what)))
    records = index_dataset(tiny_root).records
    decode_images(records, 24, None)
    assert asked == [(len(records) * 24 * 24, f"the {len(records)} decoded images at 24 px")]


def test_a_cache_that_cannot_be_written_is_skipped_with_the_reason(tiny_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(dataset, "atomic_path", full_disk)
    decoded = decode_images(index_dataset(tiny_root).records, 32, tmp_path / "cache")
    assert decoded.readable.all()
    out = capsys.readouterr().out
    assert "(No space left on device): continuing without it" in out, out
