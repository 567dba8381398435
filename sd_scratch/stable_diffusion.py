"""The four parts of Stable Diffusion held together: tokenizer → text encoder → UNet (+ scheduler) → VAE.

`000 · Stable Diffusion原理` splits SD into the text encoder, the "图像优化模块" (UNet and scheduler)
and the image decoder (the VAE). `sd_scratch.load(...)` returns this object; the generation
pipelines are built on it.
"""
from __future__ import annotations

import torch

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

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 0) -> torch.Tensor:
        """Prompts -> token ids (B, 77) -> text embeddings (B, 77, width), the UNet's context."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids, clip_skip=clip_skip)
