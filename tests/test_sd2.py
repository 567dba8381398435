"""SD 2.x's parts against the reference libraries on the same random weights (tiny configurations)."""
import pytest
import torch

from sd_scratch.attention import attention
from sd_scratch.checkpoints.rules import convert, original_unet_shape, unet_rules
from sd_scratch.unet import UNet, UNetConfig
from tests.reference import TINY_SD2_UNET, make_unet, rel_err


@pytest.fixture(scope="module")
def sd2_unet():
    return make_unet(TINY_SD2_UNET)


def unet_inputs(width: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 1]), torch.randn(2, 77, width, generator=g)


def test_the_sd2_unet_equals_diffusers_from_its_config(sd2_unet):
    config = UNetConfig.from_diffusers_config(dict(sd2_unet.config))
    assert (config.heads, config.linear_projection, config.upcast_attention) == ((1, 2, 2), True, True)
    ours = UNet(config).eval()
    ours.load_state_dict(sd2_unet.state_dict(), strict=True)
    x, t, context = unet_inputs(128)
    with torch.no_grad():
        assert rel_err(ours(x, t, context), sd2_unet(x, t, context).sample) <= 1e-4


def test_the_sd2_unet_is_read_off_its_single_file_tensors(sd2_unet):
    """A single file records neither heads nor upcasting: the family's 64-wide heads give 1/2/2."""
    config = UNetConfig.from_state_dict(sd2_unet.state_dict(), head_dim=64, upcast_attention=True)
    assert config == UNetConfig.from_diffusers_config(dict(sd2_unet.config))
    rules = unet_rules(len(config.channels), config.layers_per_level, config.attention_levels)
    original = convert(sd2_unet.state_dict(), rules, "original")
    assert original["input_blocks.1.1.proj_in.weight"].ndim == 2  # Linear in the CompVis file too
    assert original_unet_shape(original) == (3, 2, (True, True, False))
    back = convert(original, rules, "ours")
    assert all(torch.equal(back[k], v) for k, v in sd2_unet.state_dict().items())


def test_upcast_attention_stays_finite_where_fp16_overflows():
    """q·kᵀ of 4e3-sized entries over 64 dims is ~1e9: beyond fp16's 65504, so plain fp16 attention
    gives inf/NaN; upcast computes it in fp32 and returns fp16."""
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 1, 16, 64, generator=g) * 4e3).half()
    k, v = q.clone(), torch.randn(1, 1, 16, 64, generator=g).half()
    scores = (q.float() @ k.float().transpose(-1, -2)) / 8
    assert scores.abs().max() > torch.finfo(torch.float16).max
    plain = (torch.softmax((q @ k.transpose(-1, -2)) / 8, dim=-1) @ v)  # fp16 arithmetic throughout
    assert not torch.isfinite(plain).all()
    up = attention(q, k, v, upcast=True)
    assert up.dtype == torch.float16 and torch.isfinite(up).all()
    assert rel_err(up.float(), attention(q.float(), k.float(), v.float())) <= 5e-3
