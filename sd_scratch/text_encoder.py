"""The CLIP ViT-L/14 text transformer that turns prompt tokens into the UNet's conditioning.

Mirrors `001 · 文本编码器` (why SD uses CLIP rather than BERT), `004 · 嵌入(Embedding)` (each token
becomes a 768-value vector) and `003 · （2）文本编码器（Text Encoder）` (a Transformer over the BPE
tokens gives the 768-d text embedding that cross-attention reads).

The path is: token ids (B, 77) -> token embedding + learned position embedding -> 12 pre-LayerNorm
Transformer blocks with a causal mask -> final LayerNorm -> (B, 77, 768). Every one of the 77 vectors
is passed to the UNet, not only a pooled one. Attribute names equal the keys of transformers'
`CLIPTextModel` with the leading `text_model.` removed, so those weights load with `strict=True`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# OpenAI CLIP's `QuickGELU` (clip/model.py): x * sigmoid(1.702 x), a cheap approximation of GELU.
QUICK_GELU_SLOPE = 1.702
# CLIP's text transformer uses 64-dimensional heads (heads = width // 64 in clip/model.py).
CLIP_HEAD_DIM = 64
# SD 2.x reads OpenCLIP ViT-H/14's text tower at its penultimate block (v2-inference.yaml
# `FrozenOpenCLIPEmbedder`, layer: "penultimate"): of its 24 blocks, 23 run, then the final norm.
OPENCLIP_LAYERS_SKIPPED = 1


@dataclass
class TextEncoderConfig:
    """Sizes of the CLIP text transformer; the defaults are SD v1's ViT-L/14."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    context_length: int = 77
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    layers_used: int | None = None  # blocks run before the final norm (None: all of them)
    projection_dim: int | None = None  # OpenCLIP files carry text_projection and logit_scale, unused by SD

    @classmethod
    def sd15(cls) -> TextEncoderConfig:
        """CLIP ViT-L/14, SD v1's text encoder."""
        return cls()

    @classmethod
    def openclip_vit_h14(cls) -> TextEncoderConfig:
        """OpenCLIP ViT-H/14's text tower as SD 2.x single files hold it: 24 blocks of 1024, 16 heads,
        exact GELU, read at the penultimate block."""
        return cls(width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu",
                   layers_used=24 - OPENCLIP_LAYERS_SKIPPED, projection_dim=1024)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], openclip: bool = False) -> TextEncoderConfig:
        """Read the sizes off the tensor shapes (keys as in this module, no `text_model.` prefix).
        `openclip`: the tower of an SD 2.x single file (exact GELU, the penultimate block, its
        projection carried)."""
        vocab_size, width = sd["embeddings.token_embedding.weight"].shape
        layers = len({m.group(1) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
        config = cls(
            vocab_size=vocab_size, width=width, layers=layers, heads=width // CLIP_HEAD_DIM,
            mlp_width=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
            context_length=sd["embeddings.position_embedding.weight"].shape[0],
        )
        if openclip:
            projection = sd.get("text_projection")
            config = replace(config, activation="gelu", layers_used=layers - OPENCLIP_LAYERS_SKIPPED,
                             projection_dim=None if projection is None else projection.shape[1])
        return config

    @classmethod
    def from_transformers_config(cls, config: dict) -> TextEncoderConfig:
        """Build from the dict of a diffusers-folder `text_encoder/config.json`."""
        activation = config.get("hidden_act", "quick_gelu")
        if activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported text encoder activation {activation!r} (expected quick_gelu or gelu)")
        return cls(
            vocab_size=config["vocab_size"], width=config["hidden_size"],
            layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
            mlp_width=config["intermediate_size"], context_length=config["max_position_embeddings"],
            activation=activation, layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        )


class Embeddings(nn.Module):
    """A learned vector per token id plus a learned vector per position 0..76.

    Ids past the vocabulary (vocab_size, vocab_size + 1, …) look up `extra_vectors`: the vectors of
    textual-inversion embeddings (`addons/textual_inversion.py`, document 004 · 嵌入), which the
    tokenizer writes in place of their names. They are not weights of the model (not in its
    state_dict), so a saved model is the one that was loaded."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        self.register_buffer("extra_vectors", None, persistent=False)  # (k, width) once embeddings are loaded

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        vocab = self.token_embedding.num_embeddings
        known = vocab + (0 if self.extra_vectors is None else len(self.extra_vectors))
        if (ids >= known).any():
            raise ValueError(f"token id {int(ids.max())} is past the vocabulary ({vocab} ids and "
                             f"{known - vocab} loaded embedding vectors)")
        tokens = self.token_embedding(ids.clamp(max=vocab - 1))  # (B, T, C)
        if known > vocab:
            extra = self.extra_vectors[(ids - vocab).clamp(min=0)]
            tokens = torch.where((ids >= vocab)[..., None], extra.to(tokens.dtype), tokens)
        return tokens + self.position_embedding(positions)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention: token t sees only tokens 0..t."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, heads, T, C/heads) for each of q, k, v
        q, k, v = (rearrange(proj(x), "b t (h d) -> b h t d", h=self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q k^T / sqrt(d)) v
        return self.out_proj(rearrange(y, "b h t d -> b t (h d)"))  # back to (B, T, C)


class MLP(nn.Module):
    """width -> mlp_width -> width, with quick-GELU (or exact GELU) in between."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.activation = cfg.activation
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(QUICK_GELU_SLOPE * h) if self.activation == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    """One pre-LayerNorm Transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The stack of blocks; a container so the keys read `encoder.layers.{i}...`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer: ids (B, T) -> one `width`-d vector per token, (B, T, width)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        if cfg.projection_dim is not None:  # carried so that the file writes back whole; never used here
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
            self.logit_scale = nn.Parameter(torch.empty(()))

    def forward(self, ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
        """Return the final-LayerNorm'd hidden state of every token.

        `clip_skip=k` stops k blocks before the last one used (`layers_used`, all by default; SD 2.x's
        tower stops one early) and applies the final LayerNorm to that block's
        output (diffusers' `clip_skip`). So clip_skip=1 is the penultimate layer, which is what
        AUTOMATIC1111's WebUI calls "Clip skip 2" (its count starts at 1 for the last layer).
        """
        B, T = ids.shape
        if T > self.config.context_length:
            raise ValueError(f"{T} tokens exceed the context_length of {self.config.context_length}")
        n_layers = self.config.layers_used or len(self.encoder.layers)
        if not 0 <= clip_skip < n_layers:
            raise ValueError(f"clip_skip must be in [0, {n_layers - 1}], got {clip_skip}")
        x = self.embeddings(ids)  # (B, T) -> (B, T, C)
        for layer in self.encoder.layers[: n_layers - clip_skip]:
            x = layer(x)
        return self.final_layer_norm(x)
