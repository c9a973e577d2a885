"""counterfactual.py: the partial schedule, DDIM inversion's round trip, SDEdit's seeding, and every
score on inputs whose answer is known."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import counterfactual
from config import SchedulerConfig
from counterfactual import Settings
from dataset import read_image
from modules import NoiseScheduler
from pipeline import load_run
from utils import Runtime

CPU = torch.device("cpu")


def test_strength_keeps_the_last_share_of_the_sampling_schedule() -> None:
    scheduler = NoiseScheduler(SchedulerConfig())
    assert scheduler.timesteps(10, 0.3) == [299, 199, 99]
    assert scheduler.timesteps(10, 1.0) == scheduler.timesteps(10)
    assert scheduler.timesteps(50, 0.5) == scheduler.timesteps(50)[25:]
    assert scheduler.timesteps(10, 0.01) == [99]  # never empty
    for strength in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="strength"):
            scheduler.timesteps(10, strength)


@pytest.fixture(scope="module")
def tiny_pipe(trained_run: Path):
    return load_run(trained_run, Runtime(CPU))


def tiny_test_slices(tiny_dataset: Path, size: int) -> tuple[np.ndarray, list[int]]:
    files = counterfactual.slice_files([tiny_dataset / "test"])
    return counterfactual.read_slices(files, size), [counterfactual.label_from_path(path) for path in files]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_inversion_with_the_source_label_gives_back_the_input(tiny_pipe, tiny_dataset: Path) -> None:
    """DDIM sampling from the inverted latents with the same label and guidance lands on the input;
    the fixed-point iterations are what make it exact (plain DDIM inversion misses by several %)."""
    pixels, labels = tiny_test_slices(tiny_dataset, tiny_pipe.config.data.image_size)
    latents = tiny_pipe.encode(torch.from_numpy(pixels).unsqueeze(1).float() / 127.5 - 1)
    conditions = tiny_pipe.conditions(torch.tensor(labels))
    errors = {}
    for iterations in (0, 8):
        settings = Settings(target=0, strength=0.6, steps=10, guidance=2.0, inversion_iterations=iterations)
        start = counterfactual.invert(tiny_pipe, latents, conditions, settings)
        back = tiny_pipe.sample(conditions, steps=10, guidance_scale=2.0, sampler="ddim", start=start, strength=0.6)
        errors[iterations] = relative_error(back, latents)
        assert relative_error(start, latents) > 0.3, "the inversion did not reach a noisy latent"
    assert errors[8] < 1e-4 and errors[0] > 1e-2  # measured 6e-6 and 8e-2


def test_a_counterfactual_to_the_source_label_is_the_reconstruction(tiny_pipe, tiny_dataset: Path) -> None:
    pixels, labels = tiny_test_slices(tiny_dataset, tiny_pipe.config.data.image_size)
    for target in (0, 1):  # a quarter of the schedule; the round trip to the same label
        chosen = [index for index, label in enumerate(labels) if label == target]
        settings = Settings(target=target, strength=0.5, steps=10, guidance=2.0, batch_size=5)
        reconstructions, edited = counterfactual.make_counterfactuals(tiny_pipe, pixels[chosen], [target] * len(chosen), settings)
        assert np.abs(edited.astype(int) - reconstructions.astype(int)).max() <= 1
    # The other label moves the latents far more than the round trip's residual (the tiny model's
    # label barely shows in its 32 px decoded images, so this is measured on latents).
    nc = [index for index, label in enumerate(labels) if label == 1]
    latents = tiny_pipe.encode(torch.from_numpy(pixels[nc]).unsqueeze(1).float() / 127.5 - 1)
    source = tiny_pipe.conditions(torch.ones(len(nc), dtype=torch.long))
    moved = {}
    for target in (0, 1):
        settings = Settings(target=target, strength=0.5, steps=10, guidance=2.0, inversion_iterations=8)
        moved[target] = relative_error(counterfactual.edit_latents(tiny_pipe, latents, source, settings, None), latents)
    assert moved[0] > 10 * moved[1], moved


def test_sdedit_is_seeded_and_unknown_sources_use_the_null_label(tiny_pipe, tiny_dataset: Path, monkeypatch) -> None:
    pixels, _ = tiny_test_slices(tiny_dataset, tiny_pipe.config.data.image_size)
    pixels = pixels[:3]
    settings = Settings(target=0, method="sdedit", strength=0.5, steps=4, seed=3)
    first = counterfactual.make_counterfactuals(tiny_pipe, pixels, [1, 1, 1], settings)[1]
    again = counterfactual.make_counterfactuals(tiny_pipe, pixels, [1, 1, 1], settings)[1]
    other = counterfactual.make_counterfactuals(tiny_pipe, pixels, [1, 1, 1], dataclasses.replace(settings, seed=4))[1]
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    seen = []
    real_invert = counterfactual.invert
    monkeypatch.setattr(
        counterfactual, "invert", lambda pipe, z, c, s: seen.append(c.labels.tolist()) or real_invert(pipe, z, c, s)
    )
    counterfactual.make_counterfactuals(tiny_pipe, pixels, [None, 0, 1], Settings(target=0, steps=4))
    assert seen == [[-1, 0, 1]]


def test_label_and_slice_come_from_the_dataset_layout() -> None:
    assert counterfactual.label_from_path(Path("d/test/AD/123456_70.jpeg")) == 0
    assert counterfactual.label_from_path(Path("pairs/nc/123456_70.jpeg")) == 1
    assert counterfactual.label_from_path(Path("mine/slice.png")) is None
    assert counterfactual.slice_index_from_path(Path("d/test/AD/123456_70.jpeg")) == 70
    assert counterfactual.slice_index_from_path(Path("mine/slice.png")) is None


# ----------------------------------------------------------------------------- scores on known answers


def brains(ventricle_radii: list[float], size: int = 32) -> np.ndarray:
    """uint8 (N, S, S) discs of brain (grey 120) with a dark ventricle (grey 40) of each radius in pixels."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    radius = np.hypot(yy, xx)
    slices = np.where(radius < size * 0.4, 120, 0)[None].repeat(len(ventricle_radii), 0)
    for slice_, ventricle in zip(slices, ventricle_radii):
        slice_[radius < ventricle] = 40
    return slices.astype(np.uint8)


def test_a_perfect_counterfactual_scores_perfectly_and_no_edit_scores_nothing() -> None:
    source, truth = brains([2, 3, 2.5, 3.5]), brains([4, 6, 4, 7])
    flipped = np.array([True, True, False, True])
    perfect = counterfactual.score(source, truth, source, truth, truth, flipped)
    assert perfect["localisation_median"] == pytest.approx(1) and perfect["localisation_median_ceiling"] == pytest.approx(1)
    assert perfect["effect_ratio"] == pytest.approx(1) and perfect["effect_correlation"] == pytest.approx(1)
    assert perfect["closer_share"] == 1 and perfect["rms_to_truth_median"] == 0
    assert perfect["rms_outside_atrophy_median"] == 0 and perfect["flip_rate"] == 0.75
    unchanged = counterfactual.score(source, truth, source, source, truth, flipped)
    assert math.isnan(unchanged["localisation_median"])  # no difference at all: no correlation
    assert unchanged["effect_ratio"] == 0 and unchanged["closer_share"] == 0
    # The ceiling is the same measure of the truth's reconstruction, whatever the counterfactual.
    assert {key: value for key, value in unchanged.items() if key.endswith("_ceiling")} == {
        key: value for key, value in perfect.items() if key.endswith("_ceiling")
    }
    assert unchanged["effect_ratio_ceiling"] == pytest.approx(1) and unchanged["closer_share_ceiling"] == 1
    # The opposite edit: the disease taken away instead of added.
    opposite = 2 * source.astype(int) - truth.astype(int)
    reversed_ = counterfactual.score(source, truth, source, np.clip(opposite, 0, 255).astype(np.uint8), truth, flipped)
    assert reversed_["localisation_median"] < -0.9 and reversed_["effect_ratio"] <= 0 and reversed_["closer_share"] == 0


def test_identity_is_measured_outside_the_changed_pixels() -> None:
    source, truth = brains([2, 3]), brains([5, 6])
    edited = truth.copy()
    edited[:, 2, 16] = 200  # far from the ventricle, inside the brain
    scores = counterfactual.score(source, truth, source, edited, truth, np.ones(2, bool))
    assert scores["rms_outside_atrophy_median"] > 0 and scores["true_rms_outside_atrophy_median"] == 0


def test_difference_colours_diverge_from_white_and_black_out_the_background() -> None:
    differences = np.array([[[0.0, 10.0], [-10.0, 0.0]]], np.float32)
    masks = np.array([[[True, True], [True, False]]])
    colours = counterfactual.difference_colours(differences, masks, scale=10.0)
    zero, brighter, darker, outside = colours[0, 0, 0], colours[0, 0, 1], colours[0, 1, 0], colours[0, 1, 1]
    assert zero.min() > 230 and brighter[0] > brighter[2] and darker[2] > darker[0] and outside.tolist() == [0, 0, 0]
    assert counterfactual.shared_scale(np.zeros((1, 2, 2)), masks) == 1.0


def test_the_recommendation_meets_the_most_targets_then_localises_best() -> None:
    good = {"effect_ratio": 1.0, "effect_correlation": 0.9, "closer_share": 0.9, "flip_rate": 0.9}
    rows = []
    for method, strength, localisation, flip in (
        ("sdedit", 0.3, 0.9, 0.1),
        ("sdedit", 0.5, 0.6, 0.9),
        ("ddim-inversion", 0.5, 0.7, 0.9),
    ):
        for direction in ("NC → AD", "AD → NC"):
            rows.append(
                good
                | {
                    "direction": direction,
                    "method": method,
                    "strength": strength,
                    "localisation_median": localisation,
                    "flip_rate": flip,
                }
            )
    assert counterfactual.recommend(rows) == {"method": "ddim-inversion", "strength": 0.5, "targets_met": 10}


def test_pairs_are_read_one_slice_per_scan_with_both_renders(tmp_path: Path) -> None:
    from conftest import write_slice

    for scan in ("100001", "100002", "100003"):
        for slice_index in (70, 71):
            for class_name, radius in (("AD", 0.3), ("NC", 0.42)):
                write_slice(tmp_path / class_name / f"{scan}_{slice_index}.jpeg", 120, radius)
    (tmp_path / "pairs.json").write_text('{"test_scans": [{"scan_id": "100001"}, {"scan_id": "100002"}, {"scan_id": "100003"}]}')
    pairs = counterfactual.read_pairs(tmp_path, 32, count=2, seed=0)
    assert len(pairs.names) == 2 and len({name.split("_")[0] for name in pairs.names}) == 2
    assert pairs.renders[0].shape == pairs.renders[1].shape == (2, 32, 32)
    assert (pairs.renders[0] > 10).sum() < (pairs.renders[1] > 10).sum()  # AD's smaller ellipse
    assert np.array_equal(pairs.renders[0][0], counterfactual.read_slices([tmp_path / "AD" / pairs.names[0]], 32)[0])
    assert read_image(tmp_path / "NC" / pairs.names[0]).shape == (240, 256)
