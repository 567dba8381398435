"""The VAE decoder run one tile at a time, for images too large to decode at once, with the numbers
of decoding them whole.

This is `001 · VAE模型`'s decoder (see `../vae.py`) cut into pieces; no document covers tiling. A naive
tiled decode (decode each tile on its own, blend the overlaps) shifts each tile's tone and leaves
seams, for two reasons, and this file removes both:

1. Convolutions reach past a tile's edge. So the decoder is not run tile by tile from start to end,
   but step by step: every step (GroupNorm, SiLU, one 3×3 conv; or an Upsample) reads each tile with
   one pixel of its neighbours around it (all a 3×3 conv reaches) and writes the tile's own pixels
   into the whole next feature map. The next step reads that map, neighbours' pixels included.
2. GroupNorm divides by the mean and variance of the *whole* feature map, not of a tile. So before
   each GroupNorm the sums are added up over all tiles, and every tile is normalised with the totals.

The whole feature maps wait on `store` (host memory by default), so the accelerator holds one tile
and its step's temporaries at a time. The decoder's mid block (its attention sees every position)
runs on the whole latent first: it is at the latent's resolution, 64× fewer pixels than the image.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..vae import AutoencoderKL

CONV_REACH = 1  # pixels a 3×3 convolution reads on each side of its output pixel


class _TileSteps:
    """Whole feature maps on `store`; each decoder step applied to them a tile at a time on `device`.
    Tiles are `tile`×`tile` latent pixels (the last ones in a row or column shorter), so at a level
    where the map is s times the latent's size a tile covers s·tile pixels."""

    def __init__(self, latent_height: int, latent_width: int, tile: int, device: torch.device,
                 store: torch.device):
        self.latent_height, self.device, self.store = latent_height, device, store
        self.tiles = [(slice(r, min(r + tile, latent_height)), slice(c, min(c + tile, latent_width)))
                      for r in range(0, latent_height, tile) for c in range(0, latent_width, tile)]

    def _region(self, tile: tuple[slice, slice], x: torch.Tensor, halo: int = 0) -> tuple[slice, slice]:
        """Where `tile` is in the map `x`, widened by `halo` of x's pixels where x goes on."""
        s = x.shape[-2] // self.latent_height  # 1 at the latent, then 2, 4, 8 going up the decoder
        return tuple(slice(max(span.start * s - halo, 0), min(span.stop * s + halo, size))
                     for span, size in zip(tile, x.shape[-2:]))

    def each(self, step: Callable[..., torch.Tensor], *maps: torch.Tensor) -> torch.Tensor:
        """The whole map `step(*maps)`, computed tile by tile; `step` may double the size (Upsample)."""
        out = None
        for tile in self.tiles:
            rows, cols = self._region(tile, maps[0], halo=CONV_REACH)
            y = step(*(m[..., rows, cols].to(self.device) for m in maps))
            k = y.shape[-2] // (rows.stop - rows.start)  # 2 after an Upsample, else 1
            if out is None:
                out = y.new_empty(*y.shape[:2], maps[0].shape[-2] * k, maps[0].shape[-1] * k, device=self.store)
            out_rows, out_cols = self._region(tile, out)  # the tile's own pixels, without the halo
            out[..., out_rows, out_cols] = y[..., out_rows.start - rows.start * k:out_rows.stop - rows.start * k,
                                             out_cols.start - cols.start * k:out_cols.stop - cols.start * k]
        return out

    def shared_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """`norm` as it acts on the whole map `x`, to apply to any tile of it. Each group's mean and
        variance over the whole map are pooled from the tiles' own (Chan et al.'s parallel formula,
        in float64); GroupNorm is then x·a + b per channel with a = γ/σ_group, b = β - μ_group·a."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # GroupNorm's arithmetic is float32 at least
        parts = []  # (count, mean, variance) per tile, each (B, G)
        for tile in self.tiles:
            rows, cols = self._region(tile, x)
            piece = x[..., rows, cols].to(self.device)
            groups = piece.reshape(piece.shape[0], norm.num_groups, -1).to(dtype)  # (B, G, C/G·h·w)
            variance, mean = torch.var_mean(groups, dim=-1, correction=0)
            parts.append((groups.shape[-1], mean.double(), variance.double()))
        n = sum(c for c, _, _ in parts)
        mean = sum(c * m for c, m, _ in parts) / n  # (B, G)
        variance = sum(c * (v + (m - mean).square()) for c, m, v in parts) / n
        a = norm.weight.to(dtype).reshape(norm.num_groups, -1) * (variance + norm.eps).rsqrt().to(dtype)[..., None]
        b = norm.bias.to(dtype).reshape(norm.num_groups, -1) - mean.to(dtype)[..., None] * a  # (B, G, C/G)
        a, b = a.flatten(1)[..., None, None], b.flatten(1)[..., None, None]  # (B, C, 1, 1)

        def normalise(x: torch.Tensor) -> torch.Tensor:
            return torch.addcmul(b, x, a).to(x.dtype)  # b + x·a
        return normalise


def check_tile(tile: int) -> None:
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive number of latent pixels, got {tile!r}")


@torch.no_grad()
def decode_tiled(vae: AutoencoderKL, z: torch.Tensor, tile: int = 64,
                 store: str | torch.device | None = "cpu") -> torch.Tensor:
    """`vae.decode(z)` computed `tile`×`tile` latent pixels at a time (64: 512×512 image pixels), equal
    to it up to float rounding. `store` is where the whole feature maps wait between steps (None: z's
    device). A latent within one tile is simply decoded."""
    vae._check(z, vae.config.latent_channels, "latents")
    check_tile(tile)
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return vae.decode(z)
    dec = vae.decoder
    run = _TileSteps(h, w, tile, z.device, torch.device(store) if store is not None else z.device)

    x = dec.mid_block(dec.conv_in(vae.post_quant_conv(z))).to(run.store)  # whole: (B, 512, h, w) for SD
    for block in dec.up_blocks:
        for res in block.resnets:  # ResnetBlock.forward, one step at a time
            norm1 = run.shared_norm(res.norm1, x)
            hidden = run.each(lambda x: res.conv1(F.silu(norm1(x))), x)
            norm2 = run.shared_norm(res.norm2, hidden)
            x = run.each(lambda x, hidden: (x if res.conv_shortcut is None else res.conv_shortcut(x))
                         + res.conv2(F.silu(norm2(hidden))), x, hidden)
            del hidden  # so that at most three whole maps exist at a time
        if len(block.upsamplers):
            x = run.each(block.upsamplers, x)  # (B, C, H, W) -> (B, C, 2H, 2W)
    norm_out = run.shared_norm(dec.conv_norm_out, x)
    return run.each(lambda x: dec.conv_out(F.silu(norm_out(x))), x).to(z.device)  # (B, 3, 8h, 8w) for SD
