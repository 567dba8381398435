"""Cross-attention maps: which pixels of the picture read from each prompt token.

Mirrors `004 · 交叉关注(Cross-attention)` and the cross-attention layers of `003 · （3）UNet去噪网络`,
where the text is tied to regions of the image. Inside every spatial transformer of the UNet
(`unet.TransformerBlock.attn2`) each pixel of the feature map is a query and each of the 77 text
tokens a key:

    P = softmax(Q Kᵀ / √d)      (B, heads, h·w, 77); each pixel's row sums to 1 over the tokens

Column j of P, folded back to (h, w), is token j's map: how much each pixel takes from that token.
Averaged over heads, layers and denoising steps, it is the picture that Prompt-to-Prompt (Hertz et
al. 2022) and DAAM (Tang et al. 2022) draw.

    with CrossAttentionMaps(sd.unet) as maps:
        sd.txt2img("a red circle", steps=20)
    maps.token_maps(tokens=[2, 3])      # (2, h, w) at the latent's resolution, all layers and steps

Capturing only reads: forward hooks on the `attn2` modules recompute P from each module's own
`to_q`/`to_k` and the inputs it was given, and return nothing, so the UNet's output is unchanged.
Leaving the `with` block removes the hooks. Memory: per step and image, 77 maps per layer; for SD
at 512×512 that is about 9 MB (16 layers), kept on the CPU.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..unet import Attention, SpatialTransformer


def attention_probs(attn: Attention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d) of one `Attention` module, in float32: x (B, Tq, C), context (B, Tk, C_ctx)
    -> (B, heads, Tq, Tk). `attn` then outputs to_out(P·v), heads concatenated."""
    context_k = context if attn.kv_context is None else attn.kv_context(context)[0]  # a hypernetwork's keys
    q = rearrange(attn.to_q(x), "b t (h d) -> b h t d", h=attn.heads).float()
    k = rearrange(attn.to_k(context_k), "b t (h d) -> b h t d", h=attn.heads).float()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, heads, Tq, Tk)
    return scores.softmax(dim=-1)


class CrossAttentionMaps:
    """A context manager that records, for every UNet call (one per denoising step), every
    cross-attention layer's P averaged over heads: `steps[i][layer]` is (N, tokens, h, w).

    guided: the UNet's batch is [uncond; cond], as the pipelines build it for classifier-free guidance
        (`prompts.encode_prompts`), and only the conditional half is kept, so N = images. False
        keeps every row (for guidance_scale ≤ 1, or a UNet called by hand).
    """

    def __init__(self, unet: nn.Module, guided: bool = True):
        self.unet = unet
        self.guided = guided
        self.steps: list[dict[str, torch.Tensor]] = []
        self._sizes: dict[SpatialTransformer, tuple[int, int]] = {}  # each transformer's (h, w) this call
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> CrossAttentionMaps:
        self.steps = []
        self._handles = [self.unet.register_forward_pre_hook(lambda module, args: self.steps.append({}))]
        for name, transformer in self.unet.named_modules():
            if not isinstance(transformer, SpatialTransformer):
                continue
            self._handles.append(transformer.register_forward_pre_hook(self._remember_size))
            for j, block in enumerate(transformer.transformer_blocks):
                hook = self._recorder(f"{name}.transformer_blocks.{j}.attn2", transformer)
                self._handles.append(block.attn2.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._sizes = [], {}

    def _remember_size(self, transformer: SpatialTransformer, args: tuple) -> None:
        self._sizes[transformer] = tuple(args[0].shape[-2:])  # its input is the feature map (B, C, h, w)

    def _conditional(self, x: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return x
        if x.shape[0] % 2:
            raise ValueError(f"CrossAttentionMaps(guided=True) expects the [uncond; cond] batch of classifier-free "
                             f"guidance, got an odd batch of {x.shape[0]}; use guided=False")
        return x[x.shape[0] // 2:]

    def _recorder(self, name: str, transformer: SpatialTransformer):
        def hook(attn: Attention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            x = args[0]  # (B, h·w, C)
            context = args[1] if len(args) > 1 else kwargs["context"]  # (B, tokens, C_ctx)
            with torch.no_grad():
                p = attention_probs(attn, self._conditional(x), self._conditional(context)).mean(dim=1)
            h, w = self._sizes[transformer]
            if not self.steps:  # a transformer called outside a UNet call
                self.steps.append({})
            self.steps[-1][name] = rearrange(p, "n (h w) t -> n t h w", h=h, w=w).cpu()  # (N, tokens, h, w)
        return hook

    @property
    def layers(self) -> list[str]:
        """The cross-attention layers recorded, in the order the UNet runs them."""
        return list(self.steps[0]) if self.steps else []

    def token_maps(self, tokens: Sequence[int] | None = None, step: int | Sequence[int] | None = None,
                   index: int = 0, layers: Sequence[str] | None = None,
                   size: tuple[int, int] | None = None) -> torch.Tensor:
        """The maps of `tokens` (positions in the 77; default all) for image `index`, each layer's map
        upsampled (bilinear) to `size` (default: the largest, the latent's h × w), then averaged over
        `layers` (default all) and over `step` (a recorded step, a list of them, or None for all)
        -> (tokens, H, W). Every pixel's values over all tokens still sum to 1."""
        if not self.steps:
            raise RuntimeError("no UNet call was recorded: run the UNet inside "
                               "`with CrossAttentionMaps(unet) as maps:`")
        steps = range(len(self.steps)) if step is None else [step] if isinstance(step, int) else list(step)
        layers = self.layers if layers is None else list(layers)
        tokens = slice(None) if tokens is None else list(tokens)
        if size is None:
            size = max((tuple(m.shape[-2:]) for m in self.steps[0].values()), key=lambda hw: hw[0] * hw[1])
        total = 0.0
        for i in steps:
            for name in layers:
                m = self.steps[i][name][index, tokens]  # (k, h, w)
                total = total + F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0]
        return total / (len(steps) * len(layers))
