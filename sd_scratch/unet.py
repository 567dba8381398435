"""The UNet noise predictor: ε_θ(x_t, t, context).

Mirrors `003 · U-Net` parts (sinusoidal time embedding, residual blocks, attention, down/up sampling
with skip connections) and the "图像优化模块" of `000 · 文生图（txt2img）`: given a noisy latent x_t,
the timestep t and the text embeddings, predict the noise ε that was added.

    x_t (B,4,H,W) ─ conv_in ─► down levels ──► middle ──► up levels ─ conv_out ─► ε (B,4,H,W)
                                  │  (skips, pushed)        ▲  (skips, popped and concatenated)
                                  └────────────────────────┘
    t ─ sinusoid ─ MLP ─► added inside every ResNet block
    text (B,77,768) ─────► cross-attention inside every spatial transformer

Module attribute names equal the diffusers-folder keys (`down_blocks.0.resnets.1.conv1.weight`), so
those weights load with `load_state_dict(strict=True)`; the CompVis single-file keys
(`model.diffusion_model.input_blocks.1.0.in_layers.2.weight`) go through `checkpoints/rules.py`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention

# The sinusoid's longest period, as in "Attention is all you need" and the LDM code (max_period).
MAX_PERIOD = 10_000
# SD v1 uses 8 attention heads at every level (v1-inference.yaml `num_heads: 8`). A checkpoint does
# not record the head count, so a single file is read with this value, or, for families whose heads
# have a fixed width (SD 2.x: v2-inference.yaml `num_head_channels: 64`), with channels / that width.
SD_V1_HEADS = 8
# GroupNorm groups and epsilons of SD v1's UNet (ResNet blocks / spatial transformers).
NORM_GROUPS = 32
RESNET_NORM_EPS = 1e-5
TRANSFORMER_NORM_EPS = 1e-6


@dataclass
class UNetConfig:
    in_channels: int = 4  # 4 for txt2img; 9 for the inpainting UNet (latent + mask + masked latent)
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # per level of the U
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_level: int = 2  # ResNet blocks per level on the way down (one more on the way up)
    transformer_depth: int = 1
    heads: int | tuple[int, ...] = SD_V1_HEADS  # one count for every level, or one per level (SD 2.x: 5/10/20/20)
    context_dim: int = 768  # width of the text embeddings (CLIP ViT-L/14; OpenCLIP ViT-H/14's 1024 in SD 2.x)
    norm_groups: int = NORM_GROUPS
    linear_projection: bool = False  # SD 2.x: proj_in/proj_out are Linear layers on the tokens, not 1×1 convs
    upcast_attention: bool = False  # q·kᵀ and the softmax in float32 under fp16/bf16 (SD 2.x)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    def heads_at(self, level: int) -> int:
        """Attention heads at down level `level` (its mirror on the way up; -1: the middle)."""
        return self.heads[level] if isinstance(self.heads, tuple) else self.heads

    @classmethod
    def sd15(cls, **overrides) -> UNetConfig:
        return replace(cls(), **overrides)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], head_dim: int | None = None,
                        upcast_attention: bool = False) -> UNetConfig:
        """Read the sizes off the tensors (keys in our/diffusers naming). The tensors do not record
        the head count: SD v1's 8 heads, or with `head_dim` (the family's) channels / head_dim."""
        levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down_blocks."))
        layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets."))
        attention = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in range(levels))
        channels = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
        config = cls(
            in_channels=sd["conv_in.weight"].shape[1],
            out_channels=sd["conv_out.weight"].shape[0],
            channels=channels,
            attention_levels=attention,
            layers_per_level=layers,
            heads=SD_V1_HEADS if head_dim is None else tuple(c // head_dim for c in channels),
            linear_projection=any(k.endswith("proj_in.weight") and t.ndim == 2 for k, t in sd.items()),
            upcast_attention=upcast_attention,
        )
        blocks = {int(k.split(".")[4]) for k in sd if k.startswith("mid_block.attentions.0.transformer_blocks.")}
        context = [t.shape[1] for k, t in sd.items() if k.endswith("attn2.to_k.weight")]
        if blocks and context:
            config = replace(config, transformer_depth=max(blocks) + 1, context_dim=context[0])
        return config

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> UNetConfig:
        """Read a diffusers `unet/config.json`."""
        # In SD's configs `attention_head_dim` holds the number of heads (a diffusers naming quirk):
        # 8 for SD v1, [5, 10, 20, 20] (one per level) for SD 2.x.
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", SD_V1_HEADS)
        heads = tuple(heads) if isinstance(heads, list) else heads
        depth = cfg.get("transformer_layers_per_block", 1)
        if not isinstance(depth, int):
            raise ValueError("unet/config.json gives per-level transformer depths; SD v1 and 2.x use one for all levels")
        if isinstance(heads, tuple) and len(heads) != len(cfg["block_out_channels"]):
            raise ValueError(f"unet/config.json gives {len(heads)} head counts for {len(cfg['block_out_channels'])} levels")
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            channels=tuple(cfg["block_out_channels"]),
            attention_levels=tuple("CrossAttn" in t for t in cfg["down_block_types"]),
            layers_per_level=cfg.get("layers_per_block", 2),
            transformer_depth=depth,
            heads=heads,
            context_dim=cfg.get("cross_attention_dim", 768),
            norm_groups=cfg.get("norm_num_groups", NORM_GROUPS),
            linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
        )


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the timesteps (003 · U-Net: time embedding): [B] -> [B, dim].

    Frequencies 1/MAX_PERIOD^(i/half) for i < half; output is [cos(t·f), sin(t·f)].
    """
    half = dim // 2
    exponent = -math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepMLP(nn.Module):
    """The sinusoid goes through Linear -> SiLU -> Linear to the ResNets' time width."""

    def __init__(self, dim: int, time_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t_freq)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-conv, plus the skip."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=RESNET_NORM_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=RESNET_NORM_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(t_emb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention to it."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        context_dim = context_dim or dim
        self.heads, self.upcast = heads, upcast
        self.slice_size: int | None = None  # queries per slice (attention slicing); None = all at once
        # context -> (what to_k reads, what to_v reads), e.g. a hypernetwork (addons/hypernetwork.py);
        # None: both read the context. A plain callable, not a submodule: the state dict stays the checkpoint's.
        self.kv_context: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list in the reference (Linear, Dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        context_k, context_v = (context, context) if self.kv_context is None else self.kv_context(context)
        q, k, v = self.to_q(x), self.to_k(context_k), self.to_v(context_v)
        # (B, T, heads·d) -> (B, heads, T, d)
        q, k, v = (rearrange(a, "b t (h d) -> b h t d", h=self.heads) for a in (q, k, v))
        out = attention(q, k, v, self.slice_size, self.upcast)
        return self.to_out[0](rearrange(out, "b h t d -> b t (h d)"))


class GEGLU(nn.Module):
    """Linear to twice the width, then value · GELU(gate) (Shazeer 2020, "GLU variants")."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Keys are ff.net.0.proj and ff.net.2; index 1 is a dropout (rate 0 in SD) in the reference.
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm: self-attention, cross-attention to the text, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> a sequence of H·W tokens -> transformer blocks -> feature map, plus the skip.
    The projections in and out are 1×1 convolutions on the map (SD v1) or Linear layers on the
    tokens (SD 2.x, `linear_projection`): the same map per pixel, applied before or after the reshape."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig):
        super().__init__()
        self.linear = cfg.linear_projection
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(channels, channels) if self.linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, cfg.context_dim, cfg.upcast_attention) for _ in range(cfg.transformer_depth)]
        )
        self.proj_out = nn.Linear(channels, channels) if self.linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")  # (B, H·W, C): one token per latent pixel
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=H, w=W)
        return x + (h if self.linear else self.proj_out(h))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour; or to `size`, the next skip's size), then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Level(nn.Module):
    """One level of the U: ResNet blocks, each followed by a spatial transformer where the level
    attends, then an optional resampler (`downsamplers` on the way down, `upsamplers` on the way up)."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SpatialTransformer]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)

    def blocks(self):
        """Yield (resnet, attention or None) pairs."""
        for i, resnet in enumerate(self.resnets):
            yield resnet, (self.attentions[i] if len(self.attentions) else None)


class MidBlock(nn.Module):
    """ResNet, spatial transformer, ResNet at the bottom of the U."""

    def __init__(self, c: int, time_dim: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, time_dim, cfg.norm_groups) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(c, cfg.heads_at(-1), cfg)]
        )

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, t_emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, t_emb)


def down_path(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder half of the U (after conv_in): the down levels, and the width of every tensor it
    pushes for the up path, conv_in's output first. A ControlNet (addons/controlnet.py) builds its
    copy of the encoder with this same function."""
    time_dim, n_levels = cfg.time_embed_dim, len(cfg.channels)
    skip_channels = [cfg.channels[0]]
    levels = nn.ModuleList()
    c = cfg.channels[0]
    for i, (c_out, attends) in enumerate(zip(cfg.channels, cfg.attention_levels)):
        resnets, attentions = [], []
        for _ in range(cfg.layers_per_level):
            resnets.append(ResnetBlock(c, c_out, time_dim, cfg.norm_groups))
            attentions += [SpatialTransformer(c_out, cfg.heads_at(i), cfg)] if attends else []
            c = c_out
            skip_channels.append(c)
        level = Level(resnets, attentions)
        if i < n_levels - 1:
            level.downsamplers = nn.ModuleList([Downsample(c)])
            skip_channels.append(c)
        levels.append(level)
    return levels, skip_channels


def run_down_path(levels: nn.ModuleList, h: torch.Tensor, t_emb: torch.Tensor,
                  context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run `down_path`'s levels on conv_in's output h: (the tensor for the middle, the skips)."""
    skips = [h]
    for level in levels:
        for resnet, attention in level.blocks():
            h = resnet(h, t_emb)
            h = h if attention is None else attention(h, context)
            skips.append(h)
        if hasattr(level, "downsamplers"):
            h = level.downsamplers[0](h)
            skips.append(h)
    return h, skips


def check_timesteps(t: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) timestep as a (B,) tensor; any other shape is an error."""
    t = torch.as_tensor(t, device=device)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"unet: t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t.reshape(-1).expand(batch)


def embed_timesteps(mlp: TimestepMLP, t: torch.Tensor | float | int, x: torch.Tensor, width: int) -> torch.Tensor:
    """t (a scalar or (B,)) -> the time embedding every ResNet adds, (B, 4·width) in x's dtype."""
    return mlp(timestep_embedding(check_timesteps(t, x.shape[0], x.device), width).to(x.dtype))


# Extra residuals from a ControlNet: one per skip (the up path's inputs), and one for the middle.
ControlResiduals = tuple[list[torch.Tensor], torch.Tensor]


class UNet(nn.Module):
    """ε_θ(x_t, t, context) for SD v1, the 9-channel inpainting UNet and tiny configs alike."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        if not (len(cfg.channels) == len(cfg.attention_levels) > 0):
            raise ValueError("UNetConfig: channels and attention_levels must be non-empty and of equal length")
        time_dim, groups = cfg.time_embed_dim, cfg.norm_groups
        n_levels = len(cfg.channels)

        def transformer(c: int, level: int) -> SpatialTransformer:
            return SpatialTransformer(c, cfg.heads_at(level), cfg)

        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        self.time_embedding = TimestepMLP(cfg.channels[0], time_dim)

        # Down path. `skip_channels` records the width of every tensor pushed for the up path.
        self.down_blocks, skip_channels = down_path(cfg)
        c = skip_channels[-1]
        self.mid_block = MidBlock(c, time_dim, cfg)

        # Up path: levels in reverse, each with one more ResNet than on the way down, each ResNet
        # taking the concatenation of the running tensor and one popped skip.
        self.up_blocks = nn.ModuleList()
        for i, (c_out, attends) in enumerate(zip(reversed(cfg.channels), reversed(cfg.attention_levels))):
            resnets, attentions = [], []
            for _ in range(cfg.layers_per_level + 1):
                resnets.append(ResnetBlock(c + skip_channels.pop(), c_out, time_dim, groups))
                attentions += [transformer(c_out, n_levels - 1 - i)] if attends else []  # mirrors down level
                c = c_out
            level = Level(resnets, attentions)
            if i < n_levels - 1:
                level.upsamplers = nn.ModuleList([Upsample(c)])
            self.up_blocks.append(level)

        self.conv_norm_out = nn.GroupNorm(groups, c, eps=RESNET_NORM_EPS)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor,
                control: ControlResiduals | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W) noisy latent; t: scalar or (B,) timesteps; context: (B, T, context_dim).
        control: a ControlNet's residuals (`addons/controlnet.py`), added to every skip and to the
        middle's output before the up path reads them (Zhang et al. 2023, eq. 2)."""
        cfg = self.config
        B, C, H, W = x.shape
        if C != cfg.in_channels:
            raise ValueError(f"unet: x has {C} channels, this UNet takes {cfg.in_channels}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            raise ValueError(f"unet: context must be (B={B}, tokens, {cfg.context_dim}), got {tuple(context.shape)}")
        t_emb = embed_timesteps(self.time_embedding, t, x, cfg.channels[0])  # (B, 4·C0)

        h, skips = run_down_path(self.down_blocks, self.conv_in(x), t_emb, context)
        h = self.mid_block(h, t_emb, context)
        if control is not None:
            down, mid = control
            if len(down) != len(skips):
                raise ValueError(f"unet: control has {len(down)} residuals for {len(skips)} skips")
            skips = [s + r for s, r in zip(skips, down)]
            h = h + mid

        for level in self.up_blocks:
            for resnet, attention in level.blocks():
                h = resnet(torch.cat([h, skips.pop()], dim=1), t_emb)  # (B, C + C_skip, h, w)
                h = h if attention is None else attention(h, context)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h, size=skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.conv_norm_out(h)))
