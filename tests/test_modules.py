"""modules.py: shapes, wiring, and the scheduler checked against the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modules import (
    EMA,
    AutoencoderKL,
    NoiseScheduler,
    SchedulerConfig,
    UNet,
    UNetConfig,
    VAEConfig,
    model_presets,
    ms_ssim,
    ssim,
    vae_loss,
)

TINY_VAE = VAEConfig(channels=(8, 16, 16, 16), num_res_blocks=1)
TINY_UNET = UNetConfig(channels=(16, 32, 32), num_res_blocks=1, attention_levels=(False, True, True), head_dim=8, context_dim=16)


def randomise_zero_inits(model: nn.Module) -> nn.Module:
    """Zero-initialised output layers make a fresh model ignore everything; give them weights so wiring shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 1 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


# ------------------------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("size", [192, 200])
def test_vae_shapes_and_compression(size):
    vae = AutoencoderKL(TINY_VAE)
    x = torch.rand(2, 1, size, size) * 2 - 1
    recon, mean, logvar = vae(x)
    assert mean.shape == logvar.shape == (2, 4, size // 8, size // 8)
    assert recon.shape == x.shape
    assert mean.numel() < x.numel() / 10, "the VAE must compress (the original expanded the image)"


def test_vae_has_no_squashing_output():
    assert not any(isinstance(m, (nn.Sigmoid, nn.Tanh)) for m in AutoencoderKL(TINY_VAE).modules())


def test_vae_latent_sampling_and_scale_factor():
    mean, logvar = torch.zeros(4000, 1, 1, 1), torch.full((4000, 1, 1, 1), math.log(4.0))
    z = AutoencoderKL.sample_latent(mean, logvar, generator=torch.Generator().manual_seed(0))
    assert abs(z.std().item() - 2.0) < 0.1
    vae = AutoencoderKL(TINY_VAE)
    vae.set_scale_factor(z)
    assert abs(vae.scale_factor.item() - 1 / z.std().item()) < 1e-6
    assert "scale_factor" in vae.state_dict(), "the scale factor must travel with the checkpoint"


def test_vae_loss_parts():
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    mean, logvar = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    total, parts = vae_loss(x, x.clone(), mean, logvar, TINY_VAE)
    assert total.item() == pytest.approx(0.0, abs=1e-5), "perfect reconstruction and a N(0, I) posterior cost nothing"
    assert set(parts) == {"reconstruction", "kl", "ssim"}
    total, parts = vae_loss(x, x + 0.1, mean + 1, logvar, TINY_VAE)
    assert parts["reconstruction"].item() == pytest.approx(0.1, rel=1e-4)
    assert parts["kl"].item() == pytest.approx(0.5 * 64, rel=1e-5)  # 0.5 * mean² summed over 4x4x4


def test_ssim_and_ms_ssim():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 64, 64, generator=generator) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5)
    assert torch.allclose(ms_ssim(x, x), torch.ones(3), atol=1e-5)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    very_noisy = (x + 0.8 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    assert (ms_ssim(noisy, x) < 0.99).all() and (ms_ssim(very_noisy, x) < ms_ssim(noisy, x)).all()
    assert ms_ssim(x[:, :, :32, :32], x[:, :, :32, :32]).shape == (3,)
    assert ms_ssim(torch.zeros(1, 1, 192, 192), torch.zeros(1, 1, 192, 192)).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- UNet


@pytest.mark.parametrize("side", [24, 25, 16, 13, 7])
def test_unet_any_latent_size(side):
    unet = UNet(TINY_UNET)
    x = torch.randn(2, 4, side, side)
    out, features = unet(x, torch.tensor([0, 999]), torch.tensor([0, 1]), return_features=True)
    assert out.shape == x.shape
    assert features.shape[0] == 2 and features.ndim == 2


def test_unet_output_zero_initialised_and_not_squashed():
    unet = UNet(TINY_UNET)
    assert not any(isinstance(m, (nn.Sigmoid, nn.Tanh)) for m in unet.modules())
    out = unet(torch.randn(2, 4, 16, 16), torch.tensor([5, 500]), torch.tensor([0, 1]))
    assert torch.equal(out, torch.zeros_like(out))


def test_unet_depends_on_label_input_and_timestep():
    unet = randomise_zero_inits(UNet(TINY_UNET)).eval()
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([100, 100])
    base = unet(x, t, torch.tensor([0, 0]))
    assert not torch.allclose(base, unet(x, t, torch.tensor([1, 1])), atol=1e-4), "label ignored"
    assert not torch.allclose(base, unet(x, t, torch.tensor([unet.null_label] * 2)), atol=1e-4), "null label ignored"
    assert not torch.allclose(base, unet(x + 0.5 * torch.randn_like(x), t, torch.tensor([0, 0])), atol=1e-4), "input ignored"
    assert not torch.allclose(base, unet(x, torch.tensor([900, 900]), torch.tensor([0, 0])), atol=1e-4), "timestep ignored"
    # The bottleneck must carry the image, not only the label (the original's flaw).
    _, features_a = unet(x, t, torch.tensor([0, 0]), return_features=True)
    _, features_b = unet(torch.randn_like(x), t, torch.tensor([0, 0]), return_features=True)
    assert not torch.allclose(features_a, features_b, atol=1e-4)


def test_unet_slice_conditioning_token():
    config = UNetConfig(**{**TINY_UNET.__dict__, "slice_conditioning": True})
    unet = randomise_zero_inits(UNet(config)).eval()
    x, t, labels = torch.randn(2, 4, 16, 16), torch.tensor([10, 10]), torch.tensor([0, 1])
    low = unet(x, t, labels, torch.tensor([0.1, 0.1]))
    assert not torch.allclose(low, unet(x, t, labels, torch.tensor([0.9, 0.9])), atol=1e-4)
    assert not torch.allclose(low, unet(x, t, labels, torch.tensor([-1.0, -1.0])), atol=1e-4)
    with pytest.raises(ValueError, match="slice_position"):
        unet(x, t, labels)


def test_tiny_unet_overfits_one_batch():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=(16, 32), num_res_blocks=1, attention_levels=(False, True), head_dim=8, context_dim=16))
    x, t, labels = torch.randn(4, 4, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 0, 1])
    target = torch.randn(4, 4, 8, 8)
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = (unet(x, t, labels) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.05 * first


def test_presets_are_consistent():
    for name in ("demo", "adni"):
        vae, unet, scheduler = model_presets(name)
        assert vae.latent_channels == unet.latent_channels
        assert len(unet.attention_levels) == len(unet.channels)
        assert sum(p.numel() for p in UNet(unet).parameters()) > 1e6
    assert model_presets("adni")[0].downsample_factor == 8
    with pytest.raises(ValueError, match="unknown preset"):
        model_presets("huge")


# ------------------------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_closed_form_and_terminal_noise(schedule):
    config = SchedulerConfig(beta_schedule=schedule, beta_start=1e-4 if schedule == "linear" else 0.0015,
                             beta_end=0.02 if schedule == "linear" else 0.0195)
    scheduler = NoiseScheduler(config)
    T = config.num_train_timesteps
    if schedule == "linear":
        betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    elif schedule == "scaled_linear":
        betas = [(0.0015**0.5 + (0.0195**0.5 - 0.0015**0.5) * i / (T - 1)) ** 2 for i in range(T)]
    else:
        f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        betas = [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]
    expected = torch.tensor(betas, dtype=torch.float64).mul(-1).add(1).cumprod(0)
    assert torch.allclose(scheduler.alphas_cumprod, expected, rtol=1e-10)
    assert scheduler.alphas_cumprod[-1].sqrt() < 0.02, "x_T must be (almost) pure noise"


def test_add_noise_marginals():
    scheduler = NoiseScheduler(SchedulerConfig())
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7)
    for step in (0, 250, 999):
        t = torch.full((len(x0),), step)
        x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
        a = scheduler.alphas_cumprod[step].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.01)
        assert x_t.var().item() == pytest.approx(1 - a, abs=0.01 + 0.01 * (1 - a))


def test_per_sample_timesteps():
    scheduler = NoiseScheduler(SchedulerConfig())
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    x_t = scheduler.add_noise(x0, noise, torch.tensor([0, 999]))
    assert torch.allclose(x_t[0], scheduler.alphas_cumprod[0].sqrt().float() * x0[0])
    assert torch.allclose(x_t[1], scheduler.alphas_cumprod[999].sqrt().float() * x0[1])


def test_posterior_matches_ddpm_paper():
    scheduler = NoiseScheduler(SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    x0, x_t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    for step in (1, 10, 500, 999):
        t = torch.full((3,), step)
        mean, variance = scheduler.q_posterior(x0, x_t, t)
        beta, alpha = scheduler.betas[step].item(), scheduler.alphas[step].item()
        a, a_prev = scheduler.alphas_cumprod[step].item(), scheduler.alphas_cumprod[step - 1].item()
        expected_mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(alpha) * (1 - a_prev) / (1 - a) * x_t
        assert torch.allclose(mean, expected_mean, atol=1e-5)
        assert variance.flatten()[0].item() == pytest.approx((1 - a_prev) / (1 - a) * beta, rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_prediction_conversions_round_trip(prediction_type):
    scheduler = NoiseScheduler(SchedulerConfig(prediction_type=prediction_type))
    x0, noise = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    t = torch.tensor([0, 10, 400, 800, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    target = scheduler.training_target(x0, noise, t)
    recovered = scheduler.predict_x0(x_t, target, t)
    assert torch.allclose(recovered[1:], x0[1:], atol=1e-3)
    assert torch.allclose(scheduler.predict_noise(x_t, recovered, t)[:-1], noise[:-1], atol=1e-3)
    if prediction_type == "v":  # v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0, so ε = sqrt(ᾱ) v + sqrt(1-ᾱ) x_t
        a = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        assert torch.allclose(a.sqrt() * target + (1 - a).sqrt() * x_t, noise, atol=1e-4)


def test_min_snr_weights():
    """Hang et al. 2023: min(SNR, γ) / SNR for ε targets, min(SNR, γ) / (SNR + 1) for v targets."""
    t = torch.tensor([0, 999])
    for prediction_type in ("epsilon", "v"):
        scheduler = NoiseScheduler(SchedulerConfig(min_snr_gamma=5.0, prediction_type=prediction_type))
        a = scheduler.alphas_cumprod[t]
        snr = a / (1 - a)
        expected = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
        assert torch.allclose(scheduler.loss_weights(t), expected.float(), rtol=1e-5)
    assert torch.equal(NoiseScheduler(SchedulerConfig()).loss_weights(t), torch.ones(2))


class NoiseOracle(nn.Module):
    """A 'model' that knows x0 and returns the exact ε (or v) of any x_t: sampling must then recover x0."""

    def __init__(self, scheduler: NoiseScheduler, x0: torch.Tensor):
        super().__init__()
        self.scheduler, self.x0, self.null_label = scheduler, x0, 2

    def forward(self, x_t, t, labels, slice_position=None):
        x0 = self.x0.repeat(len(x_t) // len(self.x0), 1, 1, 1)
        noise = self.scheduler.predict_noise(x_t, x0, t)
        return self.scheduler.training_target(x0, noise, t)


@pytest.mark.parametrize("num_steps", [1, 7, 50, 1000])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_ddim_with_oracle_recovers_x0_for_any_step_count(num_steps, prediction_type):
    scheduler = NoiseScheduler(SchedulerConfig(prediction_type=prediction_type))
    x0 = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(num_steps))
    x_T = scheduler.add_noise(x0, torch.randn_like(x0), torch.tensor([999, 999]))
    steps = scheduler.timesteps(num_steps)
    assert steps[0] == 999 and len(steps) == num_steps and steps == sorted(set(steps), reverse=True)
    out = scheduler.sample(NoiseOracle(scheduler, x0), x0.shape, torch.tensor([0, 1]), num_steps=num_steps,
                           sampler="ddim", eta=0.0, x_T=x_T)
    assert (out - x0).abs().max().item() < 1e-4


def test_ddim_eta_zero_is_deterministic_and_ddpm_is_stochastic():
    scheduler = NoiseScheduler(SchedulerConfig())
    model = randomise_zero_inits(UNet(TINY_UNET)).eval()
    labels = torch.tensor([0, 1])

    def run(sampler: str, seed_for_noise: int) -> torch.Tensor:
        x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return scheduler.sample(model, (2, 4, 8, 8), labels, sampler=sampler, num_steps=5, x_T=x_T,
                                generator=torch.Generator().manual_seed(seed_for_noise))

    assert torch.equal(run("ddim", 1), run("ddim", 2)), "DDIM eta=0 must not use fresh noise"
    assert not torch.allclose(run("ddpm", 1), run("ddpm", 2)), "DDPM is ancestral"
    assert torch.equal(run("ddpm", 1), run("ddpm", 1)), "same seed, same sample"


def test_ddpm_full_chain_with_oracle_ends_at_x0():
    scheduler = NoiseScheduler(SchedulerConfig())
    x0 = torch.randn(1, 4, 4, 4)
    steps = list(scheduler.sample_steps(NoiseOracle(scheduler, x0), x0.shape, torch.tensor([0]), sampler="ddpm",
                                        num_steps=20, generator=torch.Generator().manual_seed(0)))
    assert [s for s, _, _ in steps][-1] < 50 and len(steps) == 20
    assert (steps[-1][1] - x0).abs().max().item() < 1e-3


def test_guidance_scale_one_is_conditional_and_zero_is_unconditional():
    scheduler = NoiseScheduler(SchedulerConfig())
    model = randomise_zero_inits(UNet(TINY_UNET)).eval()
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.tensor([0, 1])
    with torch.no_grad():
        conditional = model(x, t, labels)
        unconditional = model(x, t, torch.tensor([2, 2]))
        assert torch.allclose(scheduler.guided_prediction(model, x, t, labels, 1.0), conditional, atol=1e-6)
        assert torch.allclose(scheduler.guided_prediction(model, x, t, labels, 0.0), unconditional, atol=1e-5)
        guided = scheduler.guided_prediction(model, x, t, labels, 3.0)
        assert torch.allclose(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)


def test_bad_scheduler_arguments():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseScheduler(SchedulerConfig(beta_schedule="quadratic"))
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseScheduler(SchedulerConfig(prediction_type="x0"))
    with pytest.raises(ValueError, match="steps"):
        NoiseScheduler(SchedulerConfig()).timesteps(0)


# ------------------------------------------------------------------------------------------- EMA


def test_ema_math_warmup_and_state():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(1 - 0.9**2)  # 0 → 0.1 → 0.19
    warm = EMA(model, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    restored = EMA(nn.Linear(1, 1, bias=False), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2 and restored.decay == 0.9
    target = nn.Linear(1, 1, bias=False)
    restored.copy_to(target)
    assert target.weight.item() == pytest.approx(1 - 0.9**2)
    assert not any(p.requires_grad for p in ema.model.parameters())
