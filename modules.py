"""The models of brainLDM: KL-VAE, label-conditioned latent UNet, noise scheduler (DDPM/DDIM), EMA.

Everything works on tensors; nothing here knows about files or data. Images are (B, 1, H, W) in
[-1, 1]; latents are (B, C_z, H/f, W/f). Formulas follow Ho et al. 2020 (DDPM), Song et al. 2021
(DDIM), Nichol & Dhariwal 2021 (cosine schedule), Salimans & Ho 2022 (v-prediction), Ho & Salimans
2022 (classifier-free guidance) and Hang et al. 2023 (min-SNR weighting); symbols follow the papers:
alpha_bar = ᾱ_t, the product of (1 - beta_s) for s <= t.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from config import SchedulerConfig, StageConfig, UNetConfig, VAEConfig

# --------------------------------------------------------------------------------------------- blocks


def group_norm(channels: int) -> nn.GroupNorm:
    """At most 32 groups (as SD) of at least 4 channels: with one channel per group the norm would
    erase the per-channel time-embedding shift added before it."""
    groups = math.gcd(32, max(1, channels // 4))
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Start a residual branch at zero, so every block begins as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual; the time embedding (if any) is added in between."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels) if time_dim else None
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            h = h + self.time_proj(F.silu(time_embedding))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3x3 conv: side s → ceil(s / 2), so odd sizes (25 → 13 → 7) work."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling to a given size (the skip connection's), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention with fused SDPA: self-attention of tokens (B, N, D) without a
    `context_dim`, else cross-attention of query tokens (B, N, D) over context tokens (B, M, D_ctx).

    Self-attention projects q, k and v in one matmul (`to_qkv`, rows q; k; v); its weights start
    as the separate `to_q` and `to_kv` did (the same random draws in the same order), and state
    dicts written with those load into it (`join_qkv`)."""

    def __init__(self, dim: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        if context_dim is None:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.register_load_state_dict_pre_hook(join_qkv)
        else:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens x (B, N, D), context (B, M, D_ctx) for cross-attention only → (B, N, D)."""
        if context is None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q, (k, v) = self.to_q(x), self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


def join_qkv(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook of a self-attention: a state dict from before the fused projection
    holds `to_q.weight` (D, D) and `to_kv.weight` (2D, D); they become `to_qkv.weight` (3D, D)."""
    separate = [prefix + "to_q.weight", prefix + "to_kv.weight"]
    if all(key in state_dict for key in separate):
        state_dict[prefix + "to_qkv.weight"] = torch.cat([state_dict.pop(key) for key in separate])


def split_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of join_qkv over a whole state dict, in its order: each `to_qkv.weight` (3D, D)
    as `to_q.weight` (D, D) and `to_kv.weight` (2D, D), the layout fingerprints were recorded in."""
    separate = {}
    for key, tensor in state_dict.items():
        if key.endswith("to_qkv.weight"):
            stem = key.removesuffix("qkv.weight")
            query, keys_values = tensor.split([len(tensor) // 3, 2 * len(tensor) // 3])
            separate[stem + "q.weight"], separate[stem + "kv.weight"] = query, keys_values
        else:
            separate[key] = tensor
    return separate


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels of a feature map (the VAE's middle block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.attention = Attention(channels, head_dim=channels)
        zero_init(self.attention.to_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attention(tokens).transpose(1, 2).reshape(b, c, h, w)


class TransformerBlock(nn.Module):
    """SD's spatial transformer: pixels attend to each other, then to the context tokens, then an MLP.

    With a single context token the cross-attention weights are all 1: it adds one learned vector per
    label to every pixel, and its query and key projections learn nothing. With several label tokens
    (unet.label_tokens) and the slice token, each pixel's query weighs them."""

    def __init__(self, channels: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.proj_in = nn.Linear(channels, channels)
        self.norm_self = nn.LayerNorm(channels)
        self.self_attention = Attention(channels, head_dim)
        self.norm_cross = nn.LayerNorm(channels)
        self.cross_attention = Attention(channels, head_dim, context_dim)
        self.norm_mlp = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, h*w, C)
        tokens = tokens + self.self_attention(self.norm_self(tokens))
        tokens = tokens + self.cross_attention(self.norm_cross(tokens), context)
        tokens = tokens + self.mlp(self.norm_mlp(tokens))
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


def sinusoidal_frequencies(dim: int, max_period: float = 10000.0, device: torch.device | str | None = None) -> torch.Tensor:
    """The dim // 2 frequencies of a sinusoidal embedding, (dim // 2,) float32."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, device=device, dtype=torch.float32) / half)


def sinusoidal_embedding(positions: torch.Tensor, dim: int, frequencies: torch.Tensor | None = None) -> torch.Tensor:
    """Transformer position encoding of (B,) positions (timesteps) → (B, dim); pass the
    `sinusoidal_frequencies(dim)` already on the device to skip computing them on every call."""
    frequencies = sinusoidal_frequencies(dim, device=positions.device) if frequencies is None else frequencies
    angles = positions.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# --------------------------------------------------------------------------------------------- VAE


class Encoder(nn.Module):
    """(B, C_in, H, W) → (B, 2 C_z, H/f, W/f): the posterior's mean and log-variance, stacked."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = config.channels
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        previous = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(previous, width))
                previous = width
            if level < len(widths) - 1:
                blocks.append(Downsample(width))
        self.down = nn.Sequential(*blocks)
        self.middle = nn.Sequential(
            ResBlock(previous, previous),
            SpatialSelfAttention(previous) if config.middle_attention else nn.Identity(),
            ResBlock(previous, previous),
        )
        self.out = nn.Sequential(group_norm(previous), nn.SiLU(), nn.Conv2d(previous, 2 * config.latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.middle(self.down(self.conv_in(x))))


class Decoder(nn.Module):
    """(B, C_z, h, w) → (B, C_in, f h, f w); a linear output (no Tanh), clamped only when shown."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = config.channels[::-1]
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResBlock(widths[0], widths[0]),
            SpatialSelfAttention(widths[0]) if config.middle_attention else nn.Identity(),
            ResBlock(widths[0], widths[0]),
        )
        blocks: list[nn.Module] = []
        previous = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResBlock(previous, width))
                previous = width
            if level < len(widths) - 1:
                blocks.append(Upsample(width))
        self.up = nn.Sequential(*blocks)
        self.out = nn.Sequential(group_norm(previous), nn.SiLU(), nn.Conv2d(previous, config.in_channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(self.middle(self.conv_in(z))))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder with a spatial latent (Rombach et al. 2022).

    `scale_factor` (1 / std of the training latents) is a buffer, so it travels in the state dict;
    the UNet works on `latent * scale_factor`, which has about unit variance."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.register_buffer("scale_factor", torch.tensor(1.0))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) → posterior mean and log-variance, each (B, C_z, H/f, W/f)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    @staticmethod
    def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + sigma * noise: the reparameterisation trick."""
        noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
        return mean + torch.exp(0.5 * logvar) * noise

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encode(x)
        z = self.sample_latent(mean, logvar) if sample_posterior else mean
        return self.decode(z), mean, logvar

    @torch.no_grad()
    def set_scale_factor(self, latents: torch.Tensor) -> None:
        """Store 1 / std of (unscaled) training latents."""
        self.scale_factor.fill_(1.0 / latents.float().std().clamp_min(1e-8).item())


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements: (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


def vae_loss(
    x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, config: VAEConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstruction (L1 or MSE, per-pixel mean) + kl_weight * KL + ssim_weight * (1 - SSIM)
    + fourier_weight * (L1 of the Fourier amplitude spectra).

    Returns the total and its parts, detached. The discriminator's term (generator_hinge_loss) is added
    by the training loop, which owns the discriminator."""
    recon = recon.float()
    if config.recon_loss == "l1":
        reconstruction = F.l1_loss(recon, x)
    elif config.recon_loss == "mse":
        reconstruction = F.mse_loss(recon, x)
    else:
        raise ValueError(f"unknown recon_loss {config.recon_loss!r}: choose l1 or mse")
    kl = kl_divergence(mean.float(), logvar.float()).mean()
    parts = {"reconstruction": reconstruction, "kl": kl}
    total = reconstruction + config.kl_weight * kl
    if config.ssim_weight > 0:
        structural = 1.0 - ssim(recon, x).mean()
        parts["ssim"] = structural
        total = total + config.ssim_weight * structural
    if config.fourier_weight > 0:
        spectral = fourier_amplitude_distance(recon, x)
        parts["fourier"] = spectral
        total = total + config.fourier_weight * spectral
    return total, {name: value.detach() for name, value in parts.items()}


def fourier_amplitude_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean |(|F x| - |F y|)| over the orthonormal 2D spectra of images (B, C, H, W): a blurred
    reconstruction lacks the high-frequency amplitude that pixel L1 and SSIM barely charge for
    (after Jiang et al. 2021's focal frequency loss, without its focal weights)."""
    return F.l1_loss(torch.fft.rfft2(x.float(), norm="ortho").abs(), torch.fft.rfft2(y.float(), norm="ortho").abs())


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): images (B, C, H, W) → one real/fake logit per overlapping patch,
    (B, 1, H/8 - 1, W/8 - 1). Three stride-2 4x4 convs (widths c, 2c, 4c, GroupNorm, LeakyReLU), then a
    stride-1 conv to the logit map; small next to the VAE, and sensitive to texture such as blur or a grid."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        width = config.discriminator_channels
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for multiplier in (2, 4):
            layers += [
                nn.Conv2d(width * multiplier // 2, width * multiplier, 4, stride=2, padding=1),
                group_norm(width * multiplier),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(4 * width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), halved as in Rombach et al.'s autoencoder."""
    return 0.5 * (F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean())


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-mean(D(reconstruction)): the VAE is rewarded for patches the discriminator calls real."""
    return -fake_logits.float().mean()


class Critic:
    """The VAE's optional PatchGAN discriminator (vae.adversarial_weight > 0) with its own AdamW: it
    learns, with a hinge loss, to tell training slices from their reconstructions from global step
    vae.adversarial_start on, and from then on the VAE's loss adds adversarial_weight times the
    generator's hinge loss. `trained` is the module its step calls (the caller may wrap `model` for DDP
    or compilation) under `autocast`; state_dict() travels in vae.pt, so a resumed run stays exact."""

    def __init__(self, config: VAEConfig, lr: float, betas: tuple[float, float], device: torch.device):
        self.settings = config
        self.model = PatchDiscriminator(config).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=tuple(betas), weight_decay=0.0)
        self.trained: nn.Module = self.model
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor, step: int) -> torch.Tensor | None:
        """The VAE's adversarial term at global step `step` (None before the start), keeping the batch
        for the discriminator's own step after the VAE's."""
        if step < self.settings.adversarial_start:
            return None
        self.pending = images, recon.detach()
        self.model.requires_grad_(False)  # its gradient from the VAE's loss would only be thrown away
        try:
            return self.settings.adversarial_weight * generator_hinge_loss(self.model(recon))
        finally:
            self.model.requires_grad_(True)

    def step(self) -> None:
        """One discriminator update on the batch the VAE just trained on, real and reconstructed in one pass."""
        if self.pending is None:
            return
        images, recon = self.pending
        self.pending = None
        with self.autocast():
            real_logits, fake_logits = self.trained(torch.cat([images, recon])).chunk(2)
        loss = discriminator_hinge_loss(real_logits, fake_logits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"discriminator": self.model.state_dict(), "discriminator_optimizer": self.optimizer.state_dict()}


# --------------------------------------------------------------------------------------------- SSIM


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


def _gaussian_window(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    window = torch.exp(-coords.pow(2) / (2 * sigma**2))
    return window / window.sum()


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean SSIM and contrast-structure term for images in [0, 1] (Wang et al. 2004)."""
    c1, c2 = 0.01**2, 0.03**2
    window = _gaussian_window(window_size, 1.5, x.device, x.dtype)
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    # The five local means in one separable Gaussian blur ('valid' borders): one grouped conv per
    # direction instead of ten convs, measured 1.8x (64 px) to 2.1x (192 px) faster with backward.
    channels = maps.shape[1]
    blurred = F.conv2d(maps, window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    blurred = F.conv2d(blurred, window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = blurred.chunk(5, dim=1)
    var_x = mean_xx - mu_x**2
    var_y = mean_yy - mu_y**2
    cov = mean_xy - mu_x * mu_y
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * contrast_structure).flatten(1).mean(1), contrast_structure.flatten(1).mean(1)


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """SSIM per image, (B,), of images in [-1, 1] (data range 1 after mapping to [0, 1])."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    window_size = min(window_size, x.shape[-2], x.shape[-1])
    return _ssim_terms(x, y, window_size)[0]


def ms_ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """Multi-scale SSIM per image, (B,), of images in [-1, 1] (Wang et al. 2003).

    Uses as many of the 5 standard scales as the image allows (each scale at least window_size
    pixels; 192 px: 5, 64 px: 3, 32 px: 2) with their weights renormalised to sum to 1."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    side = min(x.shape[-2], x.shape[-1])
    window_size = min(window_size, side)
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and side // 2**scales >= window_size:
        scales += 1
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x.device)
    weights = weights / weights.sum()
    factors = []
    for scale in range(scales):
        full, contrast_structure = _ssim_terms(x, y, window_size)
        factors.append((full if scale == scales - 1 else contrast_structure).clamp_min(0))
        if scale < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(factors, dim=1) ** weights, dim=1)


# --------------------------------------------------------------------------------------------- UNet


@dataclass(frozen=True)
class Conditions:
    """What each item of a batch is conditioned on: its diagnosis label and, for UNets built with
    slice conditioning, its slice position. One object from the training batch through the loss,
    guidance dropout and sampling, so a new condition is a new field here and in UNet.context.

    labels (B,) long: 0 AD, 1 NC; slice_position (B,) float in [0, 1] or None. ABSENT in a field is
    the null condition of classifier-free guidance ("no label", "no position")."""

    labels: torch.Tensor
    slice_position: torch.Tensor | None = None

    ABSENT: ClassVar[int] = -1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> Conditions:
        return Conditions(*(None if value is None else value[index] for value in self._fields()))

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return self.labels, self.slice_position

    def to(self, device: torch.device | str) -> Conditions:
        return Conditions(*(None if value is None else value.to(device) for value in self._fields()))

    def where(self, absent: torch.Tensor) -> Conditions:
        """Every field set to ABSENT where the (B,) mask `absent` is true."""
        return Conditions(
            *(
                None if value is None else torch.where(absent, torch.full_like(value, self.ABSENT), value)
                for value in self._fields()
            )
        )

    def unconditional(self) -> Conditions:
        return self.where(torch.ones(len(self), dtype=torch.bool, device=self.labels.device))

    def dropped(self, p: float, generator: torch.Generator | None = None) -> Conditions:
        """Classifier-free guidance's training-time dropout: each item loses all its conditions with
        probability p, so one network also learns the unconditional model (Ho & Salimans 2022)."""
        return self.where(torch.rand(len(self), device=self.labels.device, generator=generator) < p)

    @staticmethod
    def cat(first: Conditions, second: Conditions) -> Conditions:
        return Conditions(*(None if a is None else torch.cat([a, b]) for a, b in zip(first._fields(), second._fields())))


class UNet(nn.Module):
    """Latent noise predictor conditioned on the timestep (added in every ResBlock) and on context
    tokens (cross-attention): label_tokens learned tokens per label, and as many for "no label", and
    optionally a slice-position token with a learned "no position" token. With label_in_resblocks the
    label's own embedding ("no label" too) is also added to the timestep's, so every ResBlock sees it.

    forward(x (B, C_z, h, w), timesteps (B,), conditions) → prediction (B, C_z, h, w)
    [and bottleneck features (B, C * h' * w') with return_features]."""

    def __init__(self, config: UNetConfig, latent_channels: int):
        super().__init__()
        if len(config.attention_levels) != len(config.channels):
            raise ValueError("unet.attention_levels needs one entry per unet.channels level")
        self.config = config
        self.null_label = config.num_classes  # the label embedding's "no label" row
        widths = config.channels
        time_dim = 4 * widths[0]
        # A constant of every forward, made once; not persistent, so state dicts are as before.
        self.register_buffer("time_frequencies", sinusoidal_frequencies(widths[0]), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(widths[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        # Each row holds a label's label_tokens context tokens side by side; with one token the layout (and
        # the initialisation's random draws) are those of runs made before there were several.
        self.label_embedding = nn.Embedding(config.num_classes + 1, config.label_tokens * config.context_dim)
        self.resblock_label_embedding = nn.Embedding(config.num_classes + 1, time_dim) if config.label_in_resblocks else None
        if config.slice_conditioning:
            self.slice_mlp = nn.Sequential(
                nn.Linear(config.context_dim, config.context_dim), nn.SiLU(), nn.Linear(config.context_dim, config.context_dim)
            )
            self.null_slice = nn.Parameter(torch.zeros(config.context_dim))
        # Patches of patch_size x patch_size latent pixels become one position (as DiT's patch embedding),
        # and the output layer unfolds them again; with 1 both are the identity.
        patch_channels = latent_channels * config.patch_size**2
        self.patchify, self.unpatchify = nn.PixelUnshuffle(config.patch_size), nn.PixelShuffle(config.patch_size)
        self.conv_in = nn.Conv2d(patch_channels, widths[0], 3, padding=1)

        def level_block(in_width: int, out_width: int, attention: bool) -> nn.ModuleList:
            block = nn.ModuleList([ResBlock(in_width, out_width, time_dim, config.dropout)])
            if attention:
                block.append(TransformerBlock(out_width, config.head_dim, config.context_dim))
            return block

        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_widths = [widths[0]]
        previous = widths[0]
        for level, (width, attention) in enumerate(zip(widths, config.attention_levels)):
            for _ in range(config.num_res_blocks):
                self.down_blocks.append(level_block(previous, width, attention))
                previous = width
                skip_widths.append(width)
            if level < len(widths) - 1:
                self.downsamples.append(Downsample(width))
                skip_widths.append(width)
        self.middle = nn.ModuleList(
            [
                ResBlock(previous, previous, time_dim, config.dropout),
                TransformerBlock(previous, config.head_dim, config.context_dim),
                ResBlock(previous, previous, time_dim, config.dropout),
            ]
        )
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level, (width, attention) in reversed(list(enumerate(zip(widths, config.attention_levels)))):
            for _ in range(config.num_res_blocks + 1):
                self.up_blocks.append(level_block(previous + skip_widths.pop(), width, attention))
                previous = width
            if level > 0:
                self.upsamples.append(Upsample(width))
        self.out = nn.Sequential(group_norm(previous), nn.SiLU(), zero_init(nn.Conv2d(previous, patch_channels, 3, padding=1)))

    def label_rows(self, conditions: Conditions) -> torch.Tensor:
        """Each item's row (B,) of a label embedding: its label, or the "no label" row where it is absent."""
        return torch.where(conditions.labels == Conditions.ABSENT, self.null_label, conditions.labels)

    def context(self, conditions: Conditions) -> torch.Tensor:
        """Context tokens (B, label_tokens [+ 1 slice token], context_dim); an absent label gets the
        "no label" row's label_tokens tokens."""
        rows = self.label_embedding(self.label_rows(conditions))
        tokens = rows.unflatten(-1, (self.config.label_tokens, self.config.context_dim))
        if self.config.slice_conditioning:
            position = conditions.slice_position
            if position is None:
                raise ValueError("this UNet was built with slice_conditioning: pass a slice_position")
            encoded = self.slice_mlp(sinusoidal_embedding(position.clamp_min(0) * 1000, self.config.context_dim))
            missing = (position == Conditions.ABSENT)[:, None]
            slice_token = torch.where(missing, self.null_slice.to(encoded.dtype).expand_as(encoded), encoded)
            tokens = torch.cat([tokens, slice_token[:, None]], dim=1)
        return tokens

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, conditions: Conditions, return_features: bool = False):
        time_embedding = self.time_mlp(sinusoidal_embedding(timesteps, self.config.channels[0], self.time_frequencies))
        if self.resblock_label_embedding is not None:
            time_embedding = time_embedding + self.resblock_label_embedding(self.label_rows(conditions))
        context = self.context(conditions)

        def run(block: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            h = block[0](h, time_embedding)
            return block[1](h, context) if len(block) > 1 else h

        h = self.conv_in(self.patchify(x))
        skips = [h]
        blocks = iter(self.down_blocks)
        for level in range(len(self.config.channels)):
            for _ in range(self.config.num_res_blocks):
                h = run(next(blocks), h)
                skips.append(h)
            if level < len(self.config.channels) - 1:
                h = self.downsamples[level](h)
                skips.append(h)
        h = self.middle[0](h, time_embedding)
        h = self.middle[1](h, context)
        h = self.middle[2](h, time_embedding)
        features = h
        blocks = iter(self.up_blocks)
        for level in range(len(self.config.channels)):
            for _ in range(self.config.num_res_blocks + 1):
                h = run(next(blocks), torch.cat([h, skips.pop()], dim=1))
            if level < len(self.config.channels) - 1:
                h = self.upsamples[level](h, size=skips[-1].shape[-2:])
        prediction = self.unpatchify(self.out(h))
        return (prediction, features.flatten(1)) if return_features else prediction


# --------------------------------------------------------------------------------------------- scheduler


def make_betas(config: SchedulerConfig) -> torch.Tensor:
    """beta_1..beta_T in float64."""
    steps = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, steps, dtype=torch.float64)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, steps, dtype=torch.float64) ** 2
    if config.beta_schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17, s = 0.008
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta_schedule {config.beta_schedule!r}: choose linear, scaled_linear or cosine")


class NoiseScheduler:
    """Forward process q(x_t | x_0), training targets and the DDPM, DDIM and DPM-Solver++(2M) reverse steps.

    Timestep indices run 0..T-1 (index t is the paper's t+1)."""

    def __init__(self, config: SchedulerConfig):
        if config.prediction_type not in ("epsilon", "v"):
            raise ValueError(f"unknown prediction_type {config.prediction_type!r}: choose epsilon or v")
        self.config = config
        self.num_train_timesteps = config.num_train_timesteps
        self.betas = make_betas(config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._alpha_bar_tables: dict[torch.device, torch.Tensor] = {}

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t (B,) in float64 on t's device; t = -1 gives ᾱ = 1 (the clean image).

        Coefficients are formed in float64 and cast once: in float32, 1 - ᾱ_t loses digits at small t.
        The table lives on t's device, so training gathers it without a host sync."""
        table = self._alpha_bar_tables.get(t.device)
        if table is None:
            table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod]).to(t.device)
            self._alpha_bar_tables[t.device] = table
        return table[t.long() + 1]

    @staticmethod
    def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B,) float64 coefficients → float32 (B, 1, ..., 1) broadcasting against `like`."""
        return values.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))

    # -- forward process and targets

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (Ho et al. eq. 4)."""
        a = self.alpha_bar(t)
        return self._per_sample(a.sqrt(), x0) * x0 + self._per_sample((1 - a).sqrt(), x0) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022)."""
        a = self.alpha_bar(t)
        return self._per_sample(a.sqrt(), x0) * noise - self._per_sample((1 - a).sqrt(), x0) * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise if self.config.prediction_type == "epsilon" else self.velocity(x0, noise, t)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights (Hang et al. 2023) of the per-sample MSE, in the target's own units; ones when off."""
        if self.config.min_snr_gamma <= 0:
            return torch.ones(len(t), device=t.device)
        a = self.alpha_bar(t)
        snr = a / (1 - a)
        clipped = snr.clamp(max=self.config.min_snr_gamma)
        weights = clipped / snr if self.config.prediction_type == "epsilon" else clipped / (snr + 1)
        return weights.float()

    # -- conversions between what the network predicts and x_0 / ε

    def predict_x0(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t)
        if self.config.prediction_type == "epsilon":  # x_0 = (x_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ)
            x0 = self._per_sample(1 / a.sqrt(), x_t) * x_t - self._per_sample(((1 - a) / a).sqrt(), x_t) * prediction
        else:  # x_0 = sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v
            x0 = self._per_sample(a.sqrt(), x_t) * x_t - self._per_sample((1 - a).sqrt(), x_t) * prediction
        return x0.clamp(-self.config.clip_sample, self.config.clip_sample) if self.config.clip_sample > 0 else x0

    def predict_noise(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε implied by x_t and an x_0 estimate (inverts add_noise)."""
        a = self.alpha_bar(t)
        return self._per_sample(1 / (1 - a).sqrt(), x_t) * x_t - self._per_sample((a / (1 - a)).sqrt(), x_t) * x0

    # -- reverse steps

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t_prev} | x_t, x_0) (Ho et al. eqs. 6-7); t_prev defaults to t - 1.

        With t_prev < t - 1 the step uses beta = 1 - ᾱ_t / ᾱ_{t_prev}, i.e. the respaced chain of
        Nichol & Dhariwal 2021, so DDPM can also sample with fewer steps."""
        t_prev = t - 1 if t_prev is None else t_prev
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        alpha = a_t / a_prev
        beta = 1 - alpha
        mean = (
            self._per_sample(a_prev.sqrt() * beta / (1 - a_t), x0) * x0
            + self._per_sample(alpha.sqrt() * (1 - a_prev) / (1 - a_t), x_t) * x_t
        )
        variance = self._per_sample(beta * (1 - a_prev) / (1 - a_t), x_t)
        return mean, variance

    def ddpm_step(
        self,
        x_t: torch.Tensor,
        x0: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        noise: torch.Tensor | None = None,
        eta: float = 1.0,
        previous: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Ancestral step x_t → x_{t_prev} ~ q(x_{t_prev} | x_t, x0-estimate); the last step adds no
        noise. Its variance is fixed by the schedule and it needs no earlier step, so `eta` and
        `previous` are accepted only to share SAMPLERS' signature."""
        mean, variance = self.q_posterior(x0, x_t, t, t_prev)
        return mean if noise is None else mean + variance.sqrt() * noise

    def ddim_step(
        self,
        x_t: torch.Tensor,
        x0: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        previous: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Song et al. 2021 eq. 12: x_{t_prev} = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ²) ε̂ + σ z,
        σ = eta sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev); eta = 0 is deterministic. A
        one-step method: `previous` is accepted only to share SAMPLERS' signature."""
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        eps = self.predict_noise(x_t, x0, t)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = (
            self._per_sample(a_prev.sqrt(), x0) * x0 + self._per_sample((1 - a_prev - sigma**2).clamp_min(0).sqrt(), x0) * eps
        )
        if eta > 0 and noise is not None:
            x_prev = x_prev + self._per_sample(sigma, x0) * noise
        return x_prev

    def half_log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """λ_t = log(α_t / σ_t) = ½ log(ᾱ_t / (1 - ᾱ_t)) (B,) in float64, the time variable of
        DPM-Solver (Lu et al. 2022); +∞ at t = -1, the clean image."""
        a = self.alpha_bar(t)
        return 0.5 * (a / (1 - a)).log()

    def dpmpp_2m_step(
        self,
        x_t: torch.Tensor,
        x0: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        previous: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), deterministic (`eta` and
        `noise` unused): the first-order DPM-Solver++ update, which is DDIM's eta = 0 step, taken with a
        data prediction D extrapolated linearly in λ from this step's x̂_0 and `previous` = (t, x̂_0)
        of the step before. The first step has no step before, and the last one (to the clean image,
        λ = +∞) no finite step size: both stay first order, as diffusers' `lower_order_final` does."""
        if previous is not None:
            t_before, x0_before = previous
            # 1. step sizes in λ: h_i to the next time, h_{i-1} from the step before; r_i = h_{i-1} / h_i
            h = self.half_log_snr(t_prev) - self.half_log_snr(t)
            h_before = self.half_log_snr(t) - self.half_log_snr(t_before)
            # 2. D_i = (1 + 1/(2 r_i)) x̂_0 - 1/(2 r_i) x̂_0,before (Algorithm 2); first order where t_prev = -1
            weight = torch.where(t_prev >= 0, h / (2 * h_before), 0.0)
            x0 = x0 + self._per_sample(weight, x0) * (x0 - x0_before)
        # 3. x_{t_prev} = (σ_prev / σ_t) x_t - α_prev (e^{-h_i} - 1) D_i, which is DDIM's step with D_i as x̂_0
        return self.ddim_step(x_t, x0, t, t_prev)

    def timesteps(self, num_steps: int, strength: float = 1.0) -> list[int]:
        """Trailing spacing (Lin et al. 2024, table 2): T-1, ..., always starting at the noisiest step,
        so a short schedule still starts from x_T ≈ N(0, I); num_steps = T gives every step.

        `strength` in (0, 1] keeps the schedule's last round(strength · num_steps) steps (at least one),
        the part below noise level strength · T: an edit of a given image starts there (SDEdit, Meng et
        al. 2022), with the same step size as sampling from noise."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_train_timesteps}, got {num_steps}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        stride = self.num_train_timesteps / num_steps
        kept = max(1, round(strength * num_steps))
        return [round(self.num_train_timesteps - i * stride) - 1 for i in range(num_steps - kept, num_steps)]

    # -- training

    def training_loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        conditions: Conditions,
        *,
        condition_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ho et al.'s simple loss at one random timestep per sample, with the min-SNR weighting and
        classifier-free guidance's condition dropout; x0 (B, C_z, h, w) are scaled latents."""
        if condition_dropout > 0:
            conditions = conditions.dropped(condition_dropout, generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        t = torch.randint(0, self.num_train_timesteps, (len(x0),), device=x0.device, generator=generator)
        prediction = model(self.add_noise(x0, noise, t), t, conditions)
        target = self.training_target(x0, noise, t)
        per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * self.loss_weights(t)).mean()

    # -- sampling

    def guided_prediction(
        self,
        model: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        conditions: Conditions,
        guidance_scale: float,
        *,
        paired: Conditions | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance: null + w (cond - null) from one batched forward of x (B, ...) at
        t (B,); w = 1 is the conditional model alone, w = 0 the unconditional one. `paired` is
        `guidance_conditions(conditions, guidance_scale)`, made once by a sampling loop instead of every step."""
        paired = guidance_conditions(conditions, guidance_scale) if paired is None else paired
        if guidance_scale == 1.0:
            return model(x, t, paired).float()
        both = model(torch.cat([x, x]), torch.cat([t, t]), paired).float()
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def sample_steps(
        self,
        model: nn.Module,
        shape: tuple[int, ...],
        conditions: Conditions,
        *,
        sampler: str = "ddim",
        num_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        x_T: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Reverse diffusion from x_T ~ N(0, I) with one of SAMPLERS: yields (t, x_{t_prev}, x̂_0)
        after every step. `ddpm` is ancestral sampling (eta is ignored); `ddim` uses eta (0 = deterministic);
        `dpmpp_2m` is deterministic (eta is ignored). With `strength` < 1 it runs only the schedule's last
        steps (`timesteps`), from an x_T given at the first of them: an image noised or inverted to that
        level (counterfactual.py)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        step_function = SAMPLERS[sampler]
        device = torch.device(device) if device is not None else conditions.labels.device
        x = torch.randn(shape, device=device, generator=generator) if x_T is None else x_T.to(device, torch.float32)
        steps = self.timesteps(num_steps, strength)
        # What stays the same across steps is made once: the guidance batch's conditions, and every
        # step's t and t_prev in one copy to the device, each step's a view of it (B,).
        paired = guidance_conditions(conditions, guidance_scale)
        schedule = torch.tensor([*steps, -1], device=device)
        previous = None  # the step before's (t, x̂_0): what a multistep sampler remembers
        for index, step in enumerate(steps):
            t, t_prev = schedule[index].expand(shape[0]), schedule[index + 1].expand(shape[0])
            # 1. the guided network output, read as an estimate of the clean latent x̂_0
            x0 = self.predict_x0(x, self.guided_prediction(model, x, t, conditions, guidance_scale, paired=paired), t)
            # 2. fresh noise for the step (none for the last one, which lands on x_0)
            last = index + 1 == len(steps)
            noise = torch.zeros_like(x) if last else torch.randn(shape, device=device, generator=generator)
            # 3. the sampler's update x_t → x_{t_prev}
            x, previous = step_function(self, x, x0, t, t_prev, eta=eta, noise=noise, previous=previous), (t, x0)
            yield step, x, x0

    @torch.no_grad()
    def sample(self, model: nn.Module, shape: tuple[int, ...], conditions: Conditions, **kwargs) -> torch.Tensor:
        """The final x_0 of `sample_steps` (same arguments). A deque of one keeps only the last step's
        tensors, not every intermediate state of a long (e.g. 1000-step DDPM) chain."""
        ((_, x_0, _),) = deque(self.sample_steps(model, shape, conditions, **kwargs), maxlen=1)
        return x_0


def guidance_conditions(conditions: Conditions, guidance_scale: float) -> Conditions:
    """What a guided forward is conditioned on: `conditions` (B) alone at w = 1, else the conditional
    and null conditions of classifier-free guidance in one batch (2B)."""
    return conditions if guidance_scale == 1.0 else Conditions.cat(conditions, conditions.unconditional())


# Sampler name → one reverse step (scheduler, x_t, x̂_0, t, t_prev, *, eta, noise, previous) → x_{t_prev},
# where `previous` is the step before's (t, x̂_0), None at the first step: all a multistep method needs.
# A new sampler is one entry here; the scripts' --sampler choices are this table's keys.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": NoiseScheduler.ddim_step,
    "ddpm": NoiseScheduler.ddpm_step,
    "dpmpp_2m": NoiseScheduler.dpmpp_2m_step,
}


# --------------------------------------------------------------------------------------------- compilation

# The blocks a UNet or VAE repeats: regional compilation compiles each class once per input shape
# instead of the whole model as one graph, which took minutes for the adni UNet.
REPEATED_BLOCKS = (ResBlock, TransformerBlock, SpatialSelfAttention)


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """The module to call, compiled as config.COMPILE_MODES names: `none` returns `model`; `full`
    wraps it in torch.compile; `reduce-overhead` too, with CUDA graphs (one launch replays a whole
    step's kernels, for launch-bound steps); `regional` compiles every REPEATED_BLOCKS module in
    place and returns `model` itself. State dict keys never change."""
    if mode == "none":
        return model
    if mode == "regional":
        for module in model.modules():
            if isinstance(module, REPEATED_BLOCKS):
                module.compile()
        return model
    if mode in ("full", "reduce-overhead"):
        return torch.compile(model, mode="reduce-overhead" if mode == "reduce-overhead" else None)
    raise ValueError(f"unknown compile mode {mode!r}: choose none, full, regional or reduce-overhead")


# --------------------------------------------------------------------------------------------- optimizer


def make_optimizer(model: nn.Module, stage: StageConfig, steps_per_epoch: int) -> tuple[Optimizer, LambdaLR]:
    """AdamW (no decay on norms and biases) with linear warm-up and cosine decay over all epochs."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=stage.lr,
        betas=tuple(stage.betas),
        # One kernel for all parameters: 4x (demo UNet) and 6.5x (adni UNet) faster than the default on a CPU.
        fused=next(model.parameters()).device.type in ("cpu", "cuda"),
    )
    total_steps = max(1, stage.epochs * steps_per_epoch)
    warmup = min(stage.warmup_steps, total_steps // 2)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, LambdaLR(optimizer, lr_factor)


# --------------------------------------------------------------------------------------------- EMA


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class EMA:
    """Exponential moving average of a model's weights, the copy used for sampling.

    decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not
    dominated by the random initialisation."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow ← decay · shadow + (1 - decay) · weights; buffers are copied."""
        self.num_updates += 1
        decay = self.current_decay()
        source = unwrap_model(model)
        shadow = [p for p in self.model.parameters()]
        current = [p.detach() for p in source.parameters()]
        torch._foreach_lerp_(shadow, current, 1.0 - decay)
        buffers = list(self.model.buffers())
        if buffers:  # one launch for all of them, not one per buffer
            torch._foreach_copy_(buffers, list(source.buffers()))

    def copy_to(self, model: nn.Module) -> None:
        unwrap_model(model).load_state_dict(self.model.state_dict())

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
