"""Random-weight reference models, built with the reference libraries (diffusers, transformers).

The official SD v1.5 weights cannot be downloaded here, so every parity test builds models with the
*reference* libraries in the official configurations (or tiny ones of the same shape of code), fills
every tensor with distinct random values, and compares sd_scratch against them on the same weights.
This module is test-only: sd_scratch itself never imports diffusers or transformers.
"""
from __future__ import annotations

import math

import torch

# ---- configurations ---------------------------------------------------------------------------
# SD v1.5 as shipped in the diffusers folder layout (unet/config.json, vae/config.json,
# text_encoder/config.json of the v1.5 release). `attention_head_dim=8` is, in SD v1, the number of
# heads (a diffusers naming quirk).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
# Tiny configurations: the same code paths (3 UNet levels, attention at some of them, skip
# connections with channel changes, a VAE with downsampling), small enough for fast tests.
# Head counts follow the rules the single-file loader uses (8 UNet heads as in SD v1; CLIP text
# heads = width / 64), since a single file does not record them.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
)
TINY_INPAINT_UNET = dict(TINY_UNET, in_channels=9)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
    block_out_channels=(32, 64, 64), norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
TINY_TEXT = dict(
    SD15_TEXT, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
)

# Parameter counts of the real SD v1.5 components (checked against the reference classes).
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter and float buffer with distinct seeded random values, in place.

    Matrices and kernels get N(0, 1/fan_in) so activations stay O(1) through deep stacks; 1-D
    weights (norm scales) get 1 + 0.1·N(0,1) and 1-D biases 0.05·N(0,1), so that no two tensors are
    equal and a swapped norm weight or bias would show up in the outputs.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(r / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.05 * r)
    return module


def make_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return randomize_(UNet2DConditionModel(**config), seed).eval()


def make_vae(config: dict, seed: int = 1):
    from diffusers import AutoencoderKL

    return randomize_(AutoencoderKL(**config), seed).eval()


def make_text_encoder(config: dict, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    return randomize_(CLIPTextModel(CLIPTextConfig(**config)), seed).eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖, the parity measure of DEVELOPERS.md."""
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
