"""Memory options give the plain path's numbers: attention slicing, and tiled VAE decoding (seamless:
equal to `decode` up to float rounding)."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sd_scratch
from sd_scratch import vae_tiling
from sd_scratch.vae import AutoencoderKL, VAEConfig
from tests.reference import rel_err


@pytest.fixture(scope="module")
def sd(tiny_checkpoint):
    return sd_scratch.load(tiny_checkpoint["single"])


@torch.no_grad()
def test_attention_slicing_matches_the_plain_path(sd):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    plain = sd.unet(x, 500, context), sd.vae.decode(x[:1]), sd.vae.encode(images).mean
    try:
        sd.set_attention_slicing(7)  # 256 queries at the top level: 37 slices, the last one short
        sliced = sd.unet(x, 500, context), sd.vae.decode(x[:1]), sd.vae.encode(images).mean
    finally:
        sd.set_attention_slicing(None)
    for a, b in zip(sliced, plain):
        assert rel_err(a, b) <= 1e-4


def test_attention_slicing_rejects_a_bad_size(sd):
    with pytest.raises(ValueError, match="slice_size"):
        sd.set_attention_slicing(0)


@torch.no_grad()
def test_tiled_decode_of_a_latent_within_one_tile_is_decode(sd):
    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sd.vae.decode_tiled(z, tile=16), sd.vae.decode(z))


@torch.no_grad()
@pytest.mark.parametrize("batch, h, w, tile", [(1, 24, 40, 16), (2, 19, 13, 5), (1, 9, 33, 8)])
def test_tiled_decode_equals_decode(sd, batch, h, w, tile):
    """Halos as wide as the decoder's reach, GroupNorm statistics summed over all tiles: the tiles'
    cores are the whole decode's pixels up to float rounding (1e-6 measured), so no seam can show.
    Sizes that tiles do not divide and tiles narrower than the halo included."""
    z = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(h))
    plain = sd.vae.decode(z)
    tiled = sd.vae.decode_tiled(z, tile=tile)
    assert tiled.shape == plain.shape
    assert rel_err(tiled, plain) <= 1e-4
    assert rel_err(sd.vae.decode_tiled(z, tile=tile, store=None), plain) <= 1e-4


@torch.no_grad()
def test_each_pixel_of_the_halo_is_needed(sd, monkeypatch):
    """In float64, where rounding is out of the way: with the halo the tiles equal the whole decode to
    1e-12, with one latent pixel less their cores' edges come out wrong (the radius is tight)."""
    vae = copy.deepcopy(sd.vae).double()
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain, radius = vae.decode(z), vae_tiling.receptive_radius(vae.config)
    assert rel_err(vae.decode_tiled(z, tile=16), plain) < 1e-12
    monkeypatch.setattr(vae_tiling, "receptive_radius", lambda cfg: radius - 1)
    assert rel_err(vae.decode_tiled(z, tile=16), plain) > 1e-9


def reach_of_one_latent_pixel(cfg: VAEConfig, seed: int = 0) -> float:
    """Change one pixel of the mid block's output and see how far, in latent pixels, the decoded
    image changes. GroupNorm is swapped for the identity here: it is shared across tiles, not local."""
    torch.manual_seed(seed)
    decoder = AutoencoderKL(cfg).decoder.eval()
    for name, module in list(decoder.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, child_name, nn.Identity())
    radius, f = vae_tiling.receptive_radius(cfg), cfg.factor
    size = 2 * radius + 3
    x = torch.randn(1, cfg.block_out_channels[-1], size, size)
    nudged = x.clone()
    nudged[..., size // 2, size // 2] += 1.0

    def up_path(x):
        return decoder.conv_out(F.silu(decoder.conv_norm_out(decoder.up_blocks(x))))
    with torch.no_grad():
        changed = (up_path(nudged) != up_path(x)).any(dim=1)[0]  # (f·size, f·size)
    rows = changed.any(dim=1).nonzero()[:, 0]
    assert rows.min() > 0 and rows.max() < f * size - 1, "the change reached the border: test size too small"
    return (size // 2 * f - rows.min().item()) / f  # pixels above the nudged latent pixel's top edge


@pytest.mark.parametrize("cfg", [VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1),
                                 VAEConfig(block_out_channels=(8, 16, 16, 16), norm_groups=8)],
                         ids=["tiny", "sd-depth"])
def test_receptive_radius_is_how_far_a_change_travels(cfg):
    """SD's decoder has 4 levels of 3 ResNet blocks: `sd-depth` is that with narrow channels."""
    reach = reach_of_one_latent_pixel(cfg)
    assert vae_tiling.receptive_radius(cfg) == math.ceil(reach)
    if cfg.layers_per_block == 2:
        assert reach == 12.25 and vae_tiling.receptive_radius(VAEConfig.sd15()) == 13


def test_tiling_checks_its_arguments(sd):
    with pytest.raises(ValueError, match="tile"):
        sd.vae.decode_tiled(torch.zeros(1, 4, 40, 40), tile=0)
    with pytest.raises(ValueError, match="tile"):
        sd.set_vae_tiling(-3)


@torch.no_grad()
def test_the_pipeline_decodes_in_tiles_when_asked(sd):
    settings = dict(height=96, width=128, steps=2, seed=3, progress=False)  # a 24×32 latent for this VAE
    plain = np.asarray(sd.txt2img("a red square", **settings)[0], dtype=int)
    try:
        tiled = np.asarray(sd.set_vae_tiling(8).txt2img("a red square", **settings)[0], dtype=int)
    finally:
        sd.set_vae_tiling(None)
    assert np.abs(tiled - plain).max() <= 1  # 8-bit rounding of values equal to 1e-6
