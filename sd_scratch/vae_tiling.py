"""The VAE decoder run one tile at a time, for images too large to decode at once, with the numbers
of decoding them whole.

This is `001 · VAE模型`'s decoder (see `vae.py`) cut into pieces; no document covers tiling. A naive
tiled decode (decode each tile on its own, blend the overlaps) leaves seams and shifts each tile's
tone, for two reasons, and this file removes both:

1. Convolutions reach past a tile's edge. An output pixel depends only on latent pixels within
   `receptive_radius(config)` of it (13 for SD), so every tile is cut with that many extra latent
   pixels (the halo) around the part it is responsible for (its core), and only the core is kept.
2. GroupNorm divides by the mean and variance of the *whole* feature map, not of a tile. So all
   tiles go through the decoder in lockstep: at every GroupNorm each tile adds up the sums over its
   core, and every tile is normalised with the totals. Between layers the tiles wait on `store`
   (host memory by default), so the accelerator holds one tile at a time.

The decoder's mid block (its attention sees every position) runs on the whole latent first: it is at
the latent's own resolution, 64× fewer pixels than the image, so it is small. The tiles start after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .vae import AutoencoderKL, VAEConfig


def receptive_radius(cfg: VAEConfig) -> int:
    """How many latent pixels away a decoded pixel can see, counted from the mid block's output on:
    each 3×3 convolution reaches one pixel further at its own resolution, which at up level `i` is
    1/2^i of a latent pixel. SD: 6 convs at each of 4 levels and 4 more (3 upsamplers, conv_out)
    -> 6·(1 + 1/2 + 1/4 + 1/8) + 1/2 + 1/4 + 1/8 + 1/8 = 12.25, so 13."""
    levels = len(cfg.block_out_channels)
    reach = 0.0
    for i in range(levels):
        reach += 2 * (cfg.layers_per_block + 1) / 2**i  # two 3×3 convs per ResNet block
        if i < levels - 1:
            reach += 1 / 2 ** (i + 1)  # the Upsample's conv, at the next level's resolution
    reach += 1 / 2 ** (levels - 1)  # conv_out
    return math.ceil(reach)


@dataclass
class Tile:
    """A tile's latent rows and columns (core plus halo) and the core rows and columns it keeps."""

    rows: slice
    cols: slice
    core_rows: slice
    core_cols: slice


def _spans(size: int, core: int, halo: int) -> list[tuple[slice, slice]]:
    """Along one side: cores of `core` latent pixels (the last may be shorter), each widened by
    `halo` on both sides where the latent goes on."""
    return [(slice(max(c - halo, 0), min(c + core + halo, size)), slice(c, min(c + core, size)))
            for c in range(0, size, core)]


def tiles_of(h: int, w: int, core: int, halo: int) -> list[Tile]:
    """The tiles of an h×w latent, row by row."""
    return [Tile(rows, cols, core_rows, core_cols)
            for rows, core_rows in _spans(h, core, halo) for cols, core_cols in _spans(w, core, halo)]


class _Lockstep:
    """Feature maps cut into tiles that wait on `store` and are computed on `device`."""

    def __init__(self, tiles: list[Tile], device: torch.device, store: torch.device):
        self.tiles, self.device, self.store = tiles, device, store

    def core(self, tile: Tile, piece: torch.Tensor) -> torch.Tensor:
        """The part of `piece` (a feature map of `tile`, at any level of the decoder) that is the core."""
        s = piece.shape[-2] // (tile.rows.stop - tile.rows.start)  # 1 at the latent, then 2, 4, 8
        top, left = tile.core_rows.start - tile.rows.start, tile.core_cols.start - tile.cols.start
        return piece[..., top * s:(top + _len(tile.core_rows)) * s, left * s:(left + _len(tile.core_cols)) * s]

    def cut(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[..., t.rows, t.cols].to(self.store) for t in self.tiles]

    def each(self, fn: Callable[..., torch.Tensor], *pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        """fn applied tile by tile (the tile's pieces brought to `device`, the result sent to `store`)."""
        return [fn(*(p.to(self.device) for p in args)).to(self.store) for args in zip(*pieces)]

    def shared_norm(self, norm: nn.GroupNorm, pieces: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """`norm` as it acts on the whole feature map that `pieces` are tiles of: the mean and variance
        of each group are summed over the tiles' cores (in float64), then shared by every tile."""
        total = total_sq = count = 0
        for tile, piece in zip(self.tiles, pieces):
            core = self.core(tile, piece.to(self.device))  # (B, C, h_core, w_core)
            groups = core.double().reshape(core.shape[0], norm.num_groups, -1)  # (B, G, C/G·h·w)
            total, total_sq = total + groups.sum(-1), total_sq + groups.square().sum(-1)
            count += groups.shape[-1]
        mean = total / count
        inv_std = (total_sq / count - mean.square() + norm.eps).rsqrt()  # (B, G)

        def normalise(x: torch.Tensor) -> torch.Tensor:  # in float32 at least, as GroupNorm does
            B, C, H, W = x.shape
            dtype = torch.promote_types(x.dtype, torch.float32)
            y = (x.to(dtype).reshape(B, norm.num_groups, -1) - mean[..., None].to(dtype)) * inv_std[..., None].to(dtype)
            return (y.reshape(B, C, H, W) * norm.weight.to(dtype)[:, None, None]
                    + norm.bias.to(dtype)[:, None, None]).to(x.dtype)
        return normalise

    def stitch(self, pieces: list[torch.Tensor], f: int) -> torch.Tensor:
        """The tiles' cores put back together: (B, C, f·h, f·w) on `store`."""
        cores = [self.core(tile, piece) for tile, piece in zip(self.tiles, pieces)]
        last = self.tiles[-1]
        out = cores[0].new_empty(*cores[0].shape[:2], last.core_rows.stop * f, last.core_cols.stop * f)
        for tile, core in zip(self.tiles, cores):
            out[..., tile.core_rows.start * f:tile.core_rows.stop * f,
                tile.core_cols.start * f:tile.core_cols.stop * f] = core
        return out


def _len(s: slice) -> int:
    return s.stop - s.start


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, z: torch.Tensor, tile: int = 64,
                 store: str | torch.device | None = "cpu") -> torch.Tensor:
    """`vae.decode(z)` computed `tile`×`tile` latent pixels at a time (64 = 512×512 image pixels), equal
    to it up to float rounding. `store` is where tiles wait between layers (None: z's device).
    A latent within one tile is simply decoded. Costs: each tile is computed with its halo, (64+26)²/64²
    ≈ 2× the work at SD's default, and tiles travel to and from `store` at every GroupNorm."""
    vae._check(z, vae.config.latent_channels, "latents")
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive number of latent pixels, got {tile!r}")
    B, _, h, w = z.shape
    if h <= tile and w <= tile:
        return vae.decode(z)
    dec = vae.decoder
    run = _Lockstep(tiles_of(h, w, tile, receptive_radius(vae.config)), z.device,
                    torch.device(store) if store is not None else z.device)

    x = dec.mid_block(dec.conv_in(vae.post_quant_conv(z)))  # whole: (B, 512, h, w) for SD
    xs = run.cut(x)
    for block in dec.up_blocks:
        for res in block.resnets:  # ResnetBlock.forward, with every GroupNorm shared across the tiles
            norm1 = run.shared_norm(res.norm1, xs)
            hs = run.each(lambda x: res.conv1(F.silu(norm1(x))), xs)
            norm2 = run.shared_norm(res.norm2, hs)
            xs = run.each(lambda x, h: (x if res.conv_shortcut is None else res.conv_shortcut(x))
                          + res.conv2(F.silu(norm2(h))), xs, hs)
        xs = run.each(block.upsamplers, xs)  # ×2 each side, except after the last level
    norm_out = run.shared_norm(dec.conv_norm_out, xs)
    images = run.each(lambda x: dec.conv_out(F.silu(norm_out(x))), xs)
    return run.stitch(images, vae.config.factor).to(z.device)
