"""The variational autoencoder (AutoencoderKL) that moves images to and from SD's latent space.

Mirrors `001 · VAE模型` (the encoder gives (μ, σ), a latent z is sampled from that distribution and
the decoder maps z back to an image), `003 · （1）VAE（变分自编码器）` (512×512×3 -> 64×64×4) and
`004 · 图像分辨率` (a 768×512 image has a 4×96×64 latent: each side shrinks by f = 8).

Encoder: conv_in -> one down block per entry of `block_out_channels` (ResNet blocks, then a stride-2
conv except after the last) -> mid block (ResNet, single-head self-attention, ResNet) -> GroupNorm,
SiLU, conv_out to 2·latent_channels (mean and log-variance) -> 1×1 `quant_conv`.
Decoder: 1×1 `post_quant_conv` -> conv_in -> mid block -> up blocks in reversed channel order, each
with layers_per_block + 1 ResNets and a nearest ×2 upsampling except after the last -> GroupNorm,
SiLU, conv_out. Attribute names equal diffusers' `AutoencoderKL` keys, so its weights load strictly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .noise_schedule import randn_like

# SD v1's `configs/stable-diffusion/v1-inference.yaml`, `scale_factor: 0.18215`: the pipeline
# multiplies encoder latents by it (and divides before decoding) so that they have about unit
# variance, like the noise the UNet was trained against. The VAE itself never applies it.
LATENT_SCALE = 0.18215
# Bounds on the encoder's log-variance, as in CompVis' and diffusers' DiagonalGaussianDistribution:
# they keep exp(logvar) between ~1e-13 and ~5e8, so std and var never overflow to inf or become 0.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
NORM_EPS = 1e-6  # every GroupNorm of the SD VAE


@dataclass
class VAEConfig:
    """Sizes of the autoencoder; the defaults are SD v1's (f = 8, 4 latent channels)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32

    @property
    def factor(self) -> int:
        """How many times each side shrinks from image to latent: 2 per downsampling, 8 for SD."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls) -> VAEConfig:
        return cls()

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> VAEConfig:
        """Read the sizes off the shapes and key counts (diffusers keys). Weights do not record the
        GroupNorm group count, so it stays at SD's 32."""
        def count(pattern: str) -> int:
            return len({m.group(1) for k in sd if (m := re.match(pattern, k))})

        n_blocks = count(r"encoder\.down_blocks\.(\d+)\.")
        return cls(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_channels=sd["decoder.conv_out.weight"].shape[0],
            latent_channels=sd["post_quant_conv.weight"].shape[0],
            block_out_channels=tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                     for i in range(n_blocks)),
            layers_per_block=count(r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        )

    @classmethod
    def from_diffusers_config(cls, config: dict) -> VAEConfig:
        """Build from the dict of a diffusers-folder `vae/config.json`."""
        expected = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                    "mid_block_add_attention": True}
        for key, value in expected.items():
            if config.get(key, value) != value:
                raise ValueError(f"unsupported VAE config: {key}={config[key]!r} (SD v1 uses {value!r})")
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != block for t in config.get(key, [block])):
                raise ValueError(f"unsupported VAE config: {key}={config[key]!r} (SD v1 uses only {block})")
        return cls(
            in_channels=config["in_channels"], out_channels=config["out_channels"],
            latent_channels=config["latent_channels"],
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"], norm_groups=config.get("norm_num_groups", 32),
        )


class DiagonalGaussian:
    """The encoder's output read as N(mean, diag(std²)) per latent element."""

    def __init__(self, moments: torch.Tensor):
        # (B, 2·latent, h, w) -> mean and logvar, each (B, latent, h, w)
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std·ε, ε drawn by `noise_schedule.draw_noise` (as diffusers draws it, so the same
        seeded generator gives the same z)."""
        return self.mean + self.std * randn_like(self.mean, generator)

    def mode(self) -> torch.Tensor:
        """The most likely latent, the mean (deterministic encoding)."""
        return self.mean


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))); a 1×1 conv_shortcut when the channel count changes.
    Unlike the UNet's ResNet blocks, there is no time embedding."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the h·w positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.slice_size: int | None = None  # queries per slice (attention slicing); None = all at once
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key `to_out.0`, as diffusers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # (B, C, H, W) -> (B, HW, C)
        q, k, v = (a[:, None] for a in (self.to_q(h), self.to_k(h), self.to_v(h)))  # one head: (B, 1, HW, C)
        y = attention(q, k, v, self.slice_size)[:, 0]
        return x + rearrange(self.to_out[0](y), "b (h w) c -> b c h w", h=H, w=W)


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    """Halve H and W: pad one zero row/column at the bottom/right only, then a stride-2 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # -> (B, C, 2H, 2W)


def resnet_stack(in_ch: int, out_ch: int, n: int, groups: int) -> nn.Sequential:
    """`n` ResNet blocks, the first changing in_ch to out_ch (keys `resnets.{j}`)."""
    return nn.Sequential(*(ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(n)))


class DownBlock(nn.Module):
    """One encoder level: ResNet blocks, then a Downsample except at the last level."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_ch, out_ch, n, groups)
        self.downsamplers = nn.Sequential(*([Downsample(out_ch)] if downsample else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsamplers(self.resnets(x))


class UpBlock(nn.Module):
    """One decoder level: ResNet blocks, then an Upsample except at the last level."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_ch, out_ch, n, groups)
        self.upsamplers = nn.Sequential(*([Upsample(out_ch)] if upsample else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsamplers(self.resnets(x))


class Encoder(nn.Module):
    """Image (B, in, H, W) -> mean and log-variance (B, 2·latent, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g, last = cfg.block_out_channels, cfg.norm_groups, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.Sequential(*(
            DownBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, g, downsample=i < last)
            for i in range(len(chs))))
        self.mid_block = MidBlock(chs[-1], g)
        self.conv_norm_out = group_norm(chs[-1], g)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.down_blocks(self.conv_in(x)))  # SD: (B, 3, H, W) -> (B, 512, H/8, W/8)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, latent, h, w) -> image (B, out, f·h, f·w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.block_out_channels[::-1], cfg.norm_groups  # widest first
        last = len(chs) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g)
        self.up_blocks = nn.Sequential(*(
            UpBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block + 1, g, upsample=i < last)
            for i in range(len(chs))))
        self.conv_norm_out = group_norm(chs[-1], g)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.up_blocks(self.mid_block(self.conv_in(z)))  # SD: (B, 4, h, w) -> (B, 128, 8h, 8w)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """SD's VAE: `encode` images in [-1, 1] to a DiagonalGaussian over latents, `decode` latents
    back to images. Latents here are unscaled: multiplying by LATENT_SCALE is the pipeline's job."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @staticmethod
    def _check(x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """(B, 3, H, W) in [-1, 1] -> distribution over latents (B, 4, H/8, W/8) for SD."""
        self._check(images, self.config.in_channels, "images")
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) unscaled latent -> (B, 3, 8h, 8w) image, about [-1, 1] but not clamped."""
        self._check(z, self.config.latent_channels, "latents")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruct: decode the mean latent of `images`."""
        return self.decode(self.encode(images).mode())

