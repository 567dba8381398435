"""The model function the denoising loop calls, `model(x, t, ᾱ_t)`, with the conditioning as layers
around the UNet call (the lesson of k-diffusion's `external.py` and its CFG denoiser).

The loop (`pipelines.denoise`) knows nothing of prompts, masks, guidance or what the UNet
predicts: it asks for ε at (x, t) and gives the step's ᾱ_t. What the UNet is conditioned on is
decided when the function is built, one layer a kind:

    eps_of = UNetCall(unet, prediction_type)                  (x, t, ᾱ_t, context) -> ε (v converted)
    eps_of = ConcatCondition(eps_of, mask_and_masked_latent)  the 9-channel inpainting UNet
    model  = ClassifierFreeGuidance(eps_of, cond, uncond, w)  (x, t, ᾱ_t) -> Prediction
          or Unguided(eps_of, cond)

v-prediction (SD 2.x 768-v; Salimans & Ho 2022): the UNet predicts v = √ᾱ ε − √(1−ᾱ) x₀ instead of
ε; `eps_from_v` turns it into ε̂ = √(1−ᾱ) x_t + √ᾱ v, so every sampler, img2img, inpainting and
the per-step callback (whose x̂₀ follows from ε̂) work unchanged.

Classifier-free guidance (`003`/`004 · CFG 值`, Ho & Salimans 2022): one UNet call on the batch
[x; x] with the contexts [uncond; cond], then ε = ε_uncond + w·(ε_cond − ε_uncond).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .unet import UNet

PREDICTION_TYPES = ("epsilon", "v_prediction")
# (x, t, ᾱ_t, context) -> ε: what each inner layer takes and gives.
EpsFunction = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """ε̂ = √(1−ᾱ_t) x_t + √ᾱ_t v: the v-parameterisation (v = √ᾱ ε − √(1−ᾱ) x₀) solved for ε,
    with x_t = √ᾱ x₀ + √(1−ᾱ) ε. Then x̂₀ = √ᾱ x_t − √(1−ᾱ) v follows from ε̂ as for any ε-model."""
    return (1 - alpha_bar_t) ** 0.5 * x_t + alpha_bar_t**0.5 * v


@dataclass
class Prediction:
    """What the model function gives the loop at one step."""

    eps: Tensor  # the ε the sampler steps with (guided, if guidance is on)
    eps_cond: Tensor  # the UNet's ε given the prompt
    eps_uncond: Tensor | None  # ε given the negative prompt (None without guidance)


class UNetCall:
    """The innermost layer: ε from the UNet, a v-model's output converted here, once, for every sampler."""

    def __init__(self, unet: UNet, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet, self.v = unet, prediction_type == "v_prediction"

    def __call__(self, x: Tensor, t: Tensor, alpha_bar_t: Tensor, context: Tensor) -> Tensor:
        out = self.unet(x, t, context)
        return eps_from_v(x[:, : out.shape[1]], out, alpha_bar_t) if self.v else out  # the latent's channels


class ConcatCondition:
    """Extra input channels appended to x before the UNet: for the 9-channel inpainting UNet the mask
    (1 channel) and the masked image's latent (4). `condition` is (B, c, h, w) for B images; a
    batch of k·B (the guidance halves) gets it k times."""

    def __init__(self, inner: EpsFunction, condition: Tensor):
        self.inner, self.condition = inner, condition

    def __call__(self, x: Tensor, t: Tensor, alpha_bar_t: Tensor, context: Tensor) -> Tensor:
        repeats = x.shape[0] // self.condition.shape[0]
        x = torch.cat([x, self.condition.repeat(repeats, 1, 1, 1)], dim=1)  # (B, 4 + c, h, w)
        return self.inner(x, t, alpha_bar_t, context)


class Unguided:
    """ε given the prompt alone (guidance scale ≤ 1)."""

    def __init__(self, inner: EpsFunction, cond: Tensor):
        self.inner, self.cond = inner, cond

    def __call__(self, x: Tensor, t: Tensor, alpha_bar_t: Tensor) -> Prediction:
        eps = self.inner(x, t, alpha_bar_t, self.cond)
        return Prediction(eps, eps, None)


class ClassifierFreeGuidance:
    """ε = ε_uncond + w·(ε_cond − ε_uncond), both from one UNet call on [x; x] with [uncond; cond]."""

    def __init__(self, inner: EpsFunction, cond: Tensor, uncond: Tensor, scale: float):
        self.inner, self.context, self.scale = inner, torch.cat([uncond, cond]), scale  # (2B, T, C)

    def __call__(self, x: Tensor, t: Tensor, alpha_bar_t: Tensor) -> Prediction:
        eps_uncond, eps_cond = self.inner(torch.cat([x, x]), t, alpha_bar_t, self.context).chunk(2)  # each (B, 4, h, w)
        return Prediction(eps_uncond + self.scale * (eps_cond - eps_uncond), eps_cond, eps_uncond)
