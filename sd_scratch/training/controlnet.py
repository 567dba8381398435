"""Training a ControlNet for a frozen model (Zhang et al. 2023, §3.2 and §4), as the built-in one was.

    ControlNet = a copy of the UNet's encoder and middle (its weights copied), a hint encoder, and
                 zero convolutions: at step 0 it adds exactly nothing, so training starts from the
                 model's own pictures;
    loss       = document 003's ‖ε − ε_θ(x_t, t, c, ControlNet(x_t, t, c, hint))‖², the UNet and the
                 text encoder frozen, only the ControlNet learning;
    captions   = half of them replaced by "" (the paper's 50%), so the ControlNet must read the
                 outline from the hint itself rather than from the words.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from ..addons.controlnet import ControlNet, ControlNetConfig
from ..noise_schedule import add_noise, alpha_bars
from .adapters import freeze
from .losses import drop_captions

if TYPE_CHECKING:
    from ..stable_diffusion import StableDiffusion

# Zhang et al. 2023, §4.1: "we randomly replace 50% text prompts with empty strings".
HINT_ONLY_SHARE = 0.5


def controlnet_from_unet(sd: StableDiffusion) -> ControlNet:
    """A ControlNet whose encoder copy starts as the UNet's own (conv_in, time embedding, down levels,
    middle); the hint encoder starts random with its last conv at zero, the 1×1 convs at zero."""
    net = ControlNet(ControlNetConfig(sd.unet.config))
    own = sd.unet.state_dict()
    copied = {k: v for k, v in own.items() if k.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))}
    missing, unexpected = net.load_state_dict(copied, strict=False)
    assert not unexpected and all(k.startswith(("controlnet_",)) for k in missing), (missing, unexpected)
    return net


def edge_hints(edges: torch.Tensor) -> torch.Tensor:
    """The world's edge maps (N, 1, H, W) of 0/1 as hint images: white lines on black, RGB in [0, 1]
    (what a Canny preprocessor gives)."""
    return edges.float().repeat(1, 3, 1, 1)


def train_controlnet(sd: StableDiffusion, latents: torch.Tensor, hints: torch.Tensor,
                     captions: Callable[[torch.Tensor, int], list[str]], steps: int = 1500,
                     batch: int = 64, lr: float = 1e-4, seed: int = 0, log: Callable[[int, float], None] | None = None,
                     net: ControlNet | None = None, start_step: int = 0,
                     optimizer_state: dict | None = None,
                     checkpoint: Callable[[int, ControlNet, dict], None] | None = None,
                     every: int = 250) -> tuple[ControlNet, dict]:
    """Train a ControlNet on (latent, hint) pairs: `latents` (N, 4, h, w) scaled, `hints` (N, 3, H, W)
    in [0, 1], `captions(index, step)` the batch's captions (the same for the same step, so a resumed
    run trains on what an uninterrupted one would). Returns the net and the optimiser's
    state (to resume from `start_step` with the same net); `checkpoint(step, net, optimizer state)`
    is called every `every` steps."""
    freeze(sd)
    net = controlnet_from_unet(sd) if net is None else net
    net.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    alpha_bar = alpha_bars()
    empty = sd.tokenizer([""])[0]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(start_step):  # the same draws as an uninterrupted run (cheap: indices only)
        _draws(generator, len(latents), batch, latents.shape[1:], len(alpha_bar))
    for step in range(start_step, steps):
        index, t, eps, drop = _draws(generator, len(latents), batch, latents.shape[1:], len(alpha_bar))
        ids = drop_captions(sd.tokenizer(captions(index, step)), empty, HINT_ONLY_SHARE, generator=drop)
        with torch.no_grad():
            context = sd.text_encoder(ids)
        x_t = add_noise(latents[index], eps, alpha_bar[t][:, None, None, None])
        residuals = net(x_t, t, context, hints[index])
        loss = F.mse_loss(sd.unet(x_t, t, context, control=residuals), eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None:
            log(step + 1, loss.item())
        if checkpoint is not None and (step + 1) % every == 0:
            checkpoint(step + 1, net, optimizer.state_dict())
    return net.eval().requires_grad_(False), optimizer.state_dict()


def _draws(generator: torch.Generator, n: int, batch: int, shape, timesteps: int):
    """One step's random draws: which pictures, which t, the noise, and a seed for the caption drop."""
    index = torch.randint(0, n, (batch,), generator=generator)
    t = torch.randint(0, timesteps, (batch,), generator=generator)
    eps = torch.randn((batch, *shape), generator=generator)
    drop = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    return index, t, eps, drop
