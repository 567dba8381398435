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
from .vae_tiling import check_tile


class StableDiffusion:
    """Holds `.tokenizer`, `.text_encoder`, `.unet`, `.vae`, and `.report` (what loading read and chose)."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextEncoder, unet: UNet, vae: AutoencoderKL,
                 report=None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.report = report
        self.vae_tile: int | None = None  # decode in tiles of this many latent pixels (None: whole)

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

    def optimize(self, compile: bool = True) -> StableDiffusion:
        """The fast mode: the UNet (where nearly all the time goes) in channels_last memory layout
        and compiled with torch.compile. The first call with each new input shape compiles (slow)."""
        self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet = torch.compile(self.unet)
        return self

    def set_attention_slicing(self, slice_size: int | None = 1024) -> StableDiffusion:
        """Compute every attention `slice_size` queries at a time (None: all at once). Same numbers,
        less memory: at 512×512 the UNet's largest score matrix is 8 heads × 4096 × 4096."""
        if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
            raise ValueError(f"slice_size must be a positive integer or None, got {slice_size!r}")
        for module in (*self.unet.modules(), *self.vae.modules()):
            if hasattr(module, "slice_size"):
                module.slice_size = slice_size
        return self

    def set_vae_tiling(self, tile: int | None = 64) -> StableDiffusion:
        """Decode the pipelines' images `tile`×`tile` latent pixels at a time (None: whole): the same
        numbers, less memory for large images, a little slower; see `vae_tiling.py`."""
        if tile is not None:
            check_tile(tile)  # now, not at the first decode
        self.vae_tile = tile
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
