"""Pictures in and out: PIL images <-> tensors in [-1, 1], masks, and latents <-> pictures.

Mirrors step 6 of `001`'s six steps (the latent divided by 0.18215, decoded by the VAE, mapped from
[-1, 1] to uint8 pixels) and its way back for img2img (`004 · 图生图`: the picture encoded to a
latent, times 0.18215).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .memory.vae_tiling import decode_tiled
from .vae import LATENT_SCALE

if TYPE_CHECKING:
    from .stable_diffusion import StableDiffusion

MASK_THRESHOLD = 0.5  # mask pixels at least half white are repainted


def open_image(image, name: str) -> Image.Image:
    """A PIL image from a PIL image, a path or a uint8 array; `name` is the parameter, for errors."""
    if isinstance(image, (str, Path)):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as err:
            raise ValueError(f"{name}: cannot read {image!r} as an image ({err})") from None
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image, an image file path or a uint8 array, got {type(image).__name__}")
    return image


def image_to_unit_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image (any mode: RGBA, palette and grayscale become RGB) -> (1, 3, H, W) in [0, 1],
    resized with Lanczos where its size differs (a ControlNet's hint is read like this)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (H, W, 3) in [0, 1]
    return pixels.permute(2, 0, 1)[None]


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], the VAE's pixel range."""
    return image_to_unit_tensor(image, height, width) * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """Mask image -> (1, 1, H, W) of 0 (keep) and 1 (repaint): grayscale, threshold at one half."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    values = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    return (values >= MASK_THRESHOLD).float()[None, None]


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (values outside [-1, 1] are clipped to the pixel range)."""
    pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def encode(sd: StableDiffusion, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> a scaled latent sample (B, 4, H/8, W/8) in the model's
    dtype, drawn from the VAE's posterior with `generator`."""
    posterior = sd.vae.encode(pixels.to(sd.device, sd.vae_dtype))
    return (posterior.sample(generator) * LATENT_SCALE).to(sd.dtype)


def decode(sd: StableDiffusion, latents: torch.Tensor) -> list[Image.Image]:
    """x_0 -> images: divided by LATENT_SCALE, decoded in the VAE's own dtype (fp32 unless asked
    otherwise), in tiles if `sd.set_vae_tiling` asked for them. NaN or Inf raises."""
    z = latents.to(sd.vae_dtype) / LATENT_SCALE
    images = sd.vae.decode(z) if sd.vae_tile is None else decode_tiled(sd.vae, z, sd.vae_tile)
    if not torch.isfinite(images).all():
        raise FloatingPointError("the decoded image contains NaN or Inf values (with fp16 try dtype='fp32' or "
                                 "keep the VAE in fp32); no picture was made")
    return tensor_to_images(images)
