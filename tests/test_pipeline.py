"""pipeline.py: the latent scale factor applied once each way, seeds that depend on the label, and the
guidance scale reaching the generation loop, each against what the pipeline's own parts compute; the
sampling options, slice conditions and split encoding on known inputs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from config import MAX_GUIDANCE, latent_shape, make_config
from dataset import SliceDataset
from metrics import band_energy, energy_ratio, psnr
from modules import AutoencoderKL, Conditions, NoiseScheduler, ms_ssim, ssim, vae_loss
from pipeline import (
    DEFAULT_SLICE_POSITION,
    MAX_IMAGES,
    MAX_SEED,
    LatentDataset,
    Pipeline,
    batch_generator,
    build_unet,
    check_sampling_options,
    check_trained_on,
    encode_split,
    normalise_slices,
    sampling_options,
    set_latent_scale,
    unet_validation_loss,
    vae_validation_scores,
)
from utils import Runtime, UsageError

CPU = torch.device("cpu")
SCALE = 0.25  # far from 1, so a factor applied twice, inverted or not at all changes every value


def tiny_pipeline(slice_conditioning: bool = False) -> Pipeline:
    """The tiny preset's VAE and UNet with random weights: the UNet's zero-initialised output layers get
    random values too, so its prediction depends on the label (cond ≠ uncond) and guidance matters."""
    torch.manual_seed(0)
    config = make_config("tiny")
    config.unet.slice_conditioning = slice_conditioning
    vae = AutoencoderKL(config.vae)
    vae.scale_factor.fill_(SCALE)
    unet = build_unet(config)
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    vae.eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
    return Pipeline(config, vae, unet, NoiseScheduler(config.scheduler), Runtime(CPU))


def images(count: int) -> torch.Tensor:
    return torch.rand(count, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_multiplies_the_posterior_mean_by_the_scale_factor_once() -> None:
    pipe, x = tiny_pipeline(), images(3)
    mean, _ = pipe.vae.encode(x)
    latents = pipe.encode(x, chunk=2)  # two chunks
    assert torch.allclose(latents, mean * SCALE, atol=1e-6), (
        f"encode must return the VAE's posterior mean times scale_factor {SCALE} (the UNet's latents); "
        f"got latents / mean = {(latents / mean).median().item():.4g}"
    )


def test_decode_divides_by_the_scale_factor_once_before_the_decoder() -> None:
    pipe = tiny_pipeline()
    latents = torch.randn(3, *latent_shape(pipe.config), generator=torch.Generator().manual_seed(2))
    expected = pipe.vae.decode(latents / SCALE).clamp(-1, 1)
    assert not torch.allclose(expected, pipe.vae.decode(latents).clamp(-1, 1), atol=1e-3)  # the case tells them apart
    assert torch.allclose(pipe.decode(latents), expected, atol=1e-6), (
        f"decode must divide the scaled latents by scale_factor {SCALE} before the VAE's decoder"
    )


def test_decode_of_encode_is_the_vaes_own_round_trip() -> None:
    pipe, x = tiny_pipeline(), images(2)
    own = pipe.vae.decode(pipe.vae.encode(x)[0]).clamp(-1, 1)
    assert torch.allclose(pipe.decode(pipe.encode(x)), own, atol=1e-5), (
        "decode(encode(x)) must equal the VAE's own round trip: the scale factor applied once each way"
    )


def initial_noise(pipe: Pipeline, label: int, count: int, seed: int, batch_size: int) -> torch.Tensor:
    """The x_T that pipe.generate starts each batch from: a scheduler that returns its first draw."""

    def first_draw(model, shape, conditions, *, generator, device, **kwargs) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)

    pipe.scheduler.sample = first_draw
    return pipe.generate(label, count, seed=seed, batch_size=batch_size)


def test_generation_noise_depends_on_the_label_seed_and_batch_and_repeats() -> None:
    pipe = tiny_pipeline()
    ad, nc = (initial_noise(pipe, label, 4, seed=7, batch_size=2) for label in (0, 1))
    assert not torch.equal(ad[:2], nc[:2]) and not torch.equal(ad[2:], nc[2:]), (
        "AD and NC images of the same seed start from the same noise: the batch seed ignores the label"
    )
    assert torch.equal(initial_noise(pipe, 0, 4, seed=7, batch_size=2), ad), "the same (seed, label) must repeat its noise"
    assert not torch.equal(ad[:2], ad[2:]), "the batches of one call start from the same noise: the seed ignores the batch"
    assert not torch.equal(initial_noise(pipe, 0, 4, seed=8, batch_size=2), ad), "another seed must give other noise"
    # Each batch's noise is batch_generator's, so any image is regenerated from (seed, label, batch size) alone.
    expected = torch.randn(2, *ad.shape[1:], generator=batch_generator(7, 1, 1, CPU))
    assert torch.equal(nc[2:], expected)


def test_the_real_generation_loop_repeats_for_a_seed_and_label() -> None:
    pipe = tiny_pipeline()
    first = pipe.generate(1, 3, seed=3, batch_size=2, steps=2)
    assert torch.equal(pipe.generate(1, 3, seed=3, batch_size=2, steps=2), first)
    assert not torch.equal(pipe.generate(0, 3, seed=3, batch_size=2, steps=2), first)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_one_step_sample_is_the_guided_prediction_from_the_pipelines_own_unet(guidance: float) -> None:
    """One DDIM step from x_T lands on x̂_0 = predict_x0(x_T, uncond + w (cond − uncond), T − 1), with cond
    and uncond the pipeline's UNet run separately on the label and on the null label."""
    pipe = tiny_pipeline()
    labels = torch.ones(2, dtype=torch.long)
    x_t = torch.randn(2, *latent_shape(pipe.config), generator=batch_generator(5, 1, 0, CPU))
    t = torch.full((2,), pipe.scheduler.num_train_timesteps - 1)
    conditions = Conditions(labels)
    conditional, unconditional = pipe.unet(x_t, t, conditions), pipe.unet(x_t, t, conditions.unconditional())
    assert not torch.allclose(conditional, unconditional, atol=1e-3)  # the label matters, so guidance does
    expected = pipe.scheduler.predict_x0(x_t, unconditional + guidance * (conditional - unconditional), t)
    sample = pipe.generate(1, 2, seed=5, batch_size=2, steps=1, guidance_scale=guidance)
    assert x_t.shape == sample.shape
    assert torch.allclose(sample, expected, atol=1e-5), (
        f"guidance {guidance}: the sample is not uncond + w (cond − uncond) of the pipeline's UNet "
        f"(largest difference {(sample - expected).abs().max().item():.3g})"
    )


def test_guidance_scale_changes_the_samples_and_defaults_to_the_runs() -> None:
    pipe = tiny_pipeline()
    options = {"seed": 2, "batch_size": 2, "steps": 2}
    weak, strong = (pipe.generate(0, 2, guidance_scale=scale, **options) for scale in (1.0, 3.0))
    assert not torch.allclose(weak, strong, atol=1e-4), "guidance 1 and 3 gave the same samples: the scale is ignored"
    pipe.config.run.guidance_scale = 3.0
    assert torch.equal(pipe.generate(0, 2, **options), strong), "without guidance_scale, generate must use the run's"


def recording_scheduler(pipe: Pipeline) -> list[dict]:
    """Replace the pipeline's reverse diffusion by one that records what each batch asked for and
    returns the batch's first noise draw."""
    calls = []

    def record(model, shape, conditions, **options) -> torch.Tensor:
        calls.append({"shape": shape, "conditions": conditions, **options})
        return torch.randn(shape, generator=options["generator"], device=options["device"])

    pipe.scheduler.sample = record
    return calls


def test_generate_passes_every_option_to_the_sampler_and_defaults_to_the_runs_in_batches_of_64() -> None:
    pipe = tiny_pipeline()
    run = pipe.config.run
    run.sample_steps, run.sampler, run.guidance_scale = 7, "ddpm", 2.5
    calls = recording_scheduler(pipe)
    assert pipe.generate(0, 65, seed=1).shape == (65, *latent_shape(pipe.config))
    asked = [(call["shape"][0], call["sampler"], call["num_steps"], call["eta"], call["guidance_scale"]) for call in calls]
    assert asked == [(64, "ddpm", 7, 0.0, 2.5), (1, "ddpm", 7, 0.0, 2.5)], "defaults: the run's steps, sampler, guidance"
    calls.clear()
    latents = pipe.generate(1, 3, seed=1, batch_size=2, steps=5, sampler="ddim", eta=0.5, guidance_scale=4.0)
    assert latents.shape[0] == 3, "the last, partial batch must hold the remaining images only"
    assert [(call["shape"][0], call["sampler"], call["num_steps"], call["eta"], call["guidance_scale"]) for call in calls] == [
        (2, "ddim", 5, 0.5, 4.0),
        (1, "ddim", 5, 0.5, 4.0),
    ], "generate must hand its sampler, steps, eta and guidance to every batch"
    assert all(call["conditions"].labels.tolist() == [1] * call["shape"][0] for call in calls)
    assert all(call["conditions"].labels.dtype == torch.long and call["device"] == CPU for call in calls)


def test_sample_defaults_to_the_runs_sampler_without_ddim_noise() -> None:
    pipe = tiny_pipeline()
    conditions = Conditions(torch.tensor([0, 1]))
    for sampler in ("ddim", "ddpm"):
        pipe.config.run.sampler = sampler
        default = pipe.sample(conditions, steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        explicit = pipe.sample(
            conditions, steps=3, guidance_scale=2.0, sampler=sampler, eta=0.0, generator=torch.Generator().manual_seed(0)
        )
        assert torch.equal(default, explicit), sampler
    pipe.config.run.sampler = "ddim"
    default = pipe.sample(conditions, steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    ddpm = pipe.sample(conditions, steps=3, guidance_scale=2.0, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    noisy = pipe.sample(conditions, steps=3, guidance_scale=2.0, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(ddpm, default) and not torch.allclose(noisy, default), "sampler and eta must reach the loop"


def test_slice_conditioned_pipelines_pass_the_position_others_none() -> None:
    pipe, labels = tiny_pipeline(slice_conditioning=True), torch.tensor([0, 1, 1])
    for position, expected in (
        (None, torch.full((3,), DEFAULT_SLICE_POSITION)),
        (0.2, torch.full((3,), 0.2)),
        (torch.tensor([0.1, 0.4, 0.9]), torch.tensor([0.1, 0.4, 0.9])),
    ):
        conditions = pipe.conditions(labels, position)
        assert torch.equal(conditions.labels, labels) and torch.allclose(conditions.slice_position, expected), position
    plain = tiny_pipeline().conditions(labels, 0.2)
    assert torch.equal(plain.labels, labels) and plain.slice_position is None
    calls = recording_scheduler(pipe)
    pipe.generate(1, 2, seed=0, slice_position=0.3)
    assert torch.allclose(calls[0]["conditions"].slice_position, torch.full((2,), 0.3)), "generate dropped the slice position"


def test_decode_clamps_to_the_image_range() -> None:
    pipe = tiny_pipeline()
    last = [module for module in pipe.vae.decoder.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    last.weight.mul_(100)  # a decoder that overshoots both ways
    images = pipe.decode(torch.randn(4, *latent_shape(pipe.config), generator=torch.Generator().manual_seed(3)))
    assert images.min() == -1.0 and images.max() == 1.0, "decode must clamp images to [-1, 1]"


def test_batch_seeds_are_fixed_so_a_recorded_seed_keeps_its_images() -> None:
    """seed · 1_000_003 + label · 10_007 + batch index: a new formula would change every image that a seed
    recorded in an earlier samples.json gives."""
    seeds = [batch_generator(seed, label, batch, CPU).initial_seed() for seed, label, batch in ((0, 0, 0), (3, 1, 2), (7, 0, 5))]
    assert seeds == [0, 3_000_009 + 10_007 + 2, 7_000_021 + 5]
    assert batch_generator(0, 1, 1, CPU).device == CPU


def test_sampling_options_are_checked_in_one_line_each() -> None:
    good = {"steps": 50, "guidance": 2.0, "seed": 0, "num_samples": 4, "batch_size": 2}
    check_sampling_options(SimpleNamespace(**good), 1000)
    check_sampling_options(SimpleNamespace(**good | {"steps": None, "guidance": None}))
    for edge in ({"steps": 1}, {"steps": 1000}, {"guidance": 0.0}, {"guidance": float(MAX_GUIDANCE)}, {"seed": MAX_SEED},
                 {"num_samples": 1}, {"num_samples": MAX_IMAGES}, {"batch_size": 1}):  # fmt: skip
        check_sampling_options(SimpleNamespace(**good | edge), 1000)
    for bad, message in (
        ({"steps": 0}, "--steps must be at least 1, got 0"),
        ({"steps": 1001}, "--steps 1001: the run has 1000 diffusion steps; use at most that many"),
        ({"guidance": -0.5}, "--guidance -0.5: must be a number from 0 to 30"),
        ({"guidance": MAX_GUIDANCE + 0.5}, "--guidance 30.5: must be a number from 0 to 30"),
        ({"guidance": float("nan")}, "--guidance nan: must be a number from 0 to 30"),
        ({"seed": -1}, f"--seed must be 0 to {MAX_SEED}, got -1"),
        ({"seed": MAX_SEED + 1}, f"--seed must be 0 to {MAX_SEED}, got {MAX_SEED + 1}"),
        ({"num_samples": 0}, "--num-samples must be at least 1, got 0"),
        ({"num_samples": MAX_IMAGES + 1}, "--num-samples must be at most 1,000,000 per label, got 1,000,001"),
        ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ):
        with pytest.raises(UsageError) as error:
            check_sampling_options(SimpleNamespace(**good | bad), 1000)
        assert str(error.value).startswith(message), (bad, str(error.value))
    options = SimpleNamespace(**good | {"sampler": "ddpm"})
    assert sampling_options(options) == {"seed": 0, "batch_size": 2, "steps": 50, "guidance_scale": 2.0, "sampler": "ddpm"}


def test_slice_indices_map_onto_the_training_range() -> None:
    positions = normalise_slices(torch.tensor([60, 70, 75, 80, 95]), (70, 80))
    assert positions.dtype == torch.float32 and torch.allclose(positions, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.equal(normalise_slices(torch.tensor([5, 6]), (5, 5)), torch.tensor([0.0, 1.0]))  # one slice: no division by 0


def test_encode_split_keeps_each_images_posterior_and_conditions() -> None:
    pipe = tiny_pipeline(slice_conditioning=True)
    pipe.config.unet_train.batch_size = 1  # chunks of 4 images: 3 chunks for 9
    pixels = (torch.rand(9, 32, 32, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    images = SliceDataset(pixels.numpy(), [0, 1] * 4 + [0], list(range(70, 79)))
    latents = encode_split(pipe.vae, images, pipe.config, pipe.runtime, (70, 78))
    mean, logvar = pipe.vae.encode(images[list(range(9))][0])
    assert torch.allclose(latents.mean, mean, atol=1e-6) and torch.allclose(latents.logvar, logvar, atol=1e-6)
    assert len(latents) == 9 and torch.equal(latents.conditions.labels, images.labels)
    assert torch.allclose(latents.conditions.slice_position, torch.arange(9) / 8)
    batch_mean, batch_logvar, batch_conditions = latents[[4, 0]]
    assert torch.equal(batch_mean, latents.mean[[4, 0]]) and torch.equal(batch_logvar, latents.logvar[[4, 0]])
    assert batch_conditions.labels.tolist() == [0, 0] and torch.allclose(
        batch_conditions.slice_position, torch.tensor([0.5, 0.0])
    )
    assert encode_split(pipe.vae, images, make_config("tiny"), pipe.runtime, (70, 78)).conditions.slice_position is None


def test_a_unet_from_another_vae_is_refused_and_old_checkpoints_are_trusted() -> None:
    check_trained_on({"vae_fingerprint": "abc"}, "abc", Path("unet.pt"))
    check_trained_on({}, "abc", Path("unet.pt"))  # written before fingerprints existed
    with pytest.raises(UsageError) as error:
        check_trained_on({"vae_fingerprint": "abd"}, "abc", Path("unet.pt"))
    assert str(error.value) == (
        "unet.pt was trained on another VAE than the vae.pt beside it (was a stage retrained by another process?): "
        "train stage 2 again with --stage unet in a new --run"
    )


# ----------------------------------------------------------------------------- what training measures (pipeline.py)


class FixedPosterior(torch.nn.Module):
    """A stand-in VAE: posterior mean = 3 × the top-left 2x2 pixels, log-variance −30 (σ ≈ 3e-7), and a
    reconstruction 1.2 × its input from the mean (beyond [-1, 1] at both ends), 0.5 × from a sample."""

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = images[:, :, :2, :2] * 3
        return mean, torch.full_like(mean, -30.0)

    def forward(self, images: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, ...]:
        mean, logvar = self.encode(images)
        return images * (0.5 if sample_posterior else 1.2), mean, logvar

    def set_scale_factor(self, latents: torch.Tensor) -> None:
        self.seen = latents


def slices(count: int, seed: int, side: int = 32) -> SliceDataset:
    pixels = (torch.rand(count, side, side, generator=torch.Generator().manual_seed(seed)) * 256).to(torch.uint8)
    return SliceDataset(pixels.numpy(), [index % 2 for index in range(count)], list(range(70, 70 + count)))


def test_latent_scale_is_set_from_evenly_spaced_training_images() -> None:
    """Up to max_images images, evenly spaced over the training set (here 0, 3, 6, 9 of 10), encoded in
    batches; their sampled latents set the scale."""
    vae, train_set = FixedPosterior(), slices(10, 6)
    set_latent_scale(vae, train_set, batch_size=3, runtime=Runtime(CPU), max_images=4)
    expected = train_set[[0, 3, 6, 9]][0][:, :, :2, :2] * 3
    assert torch.allclose(vae.seen, expected, atol=1e-5), "the scale must come from images 0, 3, 6 and 9, all of them"
    set_latent_scale(vae, train_set, batch_size=4, runtime=Runtime(CPU))
    assert torch.allclose(vae.seen, train_set[list(range(10))][0][:, :, :2, :2] * 3, atol=1e-5)
    large = slices(4098, 9, side=2)
    set_latent_scale(vae, large, batch_size=4098, runtime=Runtime(CPU))
    assert len(vae.seen) == 4096, "by default the scale comes from at most 4096 images"


def test_vae_validation_scores_are_per_image_means_over_unequal_batches() -> None:
    config, images = make_config("tiny"), slices(5, 7)[list(range(5))][0]
    loader = [(images[:3], None), (images[3:], None)]
    scores = vae_validation_scores(FixedPosterior(), loader, config, Runtime(CPU))
    losses = [vae_loss(batch, batch * 1.2, *FixedPosterior().encode(batch), config.vae)[0] for batch, _ in loader]
    recon = (images * 1.2).clamp(-1, 1)  # the posterior mean's reconstruction, clamped to the image range
    assert scores["val_loss"] == pytest.approx(float(losses[0] * 3 + losses[1] * 2) / 5, rel=1e-5)
    assert scores["val_ms_ssim"] == pytest.approx(float(ms_ssim(recon, images).mean()), rel=1e-5)
    assert scores["val_ssim"] == pytest.approx(float(ssim(recon, images).mean()), rel=1e-5)
    assert scores["val_psnr"] == pytest.approx(float(psnr(recon, images).mean()), rel=1e-5)
    assert scores["val_spectral_energy"] == pytest.approx(energy_ratio(band_energy(recon), 5, band_energy(images), 5))
    assert all(ratio > 1.1 for ratio in scores["val_spectral_energy"].values())  # 1.2x contrast, a little clamped


def test_unet_validation_loss_is_a_fixed_draw_weighted_by_batch_size() -> None:
    pipe = tiny_pipeline()
    generator = torch.Generator().manual_seed(8)
    mean, logvar = torch.randn(5, *latent_shape(pipe.config), generator=generator), torch.full((5, 4, 8, 8), -2.0)
    latents = LatentDataset(mean, logvar, Conditions(torch.tensor([0, 1, 0, 1, 1])))
    pipe.config.unet_train.batch_size = 3  # batches of 3 and 2
    loss = unet_validation_loss(pipe.unet, pipe.scheduler, latents, 0.5, pipe.config, pipe.runtime)
    draws, total = torch.Generator().manual_seed(1234), 0.0
    for batch in ([0, 1, 2], [3, 4]):
        z = AutoencoderKL.sample_latent(mean[batch], logvar[batch], generator=draws) * 0.5
        total += float(pipe.scheduler.training_loss(pipe.unet, z, latents.conditions[batch], generator=draws)) * len(batch)
    assert loss == pytest.approx(total / 5, rel=1e-5), "not the batch-size-weighted loss of the fixed draw (seed 1234)"
    torch.randn(3)  # the global generator moves on; the validation draw does not
    assert unet_validation_loss(pipe.unet, pipe.scheduler, latents, 0.5, pipe.config, pipe.runtime) == loss
    assert unet_validation_loss(pipe.unet, pipe.scheduler, latents, 1.0, pipe.config, pipe.runtime) != loss
