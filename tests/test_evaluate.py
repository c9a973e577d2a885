"""evaluate.py: metric math on known inputs, the classifier on the tiny data, end to end, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from dataset import DataConfig, load_split_datasets

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    features = np.random.default_rng(0).normal(size=(500, 8))
    assert evaluate.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_a_mean_shift_is_its_squared_length() -> None:
    rng = np.random.default_rng(1)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    features = rng.normal(size=(2000, 6))
    # Same covariance exactly: the closed form |m|² holds to rounding.
    assert evaluate.frechet_distance(features, features + shift) == pytest.approx(np.sum(shift**2), abs=1e-6)
    # Independent draws of N(0, I) and N(m, I): |m|² within sampling error.
    other = rng.normal(size=(20000, 6)) + shift
    assert evaluate.frechet_distance(rng.normal(size=(20000, 6)), other) == pytest.approx(np.sum(shift**2), rel=0.03)


def test_kid_is_about_zero_for_one_set_and_positive_for_a_shifted_one() -> None:
    features = np.random.default_rng(2).normal(size=(400, 16))
    same, _ = evaluate.kernel_inception_distance(features, features, subsets=50, subset_size=200, seed=0)
    shifted, shifted_std = evaluate.kernel_inception_distance(features, features + 0.5, subsets=50, subset_size=200, seed=0)
    assert shifted > 3 * shifted_std > 0
    assert abs(same) < 0.05 * shifted


def test_ms_ssim_of_an_image_with_itself_is_one() -> None:
    copies = (torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).repeat(5, 1, 1, 1)
    for pairs in (100, 4):  # all 10 pairs; 4 random ones
        assert evaluate.pairwise_ms_ssim(copies, pairs=pairs) == pytest.approx(1.0, abs=1e-5)
    noise = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert evaluate.pairwise_ms_ssim(noise) < 0.5


def test_nearest_distances_find_a_planted_copy() -> None:
    generator = torch.Generator().manual_seed(3)
    references = torch.randint(0, 256, (50, 16, 16), dtype=torch.uint8, generator=generator)
    queries = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=generator)
    queries[1] = references[37]
    distances, indices = evaluate.nearest_distances(queries, references, chunk=16)  # several chunks
    brute_force = (queries[:, None].float() - references[None].float()).square().mean((2, 3)).sqrt()
    assert indices[1] == 37 and distances[1] == 0.0
    np.testing.assert_array_equal(indices, brute_force.argmin(1).numpy())
    np.testing.assert_allclose(distances, brute_force.min(1).values.numpy(), rtol=1e-5)


def test_csf_dark_share_counts_dark_brain_pixels() -> None:
    brain = np.full((1, 20, 20), 100, dtype=np.uint8)
    brain[0, :5] = 40  # a quarter darker than 0.6 x the median brain intensity
    blank = np.zeros((1, 20, 20), dtype=np.uint8)
    shares = evaluate.csf_dark_share(np.concatenate([brain, blank]))
    assert shares[0] == pytest.approx(0.25) and np.isnan(shares[1])


def test_position_balancing_makes_every_slice_half_ad() -> None:
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    slices = np.array([70, 70, 70, 70, 71, 71, 71, 72])  # slice 72 holds NC only
    weights = evaluate.position_balancing_weights(labels, slices)
    for index in (70, 71):
        here = slices == index
        assert weights[here & (labels == 0)].sum() == pytest.approx(weights[here & (labels == 1)].sum())
        assert weights[here].sum() == pytest.approx(here.sum())  # each index keeps its share
    assert weights[slices == 72].sum() == 0


def test_classifier_learns_the_tiny_dataset(tiny_dataset: Path) -> None:
    datasets, _ = load_split_datasets(DataConfig(data_dir=str(tiny_dataset), image_size=32, cache_dir=None),
                                      return_slice=True, verbose=False)
    model, val_accuracy = evaluate.train_classifier(datasets["train"], datasets["val"], evaluate.ClassifierSettings(), CPU)
    predictions, features = evaluate.classify(model, datasets["test"].pixels, CPU)
    assert np.mean(predictions == datasets["test"].labels.numpy()) >= 0.9 and val_accuracy >= 0.9
    assert features.shape == (len(datasets["test"]), evaluate.ClassifierSettings().channels[-1])


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """The session's tiny run, copied so that metrics and the classifier cache land in a private folder."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def run_evaluate(run_dir: Path, *extra: str) -> None:
    evaluate.main(["--run", str(run_dir), "--num-samples", "4", "--steps", "2", "--batch-size", "3", "--device", "cpu", *extra])


GROUP_KEYS = {
    "generated_images", "conditioning_accuracy", "real_test_accuracy", "reconstructed_test_accuracy", "frechet_distance",
    "frechet_floor", "kid", "kid_std", "kid_floor", "kid_floor_std", "ms_ssim_generated", "ms_ssim_real", "nearest_train_generated", "nearest_train_real",
    "near_copy_share_generated", "near_copy_share_real",
}


def test_end_to_end_writes_both_files_and_reuses_the_classifier(run_copy: Path, capsys) -> None:
    run_evaluate(run_copy)
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert set(metrics["groups"]) == {"all", "AD", "NC"}
    for name, group in metrics["groups"].items():
        assert set(group) == GROUP_KEYS
        assert group["generated_images"] == (8 if name == "all" else 4)
        assert 0 <= group["conditioning_accuracy"] <= 1 and 0 <= group["ms_ssim_generated"] <= 1
        assert group["frechet_distance"] is not None and group["nearest_train_generated"]["median"] >= 0
    classifier = metrics["classifier"]
    assert classifier["source"].startswith("trained") and (run_copy / "classifier.pt").is_file()
    assert {"test_accuracy", "test_accuracy_position_balanced", "slice_position_only_test_accuracy"} <= set(classifier)
    assert sum(tercile["images"] for tercile in classifier["slice_terciles"]) == metrics["real_test_images"] == 16
    assert {"generated", "real_test", "directions_agree"} == set(metrics["anatomy"])
    assert metrics["anatomy"]["real_test"]["cohens_d_AD_minus_NC"] is not None
    markdown = (run_copy / "metrics.md").read_text()
    assert "| metric | all | AD | NC |" in markdown and "ImageNet-FID is not computed" in markdown
    assert markdown in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        run_evaluate(run_copy)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err

    run_evaluate(run_copy, "--overwrite")
    again = json.loads((run_copy / "metrics.json").read_text())
    assert again["classifier"]["source"].startswith("reused")
    assert again["groups"] == metrics["groups"] and again["anatomy"] == metrics["anatomy"]  # same seed, same numbers


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-samples", "1"], "--num-samples must be at least 2"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--guidance", "-1"], "--guidance must be 0 or more"),
        (["--run", "no/such/run"], "not found"),
    ],
)
def test_bad_input_exits_2(trained_run: Path, argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--run", str(trained_run), "--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_input_is_one_line_from_the_command_line(trained_run: Path) -> None:
    result = subprocess.run([sys.executable, "evaluate.py", "--run", str(trained_run), "--num-samples", "1"],
                            check=False, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--num-samples" in result.stderr
