"""The model function the denoising loop calls, `model(x, t)`, with the conditioning as layers
around the UNet call (the lesson of k-diffusion's `external.py` and its CFG denoiser).

The loop (`pipelines.denoise`) knows nothing of prompts, masks or guidance: it asks for ε at
(x, t). What the UNet is conditioned on is decided when the function is built, one layer a kind:

    eps_of = UNetCall(unet)                                  (x, t, context) -> ε
    eps_of = ConcatCondition(eps_of, mask_and_masked_latent) the 9-channel inpainting UNet
    model  = ClassifierFreeGuidance(eps_of, cond, uncond, w) (x, t) -> Prediction
          or Unguided(eps_of, cond)

Classifier-free guidance (`003`/`004 · CFG 值`, Ho & Salimans 2022): one UNet call on the batch
[x; x] with the contexts [uncond; cond], then ε = ε_uncond + w·(ε_cond − ε_uncond).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .unet import UNet

# (x, t, context) -> ε: what each inner layer takes and gives.
EpsFunction = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Prediction:
    """What the model function gives the loop at one step."""

    eps: Tensor  # the ε the sampler steps with (guided, if guidance is on)
    eps_cond: Tensor  # the UNet's ε given the prompt
    eps_uncond: Tensor | None  # ε given the negative prompt (None without guidance)


class UNetCall:
    """The innermost layer: ε from the UNet. The UNet predicts ε for every family loaded today; a
    v-predicting family would convert its output here, once, for every sampler."""

    def __init__(self, unet: UNet, prediction_type: str = "epsilon"):
        if prediction_type != "epsilon":
            raise ValueError(f"prediction_type {prediction_type!r} is not supported yet (only 'epsilon')")
        self.unet = unet

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.unet(x, t, context)


class ConcatCondition:
    """Extra input channels appended to x before the UNet: for the 9-channel inpainting UNet the mask
    (1 channel) and the masked image's latent (4). `condition` is (B, c, h, w) for B images; a
    batch of k·B (the guidance halves) gets it k times."""

    def __init__(self, inner: EpsFunction, condition: Tensor):
        self.inner, self.condition = inner, condition

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        repeats = x.shape[0] // self.condition.shape[0]
        return self.inner(torch.cat([x, self.condition.repeat(repeats, 1, 1, 1)], dim=1), t, context)  # (B, 4 + c, h, w)


class Unguided:
    """ε given the prompt alone (guidance scale ≤ 1)."""

    def __init__(self, inner: EpsFunction, cond: Tensor):
        self.inner, self.cond = inner, cond

    def __call__(self, x: Tensor, t: Tensor) -> Prediction:
        eps = self.inner(x, t, self.cond)
        return Prediction(eps, eps, None)


class ClassifierFreeGuidance:
    """ε = ε_uncond + w·(ε_cond − ε_uncond), both from one UNet call on [x; x] with [uncond; cond]."""

    def __init__(self, inner: EpsFunction, cond: Tensor, uncond: Tensor, scale: float):
        self.inner, self.context, self.scale = inner, torch.cat([uncond, cond]), scale  # (2B, T, C)

    def __call__(self, x: Tensor, t: Tensor) -> Prediction:
        eps_uncond, eps_cond = self.inner(torch.cat([x, x]), t, self.context).chunk(2)  # each (B, 4, h, w)
        return Prediction(eps_uncond + self.scale * (eps_cond - eps_uncond), eps_cond, eps_uncond)
