"""The four parts of Stable Diffusion held together: tokenizer → text encoder → UNet (+ scheduler) → VAE.

`000 · Stable Diffusion原理` splits SD into the text encoder, the "图像优化模块" (UNet and scheduler)
and the image decoder (the VAE). `sd_scratch.load(...)` returns this object; the generation
pipelines are built on it.
"""
from __future__ import annotations

import torch
from PIL import Image

from . import pipelines
from .text_encoder import CLIPTextEncoder
from .tokenizer import CLIPTokenizer
from .unet import UNet
from .vae import AutoencoderKL


class StableDiffusion:
    """Holds `.tokenizer`, `.text_encoder`, `.unet`, `.vae`, and `.report` (what loading read and chose)."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextEncoder, unet: UNet, vae: AutoencoderKL,
                 report=None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.report = report

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device=device, dtype=dtype)
        return self

    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] = "", **kwargs) -> list[Image.Image]:
        """Text to image; see `pipelines.txt2img` for the settings."""
        return pipelines.txt2img(self, prompt, negative_prompt, **kwargs)

    def img2img(self, prompt: str | list[str], image, negative_prompt: str | list[str] = "", **kwargs) -> list[Image.Image]:
        """Image to image (SDEdit) with `strength`; see `pipelines.img2img`."""
        return pipelines.img2img(self, prompt, image, negative_prompt, **kwargs)

    def inpaint(self, prompt: str | list[str], image, mask, negative_prompt: str | list[str] = "",
                **kwargs) -> list[Image.Image]:
        """Repaint the white part of `mask`; see `pipelines.inpaint`."""
        return pipelines.inpaint(self, prompt, image, mask, negative_prompt, **kwargs)
