"""Training Stable Diffusion's parts: the two losses, the latent scale, and the tiny model's sizes.

SD is trained in two stages (`001 · VAE模型`, `003 · U-Net`), and so is the built-in model:

1. The autoencoder learns to reconstruct images through its latent: a reconstruction loss plus a
   small KL term that keeps the encoder's Gaussian close to N(0, I) (`VAELoss`).
2. With the autoencoder frozen, the text encoder and the UNet learn together to predict the noise
   added to a scaled latent (`DiffusionLoss`, document 003's objective):

       t ~ U{0, …, 999},  ε ~ N(0, I),  x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε,  loss = ‖ε − ε_θ(x_t, t, c)‖²

   with ᾱ_t from SD v1's schedule (`noise_schedule.betas_for`), and about one caption in ten replaced
   by "" so the same network also learns ε_θ(x_t, t, ∅), which classifier-free guidance needs.

Both losses are `nn.Module`s whose `forward` returns the loss, so `DistributedDataParallel` can wrap
them unchanged. `scripts/train_tiny.py` is the driver; the tiny sizes live here (`tiny_configs`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..guidance import PREDICTION_TYPES
from ..noise_schedule import add_noise, alpha_bars, randn_like
from ..text_encoder import CLIPTextEncoder, TextEncoderConfig
from ..unet import UNet, UNetConfig
from ..vae import LATENT_SCALE, AutoencoderKL, VAEConfig

# "About 10%" of captions dropped for classifier-free guidance (Ho & Salimans 2022 use 10–20%;
# SD v1's model card: "10% dropping of the text-conditioning").
CAPTION_DROP = 0.1


@dataclass
class TinyConfigs:
    vae: VAEConfig
    text: TextEncoderConfig
    unet: UNetConfig


def tiny_configs() -> TinyConfigs:
    """The built-in model's sizes. Every choice respects what a single file cannot record, so the
    loader reads them back: channel counts are multiples of 32 (GroupNorm groups), UNet heads are 8,
    and the text width is a multiple of 64 (heads = width // 64).

    VAE: f = 8 (four levels), so a 64×64 image has a 4×8×8 latent, 48× fewer numbers, as in SD.
    64 channels, not 32, at every level: with 32 groups, 32 channels would be one channel per
    group, and GroupNorm would then scale every channel of a flat background to zero, so the
    decoder's last norm could not pass on which colour the background is (SD has 4 per group).
    Text encoder: CLIP's architecture and its 49,408-token vocabulary, 128 wide and 3 layers deep
    (two shapes in a relation need the words to see each other: "red" must bind to "circle").
    UNet: two levels, 8×8 (64 channels) and 4×4 (128), two ResNets each, cross-attention to the
    text at both.
    """
    return TinyConfigs(
        vae=VAEConfig(block_out_channels=(64, 64, 64, 64), layers_per_block=1),
        text=TextEncoderConfig(width=128, layers=3, heads=2, mlp_width=512),
        unet=UNetConfig(channels=(64, 128), attention_levels=(True, True), layers_per_level=2, context_dim=128),
    )


# ---- stage 1: the autoencoder ---------------------------------------------------------------------

class VAELoss(nn.Module):
    """Reconstruction (L1 + squared error, per pixel) plus kl_weight × KL(q(z|x) ‖ N(0, I)) per latent number.

    Latent Diffusion trains with a perceptual and an adversarial term as well; flat-coloured shapes
    need neither. What they do need is attention to the shape: it covers 5–17% of the pixels, so
    an autoencoder that paints the background alone already scores well. Pixels that differ from the
    image's corners (always background in the shapes world) weigh `foreground_weight` times more.
    The KL term is kept tiny (Latent Diffusion uses 1e-6 on sums): it keeps the latent from spreading
    without bound but barely limits what it carries. At 1e-3 on these means it made the encoder's
    noise drown the colour, and every shape decoded as the average orange.
    """

    def __init__(self, vae: AutoencoderKL, kl_weight: float = 1e-6, foreground_weight: float = 5.0):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.foreground_weight = foreground_weight

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        posterior = self.vae.encode(images)
        reconstruction = self.vae.decode(posterior.sample(generator))
        l1, mse = reconstruction_errors(reconstruction, images, self.foreground_weight)
        mean, logvar = posterior.mean, posterior.logvar
        kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).mean()
        return {"loss": l1 + mse + self.kl_weight * kl, "l1": l1, "mse": mse, "kl": kl}


class DecoderLoss(nn.Module):
    """Fine-tune the decoder alone, the encoder frozen, as Stability did for SD's ft-MSE VAE.

    The latents do not change, so a UNet trained on them stays valid while the decoder keeps
    learning to draw them sharper; the two can even train at the same time.
    """

    def __init__(self, vae: AutoencoderKL, foreground_weight: float = 5.0):
        super().__init__()
        self.vae = vae
        self.foreground_weight = foreground_weight
        for frozen in (vae.encoder, vae.quant_conv):
            frozen.requires_grad_(False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            z = self.vae.encode(images).sample(generator)
        l1, mse = reconstruction_errors(self.vae.decode(z), images, self.foreground_weight)
        return {"loss": l1 + mse, "l1": l1, "mse": mse}


def reconstruction_errors(reconstruction: torch.Tensor, images: torch.Tensor,
                          foreground_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean absolute and squared errors. Pixels that differ from the image's corners (always
    background in the shapes world) weigh `foreground_weight` times more; each image's weights
    average 1."""
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].mean(dim=2)  # (B, 3)
    foreground = (images - corners[:, :, None, None]).abs().amax(dim=1, keepdim=True) > 0.2  # (B, 1, H, W)
    weights = 1.0 + (foreground_weight - 1.0) * foreground.to(images.dtype)
    weights = weights / weights.mean(dim=(1, 2, 3), keepdim=True)
    error = reconstruction - images
    return (weights * error.abs()).mean(), (weights * error**2).mean()


@torch.no_grad()
def fold_latent_normalisation(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> None:
    """Make LATENT_SCALE · z have zero mean and unit std per channel, by editing the 1×1 convs around
    the latent, so that the pipeline's fixed 0.18215 suits this VAE as it suits SD's.

    With m, s the channel's mean and std of the encoder's mean latent, the new latent is
    z' = (z − m) / (s · LATENT_SCALE) = a·z + b. `quant_conv` (which outputs mean and log-variance)
    gets its mean rows scaled by a and shifted by b, its log-variance rows shifted by 2·ln a;
    `post_quant_conv` (the decoder's first layer) gets z = (z' − b)/a folded into its weights. The
    decoder sees exactly the same numbers as before: only the latent's units change.
    """
    means = torch.cat([vae.encode(images[i:i + batch]).mean for i in range(0, len(images), batch)])
    m = means.mean(dim=(0, 2, 3))  # (latent_channels,)
    s = means.std(dim=(0, 2, 3))
    a, b = 1.0 / (s * LATENT_SCALE), -m / (s * LATENT_SCALE)
    n = vae.config.latent_channels
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.weight[:n] *= a[:, None, None, None]
    quant.bias[:n] = a * quant.bias[:n] + b
    quant.bias[n:] += 2.0 * torch.log(a)
    # post(z) = W z + c with z = (z' − b)/a  ->  W' = W / a (per input channel), c' = c − W' b
    post.weight /= a[None, :, None, None]
    post.bias -= (post.weight[:, :, 0, 0] * b[None, :]).sum(dim=1)


# ---- stage 2: text encoder and UNet ----------------------------------------------------------------

class DiffusionLoss(nn.Module):
    """Document 003's noise-prediction loss for a UNet conditioned on a text encoder's output:
    ‖ε_θ(x_t, t, c) − ε‖², or with prediction_type "v_prediction" (SD 2.x's 768-v) ‖v_θ − v‖² with
    the target v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (Salimans & Ho 2022)."""

    def __init__(self, text_encoder: CLIPTextEncoder, unet: UNet, schedule: str = "scaled_linear",
                 prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.text_encoder = text_encoder
        self.unet = unet
        self.prediction_type = prediction_type
        self.register_buffer("alpha_bar", alpha_bars(schedule), persistent=False)  # ᾱ_t, t = 0…999

    def forward(self, x0: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0: scaled latents (B, 4, h, w); ids: token ids (B, 77), already with some captions dropped."""
        B = x0.shape[0]
        draw_on = generator.device if generator is not None else x0.device  # a CPU generator draws on the CPU
        t = torch.randint(0, len(self.alpha_bar), (B,), generator=generator, device=draw_on).to(x0.device)
        eps = randn_like(x0, generator)
        alpha_bar_t = self.alpha_bar[t].to(x0.dtype)[:, None, None, None]
        x_t = add_noise(x0, eps, alpha_bar_t)  # the forward process, noise_schedule.py
        prediction = self.unet(x_t, t, self.text_encoder(ids))
        target = eps if self.prediction_type == "epsilon" else velocity(x0, eps, alpha_bar_t)
        return F.mse_loss(prediction, target)


def velocity(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t ε − √(1−ᾱ_t) x₀, what a v-model is trained to predict."""
    return alpha_bar_t**0.5 * eps - (1 - alpha_bar_t) ** 0.5 * x0


def drop_captions(ids: torch.Tensor, empty_ids: torch.Tensor, p: float = CAPTION_DROP,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each row of `ids` (B, 77) by the empty caption's ids with probability p."""
    draw_on = generator.device if generator is not None else ids.device
    drop = torch.rand(ids.shape[0], generator=generator, device=draw_on).to(ids.device) < p
    return torch.where(drop[:, None], empty_ids.to(ids.device)[None, :], ids)
