"""The VAE's optional sharpness terms: the Fourier amplitude loss and the PatchGAN discriminator (hinge
loss, switched on after vae.adversarial_start steps, its state in vae.pt so a resume stays exact),
and the optimizer's betas as a config field."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import train
from config import VAEConfig, config_to_dict, make_config, read_config
from conftest import run_train
from modules import (
    PatchDiscriminator,
    discriminator_hinge_loss,
    fourier_amplitude_distance,
    generator_hinge_loss,
    vae_loss,
)
from utils import load_checkpoint

ADVERSARIAL = ["--vae.adversarial_weight", "0.1", "--vae.discriminator_channels", "8"]


def test_fourier_term_is_zero_for_a_perfect_reconstruction_and_charges_blur() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 1, 32, 32) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    assert fourier_amplitude_distance(images, images) == 0
    assert fourier_amplitude_distance(blurred, images) > 0.05
    config = VAEConfig(ssim_weight=0.0, kl_weight=0.0, fourier_weight=2.0)
    mean, logvar = torch.zeros(4, 4, 8, 8), torch.zeros(4, 4, 8, 8)
    total, parts = vae_loss(images, blurred, mean, logvar, config)
    assert math.isclose(float(total), float(parts["reconstruction"] + 2.0 * parts["fourier"]), rel_tol=1e-6)
    assert "fourier" not in vae_loss(images, blurred, mean, logvar, dataclasses.replace(config, fourier_weight=0.0))[1]


def test_patch_discriminator_gives_one_logit_per_patch_and_hinge_losses_follow_their_formulas() -> None:
    discriminator = PatchDiscriminator(VAEConfig(discriminator_channels=8))
    assert discriminator(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 7, 7)
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = (0, 0.5, 2) → mean 5/6; relu(1 + fake) = (0, 1, 2) → mean 1; halved
    assert math.isclose(float(discriminator_hinge_loss(real, fake)), 0.5 * (5 / 6 + 1), rel_tol=1e-6)
    assert float(generator_hinge_loss(fake)) == pytest.approx(1 / 3)


def test_discriminator_trains_from_its_start_step_and_the_loss_stays_finite(tiny_dataset: Path, tmp_path: Path) -> None:
    start = 3
    run_train(tiny_dataset, tmp_path / "run", "--stage", "vae", *ADVERSARIAL, "--vae.adversarial_start", str(start))
    state = load_checkpoint(tmp_path / "run/vae.pt")
    assert all(math.isfinite(entry["train_loss"]) for entry in state["history"])
    steps = {int(s["step"]) for s in state["discriminator_optimizer"]["state"].values()}
    assert steps == {state["step"] - start}, "the discriminator steps once per VAE step from the start step on"


def test_a_start_after_the_last_step_never_trains_the_discriminator(tiny_dataset: Path, tmp_path: Path) -> None:
    run_train(tiny_dataset, tmp_path / "run", "--stage", "vae", *ADVERSARIAL, "--vae.adversarial_start", "100000")
    state = load_checkpoint(tmp_path / "run/vae.pt")
    assert state["discriminator_optimizer"]["state"] == {}


def test_resume_with_the_discriminator_is_exact(tiny_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """Killed during VAE epoch 2 and resumed: VAE, discriminator and both optimizers end bit-identical to
    an uninterrupted run."""
    options = ["--stage", "vae", *ADVERSARIAL, "--vae.adversarial_start", "2"]
    run_train(tiny_dataset, tmp_path / "straight", *options)
    real_epoch = train.train_one_epoch

    def killed_in_epoch_2(name, *args, **kwargs):
        if name == "vae 2/2":
            raise KeyboardInterrupt
        return real_epoch(name, *args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(SystemExit, match="^130$"):  # a kill mid-epoch: Ctrl-C ends train.py with 128 + SIGINT
        run_train(tiny_dataset, tmp_path / "resumed", *options)
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    assert load_checkpoint(tmp_path / "resumed/vae.pt")["epoch"] == 1
    run_train(tiny_dataset, tmp_path / "resumed", *options, "--resume")
    straight, resumed = (load_checkpoint(tmp_path / name / "vae.pt") for name in ("straight", "resumed"))
    for key in ("model", "discriminator"):
        assert straight[key].keys() == resumed[key].keys()
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    for key in ("optimizer", "discriminator_optimizer"):
        for a, b in zip(straight[key]["state"].values(), resumed[key]["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in a), key


def test_betas_reach_the_optimizer() -> None:
    stage = make_config("tiny").vae_train
    stage.betas = (0.5, 0.9)
    optimizer, _ = train.make_optimizer(torch.nn.Linear(2, 2), stage, steps_per_epoch=1)
    assert all(group["betas"] == (0.5, 0.9) for group in optimizer.param_groups)


def test_adni_vae_uses_betas_05_09_and_runs_saved_before_keep_theirs(tmp_path: Path) -> None:
    assert make_config("adni").vae_train.betas == (0.5, 0.9)
    assert make_config("adni").unet_train.betas == make_config("demo").vae_train.betas == (0.9, 0.999)
    stored = config_to_dict(make_config("adni"))
    del stored["vae_train"]["betas"], stored["unet_train"]["betas"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    old = read_config(tmp_path)
    assert old.vae_train.betas == old.unet_train.betas == (0.9, 0.999), "a resumed old run keeps its optimizer"
