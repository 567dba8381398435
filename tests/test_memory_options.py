"""Memory options give the plain path's numbers: attention slicing, and tiled VAE decoding (seamless:
equal to `decode` up to float rounding)."""
import copy

import numpy as np
import pytest
import torch

import sd_scratch
from sd_scratch.memory.vae_tiling import decode_tiled
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
    assert torch.equal(decode_tiled(sd.vae, z, tile=16), sd.vae.decode(z))


@torch.no_grad()
@pytest.mark.parametrize("batch, h, w, tile", [(1, 24, 40, 16), (2, 19, 13, 5), (1, 9, 33, 8), (1, 3, 4, 1)])
def test_tiled_decode_equals_decode(sd, batch, h, w, tile):
    """Every step reads one pixel of the neighbouring tiles, and GroupNorm statistics are summed over
    all tiles: the tiles give the whole decode's pixels up to float rounding (1e-6 measured), so no
    seam can show. Sizes that tiles do not divide, and tiles of a single latent pixel, included."""
    z = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(h))
    plain = sd.vae.decode(z)
    tiled = decode_tiled(sd.vae, z, tile=tile)
    assert tiled.shape == plain.shape
    assert rel_err(tiled, plain) <= 1e-4
    assert rel_err(decode_tiled(sd.vae, z, tile=tile, store=None), plain) <= 1e-4


@torch.no_grad()
def test_tiled_decode_is_exact_in_float64(sd):
    """With rounding out of the way the tiles give the whole decode's numbers to 1e-12: nothing is
    approximated, only the order of the sums changes."""
    vae = copy.deepcopy(sd.vae).double()
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rel_err(decode_tiled(vae, z, tile=16), vae.decode(z)) < 1e-12


def test_tiling_checks_its_arguments(sd):
    with pytest.raises(ValueError, match="tile"):
        decode_tiled(sd.vae, torch.zeros(1, 4, 40, 40), tile=0)
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
