"""Cross-attention maps (004 · 交叉关注): each pixel shares its attention among the prompt's tokens,
and recording it changes nothing the UNet computes."""
import pytest
import torch
from einops import rearrange

import sd_scratch
from sd_scratch.lab.attention_maps import CrossAttentionMaps, attention_probs
from sd_scratch.training.losses import tiny_configs
from sd_scratch.unet import TransformerBlock, UNet

TOKENS = 77


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(tiny_configs().unet).eval()


def inputs(B=2, h=8, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, h, w, generator=g)
    context = torch.randn(B, TOKENS, tiny_configs().unet.context_dim, generator=g)
    return x, torch.tensor(500), context


def hook_counts(module):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in module.modules()]


@torch.no_grad()
def test_every_pixel_shares_its_attention_among_the_tokens(unet):
    with CrossAttentionMaps(unet, guided=False) as maps:
        unet(*inputs())
    assert len(maps.steps) == 1
    for name, p in maps.steps[0].items():
        assert torch.allclose(p.sum(dim=1), torch.ones(()), atol=1e-5), name  # sum over tokens
        assert p.min() >= 0
    assert torch.allclose(maps.token_maps().sum(dim=0), torch.ones(()), atol=1e-5)  # still after upsampling


@torch.no_grad()
def test_one_map_per_cross_attention_layer_at_that_layers_resolution(unet):
    with CrossAttentionMaps(unet, guided=False) as maps:
        unet(*inputs(h=8, w=12))  # not square, so h and w cannot be swapped unnoticed
    blocks = [m for m in unet.modules() if isinstance(m, TransformerBlock)]
    assert len(maps.layers) == len(blocks) and all(name.endswith(".attn2") for name in maps.layers)
    sizes = {tuple(p.shape) for p in maps.steps[0].values()}
    assert sizes == {(2, TOKENS, 8, 12), (2, TOKENS, 4, 6)}  # the tiny UNet's two levels
    assert maps.token_maps(tokens=[1, 5]).shape == (2, 8, 12)
    assert maps.token_maps(tokens=[1], size=(64, 96)).shape == (1, 64, 96)


@torch.no_grad()
def test_token_maps_average_the_chosen_layers_and_steps(unet):
    with CrossAttentionMaps(unet, guided=False) as maps:
        unet(*inputs(seed=1))
        unet(*inputs(seed=2))
    full_size = [n for n in maps.layers if maps.steps[0][n].shape[-1] == 8]
    one = full_size[0]
    assert torch.equal(maps.token_maps(tokens=[3], step=1, index=1, layers=[one]), maps.steps[1][one][1, [3]])
    both = (maps.steps[0][one][0, [3]] + maps.steps[1][one][0, [3]]) / 2
    assert torch.allclose(maps.token_maps(tokens=[3], layers=[one]), both)


@torch.no_grad()
def test_the_recomputed_probabilities_give_the_modules_own_output(unet):
    attn = next(m for m in unet.modules() if isinstance(m, TransformerBlock)).attn2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, attn.to_q.in_features, generator=g)
    context = torch.randn(2, TOKENS, attn.to_k.in_features, generator=g)
    p = attention_probs(attn, x, context)  # (B, heads, 64, 77)
    assert p.shape == (2, attn.heads, 64, TOKENS)
    v = rearrange(attn.to_v(context), "b t (h d) -> b h t d", h=attn.heads)
    out = attn.to_out[0](rearrange(p @ v, "b h t d -> b t (h d)"))
    assert torch.allclose(out, attn(x, context), atol=1e-5)


@torch.no_grad()
def test_the_probabilities_use_the_keys_context_a_hypernetwork_gives(unet):
    attn = next(m for m in unet.modules() if isinstance(m, TransformerBlock)).attn2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, attn.to_q.in_features, generator=g)
    context = torch.randn(1, TOKENS, attn.to_k.in_features, generator=g)
    attn.kv_context = lambda c: (c + 1.0, c)  # keys read c + 1, values c
    try:
        p = attention_probs(attn, x, context)
    finally:
        attn.kv_context = None
    q = rearrange(attn.to_q(x), "b t (h d) -> b h t d", h=attn.heads)
    k = rearrange(attn.to_k(context + 1.0), "b t (h d) -> b h t d", h=attn.heads)
    torch.testing.assert_close(p, (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1))


@torch.no_grad()
def test_recording_leaves_the_output_and_the_modules_as_they_were(unet):
    before = hook_counts(unet)
    expected = unet(*inputs())
    with CrossAttentionMaps(unet) as maps:
        assert hook_counts(unet) != before
        got = unet(*inputs())
    assert torch.equal(got, expected)
    assert hook_counts(unet) == before
    with pytest.raises(KeyError), CrossAttentionMaps(unet):
        raise KeyError("an error inside the block")
    assert hook_counts(unet) == before
    assert maps.steps  # the record outlives the block


@torch.no_grad()
def test_guided_keeps_the_conditional_half_of_the_batch(unet):
    x, t, context = inputs(B=2)
    cond_x, cond_context = x[1:], context[1:]
    with CrossAttentionMaps(unet, guided=True) as guided:
        unet(torch.cat([cond_x, cond_x]), t, torch.cat([context[:1], cond_context]))  # [uncond; cond]
    with CrossAttentionMaps(unet, guided=False) as alone:
        unet(cond_x, t, cond_context)
    for name in alone.layers:
        assert guided.steps[0][name].shape[0] == 1
        assert torch.allclose(guided.steps[0][name], alone.steps[0][name], atol=1e-5), name
    with pytest.raises(ValueError, match="odd batch"), CrossAttentionMaps(unet, guided=True):
        unet(*inputs(B=1))


def test_a_generation_records_one_entry_per_denoising_step():
    sd = sd_scratch.load()
    with CrossAttentionMaps(sd.unet) as maps:
        sd.txt2img("a large red circle at the top left on a white background", height=64, width=64, steps=3,
                   seed=0, progress=False)
    assert len(maps.steps) == 3
    assert maps.token_maps(tokens=[1, 2, 3]).shape == (3, 8, 8)  # the latent of a 64×64 image is 8×8
    assert maps.token_maps(step=2).shape == (TOKENS, 8, 8)
