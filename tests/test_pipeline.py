"""pipeline.py: the latent scale factor applied once each way, seeds that depend on the label, and the
guidance scale reaching the generation loop, each against what the pipeline's own parts compute."""

from __future__ import annotations

import pytest
import torch

from config import latent_shape, make_config
from modules import AutoencoderKL, Conditions, NoiseScheduler
from pipeline import Pipeline, batch_generator, build_unet
from utils import Runtime

CPU = torch.device("cpu")
SCALE = 0.25  # far from 1, so a factor applied twice, inverted or not at all changes every value


def tiny_pipeline() -> Pipeline:
    """The tiny preset's VAE and UNet with random weights: the UNet's zero-initialised output layers get
    random values too, so its prediction depends on the label (cond ≠ uncond) and guidance matters."""
    torch.manual_seed(0)
    config = make_config("tiny")
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
