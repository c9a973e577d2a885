"""classifier.py: the yardstick's augmentations, its training, its robustness to an imperfect VAE, and
the slice-position weights."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import classifier
from config import DataConfig, read_config
from conftest import make_tiny_dataset, run_train
from dataset import SliceDataset, load_split_datasets, load_splits, to_model_range
from pipeline import load_trained_vae
from utils import UsageError, load_checkpoint, save_checkpoint, to_uint8

CPU = torch.device("cpu")
QUICK = classifier.ClassifierSettings(epochs=4)
FINGERPRINT_OF_QUICK = "6f544be028f69c591d5a"  # of fixed splits, size 32 and VAE "vae": changes with any default of QUICK


def test_position_balancing_makes_every_slice_half_ad() -> None:
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1, 0, 0])
    slices = np.array([70, 70, 70, 70, 71, 71, 71, 72, 73, 73])  # slice 72 holds NC only, 73 AD only
    weights = classifier.position_balancing_weights(labels, slices)
    for index in (70, 71):
        here = slices == index
        assert weights[here & (labels == 0)].sum() == pytest.approx(weights[here & (labels == 1)].sum())
        assert weights[here].sum() == pytest.approx(here.sum())  # each index keeps its share
    assert weights[slices >= 72].sum() == 0, "a slice index holding one class only must get weight 0"


def test_checkerboard_has_the_asked_period_and_phase() -> None:
    board = classifier.checkerboard(8, 4, (0, 0))
    assert board[0].tolist() == [-1, -1, 1, 1, -1, -1, 1, 1] and board[:, 0].tolist() == [-1, -1, 1, 1, -1, -1, 1, 1]
    assert torch.equal(classifier.checkerboard(8, 4, (0, 1)), board.roll(-1, 1))
    assert torch.equal(classifier.checkerboard(6, 2, (0, 0))[0], torch.tensor([-1.0, 1, -1, 1, -1, 1]))


def test_decoder_artefacts_are_seeded_varied_and_leave_some_images_clean() -> None:
    images = to_model_range(torch.randint(0, 256, (512, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    settings = classifier.ClassifierSettings()

    def augmented(seed: int) -> torch.Tensor:
        return classifier.with_decoder_artefacts(images, settings, torch.Generator().manual_seed(seed))

    first = augmented(1)
    assert torch.equal(first, augmented(1)) and not torch.equal(first, augmented(2))
    untouched = [(first[i] == images[i]).all() or (first[i] == images[i].flip(-1)).all() for i in range(len(images))]
    assert 0.01 < sum(untouched) / len(images) < 0.1  # each of 5 artefacts hits half the images: 1/32 escape all
    off = dataclasses.replace(settings, blur_sigma=0, noise_std=0, brightness=0, contrast=0, grid_amplitude=0)
    plain = classifier.with_decoder_artefacts(images, off, torch.Generator().manual_seed(1))
    assert all((plain[i] == images[i]).all() or (plain[i] == images[i].flip(-1)).all() for i in range(len(images)))


def test_classifier_learns_the_tiny_dataset(tiny_dataset: Path) -> None:
    datasets, _ = load_split_datasets(
        DataConfig(data_dir=str(tiny_dataset), image_size=32, cache_dir=None), return_slice=True, verbose=False
    )
    train, val, test = datasets["train"], datasets["val"], datasets["test"]
    model, val_accuracy = classifier.train_classifier(
        train.pixels, train.labels, classifier.ClassifierSettings(), CPU, validation=[(val.pixels, val.labels)]
    )
    predictions, features = classifier.classify(model, test.pixels, CPU)
    assert np.mean(predictions == test.labels.numpy()) >= 0.9 and val_accuracy >= 0.9
    assert features.shape == (len(test), classifier.ClassifierSettings().channels[-1])
    # Without validation sets the last epoch is kept and no accuracy is claimed.
    _, none = classifier.train_classifier(train.pixels, train.labels, QUICK, CPU)
    assert none is None


def test_yardstick_reads_reconstructions_of_an_undertrained_vae_like_real_slices(tmp_path: Path) -> None:
    """A VAE trained for a handful of steps renders the slices badly (blurred, off in brightness); the
    yardstick, which learns from its reconstructions too, must still judge them as it judges the
    originals: accuracy on reconstructed test slices within 5 points of accuracy on the real ones."""
    data = make_tiny_dataset(tmp_path / "AD_NC", {"train/AD": 8, "train/NC": 8, "test/AD": 6, "test/NC": 6})
    run_train(data, tmp_path / "run", "--stage", "vae", "--vae_train.epochs", "1", "--vae_train.lr", "1e-4")
    config = read_config(tmp_path / "run")
    vae = load_trained_vae(config, tmp_path / "run", CPU).eval()

    @torch.no_grad()
    def reconstruct(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(to_uint8(vae.decode(vae.encode(to_model_range(pixels.unsqueeze(1)))[0])))

    datasets, _ = load_split_datasets(
        config.data, load_splits(tmp_path / "run" / "splits.json"), return_slice=True, verbose=False
    )
    test = datasets["test"]
    reconstructed = reconstruct(test.pixels)
    error = (reconstructed.float() - test.pixels.float()).abs().mean()
    assert error > 10, f"the VAE is meant to be under-trained, but its reconstructions are off by only {error:.1f} grey levels"
    model, _ = classifier.train_yardstick(datasets, reconstruct, classifier.ClassifierSettings(), CPU)
    real_accuracy = classifier.accuracy(model, test.pixels, test.labels, CPU)
    reconstructed_accuracy = classifier.accuracy(model, reconstructed, test.labels, CPU)
    assert real_accuracy >= 0.9 and abs(real_accuracy - reconstructed_accuracy) <= 0.05


@pytest.mark.parametrize("content", ["list", "other_weights", "garbage", "no_accuracy"])
def test_a_damaged_or_foreign_yardstick_cache_is_retrained(tmp_path: Path, monkeypatch, content: str) -> None:
    """classifier.pt only saves time: a file that holds a list, weights of another shape or no checkpoint at
    all is a stale cache, replaced by a newly trained yardstick, never a traceback."""
    splits = {"train": ["1"], "val": ["2"], "test": ["3"]}
    fingerprint = classifier.classifier_fingerprint(splits, 32, "vae", QUICK)
    path = tmp_path / classifier.CLASSIFIER_FILE
    if content == "list":
        save_checkpoint([1, 2], path)
    elif content == "other_weights":
        save_checkpoint({"fingerprint": fingerprint, "model": {"weight": torch.zeros(3)}, "val_accuracy": 0.5}, path)
    elif content == "no_accuracy":
        model = classifier.SliceClassifier(QUICK.channels)
        save_checkpoint({"fingerprint": fingerprint, "model": model.state_dict()}, path)
    else:
        path.write_bytes(b"not a checkpoint")
    trained = classifier.SliceClassifier(QUICK.channels)
    monkeypatch.setattr(classifier, "train_yardstick", lambda *args: (trained, 0.75))
    model, info = classifier.load_or_train_yardstick(tmp_path, {}, splits, 32, "vae", lambda pixels: pixels, CPU, False, QUICK)
    assert model is trained and info["source"] == "trained, saved as classifier.pt" and info["val_accuracy"] == 0.75
    assert load_checkpoint(path)["fingerprint"] == fingerprint


def test_one_class_per_slice_index_leaves_nothing_to_learn() -> None:
    train = SliceDataset(np.zeros((4, 8, 8), np.uint8), [0, 0, 1, 1], [70, 70, 71, 71])
    with pytest.raises(UsageError) as error:
        classifier.check_position_balance(train)
    assert str(error.value) == (
        "no slice index of the training split holds both AD and NC images: slice position alone separates the classes, "
        "so no yardstick can be trained on anatomy; use a dataset whose classes share slice positions"
    )
    classifier.check_position_balance(SliceDataset(np.zeros((4, 8, 8), np.uint8), [0, 1, 1, 1], [70, 70, 71, 71]))


def test_the_yardstick_trains_on_weighted_slices_and_their_reconstructions(monkeypatch) -> None:
    """train_yardstick hands train_classifier the position-balanced weights, the slices followed by their
    reconstructions (weights repeated), and validation on real and on reconstructed val slices."""
    pixels = torch.arange(6 * 4 * 4, dtype=torch.uint8).reshape(6, 4, 4)
    train = SliceDataset(pixels.numpy(), [0, 1, 0, 1, 0, 0], [70, 70, 71, 71, 72, 72])
    val = SliceDataset(pixels[:2].numpy(), [0, 1], [70, 70])
    seen = {}

    def fake_train(pixels, labels, settings, device, weights, validation, description) -> tuple[str, float]:
        seen.update(pixels=pixels, labels=labels, settings=settings, device=device, weights=weights, validation=validation)
        return "model", 0.5

    monkeypatch.setattr(classifier, "train_classifier", fake_train)

    def darker(images: torch.Tensor) -> torch.Tensor:  # a stand-in "reconstruction"
        return images // 2

    assert classifier.train_yardstick({"train": train, "val": val}, darker, QUICK, CPU) == ("model", 0.5)
    weights = classifier.position_balancing_weights(train.labels.numpy(), train.slice_indices.numpy())
    assert torch.equal(seen["pixels"], torch.cat([train.pixels, train.pixels // 2]))
    assert seen["labels"].tolist() == [0, 1, 0, 1, 0, 0] * 2 and seen["device"] == CPU and seen["settings"] is QUICK
    assert seen["weights"].tolist() == [*weights, *weights] and weights[4:].sum() == 0
    (real, real_labels), (reconstructed, reconstructed_labels) = seen["validation"]
    assert torch.equal(real, val.pixels) and torch.equal(reconstructed, val.pixels // 2)
    assert real_labels.tolist() == reconstructed_labels.tolist() == [0, 1]
    alone = dataclasses.replace(QUICK, with_reconstructions=False)
    classifier.train_yardstick({"train": train, "val": val}, darker, alone, CPU)
    assert torch.equal(seen["pixels"], train.pixels) and seen["weights"].tolist() == list(weights)
    assert len(seen["validation"]) == 1


def test_a_cache_of_the_same_inputs_is_reused_and_a_change_of_any_retrains(tmp_path: Path, monkeypatch) -> None:
    splits = {"train": ["1"], "val": ["2"], "test": ["3"]}
    # Fixed inputs, fixed fingerprint (sorted JSON, 20 hex digits): a cache stays valid across versions.
    assert classifier.classifier_fingerprint(splits, 32, "vae", QUICK) == FINGERPRINT_OF_QUICK
    calls = []

    def train(*args) -> tuple[classifier.SliceClassifier, float]:
        calls.append(args)
        torch.manual_seed(len(calls))
        return classifier.SliceClassifier(QUICK.channels), 0.75

    monkeypatch.setattr(classifier, "train_yardstick", train)

    datasets = {"train": "train split", "val": "val split"}

    def reconstruct(pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def load(**changes):
        arguments = {"splits": splits, "image_size": 32, "vae_fingerprint": "vae", "retrain": False, "settings": QUICK} | changes
        return classifier.load_or_train_yardstick(
            run_dir=tmp_path, datasets=datasets, reconstruct=reconstruct, device=CPU, **arguments
        )

    trained, info = load()
    settings = dataclasses.asdict(QUICK)
    assert info == {"source": "trained, saved as classifier.pt", "val_accuracy": 0.75, "settings": settings}
    assert calls == [(datasets, reconstruct, QUICK, CPU)], "train_yardstick must get the datasets, reconstruct, settings, device"
    saved = load_checkpoint(tmp_path / classifier.CLASSIFIER_FILE)
    assert saved.keys() == {"fingerprint", "settings", "model", "val_accuracy"} and saved["settings"] == settings
    assert saved["fingerprint"] == FINGERPRINT_OF_QUICK and saved["val_accuracy"] == 0.75
    reused, info = load()
    assert info == {"source": "reused classifier.pt", "val_accuracy": 0.75, "settings": settings} and len(calls) == 1
    assert not reused.training and reused.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(reused.state_dict()[name], value) for name, value in trained.state_dict().items())
    for change in (
        {"retrain": True},
        {"splits": {**splits, "test": ["4"]}},
        {"image_size": 64},
        {"vae_fingerprint": "other vae"},
        {"settings": dataclasses.replace(QUICK, epochs=5)},
    ):
        count = len(calls)
        assert load(**change)[1]["source"].startswith("trained"), change
        assert len(calls) == count + 1
        load()  # back to the original inputs: retrained once more, cached again


def test_classify_returns_the_heads_argmax_and_the_pooled_features(monkeypatch) -> None:
    torch.manual_seed(0)
    model = classifier.SliceClassifier(QUICK.channels).train()
    pixels = torch.randint(0, 256, (5, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(classifier, "CHUNK", 2)  # three chunks
    predictions, features = classifier.classify(model, pixels, CPU)
    assert not model.training, "classify must measure in evaluation mode"
    with torch.no_grad():
        expected_features = model.features(to_model_range(pixels.unsqueeze(1)))
        expected_predictions = model.head(expected_features).argmax(1)
    assert features.dtype == np.float64 and np.allclose(features, expected_features.double().numpy(), atol=1e-6)
    assert predictions.tolist() == expected_predictions.tolist()
    labels = torch.tensor(expected_predictions.tolist())
    labels[:2] = 1 - labels[:2]  # two of five wrong
    assert classifier.accuracy(model, pixels, labels, CPU) == pytest.approx(0.6)


NO_ARTEFACTS = dataclasses.replace(QUICK, blur_sigma=0, noise_std=0, brightness=0, contrast=0, grid_amplitude=0)


def artefact_alone(name: str, images: torch.Tensor) -> torch.Tensor:
    """with_decoder_artefacts with only `name` at its default strength (and the flip, invisible on
    left-right symmetric images): the augmented images minus nothing else."""
    settings = dataclasses.replace(NO_ARTEFACTS, **{name: getattr(QUICK, name)})
    return classifier.with_decoder_artefacts(images, settings, torch.Generator().manual_seed(2))


def symmetric_images(count: int) -> torch.Tensor:
    half = torch.rand(count, 1, 12, 6, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8
    return torch.cat([half, half.flip(-1)], dim=-1)  # (count, 1, 12, 12), a flip changes nothing


def check_half_and_range(strengths: torch.Tensor, low: float, high: float, what: str) -> None:
    """A random half of the batch untouched (strength 0); the rest spread over [low, high]."""
    touched = strengths != 0
    assert 0.4 < touched.float().mean() < 0.6, f"{what}: {touched.float().mean():.2f} of the images, not half"
    assert strengths.min() >= low - 1e-5 and strengths.max() <= high + 1e-5, f"{what} outside [{low}, {high}]"
    span = high - low
    assert strengths[touched].min() < low + 0.1 * span and strengths[touched].max() > high - 0.1 * span, f"{what} range"


def test_each_decoder_artefact_hits_half_the_images_up_to_its_strength() -> None:
    images = symmetric_images(400)
    flat = images.flatten(1)
    # Brightness: a constant offset up to ±0.1. Contrast: a gain up to 1 ± 0.15.
    offset = (artefact_alone("brightness", images) - images).flatten(1)
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-5)
    check_half_and_range(offset[:, 0], -QUICK.brightness, QUICK.brightness, "brightness")
    gain = (artefact_alone("contrast", images).flatten(1) / flat).median(1).values - 1
    check_half_and_range(gain, -QUICK.contrast, QUICK.contrast, "contrast")
    # Noise: Gaussian, standard deviation up to 0.05.
    noise = (artefact_alone("noise_std", images) - images).flatten(1)
    spread = noise.std(1)  # of 144 draws: within 25% of the strength drawn for the image
    assert 0.4 < (spread != 0).float().mean() < 0.6 and spread.max() < 1.25 * QUICK.noise_std, "noise: half, up to 0.05"
    assert spread.max() > 0.8 * QUICK.noise_std and spread[spread != 0].min() < 0.1 * QUICK.noise_std
    # Blur: a blend towards the Gaussian blur of sigma 1 by a random amount in [0, 1].
    towards = (classifier.gaussian_blur(images, QUICK.blur_sigma) - images).flatten(1)
    moved = (artefact_alone("blur_sigma", images) - images).flatten(1)
    amount = (moved * towards).sum(1) / towards.square().sum(1)
    assert torch.allclose(moved, amount[:, None] * towards, atol=1e-5), "blur must move along the blur direction"
    check_half_and_range(amount, 0, 1, "blur")
    # Grid: a ±1 checkerboard of period 2, 4 or 8 times an amplitude up to ±0.06.
    grid = (artefact_alone("grid_amplitude", images) - images).reshape(-1, 12, 12)
    amplitude = grid.abs().flatten(1).max(1).values * torch.sign(grid[:, 0, 0])
    assert torch.allclose(grid.abs().flatten(1), amplitude.abs()[:, None].expand(-1, 144), atol=1e-5)
    check_half_and_range(amplitude, -QUICK.grid_amplitude, QUICK.grid_amplitude, "grid")
    periods = set()  # one period per batch
    for seed in range(12):
        settings = dataclasses.replace(NO_ARTEFACTS, grid_amplitude=QUICK.grid_amplitude)
        batch = classifier.with_decoder_artefacts(images[:8], settings, torch.Generator().manual_seed(seed)) - images[:8]
        row = torch.sign(batch[batch.flatten(1).abs().amax(1) > 0][0, 0, 0])
        changes = (row[1:] != row[:-1]).nonzero().flatten()
        periods.add(int(2 * (changes[1] - changes[0])))  # squares are half a period wide
    assert periods == set(classifier.GRID_PERIODS), periods


def test_the_flip_mirrors_half_the_images() -> None:
    images = to_model_range(torch.randint(0, 256, (400, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)))
    out = classifier.with_decoder_artefacts(images, NO_ARTEFACTS, torch.Generator().manual_seed(5))
    flipped = torch.tensor([torch.equal(out[i], images[i].flip(-1)) for i in range(400)])
    kept = torch.tensor([torch.equal(out[i], images[i]) for i in range(400)])
    assert (flipped ^ kept).all() and 0.4 < flipped.float().mean() < 0.6


def test_controls_set_the_classifier_beside_slice_position_alone() -> None:
    """Training slices 70-72 all AD, 73-75 all NC: position alone predicts AD below 72.5. On 7 test images the
    classifier gets 3 right, position 4; position-balanced (slices 70, 72, 74 hold both labels, 73 only NC) the
    classifier gets 3 of 6; terciles of the training slices (edges 71.67 and 73.33) split them 2, 3, 2."""
    train = SliceDataset(np.zeros((6, 4, 4), np.uint8), [0, 0, 0, 1, 1, 1], [70, 71, 72, 73, 74, 75])
    test = SliceDataset(np.zeros((7, 4, 4), np.uint8), [0, 1, 1, 0, 0, 1, 1], [70, 70, 74, 74, 72, 72, 73])
    assert classifier.slice_position_only_predictions(train, test).tolist() == [0, 0, 1, 1, 0, 0, 1]
    controls = classifier.classifier_controls(np.array([0, 0, 1, 1, 1, 1, 0]), train, test)
    assert controls == {
        "test_accuracy": pytest.approx(3 / 7),
        "test_accuracy_position_balanced": pytest.approx(0.5),
        "slice_position_only_test_accuracy": pytest.approx(4 / 7),
        "slice_terciles": [
            {"slices": "70-70", "images": 2, "AD_share": 0.5, "classifier_accuracy": 0.5, "slice_position_only_accuracy": 0.5},
            {
                "slices": "72-73",
                "images": 3,
                "AD_share": pytest.approx(1 / 3),
                "classifier_accuracy": pytest.approx(1 / 3),
                "slice_position_only_accuracy": pytest.approx(2 / 3),
            },
            {"slices": "74-74", "images": 2, "AD_share": 0.5, "classifier_accuracy": 0.5, "slice_position_only_accuracy": 0.5},
        ],
    }
    # Tercile edges on an integer slice: training slices 0-12 put the edges at 4 and 8; a slice on an edge
    # belongs to the tercile above it.
    wide = SliceDataset(np.zeros((13, 4, 4), np.uint8), [0, 1] * 6 + [0], list(range(13)))
    four = SliceDataset(np.zeros((4, 4, 4), np.uint8), [0, 1, 0, 1], [3, 4, 8, 12])
    parts = classifier.classifier_controls(np.array([0, 1, 0, 1]), wide, four)["slice_terciles"]
    assert [(part["slices"], part["images"]) for part in parts] == [("3-3", 1), ("4-4", 1), ("8-12", 2)]
    unbalanced = SliceDataset(np.zeros((2, 4, 4), np.uint8), [0, 1], [70, 75])  # no slice index holds both
    assert math.isnan(classifier.classifier_controls(np.array([0, 1]), train, unbalanced)["test_accuracy_position_balanced"])


def test_gaussian_blur_is_the_truncated_normalised_kernel_with_reflected_borders() -> None:
    """Blur of a single bright pixel in float64 against the kernel written out: taps up to ceil(3σ) (at least 1),
    weights exp(−x²/2σ²) normalised; at the border the image is reflected, so a flat image stays flat."""
    for sigma in (0.3, 0.5, 1.0, 1.5):
        radius = max(1, math.ceil(3 * sigma))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-taps.square() / (2 * sigma**2))
        kernel /= kernel.sum()
        image = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
        image[0, 0, 7, 7] = 1
        blurred = classifier.gaussian_blur(image, sigma)
        expected = torch.zeros(15, 15, dtype=torch.float64)
        expected[7 - radius : 8 + radius, 7 - radius : 8 + radius] = kernel[:, None] * kernel[None, :]
        assert blurred.dtype == torch.float64 and torch.allclose(blurred[0, 0], expected, atol=1e-12), sigma
    flat = torch.full((1, 1, 9, 9), 0.7, dtype=torch.float64)  # reflected borders: a flat image stays flat
    assert torch.allclose(classifier.gaussian_blur(flat, 1.5), flat, atol=1e-12), "the border must be reflected, not zero"


def test_the_checkerboards_phase_comes_from_the_generator() -> None:
    images = symmetric_images(16)
    settings = dataclasses.replace(NO_ARTEFACTS, grid_amplitude=QUICK.grid_amplitude)
    for seed in range(8):  # periods of 2 leave 4 phases: one seed could match by chance, eight cannot
        torch.manual_seed(seed)
        first = classifier.with_decoder_artefacts(images, settings, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed + 100)  # the global generator must not matter
        again = classifier.with_decoder_artefacts(images, settings, torch.Generator().manual_seed(seed))
        assert torch.equal(again, first), "the checkerboard's phase must come from the given generator"
