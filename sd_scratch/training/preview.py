"""Distilling a TAESD-shaped preview decoder (`addons/preview.py`) from a model's VAE, and fitting its cheap matrix.

The teacher is the VAE's decoder and the data are its own decodes: latents z of the world's
pictures (the VAE's posterior samples × LATENT_SCALE, what the UNet learns to produce) go through
the VAE's decoder once, and the small decoder learns z -> that decode, an L1 loss on pixels in [0, 1].
A share of the latents are blends of two pictures' latents: during sampling a preview is mostly
shown x̂₀ = E[x_0 | x_t], early on an average of the pictures x_t could still become, which no
single picture's latent looks like.
Nothing else is needed, no adversarial loss or perceptual network as in TAESD's own training:
the built-in world's pictures are flat colours and edges. The cheap matrix is the least-squares
answer to the same question at one pixel per latent pixel: each 8×8 patch's mean colour from z.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..addons.preview import LatentToRGB, TAESDDecoder
from ..vae import LATENT_SCALE, AutoencoderKL
from . import captions

UINT8_LEVELS = 255


@torch.no_grad()
def vae_decoded(vae: AutoencoderKL, latents: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Scaled latents -> the VAE's decodes in [0, 1], the distillation's targets (clamped as a picture is)."""
    images = [vae.decode(latents[i:i + batch] / LATENT_SCALE) for i in range(0, len(latents), batch)]
    return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def world_latents(vae: AutoencoderKL, n: int, seed: int, held_out: bool = False, batch: int = 128) -> torch.Tensor:
    """n pictures of the world (`captions.make_world`: the training or held-out combinations), encoded
    as the pipelines encode: a posterior sample × LATENT_SCALE."""
    images = captions.make_world(n, seed, held_out=held_out).images
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([vae.encode(images[i:i + batch]).sample(generator)
                      for i in range(0, n, batch)]) * LATENT_SCALE


def blends(latents: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n blends a·z_i + (1 − a)·z_j of random pairs of `latents`, a ~ U(0.2, 0.8)."""
    generator = torch.Generator().manual_seed(seed)
    i, j = torch.randint(0, len(latents), (2, n), generator=generator)
    a = 0.2 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    return a * latents[i] + (1 - a) * latents[j]


def sampled_latents(sd, n: int, seed: int, steps: int = 20, held_out: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own latents for n captions of the world: (the final x_0 (n, 4, h, w), every step's
    prediction x̂₀ (steps·n, 4, h, w)), the latents a preview is shown during sampling."""
    rng = random.Random(seed)
    prompts = [captions.random_caption(captions.random_scene(rng, held_out=held_out), rng) for _ in range(n)]
    predictions: list[torch.Tensor] = []
    final: list[torch.Tensor] = []

    def record(info) -> None:
        predictions.append(info.x0_pred.float())
        if info.step == steps - 1:
            final.append(info.x_t.float())

    sd.txt2img(prompts, steps=steps, seed=seed, guidance_scale=3.0, callback=record, progress=False)
    return final[0], torch.cat(predictions)


def random_crops(latents: torch.Tensor, targets: torch.Tensor, size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A size×size window of each latent, at its own random place, and the same window of its target."""
    factor = targets.shape[-1] // latents.shape[-1]
    h, w = latents.shape[-2:]
    tops = torch.randint(0, h - size + 1, (len(latents),), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (len(latents),), generator=generator).tolist()
    z = torch.stack([l[:, t:t + size, s:s + size] for l, t, s in zip(latents, tops, lefts)])
    x = torch.stack([im[:, t * factor:(t + size) * factor, s * factor:(s + size) * factor]
                     for im, t, s in zip(targets, tops, lefts)])
    return z, x


def distill(decoder: TAESDDecoder, latents: torch.Tensor, targets: torch.Tensor, steps: int, batch: int = 32,
            crop: int = 4, lr: float = 2e-3, seed: int = 0,
            log: Callable[[int, float], None] | None = None) -> TAESDDecoder:
    """Train `decoder` to give `targets` (N, 3, H, W) in [0, 1] from `latents` (N, 4, h, w): AdamW, L1,
    cosine-decayed learning rate, batches drawn by a generator seeded with `seed`. Each step sees a
    crop×crop window of each latent (a convolutional network can learn from windows; 4×4 of the
    built-in model's 8×8 latents costs a quarter of the whole). Channels-last tensors: a third faster on CPU."""
    decoder.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    decoder.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        z, x = random_crops(latents[index], targets[index], crop, generator)
        loss = F.l1_loss(decoder(z.contiguous(memory_format=torch.channels_last)), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None:
            log(step, loss.item())
    return decoder.eval()


def fit_cheap_matrix(latents: torch.Tensor, targets: torch.Tensor, name: str) -> LatentToRGB:
    """Least squares of [z, 1] -> rgb in [-1, 1], rgb each latent pixel's patch mean of `targets` ([0, 1])."""
    factor = targets.shape[-1] // latents.shape[-1]
    rgb = F.avg_pool2d(targets * 2 - 1, factor)                          # (N, 3, h, w)
    z = latents.double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N·h·w, 4)
    z1 = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    solution = torch.linalg.lstsq(z1, rgb.double().permute(0, 2, 3, 1).reshape(-1, 3)).solution  # (5, 3)
    rounded = [[round(v, 4) for v in row] for row in solution.tolist()]
    return LatentToRGB(name, tuple(tuple(row) for row in rounded[:-1]), tuple(rounded[-1]))


def save_preview_decoder(decoder: TAESDDecoder, path) -> None:
    """fp16, in the official `taesd_decoder.pth` layout (Sequential indices: `1.weight`, `3.conv.0.weight`...)."""
    save_file({k: v.detach().half().contiguous() for k, v in decoder.state_dict().items()}, str(path))


def image_error(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(mean absolute difference in uint8 levels, PSNR in dB) of two batches in [0, 1], each first
    rounded to uint8 as a picture is."""
    a, b = ((x.clamp(0, 1) * UINT8_LEVELS).round() for x in (images, reference))
    mse = ((a - b) ** 2).mean().item()
    return (a - b).abs().mean().item(), 10 * math.log10(UINT8_LEVELS ** 2 / max(mse, 1e-12))
