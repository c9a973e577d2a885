"""volumes.py and `project_setup.py --from-nifti`: NIfTI volumes and a diagnosis table → the slice layout.

Volumes are made from the MNI152 template that nilearn ships (written by nibabel in several
orientations and voxel sizes); the real scan is nibabel's own test file `anatomical.nii`.
"""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, ornt_transform
from PIL import Image
from scipy import ndimage

import volumes
from conftest import run_train, tree_fingerprint
from dataset import parse_image_name
from utils import UsageError
from volumes import Plan, Volume, convert_volumes, slice_volume

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


@pytest.fixture(scope="module")
def template() -> tuple[np.ndarray, np.ndarray]:
    """nilearn's MNI152 T1 at 1 mm (197 x 233 x 189, skull-stripped), scaled to 0-100, and its RAS affine."""
    from nilearn import datasets

    image = datasets.load_mni152_template(resolution=1)
    return image.get_fdata(dtype=np.float32) * 100, image.affine


@pytest.fixture(scope="module")
def template_2mm(template) -> tuple[np.ndarray, np.ndarray]:
    """The same head on a 2 mm grid (every other voxel), a quarter of the work in each test, under a bias
    field: the template is symmetric, and a left-right flip must show."""
    data, affine = template
    coarse = affine.copy()
    coarse[:3, :3] *= 2
    data = data[::2, ::2, ::2]
    x, y, z = np.indices(data.shape) / np.array(data.shape)[:, None, None, None]
    return np.ascontiguousarray(data * (1 + 0.3 * x + 0.1 * y - 0.1 * z)).astype(np.float32), coarse


def save_volume(path: Path, data: np.ndarray, affine: np.ndarray, axcodes: str = "RAS") -> Path:
    """Write an RAS volume as NIfTI stored in `axcodes` (the same head: nibabel moves data and affine together)."""
    image = nib.Nifti1Image(data.astype(np.float32), affine)
    if axcodes != "RAS":
        image = image.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes)))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def slices_of(path: Path, count: int = 20) -> np.ndarray:
    return slice_volume(Volume(path, path.name, "scan"), count)[0]


def write_table(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...] = ("file", "subject", "diagnosis")) -> Path:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


# ----------------------------------------------------------------------------- orientation and voxel size


def test_las_lps_and_sagittal_copies_give_identical_slices(template_2mm, tmp_path: Path) -> None:
    data, affine = template_2mm
    stored = {codes: save_volume(tmp_path / f"{codes}.nii.gz", data, affine, codes) for codes in ("RAS", "LAS", "LPS", "ASR")}
    assert [nib.aff2axcodes(nib.load(path).affine) for path in stored.values()] == [tuple(c) for c in stored]
    assert not np.array_equal(np.asarray(nib.load(stored["LAS"]).dataobj), np.asarray(nib.load(stored["RAS"]).dataobj))
    reference = slices_of(stored["RAS"])
    assert reference.shape == (20, 240, 256) and reference.dtype == np.uint8 and reference.max() == 255
    for codes in ("LAS", "LPS", "ASR"):
        assert np.array_equal(slices_of(stored[codes]), reference), codes


def test_slices_show_anterior_up_and_the_subjects_right_on_the_right(template_2mm, tmp_path: Path) -> None:
    """A bright marker in the right anterior brain lands in the image's upper right, whatever the storage."""
    data, affine = template_2mm
    plain = slices_of(save_volume(tmp_path / "plain.nii", data, affine)).astype(int)
    marked = data.copy()
    x, y, z = 70, 85, 45  # 2 mm voxels: MNI (+42, +36, +18) mm, right and anterior, at the window's height
    marked[x - 1 : x + 2, y - 1 : y + 2, z - 2 : z + 3] = 1000
    for codes in ("RAS", "LPS"):
        pixels = slices_of(save_volume(tmp_path / f"{codes}.nii", marked, affine, codes))
        rows, cols = np.nonzero((pixels - plain > 50).any(axis=0))
        assert rows.size and rows.mean() < 90 and cols.mean() > 150, codes  # the brain's centre is near (120, 128)


def test_resampling_reproduces_a_linear_function_exactly_on_anisotropic_and_tilted_grids(tmp_path: Path) -> None:
    """Trilinear interpolation is exact for a linear function, so the 1 mm output must hold f(world) to float precision."""
    coefficients = np.array([2.0, -3.0, 0.5])
    tilt = np.radians(10)
    rotation = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    for name, matrix in (("anisotropic LAS", np.diag([-1.2, 0.8, 3.0])), ("tilted", rotation @ np.diag([1.5, 1.0, 2.5]))):
        affine = np.eye(4)
        affine[:3, :3], affine[:3, 3] = matrix, [10.0, -5.0, 2.0]
        shape = (20, 30, 12)
        world = np.tensordot(matrix, np.indices(shape, dtype=np.float64), axes=1) + affine[:3, 3, None, None, None]
        path = tmp_path / f"{name.split()[0]}.nii"
        nib.save(nib.Nifti1Image(np.tensordot(coefficients, world, axes=1).astype(np.float32), affine), path)
        data, canonical, _ = volumes.canonical_data(Volume(path, path.name, "linear"))
        out = volumes.resample_to_1mm(data, canonical)
        corners = np.array([matrix @ (np.array(c) * (np.array(shape) - 1)) for c in np.ndindex(2, 2, 2)])
        low = corners.min(axis=0) + affine[:3, 3]
        if name == "anisotropic LAS":  # 19 x 1.2, 29 x 0.8 and 11 x 3 mm: 23, 24 and 34 planes 1 mm apart
            assert out.shape == (23, 24, 34)
        expected = np.tensordot(coefficients, np.indices(out.shape) + low[:, None, None, None], axes=1)
        if name == "tilted":  # only the points inside the tilted volume are interpolated; the corners are background
            inside = ndimage.binary_erosion(out > out.min(), iterations=3)
            assert inside.mean() > 0.3
            assert np.abs(out - expected)[inside].max() < 1e-3, name
        else:
            assert np.abs(out - expected).max() < 1e-3, name


def test_separable_and_general_resampling_agree(template_2mm) -> None:
    """Axis-aligned volumes take the separable path; scipy's affine_transform must give the same values."""
    data, _ = template_2mm
    matrix = np.diag([1.2, 1.0, 3.0])
    part = data[20:60, 30:70, 20:50]
    separable = volumes.resample_to_1mm(part, matrix)
    inverse = np.linalg.inv(matrix)
    general = ndimage.affine_transform(part, inverse, output_shape=separable.shape, order=1)
    assert np.abs(separable - general).max() < 1e-3


def test_voxels_under_1mm_are_smoothed_before_they_are_resampled() -> None:
    """Stripes at 0.5 mm voxels' Nyquist frequency (period 1 mm) would alias to a full-strength offset on the
    1 mm grid; blurred first (sigma 0.5 voxels, scipy's kernel of radius 2) only its alternating sum survives."""
    stripes = 100.0 + 50.0 * (-1.0) ** np.arange(40)[:, None, None] * np.ones((40, 6, 6))
    out = volumes.resample_to_1mm(stripes.astype(np.float32), np.diag([0.5, 1.0, 1.0]))
    assert out.shape == (20, 6, 6)
    weights = np.exp(-(np.arange(-2, 3) ** 2) / (2 * 0.5**2))
    gain = (weights * (-1.0) ** np.arange(-2, 3)).sum() / weights.sum()  # 0.57, against 1 unfiltered
    assert np.allclose(out[3:-3], 100.0 + 50.0 * gain, atol=1e-3)


def test_anisotropic_voxels_are_resampled_to_the_slices_of_the_1mm_volume(template, tmp_path: Path) -> None:
    """Every third plane of the 1 mm template, stored as 1 x 1 x 3 mm, gives (nearly) the 1 mm slices:
    its window is within a plane of the 1 mm window (the top of the head is known to 3 mm)."""
    data, affine = template
    thick = affine.copy()
    thick[2, 2] = 3.0
    reference = slices_of(save_volume(tmp_path / "iso.nii", data, affine), 22).astype(float)  # numbers 80-101
    resampled = slices_of(save_volume(tmp_path / "thick.nii", data[:, :, ::3], thick)).astype(float)  # 81-100
    differences = {offset: np.abs(resampled - reference[1 + offset : 21 + offset]).mean() for offset in (-1, 0, 1)}
    assert min(differences, key=differences.get) in (0, 1)
    assert min(differences.values()) < 6  # a window 3 mm off differs by ~9 grey levels per pixel on average


def test_oblique_volume_gives_axial_slices_on_the_world_axes(template, tmp_path: Path) -> None:
    """The template sampled on a grid tilted 12 degrees: resampled on the world's axes it matches the
    straight slices, far better than the same voxels with the tilt ignored."""
    data, affine = template
    tilt = np.radians(12)
    matrix = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]]) * 2.0
    shape = np.array([88, 106, 96])
    centre = affine[:3, :3] @ (np.array(data.shape) / 2) + affine[:3, 3]
    oblique = np.eye(4)
    oblique[:3, :3], oblique[:3, 3] = matrix, centre - matrix @ (shape / 2)
    world = matrix @ np.indices(shape).reshape(3, -1) + oblique[:3, 3, None]
    sampled = ndimage.map_coordinates(data, world - affine[:3, 3, None], order=1).reshape(shape)
    straight = slices_of(save_volume(tmp_path / "straight.nii", data, affine), 22).astype(float)
    tilted = slices_of(save_volume(tmp_path / "oblique.nii", sampled, oblique)).astype(float)
    ignored_affine = oblique.copy()
    ignored_affine[:3, :3] = np.diag([2.0, 2.0, 2.0])
    ignored = slices_of(save_volume(tmp_path / "ignored.nii", sampled, ignored_affine)).astype(float)
    best = min(np.abs(tilted - straight[1 + offset : 21 + offset]).mean() for offset in (-1, 0, 1))
    ignoring = min(np.abs(ignored - straight[1 + offset : 21 + offset]).mean() for offset in (-1, 0, 1))
    assert best < 8 and best < ignoring / 2


# ----------------------------------------------------------------------------- the window and the intensities


def test_template_window_is_planes_81_to_100(template) -> None:
    """The rule's constants come from this template: its head mask tops out at REFERENCE_TOP, so a
    20-slice window is template planes 81-100 (MNI z +9 to +28 mm), each written whole."""
    data, _ = template
    mask = volumes.head_mask(data)
    assert np.flatnonzero(mask.any(axis=(0, 1)))[-1] == volumes.REFERENCE_TOP
    assert list(volumes.window_numbers(20)) == list(range(81, 101))
    volume = Volume(Path("template.nii"), "template.nii", "template")
    assert volumes._window_planes(volume, mask, volumes.window_numbers(20)) == list(range(81, 101))
    pixels = volumes._frame(
        volume, volumes.to_uint8(data, *volumes.intensity_range(data, mask))[:, :, 81:101], mask[:, :, 81:101]
    )
    expected = volumes.to_uint8(data[:, :, 81:101], *volumes.intensity_range(data, mask))
    assert [int(s.sum()) for s in pixels] == [int(expected[:, :, k].sum()) for k in range(20)]  # nothing cut off


def test_specks_apart_from_the_head_are_not_the_head(template_2mm) -> None:
    """Bright noise or a marker capsule above the head, not touching it, does not move the top of the mask."""
    data, _ = template_2mm
    specked = data.copy()
    specked[41:44, 51:54, 85:88] = 100.0  # 2 mm voxels: 16 mm above the top of the head
    specked[5, 7, 91] = 100.0
    assert np.array_equal(volumes.head_mask(specked), volumes.head_mask(data))


def test_background_noise_does_not_join_the_head(template) -> None:
    """A magnitude image's Rician background noise, sigma 8 against white matter's ~90, moves the top of the
    mask by at most a plane (without the smoothing, the noise joined the head up to the field of view's top)."""
    data, _ = template
    rng = np.random.default_rng(0)
    noisy = np.hypot(data + rng.normal(0, 8, data.shape), rng.normal(0, 8, data.shape)).astype(np.float32)
    top = np.flatnonzero(volumes.head_mask(noisy).any(axis=(0, 1)))[-1]
    assert volumes.REFERENCE_TOP <= top <= volumes.REFERENCE_TOP + 1


def test_window_follows_the_head_not_the_index(template_2mm, tmp_path: Path) -> None:
    """The same head moved 10 mm up and 6 mm sideways in its field of view gives the same slices."""
    data, affine = template_2mm
    data = np.pad(data, ((0, 0), (0, 0), (6, 0)))  # background below the brainstem too
    moved = np.roll(data, (3, -2, 5), axis=(0, 1, 2))  # the rolled-off voxels are all background
    assert np.array_equal(np.sort(moved, axis=None), np.sort(data, axis=None))
    assert not np.array_equal(moved, data)
    original = slices_of(save_volume(tmp_path / "a.nii", data, affine))
    assert np.array_equal(slices_of(save_volume(tmp_path / "moved.nii", moved, affine)), original)


def test_intensities_are_scaled_per_scan_robustly(template_2mm, tmp_path: Path) -> None:
    data, affine = template_2mm
    reference = slices_of(save_volume(tmp_path / "a.nii", data, affine))
    # Another scanner's gain and offset: the same image.
    rescaled = slices_of(save_volume(tmp_path / "b.nii", data * 7.0 + 300.0, affine))
    assert np.abs(rescaled.astype(int) - reference).max() <= 1
    # A handful of extreme voxels (0.02% of the head) moves nothing else.
    spiked = data.copy()
    rng = np.random.default_rng(0)
    head = np.flatnonzero(data > 10)
    spiked.ravel()[rng.choice(head, size=len(head) // 5000, replace=False)] = 1e6
    with_spikes = slices_of(save_volume(tmp_path / "c.nii", spiked, affine)).astype(int)
    assert np.abs(with_spikes - reference)[with_spikes < 255].max() <= 1
    # Scaled by the whole head, so a shorter window gives the same pixels for the slices it shares.
    four = slices_of(tmp_path / "a.nii", 4)
    assert list(volumes.window_numbers(4)) == list(range(89, 93))
    assert np.array_equal(four, reference[89 - 81 : 93 - 81])


# ----------------------------------------------------------------------------- the real scan nibabel ships


def test_nibabels_anatomical_scan_is_read_reoriented_and_resampled(tmp_path: Path) -> None:
    """anatomical.nii: big-endian int16, 2 mm, stored LAS. Canonical = the stored voxels flipped left-right;
    its 1 mm resampling holds the stored voxels at even indices and their means in between."""
    source = NIBABEL_DATA / "anatomical.nii"
    stored = np.asarray(nib.load(source).dataobj).astype(np.float32)
    data, matrix, orientation = volumes.canonical_data(Volume(source, "anatomical.nii", "anatomical"))
    assert orientation == "LAS" and np.array_equal(matrix, np.diag([2.0, 2.0, 2.0]))
    assert np.array_equal(data, stored[::-1])
    resampled = volumes.resample_to_1mm(data, matrix)
    assert resampled.shape == tuple(2 * n - 1 for n in data.shape)
    assert np.array_equal(resampled[::2, ::2, ::2], data)
    assert np.allclose(resampled[1::2, ::2, ::2], (data[:-1] + data[1:]) / 2, atol=1e-3)
    # An RAS copy of the same scan reads the same.
    ras = tmp_path / "anatomical_ras.nii"
    nib.save(nib.as_closest_canonical(nib.load(source)), ras)
    assert nib.aff2axcodes(nib.load(ras).affine) == ("R", "A", "S")
    assert np.array_equal(volumes.canonical_data(Volume(ras, ras.name, "ras"))[0], data)


def test_a_scan_without_the_top_of_the_head_is_refused() -> None:
    """anatomical.nii is a 66 x 82 x 50 mm block from the middle of a brain: brain to every edge, so no
    brain-relative window exists in it."""
    with pytest.raises(UsageError, match="the head reaches the top of anatomical.nii's field of view"):
        slices_of(NIBABEL_DATA / "anatomical.nii")


# ----------------------------------------------------------------------------- the table and the split


def test_diagnosis_spellings() -> None:
    read = {text: volumes.diagnosis_class(text) for text in ("AD", " ad ", "Dementia", "Alzheimer's disease", "CN", "NC")}
    read |= {text: volumes.diagnosis_class(text) for text in ("control", "Healthy Control", "MCI", "EMCI", "1", "")}
    assert read == {
        "AD": "AD",
        " ad ": "AD",
        "Dementia": "AD",
        "Alzheimer's disease": "AD",
        "CN": "NC",
        "NC": "NC",
        "control": "NC",
        "Healthy Control": "NC",
        "MCI": None,
        "EMCI": None,
        "1": None,
        "": None,
    }


def test_table_columns_by_other_names_and_separators(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("\ufeffParticipant_ID;Session;DX;Path\nS1;bl;AD;a.nii\nS2;m12;CN;b.nii.gz\n")
    assert volumes.read_table(table) == [
        {"subject": "S1", "visit": "bl", "diagnosis": "AD", "file": "a.nii"},
        {"subject": "S2", "visit": "m12", "diagnosis": "CN", "file": "b.nii.gz"},
    ]


def test_split_is_by_subject_stratified_and_seeded() -> None:
    rng = np.random.default_rng(1)
    plan = Plan(
        [
            Volume(
                Path(f"s{subject}_{visit}.nii"),
                f"s{subject}_{visit}.nii",
                f"s{subject}_{visit}",
                f"S{subject}",
                str(visit),
                "",
                "AD" if subject % 3 == 0 else "NC",
            )
            for subject in range(60)
            for visit in range(int(rng.integers(1, 4)))
        ],
        Counter(),
    )
    split = volumes.split_by_subject(plan, 0.3, seed=0)
    of_subject: dict[str, set[str]] = {}
    for volume in split.volumes:
        of_subject.setdefault(volume.subject, set()).add(volume.split)
    assert all(len(splits) == 1 for splits in of_subject.values())  # repeat visits never straddle
    for name, subjects in (("AD", 20), ("NC", 40)):
        tested = {v.subject for v in split.volumes if v.class_name == name and v.split == "test"}
        assert len(tested) == round(0.3 * subjects)
    assert volumes.split_by_subject(plan, 0.3, seed=0) == split
    assert volumes.split_by_subject(plan, 0.3, seed=1) != split


# ----------------------------------------------------------------------------- the whole command


SUBJECTS = {  # subject → (diagnosis as the table writes it, visits)
    "A1": ("AD", 2),
    "A2": ("Dementia", 2),
    "A3": ("AD", 1),
    "N1": ("CN", 2),
    "N2": ("control", 1),
    "N3": ("NC", 1),
    "M1": ("MCI", 1),
}
CLASS_OF = {"A": "AD", "N": "NC"}


@pytest.fixture(scope="module")
def nifti_study(template_2mm, tmp_path_factory) -> tuple[Path, Path]:
    """A folder of volumes (orientations, gains and noise differ) and its table: AD 5 volumes of 3 subjects, NC 4 of 3, MCI 1."""
    data, affine = template_2mm
    root = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(0)
    rows = []
    for number, (subject, (diagnosis, visits)) in enumerate(SUBJECTS.items()):
        for visit in range(visits):
            codes = ("RAS", "LAS", "LPS", "ASR")[(number + visit) % 4]
            volume = data * rng.uniform(0.5, 3.0) + rng.normal(0.0, 0.5, data.shape)
            save_volume(root / "scans" / subject / f"{subject}_v{visit}.nii.gz", volume, affine, codes)
            rows.append((f"{subject}/{subject}_v{visit}.nii.gz", subject, f"v{visit}", diagnosis))
    return root / "scans", write_table(root / "labels.csv", rows, ("file", "subject", "visit", "diagnosis"))


@pytest.fixture(scope="module")
def converted(nifti_study, tmp_path_factory) -> tuple[Path, list[str]]:
    folder, table = nifti_study
    out = tmp_path_factory.mktemp("converted") / "mine" / "AD_NC"
    lines = convert_volumes(folder, table, out, slices=4, workers=2)
    return out, lines


def read_manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_conversion_writes_the_layout_and_the_manifest(converted, nifti_study) -> None:
    out, lines = converted
    folder, _ = nifti_study
    assert lines[0] == "skipped 1 volume by diagnosis: MCI 1"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files[0] == "manifest.csv" and len(files) == 1 + 9 * 4
    manifest = read_manifest(out)
    assert list(manifest[0]) == list(volumes.MANIFEST_COLUMNS) and len(manifest) == 9
    for row in manifest:
        subject = row["subject"]
        assert row["source"].startswith(f"{subject}/{subject}_v") and row["scan"] == row["source"].replace("/", "-")[:-7]
        assert row["diagnosis"] == SUBJECTS[subject][0] and row["class"] == CLASS_OF[subject[0]]
        assert row["slices"] == "89-92" and row["voxel_mm"] == "2x2x2"
        names = sorted(p.name for p in (out / row["split"] / row["class"]).glob(f"{row['scan']}_*.png"))
        assert [parse_image_name(name) for name in names] == [(row["scan"], n) for n in range(89, 93)]
        for name in names:
            with Image.open(out / row["split"] / row["class"] / name) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "L", (256, 240))
    # The slices are those of the volume read on its own (the workers and the PNG files change nothing).
    row = manifest[1]
    written = [np.asarray(Image.open(out / row["split"] / row["class"] / f"{row['scan']}_{n}.png")) for n in range(89, 93)]
    assert np.array_equal(np.stack(written), slices_of(folder / row["source"], 4))
    assert {row["orientation"] for row in manifest} == {"RAS", "LAS", "LPS", "ASR"}
    splits = {row["subject"]: row["split"] for row in manifest}
    assert all(row["split"] == splits[row["subject"]] for row in manifest)  # repeat visits together
    assert Counter((CLASS_OF[subject[0]], split) for subject, split in splits.items()) == {
        ("AD", "train"): 2,
        ("AD", "test"): 1,
        ("NC", "train"): 2,
        ("NC", "test"): 1,
    }


def test_converted_folder_passes_the_check_and_trains_the_tiny_preset(converted, run_setup, tmp_path: Path) -> None:
    out, _ = converted
    before = tree_fingerprint(out)
    code, report, _ = run_setup("--data-dir", out)
    assert code == 0 and "usable: 36 readable images in 9 scans" in report
    assert "89-92" in report and "other files skipped: none" in report
    run_train(out, tmp_path / "run", "--epochs", "1")
    assert (tmp_path / "run" / "unet.pt").is_file()
    assert tree_fingerprint(out) == before


def test_from_the_command_line_then_a_rerun_needs_overwrite(nifti_study, run_setup, tmp_path: Path) -> None:
    study, _ = nifti_study
    folder = tmp_path / "scans"
    rows = [
        ("A1_v1.nii.gz", "A1", "AD"),
        ("A2_v0.nii.gz", "A2", "Dementia"),
        ("N1_v0.nii.gz", "N1", "CN"),
        ("N2_v0.nii.gz", "N2", "CN"),
    ]
    for name, subject, _ in rows:
        (folder / name).parent.mkdir(exist_ok=True)
        shutil.copy(study / subject / name, folder / name)
    table = write_table(tmp_path / "labels.csv", rows)
    out = tmp_path / "data" / "mine" / "AD_NC"
    code, printed, err = run_setup("--from-nifti", folder, "--labels", table, "--out", out, "--slices", 1, "--seed", 3)
    assert code == 0, err
    assert "wrote 4 volumes x 1 slices (91-91, centred 64.5 mm below the top of each head)" in printed
    assert "usable: 4 readable images in 4 scans" in printed
    before = tree_fingerprint(out)
    code, _, err = run_setup("--from-nifti", folder, "--labels", table, "--out", out, "--slices", 2)
    assert code == 2 and "already exists: add --overwrite" in err and tree_fingerprint(out) == before
    code, _, err = run_setup("--from-nifti", folder, "--labels", table, "--out", out, "--slices", 2, "--overwrite")
    assert code == 0, err
    assert {row["slices"] for row in read_manifest(out)} == {"90-91"} and len(list(out.rglob("*.png"))) == 8
    assert sorted(p.name for p in out.parent.iterdir()) == ["AD_NC"]  # nothing left beside it


def test_overwrite_replaces_only_an_earlier_conversion(nifti_study, run_setup, tmp_path: Path) -> None:
    folder, table = nifti_study
    precious = tmp_path / "precious"
    (precious / "notes").mkdir(parents=True)
    (precious / "notes" / "thesis.txt").write_text("years of work")
    before = tree_fingerprint(precious)
    code, _, err = run_setup("--from-nifti", folder, "--labels", table, "--out", precious, "--overwrite")
    assert code == 2 and "is not a folder that --from-nifti wrote (no manifest.csv in it)" in err
    assert tree_fingerprint(precious) == before
    code, _, err = run_setup("--from-nifti", folder, "--labels", table, "--out", folder / "AD_NC")
    assert code == 2 and f"--out {folder / 'AD_NC'} lies inside the dataset folder {folder}" in err
    assert not (folder / "AD_NC").exists()


# ----------------------------------------------------------------------------- bad input


def tiny_volume(path: Path, shape: tuple[int, ...] = (12, 12, 12), value: float | None = None) -> Path:
    data = np.random.default_rng(0).uniform(1, 100, shape).astype(np.float32)
    if value is not None:
        data[3, 4, 5] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def truncated_gz(path: Path) -> None:
    tiny_volume(path)
    path.write_bytes(path.read_bytes()[:-200])


GOOD = [("b.nii", "S2", "AD"), ("c.nii", "S3", "CN"), ("d.nii", "S4", "CN")]
BAD_VOLUMES = {
    "4-D": (
        lambda p: shutil.copy(NIBABEL_DATA / "example4d.nii.gz", p),
        "a.nii.gz",
        "is 4-D (128x96x24x2): give one 3-D volume per file",
    ),
    "2-D": (lambda p: tiny_volume(p, (12, 12)), "a.nii", "is 2-D (12x12): brainLDM needs a 3-D volume"),
    "one plane": (lambda p: tiny_volume(p, (12, 12, 1)), "a.nii", "is 2-D (12x12x1)"),
    "NaN": (lambda p: tiny_volume(p, value=np.nan), "a.nii", "has 1 NaN or infinite voxels: replace them"),
    "inf": (lambda p: tiny_volume(p, value=np.inf), "a.nii", "has 1 NaN or infinite voxels"),
    "not NIfTI": (lambda p: p.write_text("subject,dx\n"), "a.nii", "a.nii is not a readable NIfTI file"),
    "truncated gz": (truncated_gz, "a.nii.gz", "cannot read the voxels of a.nii.gz (Compressed file ended"),
}


def assert_refused(run_setup, tmp_path: Path, folder: Path, table: Path, *fragments: str) -> None:
    out = tmp_path / "made" / "for" / "AD_NC"
    before = tree_fingerprint(folder)
    code, _, err = run_setup("--from-nifti", folder, "--labels", table, "--out", out)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "made").exists()  # nothing written, not even the folders made to hold it
    assert tree_fingerprint(folder) == before


@pytest.mark.parametrize("kind", list(BAD_VOLUMES))
def test_bad_volume_is_one_line_and_nothing_is_written(kind: str, tmp_path: Path, run_setup) -> None:
    make, name, message = BAD_VOLUMES[kind]
    folder = tmp_path / "scans"
    folder.mkdir()
    make(folder / name)
    for file, *_ in GOOD:
        tiny_volume(folder / file)
    table = write_table(tmp_path / "labels.csv", [(name, "S1", "AD"), *GOOD])
    assert_refused(run_setup, tmp_path, folder, table, message)


BAD_TABLES = {
    "no subject column": ("file,dx\na.nii,AD\n", "has no column for the subject (subject: one of subject, subject_id"),
    "no columns at all": ("", "is empty: it needs a header row"),
    "two diagnosis columns": ("file,subject,DX,DX_bl\n", "has several diagnosis columns (DX, DX_bl)"),
    "a volume with no row": ("file,subject,diagnosis\na.nii,S1,AD\nb.nii,S2,AD\nc.nii,S3,CN\n", "1 volume under "),
    "a row with no volume": (
        "file,subject,diagnosis\na.nii,S1,AD\nb.nii,S2,AD\nc.nii,S3,CN\nd.nii,S4,CN\nx.nii,S5,CN\n",
        "1 row of ",
    ),
    "two diagnoses": (
        "file,subject,diagnosis\na.nii,S1,AD\nb.nii,S2,AD\nc.nii,S3,CN\nd.nii,S1,CN\n",
        "subjects S1 have both AD and NC",
    ),
    "a class left empty": (
        "file,subject,diagnosis\na.nii,S1,CN\nb.nii,S2,MCI\nc.nii,S3,CN\nd.nii,S4,LMCI\n",
        "0 AD subjects in the table: the split needs at least 2 per class (one in train, one in test); skipped: MCI 1, LMCI 1",
    ),
    "one subject in a class": (
        "file,subject,diagnosis\na.nii,S1,AD\nb.nii,S1,AD\nc.nii,S3,CN\nd.nii,S4,CN\n",
        "1 AD subject in the table",
    ),
    "a volume named twice": (
        "file,subject,diagnosis\na.nii,S1,AD\na,S1,AD\nb.nii,S2,AD\nc.nii,S3,CN\nd.nii,S4,CN\n",
        "a.nii is named by rows 2 and 3",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_TABLES))
def test_bad_table_is_one_line_and_nothing_is_written(kind: str, tmp_path: Path, run_setup) -> None:
    text, message = BAD_TABLES[kind]
    folder = tmp_path / "scans"
    for name in ("a.nii", "b.nii", "c.nii", "d.nii"):
        tiny_volume(folder / name)
    table = tmp_path / "labels.csv"
    table.write_text(text)
    assert_refused(run_setup, tmp_path, folder, table, message)


def test_rows_and_volumes_that_do_not_match_are_listed(tmp_path: Path, run_setup) -> None:
    folder = tmp_path / "scans"
    for name in ("a.nii", "b.nii", "c.nii", "d.nii", "e.nii"):
        tiny_volume(folder / name)
    table = write_table(tmp_path / "labels.csv", [("a.nii", "S1", "AD"), ("b", "S2", "AD"), ("c.nii.gz", "S3", "CN")])
    assert_refused(run_setup, tmp_path, folder, table, "1 row of ", "name no volume under", "c.nii.gz (row 4)")
    table = write_table(tmp_path / "labels.csv", [("a.nii", "S1", "AD"), ("b", "S2", "AD"), ("c", "S3", "CN")])
    assert_refused(run_setup, tmp_path, folder, table, "2 volumes under ", "have no row in ", "d.nii, e.nii")


def test_a_failure_after_some_volumes_were_written_leaves_nothing(template_2mm, tmp_path: Path, run_setup) -> None:
    data, affine = template_2mm
    folder = tmp_path / "scans"
    for name in ("a.nii", "b.nii", "c.nii"):
        save_volume(folder / name, data, affine)
    tiny_volume(folder / "z.nii", value=np.nan)  # the last one converted
    table = write_table(
        tmp_path / "labels.csv", [("a.nii", "S1", "AD"), ("b.nii", "S2", "AD"), ("c.nii", "S3", "CN"), ("z.nii", "S4", "CN")]
    )
    assert_refused(run_setup, tmp_path, folder, table, "z.nii has 1 NaN or infinite voxels")


@pytest.mark.parametrize(
    "args, message",
    [
        (("--labels", "t.csv"), "--labels only apply with --from-nifti"),
        (("--from-nifti", "scans"), "--from-nifti needs --labels TABLE"),
        (("--from-nifti", "scans", "--labels", "t.csv", "--demo"), "--demo do not apply with --from-nifti"),
        (("--from-nifti", "scans", "--labels", "t.csv", "--data-dir", "d"), "--data-dir do not apply with --from-nifti"),
        (("--from-nifti", "scans", "--labels", "t.csv", "--slices", "0"), "--slices 0: give 1 to 100"),
        (
            ("--from-nifti", "scans", "--labels", "t.csv", "--test-fraction", "1"),
            "--test-fraction 1.0: give a fraction between 0 and 1",
        ),
        (("--from-nifti", "scans", "--labels", "t.csv"), "--from-nifti scans is not a folder"),
    ],
)
def test_bad_arguments_are_one_line(args: tuple[str, ...], message: str, run_setup) -> None:
    code, _, err = run_setup(*args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
