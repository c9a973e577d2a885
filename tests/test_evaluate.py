"""evaluate.py: each figure on known inputs (conditioning, fidelity, TSTR, memorisation, anatomy), end to
end on the tiny run (full evaluation, --umap, --guidance-sweep, --sampler-sweep), and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import classifier
import evaluate
from config import DataConfig, read_config
from conftest import SLICES_PER_SCAN, run_train
from dataset import (
    brain_pixels,
    cohens_d,
    csf_dark_share,
    csf_dark_shares_by_region,
    load_split_datasets,
    load_splits,
    to_model_range,
)
from metrics import SPECTRAL_BANDS, cohens_d_interval, distribution, frechet_distance, precision_recall_density_coverage, psnr
from modules import ms_ssim

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


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


def known_reference() -> evaluate.Reference:
    """A reference with hand-set predictions: real test 7 of 8 right, reconstructions 4 of 8."""
    train = evaluate.SliceDataset(random_images(40, 0).numpy(), np.array([0] * 20 + [1] * 20), np.full(40, 70))
    real_test = image_set(random_images(8, 2), [0] * 4 + [1] * 4, [0, 0, 0, 1, 1, 1, 1, 1], 2)
    reconstructed = image_set(real_test.pixels, real_test.labels, [1] * 8, 3)
    train_sample = image_set(train.pixels[:10], [0] * 5 + [1] * 5, [0] * 10, 4)
    return evaluate.Reference(train, real_test, reconstructed, train_sample)


def test_fidelity_on_known_inputs() -> None:
    """Accuracies from each set's own predictions; floors from the train sample; identical images read MS-SSIM 1."""
    reference = known_reference()
    generated = image_set(random_images(10, 1), [0] * 5 + [1] * 5, [0, 0, 0, 1, 1, 1, 1, 1, 0, 0], 1)  # 6 of 10 right
    metrics = evaluate.fidelity(generated, reference, None, 0, CPU)
    assert metrics["generated_images"] == 10 and metrics["conditioning_accuracy"] == 0.6
    assert metrics["real_test_accuracy"] == 0.875 and metrics["reconstructed_test_accuracy"] == 0.5
    assert metrics["frechet_floor"] == frechet_distance(reference.train_sample.features, reference.real_test.features)
    assert metrics["prdc"] == precision_recall_density_coverage(reference.real_test.features, generated.features)
    assert metrics["ms_ssim_generated"] < 0.5 and metrics["ms_ssim_real"] < 0.5
    # One label: every figure from that label's images only (AD: generated 3 of 5 right, real 3 of 4, reconstructed 0).
    ad = evaluate.fidelity(generated, reference, 0, 0, CPU)
    assert (ad["generated_images"], ad["conditioning_accuracy"], ad["real_test_accuracy"]) == (5, 0.6, 0.75)
    assert ad["reconstructed_test_accuracy"] == 0.0
    assert all(np.isnan(value) for value in ad["prdc"].values())  # 4 real test images: too few for k = 5
    # Mode collapse: every generated image the same reads MS-SSIM 1; the real pairs stay as they were.
    collapsed = image_set(reference.train.pixels[[3] * 10], generated.labels, generated.predictions, 1)
    again = evaluate.fidelity(collapsed, reference, None, 0, CPU)
    assert again["ms_ssim_generated"] == pytest.approx(1.0, abs=1e-5) and again["ms_ssim_real"] == metrics["ms_ssim_real"]


def test_sharpness_sees_blur_that_the_real_slices_do_not_have() -> None:
    """Generated images that are the real test slices keep exactly their spectral energy (1.0 in every band);
    reconstructions blurred by a 3x3 box keep far less above 1/4 cycle per pixel than below, and their
    PSNR/SSIM/MS-SSIM against the slices are those of metrics and modules on the same tensors."""
    reference = known_reference()
    real = reference.real_test
    box = torch.nn.functional.avg_pool2d(real.pixels.unsqueeze(1).float(), 3, stride=1, padding=1, count_include_pad=False)
    blurred = image_set(box.squeeze(1).round().to(torch.uint8), real.labels, real.predictions, 3)
    reference = dataclasses.replace(reference, reconstructed_test=blurred)
    generated = image_set(real.pixels.clone(), real.labels, real.predictions, 1)
    sharp = evaluate.sharpness(generated, reference, CPU)
    assert sharp["spectral_energy"]["generated"] == pytest.approx({"low": 1.0, "mid": 1.0, "high": 1.0}, rel=1e-12)
    kept = sharp["spectral_energy"]["reconstructed_test"]
    assert kept["high"] < 0.25 < kept["low"], f"a 3x3 box blur should lose the top band most: {kept}"
    as_model = [to_model_range(images.pixels.unsqueeze(1)) for images in (blurred, real)]
    assert sharp["reconstruction"]["psnr"] == pytest.approx(float(psnr(*as_model).mean()))
    assert sharp["reconstruction"]["ms_ssim"] == pytest.approx(float(ms_ssim(*as_model).mean()))
    assert sharp["reconstruction"]["ssim"] < 1.0


def test_sharpness_section_writes_the_psnr_in_decibels_not_in_powers_of_ten() -> None:
    """A demo VAE's 35.19 dB read "4e+01 dB" in metrics.md when the PSNR kept one significant digit."""
    kept = {band: 1.0 for band in SPECTRAL_BANDS}
    sharp = {
        "spectral_energy": {name: kept for name in evaluate.SHARPNESS_SETS},
        "reconstruction": {"psnr": 35.19094, "ssim": 0.98389, "ms_ssim": 0.99760},
    }
    assert evaluate.sharpness_section(sharp)[-1].endswith("PSNR 35.2 dB, SSIM 0.984, MS-SSIM 0.998.")


def test_memorisation_finds_planted_copies_by_distance_and_by_correlation() -> None:
    train = random_images(40, 0)
    generated = image_set(random_images(10, 1), [0] * 5 + [1] * 5, [0] * 10, 1)
    generated.pixels[[2, 5]] = train[[11, 23]]  # exact copies
    generated.pixels[7] = (train[38].float() * 0.25 + 190).to(torch.uint8)  # a brighter, flatter copy: far in RMS
    real_sample = image_set(random_images(20, 5), [0] * 10 + [1] * 10, [0] * 20, 5)
    for images in (generated, real_sample):
        images.find_nearest_training_images(train, CPU)
    assert generated.nearest_index[[2, 5]].tolist() == [11, 23] and generated.correlated_index[[2, 5, 7]].tolist() == [11, 23, 38]
    report = evaluate.memorisation(generated, real_sample)
    everything = report["all"]
    assert everything["generated"]["near_copy_share_distance"] == 0.2  # the two exact copies (distance 0)
    assert everything["generated"]["near_copy_share_correlation"] == 0.3  # and the brighter one
    assert everything["real_test"]["near_copy_share_distance"] == 0.05  # 1st percentile of 20 distinct values: the smallest
    assert everything["generated"]["nearest_distance"]["p1"] == 0.0
    assert everything["real_test"]["nearest_distance"] == distribution(real_sample.nearest_distance)
    # Per label: AD holds copy 2; NC holds copy 5 and the brighter 7, which only the correlation catches.
    assert (
        report["AD"]["generated"]["near_copy_share_distance"] == report["AD"]["generated"]["near_copy_share_correlation"] == 0.2
    )
    assert (
        report["NC"]["generated"]["near_copy_share_distance"] == 0.2
        and report["NC"]["generated"]["near_copy_share_correlation"] == 0.4
    )


def test_full_evaluation_measures_memorisation_against_the_training_set(tmp_path: Path, monkeypatch) -> None:
    """Generated images holding a copy of training image 11 and a copy of test image 3: the training copy is
    found at distance 0 and counted as a near-copy; the test copy is no training copy, and real test images
    are measured against the training set too, not against themselves."""
    train, test = random_images(30, 0), random_images(10, 1)
    generated = image_set(torch.stack([train[11], test[3], *random_images(2, 2)]), [0, 0, 1, 1], [0] * 4, 3)
    real_test = image_set(test, [0] * 5 + [1] * 5, [0] * 10, 4)
    reference = evaluate.Reference(evaluate.SliceDataset(train.numpy(), np.zeros(30), np.full(30, 70)), real_test, None, None)
    monkeypatch.setattr(evaluate, "generate_and_measure", lambda pipe, yardstick, args: (generated, 0.0))
    for figure_of_others in ("fidelity", "sharpness", "anatomy", "train_on_synthetic"):
        monkeypatch.setattr(evaluate, figure_of_others, lambda *args: {})
    pipe = SimpleNamespace(run_dir=tmp_path, runtime=SimpleNamespace(device=CPU))
    args = SimpleNamespace(num_samples=5, umap=False, seed=0)
    report = evaluate.full_evaluation(pipe, None, reference, args, np.random.default_rng(0))["memorisation"]
    assert generated.nearest_index[0] == 11 and generated.nearest_distance[0] == 0.0, (
        f"a copy of training image 11 was matched to image {generated.nearest_index[0]} at distance "
        f"{generated.nearest_distance[0]:.3g}: memorisation must search the training set"
    )
    assert generated.nearest_distance[1] > 10, "a copy of a test image was reported as a copy of a training image"
    assert report["all"]["real_test"]["nearest_distance"]["p1"] > 10, "real test images were compared with themselves"
    assert report["all"]["generated"]["near_copy_share_distance"] == 0.25  # the training copy alone
    assert report["AD"]["generated"]["near_copy_share_distance"] == 0.5 and (tmp_path / "memorisation.png").is_file()


def test_memorisation_figure_pairs_each_generated_image_with_its_training_image(tmp_path: Path) -> None:
    train = random_images(12, 0)
    generated = image_set(train[[4, 9, 1]], [0, 1, 0], [0] * 3, 1)
    generated.find_nearest_training_images(train, CPU)
    evaluate.save_memorisation_figure(generated, train, tmp_path / "memorisation.png")
    with Image.open(tmp_path / "memorisation.png") as figure:
        assert figure.width > figure.height / 2 and figure.height > 300  # 4 rows of 3 pairs


def csf_image(dark_rows: int) -> torch.Tensor:
    """A 20x20 brain at grey 100 whose first `dark_rows` rows are CSF-dark (40): share dark_rows / 20."""
    image = torch.full((20, 20), 100, dtype=torch.uint8)
    image[:dark_rows] = 40
    return image


def test_anatomy_means_cohens_d_interval_and_direction_on_known_shares() -> None:
    # generated: AD shares 0.2, 0.3 and NC 0.1, 0.2 → means 0.25 / 0.15, sd √0.005 each, d = 0.1 / √0.005 = √2.
    # real: the reverse (d = −√2), plus one blank NC image (no brain: left out, not counted as 0).
    generated = image_set(torch.stack([csf_image(4), csf_image(6), csf_image(2), csf_image(4)]), [0, 0, 1, 1], [0] * 4, 0)
    real = image_set(
        torch.stack([csf_image(2), csf_image(4), csf_image(4), csf_image(6), torch.zeros(20, 20, dtype=torch.uint8)]),
        [0, 0, 1, 1, 1],
        [0] * 5,
        1,
    )
    report = evaluate.anatomy(generated, real, seed=0)
    assert set(report) == {"generated", "real_test", "directions_agree"}
    expected_sd = pytest.approx(np.sqrt(0.005))
    expected_interval = list(cohens_d_interval(np.array([0.2, 0.3]), np.array([0.1, 0.2]), seed=0))
    assert set(report["generated"].pop("by_region")) == {"cortex_band", "deep"}  # its own test below
    assert report["generated"] == {
        "AD_mean": pytest.approx(0.25),
        "AD_std": expected_sd,
        "NC_mean": pytest.approx(0.15),
        "NC_std": expected_sd,
        "cohens_d_AD_minus_NC": pytest.approx(np.sqrt(2)),
        "cohens_d_95ci": pytest.approx(expected_interval, nan_ok=True),
    }
    assert report["real_test"]["cohens_d_AD_minus_NC"] == pytest.approx(-np.sqrt(2))
    assert report["real_test"]["NC_mean"] == pytest.approx(0.25) and report["real_test"]["AD_mean"] == pytest.approx(0.15)
    assert report["directions_agree"] is False
    assert evaluate.anatomy(generated, generated, seed=0)["directions_agree"] is True
    # One image of a label: no spread, no d, no interval, no verdict (null in metrics.json).
    single = image_set(torch.stack([csf_image(4), csf_image(2), csf_image(4)]), [0, 1, 1], [0] * 3, 2)
    report = evaluate.anatomy(single, real, seed=0)
    assert np.isnan(report["generated"]["AD_std"]) and np.isnan(report["generated"]["cohens_d_AD_minus_NC"])
    assert report["directions_agree"] is None
    cleaned = evaluate.without_nan(report)["generated"]
    assert cleaned["cohens_d_AD_minus_NC"] is None and cleaned["cohens_d_95ci"] == [None, None]


def brain_disc(dark: str, radius_of_dark: float) -> torch.Tensor:
    """A 64x64 disc of brain (radius 25, grey 150) dark (40) in its outer 3 px on the left half (`dark` =
    "band", 3 px inside the 5 px cortex band), or in a central disc of `radius_of_dark` (`dark` = "deep")."""
    y, x = np.mgrid[:64, :64]
    radius = np.hypot(y - 31.5, x - 31.5)
    image = np.where(radius < 25, 150, 0).astype(np.uint8)
    image[(radius < 25) & ((radius > 22) & (x < 32) if dark == "band" else (radius < radius_of_dark))] = 40
    return torch.from_numpy(image)


def test_anatomy_by_region_puts_dark_pixels_where_they_are() -> None:
    """CSF in the outer band counts in the cortex band only, CSF in the middle in the deep brain only; the
    region's d follows its own shares (here AD's deep CSF grows, the cortex band does not change)."""
    band, deep = brain_disc("band", 0), brain_disc("deep", 6)
    shares = csf_dark_shares_by_region(torch.stack([band, deep]).numpy())
    assert shares[0, 0] > 0.2 and shares[0, 1] == 0 and shares[1, 0] == 0 and shares[1, 1] > 0.05
    assert np.isnan(csf_dark_shares_by_region(np.zeros((1, 64, 64), np.uint8))).all()
    ad = [brain_disc("deep", radius) for radius in (7, 8, 9)]
    nc = [brain_disc("deep", radius) for radius in (4, 5, 6)]
    images = image_set(torch.stack([*ad, *nc, band, band]), [0, 0, 0, 1, 1, 1, 0, 1], [0] * 8, 0)
    regions = evaluate.anatomy_of(images, seed=0)["by_region"]
    deep_shares = csf_dark_shares_by_region(torch.stack([*ad, *nc, band]).numpy())[:, 1]
    ad_deep, nc_deep = np.append(deep_shares[:3], 0.0), np.append(deep_shares[3:6], 0.0)
    assert regions["deep"]["AD_mean"] == pytest.approx(ad_deep.mean()) and regions["deep"]["NC_mean"] == pytest.approx(
        nc_deep.mean()
    )
    assert (
        regions["deep"]["cohens_d_AD_minus_NC"] == pytest.approx(cohens_d(ad_deep, nc_deep))
        and regions["deep"]["cohens_d_AD_minus_NC"] > 0
    )
    assert regions["cortex_band"]["AD_mean"] == pytest.approx(regions["cortex_band"]["NC_mean"])
    assert regions["cortex_band"]["cohens_d_AD_minus_NC"] == pytest.approx(0, abs=1e-9)


def test_anatomy_without_spread_or_with_one_image_says_why_d_is_undefined() -> None:
    """Every AD image one picture and every NC image another: d would be a difference divided by
    var()'s rounding error (once 9.4e14); it is undefined, and the report says so."""
    same = image_set(torch.stack([csf_image(4)] * 3 + [csf_image(2)] * 3), [0, 0, 0, 1, 1, 1], [0] * 6, 0)
    report = evaluate.anatomy_of(same, seed=0)
    assert report["AD_mean"] == pytest.approx(0.2) and report["AD_std"] == pytest.approx(0, abs=1e-12)
    assert math.isnan(report["cohens_d_AD_minus_NC"]) and all(map(math.isnan, report["cohens_d_95ci"]))
    assert report["cohens_d_undefined"] == "no spread: every image of each label has the same CSF-dark share"
    single = image_set(torch.stack([csf_image(4), csf_image(2), csf_image(4)]), [0, 1, 1], [0] * 3, 1)
    assert evaluate.anatomy_of(single, seed=0)["cohens_d_undefined"] == (
        "fewer than 2 images with brain pixels in a label (AD 1, NC 2)"
    )
    varied = image_set(torch.stack([csf_image(4), csf_image(6), csf_image(2), csf_image(4)]), [0, 0, 1, 1], [0] * 4, 2)
    assert "cohens_d_undefined" not in evaluate.anatomy_of(varied, seed=0)


def test_tstr_of_real_images_equals_train_on_real_and_of_swapped_labels_is_below_chance(tiny_dataset: Path) -> None:
    """Known answers: "generated" images that are the real training sample give exactly the train-on-real
    accuracy; the same images with their labels swapped teach the opposite and score near 0."""
    datasets, _ = load_split_datasets(
        DataConfig(data_dir=str(tiny_dataset), image_size=32, cache_dir=None), return_slice=True, verbose=False
    )
    train, test = datasets["train"], datasets["test"]
    sample = image_set(train.pixels, train.labels.numpy(), train.labels.numpy(), 0)
    real_test = image_set(test.pixels, test.labels.numpy(), test.labels.numpy(), 1)
    same = evaluate.train_on_synthetic(sample, sample, real_test, len(train), CPU)
    assert same["test_accuracy"]["synthetic"] == same["test_accuracy"]["real"] >= 0.9
    assert same["images"] == {"synthetic": len(train), "real": len(train), "real_plus_synthetic": 2 * len(train)}
    assert same["test_accuracy_per_label"]["synthetic"] == same["test_accuracy_per_label"]["real"]
    swapped = image_set(train.pixels, 1 - train.labels.numpy(), train.labels.numpy(), 0)
    report = evaluate.train_on_synthetic(swapped, sample, real_test, len(train), CPU)
    assert report["test_accuracy"]["synthetic"] <= 0.1 and report["test_accuracy"]["real"] >= 0.9


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
    "prdc",
    "prdc_floor",
    "ms_ssim_generated",
    "ms_ssim_real",
}


def test_end_to_end_writes_every_file_and_reuses_the_classifier(run_copy: Path, capsys) -> None:
    run_evaluate(run_copy, "--umap")
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert set(metrics["groups"]) == {"all", "AD", "NC"}
    assert set(metrics["sharpness"]["spectral_energy"]) == {"generated", "reconstructed_test", "train_sample"}
    groups = metrics["groups"]
    for name, group in groups.items():
        assert set(group) == GROUP_KEYS
        assert group["generated_images"] == (8 if name == "all" else 4)
        assert all(isinstance(group[key], float) for key in ("frechet_distance", "frechet_floor", "kid", "kid_floor"))
        assert set(group["prdc"]) == {"precision", "recall", "density", "coverage"}
    assert all(isinstance(value, float) for value in groups["all"]["prdc"].values())  # 8 generated, 16 real: enough for k = 5
    assert all(value is None for value in groups["AD"]["prdc"].values())  # 4 generated per label: too few
    # Every tiny test slice has a pixel-identical training slice (same class, same slice index): distance 0, r = 1.
    copies = metrics["memorisation"]
    assert copies["all"]["real_test"]["nearest_distance"] == {"mean": 0.0, "p1": 0.0, "median": 0.0, "p99": 0.0}
    assert copies["all"]["real_test"]["top_correlation"]["p1"] == pytest.approx(1.0, abs=1e-5)  # float32 dot products
    assert copies["near_copy_distance"] == 0.0 and copies["all"]["real_test"]["near_copy_share_distance"] == 0.0
    # "all" pools AD and NC: 4 + 4 images asked for, 8 + 8 real test images.
    assert (
        groups["all"]["conditioning_accuracy"]
        == (groups["AD"]["conditioning_accuracy"] + groups["NC"]["conditioning_accuracy"]) / 2
    )
    assert groups["all"]["real_test_accuracy"] == (groups["AD"]["real_test_accuracy"] + groups["NC"]["real_test_accuracy"]) / 2
    assert metrics["settings"] == {
        "num_samples": 4,
        "steps": 2,
        "guidance": 2.0,
        "seed": 0,
        "sampler": "dpmpp_2m",
        "batch_size": 3,
    }
    controls = metrics["classifier"]
    assert controls["source"].startswith("trained") and (run_copy / "classifier.pt").is_file()
    assert controls["settings"]["with_reconstructions"] is True
    assert {"test_accuracy", "test_accuracy_position_balanced", "slice_position_only_test_accuracy"} <= set(controls)
    assert controls["test_accuracy"] == groups["all"]["real_test_accuracy"]
    assert controls["slice_position_only_test_accuracy"] == 0.5  # AD and NC share the slice window 70-73
    assert sum(tercile["images"] for tercile in controls["slice_terciles"]) == metrics["real_test_images"] == 16
    assert {"generated", "real_test", "reconstructed_test", "directions_agree"} == set(metrics["anatomy"])
    assert metrics["anatomy"]["real_test"]["cohens_d_AD_minus_NC"] is not None
    assert set(metrics["anatomy"]["reconstructed_test"]["by_region"]) == {"cortex_band", "deep"}
    assert "| reconstructed test |" in (run_copy / "metrics.md").read_text()
    assert metrics["tstr"]["images"] == {"synthetic": 8, "real": 8, "real_plus_synthetic": 16}
    assert metrics["tstr"]["draws_per_epoch"] == len(load_splits(run_copy / "splits.json")["train"]) * SLICES_PER_SCAN
    assert set(metrics["tstr"]["test_accuracy"]) == {"synthetic", "real", "real_plus_synthetic"}
    for name in ("memorisation.png", "umap_features.png"):
        with Image.open(run_copy / name) as figure:
            assert figure.width > 400
    markdown = (run_copy / "metrics.md").read_text()
    assert "| metric | all | AD | NC |" in markdown and "ImageNet-FID is not computed" in markdown
    assert "Train on synthetic, test on real" in markdown and "95% CI" in markdown
    assert "| VAE reconstructions of the test slices |" in markdown and "above 1/4 cycle/px" in markdown
    assert markdown in capsys.readouterr().out
    # Where Cohen's d is undefined (a degenerate dataset: one image per class), the report says why, not a number.
    degenerate = json.loads(json.dumps(metrics))
    degenerate["anatomy"]["real_test"] |= {
        "cohens_d_AD_minus_NC": None,
        "cohens_d_95ci": [None, None],
        "cohens_d_undefined": "no spread: every image of each label has the same CSF-dark share",
    }
    degenerate["anatomy"]["directions_agree"] = None
    report = evaluate.markdown_report(degenerate)
    assert "| n/a | n/a |\n" in report.split("| real test |")[1]
    assert (
        "Directions agree: n/a. Cohen's d undefined for real test: no spread: every image of each label has the same "
        "CSF-dark share." in report
    )

    with pytest.raises(SystemExit) as exit_info:
        run_evaluate(run_copy)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err

    run_evaluate(run_copy, "--overwrite")
    again = json.loads((run_copy / "metrics.json").read_text())
    assert again["classifier"]["source"].startswith("reused")
    for part in ("groups", "anatomy", "tstr", "memorisation"):  # same seed, same numbers
        assert again[part] == metrics[part], part


def quick_yardstick(monkeypatch) -> None:
    """A 2-epoch yardstick: enough where figures are compared with each other, not judged."""
    original = evaluate.load_or_train_yardstick
    settings = dataclasses.replace(classifier.ClassifierSettings(), epochs=2)
    monkeypatch.setattr(evaluate, "load_or_train_yardstick", lambda *args: original(*args, settings=settings))


def test_real_test_images_passed_as_generated_match_the_real_figures(run_copy: Path, monkeypatch) -> None:
    """With the real test slices as the "generated" images (all 8 per label, in test order), every
    generated-side figure equals its real-side twin: conditioning accuracy = real test accuracy,
    Fréchet distance ≈ 0, precision = recall = coverage = 1, the same nearest-training distances,
    near-copy shares and anatomy."""
    config = read_config(run_copy)
    test = load_split_datasets(config.data, load_splits(run_copy / "splits.json"), verbose=False)[0]["test"]
    asked = []

    def real_as_generated(pipe, label, args):
        asked.append(label)
        return test.pixels[test.labels == label][: args.num_samples]

    monkeypatch.setattr(evaluate, "generate_images", real_as_generated)
    quick_yardstick(monkeypatch)
    evaluate.main(["--run", str(run_copy), "--num-samples", "8", "--steps", "2", "--device", "cpu"])
    assert asked == [0, 1]
    metrics = json.loads((run_copy / "metrics.json").read_text())
    for name, group in metrics["groups"].items():
        assert group["generated_images"] == (16 if name == "all" else 8)
        assert group["conditioning_accuracy"] == group["real_test_accuracy"]
        assert abs(group["frechet_distance"]) <= 0.25 * group["frechet_floor"]
        assert group["prdc"]["precision"] == group["prdc"]["recall"] == group["prdc"]["coverage"] == 1.0
    for name in ("AD", "NC"):  # one label's features are far from singular trouble: ≈ 0 to rounding
        assert abs(metrics["groups"][name]["frechet_distance"]) <= 1e-3 * metrics["groups"][name]["frechet_floor"]
    for group in metrics["memorisation"].values():
        if isinstance(group, dict):
            assert group["generated"] == group["real_test"]
    assert metrics["anatomy"]["generated"] == metrics["anatomy"]["real_test"]
    assert metrics["anatomy"]["directions_agree"] is True


def test_recommended_guidance_balances_anatomy_and_fidelity() -> None:
    """The demo run's sweep (README): 1.5 has the closest anatomy effect, 3 the lowest Fréchet distance,
    and 2 the best balance (relative errors 0.18 + 0.14 against 0.15 + 0.37 and 0.85 + 0)."""
    scales = [1.0, 1.5, 2.0, 3.0, 5.0]
    d_generated, frechet = np.array([0.834, 1.39, 1.92, 3.01, 5.05]), np.array([1.811, 1.522, 1.261, 1.107, 2.741])
    assert evaluate.best_scale(scales, np.abs(d_generated - 1.63)) == 1.5 and evaluate.best_scale(scales, frechet) == 3.0
    assert evaluate.recommended_scale(scales, d_generated, 1.63, frechet) == 2.0
    # Without a real anatomy effect to match, there is nothing to recommend.
    assert np.isnan(evaluate.recommended_scale(scales, d_generated, math.nan, frechet))


def test_sweep_figure_draws_a_region_whose_effect_is_undefined(tmp_path: Path) -> None:
    """A region without spread has no Cohen's d (null in the sweep's JSON): the figure still draws, leaving it out."""
    row = {"guidance": 1.0, "conditioning_accuracy": 0.5, "cohens_d_AD_minus_NC": 0.2, "cohens_d_95ci": [0.1, 0.3]}
    rows = [row | {"frechet_distance": 2.0, "cohens_d_by_region": {"cortex_band": None, "deep": 0.2}}]
    rows.append(rows[0] | {"guidance": 2.0, "cohens_d_by_region": {"cortex_band": None, "deep": 0.4}})
    reference = {"real_test_accuracy": 0.8, "reconstructed_test_accuracy": 0.7, "cohens_d_95ci": [1.0, 2.0]}
    reference |= {"cohens_d_AD_minus_NC": 1.5, "frechet_floor": 0.1, "cohens_d_by_region": {"cortex_band": 1.1, "deep": None}}
    evaluate.save_sweep_figure({"scales": rows, "reference": reference}, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_guidance_sweep_writes_its_table_and_plot(run_copy: Path, monkeypatch, capsys) -> None:
    quick_yardstick(monkeypatch)
    run_evaluate(run_copy, "--guidance-sweep", "1,3")
    sweep = json.loads((run_copy / "guidance_sweep.json").read_text())
    assert [row["guidance"] for row in sweep["scales"]] == [1.0, 3.0]
    for row in sweep["scales"]:
        assert set(row) == {
            "guidance",
            "conditioning_accuracy",
            "cohens_d_AD_minus_NC",
            "cohens_d_95ci",
            "cohens_d_by_region",
            "frechet_distance",
            "prdc",
            "spectral_energy",
            "generation_seconds",
        }
        assert set(row["cohens_d_by_region"]) == {"cortex_band", "deep"}
    assert sweep["lowest_frechet"] in (1.0, 3.0) and sweep["closest_anatomy"] in (1.0, 3.0) and sweep["recommended"] in (1.0, 3.0)
    assert set(sweep["reference"]) >= {"cohens_d_AD_minus_NC", "frechet_floor", "reconstructed_test_accuracy"}
    assert not (run_copy / "metrics.json").exists()  # a sweep is not the full evaluation
    with Image.open(run_copy / "guidance_sweep.png") as figure:
        assert figure.width > 600
    markdown = (run_copy / "guidance_sweep.md").read_text()
    assert "| guidance |" in markdown and markdown in capsys.readouterr().out
    # The same scale in a sweep and in a full evaluation draws the same images.
    run_evaluate(run_copy, "--guidance", "3")
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["groups"]["all"]["frechet_distance"] == sweep["scales"][1]["frechet_distance"]
    assert metrics["anatomy"]["generated"]["cohens_d_AD_minus_NC"] == sweep["scales"][1]["cohens_d_AD_minus_NC"]


def test_sampler_sweep_writes_its_table_and_plot(run_copy: Path, monkeypatch, capsys) -> None:
    """Each sampler:steps at each seed, paired with the setting of most steps (which matches itself
    exactly); a row draws the same images as a full evaluation with that sampler, steps and seed."""
    quick_yardstick(monkeypatch)
    common = ["--run", str(run_copy), "--num-samples", "4", "--batch-size", "3", "--device", "cpu"]
    evaluate.main([*common, "--sampler-sweep", "ddim:3,dpmpp_2m:2", "--seeds", "0,1"])
    sweep = json.loads((run_copy / "sampler_sweep.json").read_text())
    assert [(row["sampler"], row["steps"], row["seed"]) for row in sweep["rows"]] == [
        ("ddim", 3, 0),
        ("ddim", 3, 1),
        ("dpmpp_2m", 2, 0),
        ("dpmpp_2m", 2, 1),
    ]
    assert all(row["seconds_per_64_images"] == pytest.approx(row["generation_seconds"] * 8, abs=1e-3) for row in sweep["rows"])
    assert sweep["settings"] == {"num_samples": 4, "guidance": 2.0, "seed": 0, "seeds": [0, 1], "batch_size": 3}
    assert sweep["baseline"] == {"sampler": "ddim", "steps": 3}
    baseline = sweep["comparison"][0]
    assert baseline["matches_baseline"] and set(baseline["paired_difference"].values()) <= {0.0, None}
    assert sweep["recommended"] in ({"sampler": "ddim", "steps": 3}, {"sampler": "dpmpp_2m", "steps": 2})
    assert not (run_copy / "metrics.json").exists()  # a sweep is not the full evaluation
    with Image.open(run_copy / "sampler_sweep.png") as figure:
        assert figure.width > 600
    markdown = (run_copy / "sampler_sweep.md").read_text()
    assert "| sampler | steps | seed |" in markdown and "**Recommended: " in markdown and markdown in capsys.readouterr().out
    evaluate.main([*common, "--sampler", "dpmpp_2m", "--steps", "2", "--seed", "1"])
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["groups"]["all"]["frechet_distance"] == sweep["rows"][3]["frechet_distance"]
    assert metrics["anatomy"]["generated"]["cohens_d_AD_minus_NC"] == sweep["rows"][3]["cohens_d_AD_minus_NC"]


def sweep_rows(sampler: str, steps: int, accuracies: list[float], frechet: list[float]) -> list[dict]:
    """Sampler-sweep rows of one setting at seeds 0, 1, ...: the given accuracies and Fréchet distances,
    anatomy d 1.5, precision 0.8, coverage NaN (as in a sweep with too few images for k)."""
    return [
        {
            "sampler": sampler,
            "steps": steps,
            "seed": seed,
            "conditioning_accuracy": accuracy,
            "cohens_d_AD_minus_NC": 1.5,
            "frechet_distance": distance,
            "prdc": {"precision": 0.8, "recall": 0.5, "density": 1.0, "coverage": math.nan},
            "seconds_per_64_images": steps / 10,
        }
        for seed, (accuracy, distance) in enumerate(zip(accuracies, frechet))
    ]


def test_sampler_comparison_is_paired_per_seed_against_the_baseline_spread() -> None:
    """Baseline ddim 50: accuracy 0.80 / 0.84 (spread 0.04), Fréchet 2.0 / 2.2 (spread 0.2). dpmpp 10 is off by
    0.3 in Fréchet (outside); dpmpp 15 by +0.01 accuracy and -0.05 Fréchet (inside, a quarter of each spread);
    ddim 15 by 0.03 and 0.15 (inside, but three quarters): dpmpp 15 is recommended. Coverage, NaN in the
    baseline, is left out of the match."""
    rows = [
        *sweep_rows("ddim", 50, [0.80, 0.84], [2.0, 2.2]),
        *sweep_rows("dpmpp_2m", 10, [0.80, 0.84], [2.3, 2.5]),
        *sweep_rows("dpmpp_2m", 15, [0.82, 0.84], [2.0, 2.1]),
        *sweep_rows("ddim", 15, [0.83, 0.87], [2.15, 2.35]),
    ]
    comparison, spread = evaluate.compare_settings(rows, ("ddim", 50), [0, 1])
    assert spread == pytest.approx(
        {"conditioning_accuracy": 0.04, "cohens_d_AD_minus_NC": 0, "frechet_distance": 0.2, "precision": 0, "coverage": math.nan},
        nan_ok=True,
    )
    by_setting = {(entry["sampler"], entry["steps"]): entry for entry in comparison}
    assert by_setting["dpmpp_2m", 10]["paired_difference"]["frechet_distance"] == pytest.approx(0.3)
    assert by_setting["dpmpp_2m", 10]["within_spread"]["frechet_distance"] is False
    matches = [entry["matches_baseline"] for entry in comparison]
    assert [(entry["sampler"], entry["steps"]) for entry in comparison] == [
        ("ddim", 50),
        ("dpmpp_2m", 10),
        ("dpmpp_2m", 15),
        ("ddim", 15),
    ]
    assert matches == [True, False, True, True]
    assert by_setting["dpmpp_2m", 15]["within_spread"] == {
        "conditioning_accuracy": True,
        "cohens_d_AD_minus_NC": True,
        "frechet_distance": True,
        "precision": True,
        "coverage": None,
    }
    assert by_setting["dpmpp_2m", 15]["paired_difference"]["conditioning_accuracy"] == pytest.approx(0.01)
    assert by_setting["dpmpp_2m", 15]["mean"]["seconds_per_64_images"] == pytest.approx(1.5)
    assert evaluate.recommended_setting(comparison, spread) == {"sampler": "dpmpp_2m", "steps": 15}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-samples", "1"], "--num-samples must be at least 2"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--guidance", "-1"], "--guidance -1.0: must be a number from 0 to 30"),
        (["--guidance", "1e30"], "--guidance 1e+30: must be a number from 0 to 30"),
        (["--run", "no/such/run"], "not found"),
        (["--guidance-sweep", "1,x"], "comma-separated numbers"),
        (["--guidance-sweep", "1,-2"], "must be numbers from 0 to 30"),
        (["--guidance-sweep", "1,nan"], "must be numbers from 0 to 30"),
        (["--guidance-sweep", "2,1e30"], "must be numbers from 0 to 30, got '2,1e30'"),
        (["--guidance-sweep", "1,2", "--guidance", "2"], "exclude each other"),
        (["--guidance-sweep", "1,2", "--umap"], "--umap belongs to the full evaluation"),
        (["--sampler-sweep", "euler:10"], "sampler:steps with a sampler of ddim, ddpm, dpmpp_2m"),
        (["--sampler-sweep", "ddim:0"], "at least 1 step"),
        (["--sampler-sweep", "ddim:10,ddim:10"], "each sampler:steps once"),
        (["--sampler-sweep", "ddim:2000"], "--sampler-sweep ddim:2000: the run has 1000 diffusion steps"),
        (["--sampler-sweep", "ddim:10", "--seeds", "0"], "give two or more, e.g. 0,1"),
        (["--sampler-sweep", "ddim:10", "--seeds", "0,0"], "distinct"),
        (["--sampler-sweep", "ddim:10", "--steps", "5"], "drop --sampler and --steps"),
        (["--sampler-sweep", "ddim:10", "--guidance-sweep", "1,2"], "exclude each other"),
        (["--sampler-sweep", "ddim:10", "--umap"], "--umap belongs to the full evaluation"),
        (["--seeds", "0,1"], "--seeds belongs to --sampler-sweep"),
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


def test_umap_fit_keeps_torch_thread_count() -> None:
    """The first UMAP fit of a process starts numba's OpenMP layer, which raised torch from 1 to 2
    threads for everything computed after it; utils.umap_embedding (used by evaluate.py --umap and
    predict.py --umap) restores the count. A fresh process, because only the first fit does it."""
    script = (
        "import numpy as np, torch\n"
        "torch.set_num_threads(1)\n"
        "from utils import umap_embedding\n"
        "embedding = umap_embedding(np.random.default_rng(0).random((40, 6)), seed=0, n_neighbors=5)\n"
        "assert embedding.shape == (40, 2), embedding.shape\n"
        "print(torch.get_num_threads())\n"
    )
    environment = {key: value for key, value in os.environ.items() if key not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "1", f"torch runs {result.stdout.split()[-1]} threads after a UMAP fit, not 1"


def test_over_training_measures_every_kept_epoch_and_draws_the_runs_together(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    """A run trained with --run.keep_every 1 is measured at UNet epochs 1 (its snapshot) and 2 (unet.pt),
    each with the images seen and minutes so far; --quality-curves draws runs' records in one figure
    and table. Without snapshots, or with --out missing, each is one line and exit 2."""
    run_dir = tmp_path / "kept"
    run_train(tiny_dataset, run_dir, "--run.keep_every", "1")
    run_evaluate(run_dir, "--over-training")
    record = json.loads((run_dir / "over_training.json").read_text())
    rows = record["rows"]
    config = read_config(run_dir)
    steps_per_epoch = len(load_splits(run_dir / "splits.json")["train"]) * SLICES_PER_SCAN // config.unet_train.batch_size
    assert [row["epoch"] for row in rows] == [1, 2]
    assert [row["images_seen"] for row in rows] == [n * steps_per_epoch * config.unet_train.batch_size for n in (1, 2)]
    assert 0 < rows[0]["training_seconds"] < rows[1]["training_seconds"]
    assert rows[0]["frechet_distance"] != rows[1]["frechet_distance"], "both epochs measured the same weights"
    assert set(rows[0]["spectral_energy"]) == {"low", "mid", "high"}
    assert "| 2 |" in (run_dir / "over_training.md").read_text()
    out = tmp_path / "curves.png"
    twin = shutil.copytree(run_dir, tmp_path / "twin")
    evaluate.main(["--quality-curves", str(run_dir), str(twin), "--out", str(out)])
    with Image.open(out) as figure:
        assert figure.width > 1000
    assert (tmp_path / "curves.md").read_text().count("| epoch |") == 2
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("snapshots", "over_training.*"))
    for argv, message in (
        (["--run", str(bare), "--over-training", "--device", "cpu"], "--run.keep_every"),
        (["--quality-curves", str(run_dir)], "--out FILE.png"),
        (["--quality-curves", str(bare), "--out", str(out), "--overwrite"], "--over-training` first"),
        (["--run", str(run_dir), "--over-training", "--guidance-sweep", "1,2", "--overwrite"], "exclude each other"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


# ----------------------------------------------------------------------------- counterfactuals against the truth


def make_pairs(root: Path, scans: int = 3) -> Path:
    """A pairs folder in --demo-pairs' layout: each scan's 2 slices as an AD ellipse (smaller) and an NC one."""
    from conftest import write_slice

    scan_ids = [str(200001 + index) for index in range(scans)]
    for scan_id in scan_ids:
        for slice_index in (70, 71):
            for class_name, radius in (("AD", 0.3), ("NC", 0.42)):
                write_slice(root / class_name / f"{scan_id}_{slice_index}.jpeg", 110 + slice_index, radius)
    (root / "pairs.json").write_text(json.dumps({"test_scans": [{"scan_id": scan_id} for scan_id in scan_ids]}))
    return root


def test_counterfactuals_write_the_table_and_the_figure(run_copy: Path, tmp_path: Path, capsys) -> None:
    pairs = make_pairs(tmp_path / "pairs")
    argv = ["--counterfactuals", "--pairs", str(pairs), "--strengths", "0.3,0.6", "--pair-slices", "2", "--batch-size", "2"]
    evaluate.main(["--run", str(run_copy), "--steps", "3", "--device", "cpu", *argv])
    report = json.loads((run_copy / "counterfactuals.json").read_text())
    assert report["slices"] == 2 and len({name.split("_")[0] for name in report["slice_names"]}) == 2
    settings = {(row["direction"], row["method"], row["strength"]) for row in report["rows"]}
    assert settings == {(d, m, s) for d in ("NC → AD", "AD → NC") for m in ("ddim-inversion", "sdedit") for s in (0.3, 0.6)}
    chosen = report["recommended"]
    assert (chosen["method"], chosen["strength"]) in {(m, s) for _, m, s in settings}
    assert report["settings"]["steps"] == 3 and report["settings"]["strengths"] == [0.3, 0.6]
    assert report["settings"]["guidance"] == 3.0  # counterfactuals' own default, not the run's 2
    for row in report["rows"]:
        assert 0 <= row["flip_rate"] <= 1 and 0 <= row["closer_share"] <= 1
        # The yardstick's references: the true counterfactuals and the sources, judged as the target label.
        assert {row["yardstick_truth_rate"], row["yardstick_source_rate"]} <= {0.0, 0.5, 1.0}
    table = (run_copy / "counterfactuals.md").read_text()
    assert "| difference-map correlation, predicted vs true, inside the brain (median over slices) |" in table
    assert "| yardstick flip rate: counterfactuals it assigns to the target label |" in table
    assert f"**Recommended: {chosen['method']} at strength {chosen['strength']:g}**" in table
    assert table in capsys.readouterr().out
    with Image.open(run_copy / "counterfactuals.png") as figure:
        assert figure.width > 200 and figure.height > 8 * 100  # 8 rows: 4 per direction
    assert not (run_copy / "metrics.json").exists()  # --counterfactuals is an evaluation of its own


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pairs", "somewhere"], "--pairs only apply with --counterfactuals"),
        (["--strengths", "0.5", "--pair-slices", "4"], "--strengths, --pair-slices only apply with --counterfactuals"),
        (["--counterfactuals", "--strengths", "0,0.5"], "strengths are shares of the noise schedule, in (0, 1]"),
        (["--counterfactuals", "--strengths", "0.5,x"], "comma-separated numbers"),
        (["--counterfactuals", "--pair-slices", "1"], "--pair-slices must be at least 2"),
        (["--counterfactuals", "--umap"], "without --guidance-sweep, --sampler-sweep, --over-training and --umap"),
        (["--counterfactuals", "--over-training"], "an evaluation of its own"),
        (
            ["--counterfactuals", "--pairs", "no/such/pairs"],
            "holds no pairs.json: build the pairs with python project_setup.py --demo-pairs",
        ),
    ],
)
def test_counterfactual_bad_input_exits_2(trained_run: Path, argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--run", str(trained_run), "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
