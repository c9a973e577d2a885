"""evaluate.py: metric math on known inputs, the classifier on the tiny data, end to end, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from config import DataConfig, read_config
from dataset import brain_pixels, csf_dark_share, load_split_datasets, load_splits

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


def test_frechet_distance_of_a_scaled_set_is_its_covariance_trace() -> None:
    """b = 2a (a centred): Σb = 4Σa, (Σa Σb)^½ = 2Σa, so the distance is tr Σa + 4 tr Σa − 4 tr Σa = tr Σa."""
    features = np.random.default_rng(4).normal(size=(300, 5)) * np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    features -= features.mean(0)
    expected = np.trace(np.cov(features, rowvar=False))
    assert evaluate.frechet_distance(features, 2 * features) == pytest.approx(expected, rel=1e-9)


def reference_kid(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² with k(p, q) = (p·q / D + 1)³, written out term by term."""

    def kernel(p: np.ndarray, q: np.ndarray) -> float:
        return (p @ q / x.shape[1] + 1) ** 3

    m, n = len(x), len(y)
    within_x = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    across = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return within_x + within_y - 2 * across


def test_kid_matches_the_unbiased_estimator_written_out() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 0.3
    # Subsets of the whole set are permutations of it: every subset gives the same value, so std = 0.
    mean, std = evaluate.kernel_inception_distance(a, b, subsets=5, subset_size=50, seed=0)
    assert mean == pytest.approx(reference_kid(a, b), rel=1e-9) and std == pytest.approx(0.0, abs=1e-12)
    # The same set on both sides: the cross term keeps k(x, x), so the value is −2/n · (mean k(x, x) − mean k(x, x')) ≤ 0.
    same, _ = evaluate.kernel_inception_distance(a, a, subsets=3, subset_size=50, seed=0)
    assert same == pytest.approx(reference_kid(a, a), rel=1e-9) and same < 0


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
    shares = [csf_dark_share(brain_pixels(image)) for image in np.concatenate([brain, blank])]
    assert shares[0] == pytest.approx(0.25) and np.isnan(shares[1])


def image_set(pixels: torch.Tensor, labels, predictions, seed: int) -> evaluate.ImageSet:
    features = np.random.default_rng(seed).normal(size=(len(pixels), 6))
    return evaluate.ImageSet(pixels, np.asarray(labels), np.asarray(predictions), features)


def random_images(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_group_metrics_on_known_inputs() -> None:
    """Accuracies from each set's own predictions; planted copies are the near-copies; identical images read MS-SSIM 1."""
    train = random_images(40, 0)
    generated = image_set(random_images(10, 1), [0] * 5 + [1] * 5, [0, 0, 0, 1, 1, 1, 1, 1, 0, 0], 1)  # 6 of 10 right
    planted = [2, 5, 7]
    generated.pixels[planted] = train[[11, 23, 38]]
    real_test = image_set(random_images(8, 2), [0] * 4 + [1] * 4, [0, 0, 0, 1, 1, 1, 1, 1], 2)  # 7 of 8 right
    reconstructed = image_set(real_test.pixels, real_test.labels, [1] * 8, 3)  # 4 of 8 right
    train_sample = image_set(train[:10], [0] * 5 + [1] * 5, [0] * 10, 4)
    real_sample = image_set(random_images(20, 5), [0] * 10 + [1] * 10, [0] * 20, 5)
    # As evaluate.main does it: nearest training distances, then the threshold from the real sample.
    generated.nearest_train, index = evaluate.nearest_distances(generated.pixels, train)
    real_sample.nearest_train = evaluate.nearest_distances(real_sample.pixels, train)[0]
    assert index[planted].tolist() == [11, 23, 38]
    threshold = float(np.percentile(real_sample.nearest_train, evaluate.NEAR_COPY_PERCENTILE))
    metrics = evaluate.group_metrics(generated, real_test, reconstructed, train_sample, real_sample, threshold, 0, CPU)
    assert metrics["generated_images"] == 10
    assert metrics["conditioning_accuracy"] == 0.6
    assert metrics["real_test_accuracy"] == 0.875 and metrics["reconstructed_test_accuracy"] == 0.5
    assert metrics["near_copy_share_generated"] == 0.3  # exactly the planted copies (distance 0)
    assert metrics["near_copy_share_real"] == 0.05  # the 1st percentile of 20 distinct values: only the smallest is below
    assert metrics["nearest_train_generated"]["p1"] == 0.0
    assert metrics["nearest_train_generated"]["mean"] == pytest.approx(generated.nearest_train.sum() / 10)
    assert metrics["nearest_train_real"] == evaluate.distribution(real_sample.nearest_train)
    assert metrics["nearest_train_real"]["p1"] > 50  # uniform noise images are far from each other
    assert metrics["frechet_floor"] == evaluate.frechet_distance(train_sample.features, real_test.features)
    assert metrics["ms_ssim_generated"] < 0.5 and metrics["ms_ssim_real"] < 0.5

    # Mode collapse: every generated image the same reads MS-SSIM 1; the real pairs stay as they were.
    collapsed = image_set(train[[3] * 10], generated.labels, generated.predictions, 1)
    collapsed.nearest_train = np.zeros(10)
    again = evaluate.group_metrics(collapsed, real_test, reconstructed, train_sample, real_sample, threshold, 0, CPU)
    assert again["ms_ssim_generated"] == pytest.approx(1.0, abs=1e-5)
    assert again["ms_ssim_real"] == metrics["ms_ssim_real"] and again["near_copy_share_generated"] == 1.0


def csf_image(dark_rows: int) -> torch.Tensor:
    """A 20x20 brain at grey 100 whose first `dark_rows` rows are CSF-dark (40): share dark_rows / 20."""
    image = torch.full((20, 20), 100, dtype=torch.uint8)
    image[:dark_rows] = 40
    return image


def test_anatomy_means_cohens_d_and_direction_on_known_shares() -> None:
    # generated: AD shares 0.2, 0.3 and NC 0.1, 0.2 → means 0.25 / 0.15, sd √0.005 each, d = 0.1 / √0.005 = √2.
    # real: the reverse (d = −√2), plus one blank NC image (no brain: left out, not counted as 0).
    generated = image_set(torch.stack([csf_image(4), csf_image(6), csf_image(2), csf_image(4)]), [0, 0, 1, 1], [0] * 4, 0)
    real = image_set(
        torch.stack([csf_image(2), csf_image(4), csf_image(4), csf_image(6), torch.zeros(20, 20, dtype=torch.uint8)]),
        [0, 0, 1, 1, 1],
        [0] * 5,
        1,
    )
    report = evaluate.anatomy(generated, real)
    assert set(report) == {"generated", "real_test", "directions_agree"}
    expected_sd = pytest.approx(np.sqrt(0.005))
    assert report["generated"] == {
        "AD_mean": pytest.approx(0.25),
        "AD_std": expected_sd,
        "NC_mean": pytest.approx(0.15),
        "NC_std": expected_sd,
        "cohens_d_AD_minus_NC": pytest.approx(np.sqrt(2)),
    }
    assert report["real_test"] == {
        "AD_mean": pytest.approx(0.15),
        "AD_std": expected_sd,
        "NC_mean": pytest.approx(0.25),
        "NC_std": expected_sd,
        "cohens_d_AD_minus_NC": pytest.approx(-np.sqrt(2)),
    }
    assert report["directions_agree"] is False
    assert evaluate.anatomy(generated, generated)["directions_agree"] is True
    # One image of a label: no spread, no d, no verdict (null in metrics.json).
    single = image_set(torch.stack([csf_image(4), csf_image(2), csf_image(4)]), [0, 1, 1], [0] * 3, 2)
    report = evaluate.anatomy(single, real)
    assert np.isnan(report["generated"]["AD_std"]) and np.isnan(report["generated"]["cohens_d_AD_minus_NC"])
    assert report["directions_agree"] is None
    assert evaluate.without_nan(report)["generated"]["cohens_d_AD_minus_NC"] is None


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
    datasets, _ = load_split_datasets(
        DataConfig(data_dir=str(tiny_dataset), image_size=32, cache_dir=None), return_slice=True, verbose=False
    )
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
    "generated_images",
    "conditioning_accuracy",
    "real_test_accuracy",
    "reconstructed_test_accuracy",
    "frechet_distance",
    "frechet_floor",
    "kid",
    "kid_std",
    "kid_floor",
    "kid_floor_std",
    "ms_ssim_generated",
    "ms_ssim_real",
    "nearest_train_generated",
    "nearest_train_real",
    "near_copy_share_generated",
    "near_copy_share_real",
}


def test_end_to_end_writes_both_files_and_reuses_the_classifier(run_copy: Path, capsys) -> None:
    run_evaluate(run_copy)
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert set(metrics["groups"]) == {"all", "AD", "NC"}
    groups = metrics["groups"]
    for name, group in groups.items():
        assert set(group) == GROUP_KEYS
        assert group["generated_images"] == (8 if name == "all" else 4)
        assert all(isinstance(group[key], float) for key in ("frechet_distance", "frechet_floor", "kid", "kid_floor"))
        # Every tiny test slice has a pixel-identical training slice (same class, same slice index): distance 0.
        assert group["nearest_train_real"] == {"mean": 0.0, "p1": 0.0, "median": 0.0}
        assert group["near_copy_share_real"] == 0.0
    assert metrics["near_copy_threshold"] == 0.0
    # "all" pools AD and NC: 4 + 4 images asked for, 8 + 8 real test images.
    assert (
        groups["all"]["conditioning_accuracy"]
        == (groups["AD"]["conditioning_accuracy"] + groups["NC"]["conditioning_accuracy"]) / 2
    )
    assert groups["all"]["real_test_accuracy"] == (groups["AD"]["real_test_accuracy"] + groups["NC"]["real_test_accuracy"]) / 2
    assert metrics["settings"] == {"num_samples": 4, "steps": 2, "guidance": 3.0, "seed": 0, "sampler": "ddim", "batch_size": 3}
    classifier = metrics["classifier"]
    assert classifier["source"].startswith("trained") and (run_copy / "classifier.pt").is_file()
    assert {"test_accuracy", "test_accuracy_position_balanced", "slice_position_only_test_accuracy"} <= set(classifier)
    assert classifier["test_accuracy"] == groups["all"]["real_test_accuracy"]
    assert classifier["slice_position_only_test_accuracy"] == 0.5  # AD and NC share the slice window 70-73
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


def test_real_test_images_passed_as_generated_match_the_real_figures(run_copy: Path, tiny_dataset: Path, monkeypatch) -> None:
    """With the real test slices as the "generated" images (all 8 per label, in test order), every
    generated-side figure equals its real-side twin: conditioning accuracy = real test accuracy,
    Fréchet distance ≈ 0, the same MS-SSIM, nearest-training distances, near-copy shares and anatomy."""
    config = read_config(run_copy)
    test = load_split_datasets(config.data, load_splits(run_copy / "splits.json"), verbose=False)[0]["test"]
    asked = []

    def real_as_generated(pipe, label, args):
        asked.append(label)
        return test.pixels[test.labels == label][: args.num_samples]

    monkeypatch.setattr(evaluate, "generate_images", real_as_generated)
    quick = evaluate.train_classifier  # a 2-epoch yardstick is enough here: the figures are compared, not judged
    monkeypatch.setattr(
        evaluate,
        "train_classifier",
        lambda train, val, settings, device: quick(train, val, dataclasses.replace(settings, epochs=2), device),
    )
    evaluate.main(["--run", str(run_copy), "--num-samples", "8", "--steps", "2", "--device", "cpu"])
    assert asked == [0, 1]
    metrics = json.loads((run_copy / "metrics.json").read_text())
    for name, group in metrics["groups"].items():
        assert group["generated_images"] == (16 if name == "all" else 8)
        assert group["conditioning_accuracy"] == group["real_test_accuracy"]
        assert abs(group["frechet_distance"]) <= 0.25 * group["frechet_floor"]
        assert group["ms_ssim_generated"] == group["ms_ssim_real"]
        assert group["nearest_train_generated"] == group["nearest_train_real"]
        assert group["near_copy_share_generated"] == group["near_copy_share_real"]
    for name in ("AD", "NC"):  # one label's features are far from singular trouble: ≈ 0 to rounding
        assert abs(metrics["groups"][name]["frechet_distance"]) <= 1e-3 * metrics["groups"][name]["frechet_floor"]
    assert metrics["anatomy"]["generated"] == metrics["anatomy"]["real_test"]
    assert metrics["anatomy"]["directions_agree"] is True


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
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--run", str(trained_run), "--num-samples", "1"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--num-samples" in result.stderr
