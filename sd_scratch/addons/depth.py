"""MiDaS DPT-Hybrid: the depth estimator that SD 2's depth-to-image model reads (`004 · 深度图转图像`,
step 2: "MiDaS estimates depth"). Ranftl, Bochkovskiy & Koltun 2021, "Vision Transformers for Dense
Prediction": a ViT reads the image as tokens, and the tokens of four depths of the network are
reassembled into image-like maps and fused, coarsest first, into one dense prediction. "Hybrid": the
ViT's tokens are not 16×16 pixel patches but the features of a ResNet-50 (BiT's: weight-standardised
convolutions and GroupNorm), whose first two stages also feed the decoder directly.

    pixel_values (B, 3, H, W) in [-1, 1], H and W multiples of 32
    ResNet stem (7×7/2 conv, GroupNorm, ReLU, 3×3/2 max pool)       -> (B, 64, H/4, W/4)
      stage 1: 3 bottlenecks                                       -> (B, 256, H/4, W/4) ───── layer 1
      stage 2: 4, the first of stride 2                            -> (B, 512, H/8, W/8) ───── layer 2
      stage 3: 9, the first of stride 2                            -> (B, 1024, H/16, W/16)
    1×1 conv, flattened: h·w tokens (h, w = H/16, W/16), cls token first, + position embeddings
      (learnt on a 24×24 grid, bilinearly resized to h×w)            -> (B, 1 + h·w, 768)
    ViT-B: 12 pre-norm transformer blocks; the outputs of blocks 8 and 11 are read out:
      "project" readout: each token ⊕ the cls token -> Linear -> GELU, then tokens -> (B, 768, h, w)
      block 8:  1×1 conv                                           -> (B, 768, H/16, W/16) ── layer 3
      block 11: 1×1 conv, 3×3/2 conv                               -> (B, 768, H/32, W/32) ── layer 4
    layers 1-4: a 3×3 conv each to 256 channels; fusion (RefineNet-like), coarsest first:
      refinenet4(layer 4) -> H/16, refinenet3(·, layer 3) -> H/8, refinenet2 -> H/4, refinenet1 -> H/2
      each: the coarser path + residual unit₁(its layer), residual unit₂, ×2 bilinear, 1×1 conv
    head: 3×3 conv to 128, ×2 bilinear, 3×3 conv to 32, ReLU, 1×1 conv to 1, ReLU   -> (B, H, W)

The output is relative inverse depth ("disparity"): larger is nearer, never negative, with no fixed
scale or offset (MiDaS is trained with a scale-and-shift-invariant loss), so only its order and its
ratios of differences mean anything; the SD 2 depth model rescales each map to [-1, 1] itself.

Module names are those of isl-org/MiDaS's `dpt_hybrid-midas-501f0c75.pt` (`pretrained.model.*` is
timm's hybrid ViT, `scratch.*` the decoder), so that file loads as it is; SD 2's checkpoint and
transformers' folder go through `checkpoints/depth_rules.py`. `load_depth_estimator` reads all three.

The input transform is the one diffusers' `StableDiffusionDepth2ImgPipeline` applies, the preprocessor
of `Intel/dpt-hybrid-midas` (and of `stabilityai/stable-diffusion-2-depth`): the image squeezed to
384×384 whatever its aspect (PIL bilinear: `DPTImageProcessor`'s default when that folder was written,
transformers 4.26), /255, then (x − 0.5) / 0.5. SD's own scripts (ldm's `AddMiDaS`) keep the aspect
instead (`keep_aspect=True`, see `resized_size`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from ..attention import attention
from ..checkpoints.depth_rules import DepthWeights, count, depth_weights_from_state_dict, read_depth_weights
from ..checkpoints.files import CheckpointError
from ..images import open_image

# The input: sides multiples of 32, because the ResNet and the ViT reduce by 16 and the last readout
# halves again, and the fusion blocks double back four times to meet each skip at its size.
MULTIPLE_OF = 32
RESNET_STRIDE = 16  # stem ÷4, stages 2 and 3 ÷2 each: one token per 16×16 pixels, as ViT-B/16's patches
DPT_SIZE = 384  # the resolution DPT-Hybrid was trained at: 24×24 tokens
# Intel/dpt-hybrid-midas's preprocessor and MiDaS's DPT transform: pixels in [0, 1] -> [-1, 1].
DPT_MEAN = DPT_STD = 0.5


@dataclass(frozen=True)
class DepthConfig:
    """Sizes of a DPT-Hybrid. The files record every width and count (`from_state_dict` reads them);
    not the heads, the GroupNorm groups, which ViT blocks are read out, nor the LayerNorm ε."""

    stem_width: int = 64
    stage_widths: tuple[int, int, int] = (256, 512, 1024)  # each stage's output; bottlenecks are ¼ as wide
    stage_depths: tuple[int, int, int] = (3, 4, 9)  # bottleneck blocks per stage (ResNet-50's first three)
    norm_groups: int = 32  # BiT's GroupNorm
    width: int = 768  # the ViT's token width D (ViT-B)
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    grid: int = 24  # the position embeddings' side: DPT_SIZE / RESNET_STRIDE
    taps: tuple[int, int] = (8, 11)  # ViT blocks read out as layers 3 and 4 (MiDaS's hooks [0, 1, 8, 11])
    layer_norm_eps: float = 1e-6  # timm's ViT (transformers' DPTConfig says 1e-12)
    reassemble_widths: tuple[int, int] = (768, 768)  # layers 3 and 4 after their 1×1 conv
    features: int = 256  # the fusion blocks' width
    head_width: int = 32  # the head's last hidden width

    @classmethod
    def dpt_hybrid(cls) -> DepthConfig:
        """MiDaS v3.0 DPT-Hybrid (`dpt_hybrid-midas-501f0c75.pt`, `Intel/dpt-hybrid-midas`, SD 2 depth)."""
        return cls()

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} does not split into {self.heads} heads")
        if not all(0 <= t < self.layers for t in self.taps):
            raise ValueError(f"taps {self.taps} must be blocks of the {self.layers}-block ViT")

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], base: DepthConfig | None = None) -> DepthConfig:
        """The sizes read off a MiDaS-named state dict; what the file does not record comes from `base`
        (by default the official preset). A missing tensor raises KeyError naming it."""
        backbone = "pretrained.model.patch_embed.backbone."
        stage_widths = tuple(sd[f"{backbone}stages.{i}.blocks.0.conv3.weight"].shape[0] for i in range(3))
        stage_depths = tuple(count(sd, f"{backbone}stages.{i}.blocks.{{}}.") for i in range(3))
        positions = sd["pretrained.model.pos_embed"].shape[1] - 1
        grid = math.isqrt(positions)
        if grid * grid != positions:
            raise ValueError(f"pretrained.model.pos_embed holds {positions} positions, not a square grid")
        return replace(
            base or cls.dpt_hybrid(),
            stem_width=sd[f"{backbone}stem.conv.weight"].shape[0], stage_widths=stage_widths,
            stage_depths=stage_depths, width=sd["pretrained.model.cls_token"].shape[-1],
            layers=count(sd, "pretrained.model.blocks.{}."), mlp_width=sd["pretrained.model.blocks.0.mlp.fc1.weight"].shape[0],
            grid=grid, reassemble_widths=(sd["pretrained.act_postprocess3.3.weight"].shape[0],
                                          sd["pretrained.act_postprocess4.3.weight"].shape[0]),
            features=sd["scratch.layer1_rn.weight"].shape[0], head_width=sd["scratch.output_conv.2.weight"].shape[0])


# ---- the BiT ResNet (timm's ResNetV2 without pre-activation, as the hybrid ViT uses it) ----------

def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's "SAME" padding, which BiT was trained with: ceil(size / stride) outputs; an odd
    total padding puts the extra pixel on the right and bottom (a 7×7/2 conv pads 2 left, 3 right)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class StdConv2d(nn.Conv2d):
    """A convolution whose filters are standardised before use (Qiao et al. 2019, "Weight
    Standardization"; BiT, Kolesnikov et al. 2020): ŵ = (w − mean(w)) / √(var(w) + ε) over each
    output channel's weights, then "SAME" padding. No bias: a GroupNorm follows."""

    EPS = 1e-8  # transformers' BiT and timm's hybrid ViT

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        w_hat = (w - mean) / torch.sqrt(var + self.EPS)
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), w_hat, None, self.stride)


class Stem(nn.Module):
    """7×7/2 conv, GroupNorm, ReLU, 3×3/2 max pool: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, width: int, groups: int):
        super().__init__()
        self.conv = StdConv2d(3, width, 7, stride=2)
        self.norm = nn.GroupNorm(groups, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        # The pool's padding: zeros here (and in transformers), −∞ in timm: the same after a ReLU.
        return F.max_pool2d(pad_same(x, 3, 2), 3, 2)


class Downsample(nn.Module):
    """The first block's shortcut: 1×1 conv (with the block's stride) and GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.conv = StdConv2d(in_channels, out_channels, 1, stride)
        self.norm = nn.GroupNorm(groups, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """ResNet's bottleneck, the stride on the 3×3 (v1.5): y = ReLU(shortcut(x) + GN(conv₁ₓ₁(ReLU(GN(
    conv₃ₓ₃(ReLU(GN(conv₁ₓ₁(x))))))))); the inner width is a quarter of the output's."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first: bool):
        super().__init__()
        mid = out_channels // 4
        self.downsample = Downsample(in_channels, out_channels, stride, groups) if first else None
        self.conv1, self.norm1 = StdConv2d(in_channels, mid, 1), nn.GroupNorm(groups, mid)
        self.conv2, self.norm2 = StdConv2d(mid, mid, 3, stride), nn.GroupNorm(groups, mid)
        self.conv3, self.norm3 = StdConv2d(mid, out_channels, 1), nn.GroupNorm(groups, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return F.relu(self.norm3(self.conv3(x)) + shortcut)


class Stage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int, groups: int):
        super().__init__()
        self.blocks = nn.Sequential(*(Bottleneck(in_channels if i == 0 else out_channels, out_channels,
                                                 stride if i == 0 else 1, groups, first=i == 0) for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNet(nn.Module):
    """The stem and three stages (stride 1, 2, 2): the outputs of all three, at H/4, H/8, H/16."""

    def __init__(self, config: DepthConfig):
        super().__init__()
        c = config
        self.stem = Stem(c.stem_width, c.norm_groups)
        widths_in = (c.stem_width,) + c.stage_widths[:-1]
        self.stages = nn.ModuleList(Stage(w_in, w_out, depth, 1 if i == 0 else 2, c.norm_groups) for i, (w_in, w_out, depth)
                                    in enumerate(zip(widths_in, c.stage_widths, c.stage_depths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


# ---- the ViT (timm's vit_base_resnet50_384) ------------------------------------------------------

class HybridPatchEmbed(nn.Module):
    """The ResNet, then a 1×1 conv from its last stage to the token width: one token per 16×16 pixels."""

    def __init__(self, config: DepthConfig):
        super().__init__()
        self.backbone = ResNet(config)
        self.proj = nn.Conv2d(config.stage_widths[-1], config.width, 1)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows: q, then k, then v
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        return self.proj(rearrange(attention(q, k, v), "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then + MLP(LN(·))."""

    def __init__(self, config: DepthConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config.width, config.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridViT(nn.Module):
    """Tokens of the ResNet's features through the transformer; returns the ResNet's first two stages
    and the tokens after the tapped blocks, (B, 1 + h·w, D) each, with the token grid (h, w)."""

    def __init__(self, config: DepthConfig):
        super().__init__()
        self.taps = config.taps
        self.patch_embed = HybridPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + config.grid ** 2, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h·w, D): the cls token's as learnt, the grid's resized bilinearly (align_corners
        False) from its square to h×w, as MiDaS's `_resize_pos_embed` and transformers do."""
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = math.isqrt(grid_pos.shape[1])
        if (h, w) != (side, side):
            grid_pos = rearrange(grid_pos, "1 (gh gw) d -> 1 d gh gw", gh=side)
            grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bilinear", align_corners=False)
            grid_pos = rearrange(grid_pos, "1 d h w -> 1 (h w) d")
        return torch.cat([cls_pos, grid_pos], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, int]]:
        stage1, stage2, stage3 = self.patch_embed.backbone(x)
        features = self.patch_embed.proj(stage3)  # (B, D, h, w)
        B, D, h, w = features.shape
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), rearrange(features, "b d h w -> b (h w) d")], dim=1)
        tokens = tokens + self.position_embeddings(h, w)  # (B, 1 + h·w, D)
        tapped = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in self.taps:
                tapped.append(tokens)
        return [stage1, stage2], tapped, (h, w)


class ProjectReadout(nn.Module):
    """DPT's "project" readout: the cls token appended to every other token, then Linear(2D -> D)
    and GELU: (B, 1 + N, D) -> (B, N, D)."""

    def __init__(self, width: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cls, rest = tokens[:, :1], tokens[:, 1:]
        return self.project(torch.cat([rest, cls.expand_as(rest)], dim=-1))


class Reassemble(nn.Sequential):
    """Tokens of one ViT block -> a feature map (MiDaS's `act_postprocess3`/`4`). The indices are
    MiDaS's: 0 the readout; 1 and 2 its transpose and unflatten, which have no weights and are done
    in `forward`; 3 a 1×1 conv to the layer's width; 4 (layer 4 only) a 3×3/2 conv halving the map."""

    def __init__(self, width: int, out_width: int, halve: bool):
        layers = [ProjectReadout(width), nn.Identity(), nn.Identity(), nn.Conv2d(width, out_width, 1)]
        if halve:
            layers.append(nn.Conv2d(out_width, out_width, 3, stride=2, padding=1))
        super().__init__(*layers)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        readout, _, _, *convs = self
        x = rearrange(readout(tokens), "b (h w) d -> b d h w", h=grid[0], w=grid[1])
        for conv in convs:
            x = conv(x)
        return x


class Encoder(nn.Module):
    """MiDaS's `pretrained`: the hybrid ViT and the readouts of its tapped blocks. (B, 3, H, W) -> the
    four layers: (B, 256, H/4, W/4), (B, 512, H/8, W/8), (B, 768, H/16, W/16), (B, 768, H/32, W/32)."""

    def __init__(self, config: DepthConfig):
        super().__init__()
        self.model = HybridViT(config)
        # act_postprocess1/2 (the ResNet stages) are identities with no weights in MiDaS: not built.
        self.act_postprocess3 = Reassemble(config.width, config.reassemble_widths[0], halve=False)
        self.act_postprocess4 = Reassemble(config.width, config.reassemble_widths[1], halve=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        (layer1, layer2), (tokens3, tokens4), grid = self.model(x)
        return [layer1, layer2, self.act_postprocess3(tokens3, grid), self.act_postprocess4(tokens4, grid)]


# ---- the decoder (MiDaS's `scratch`) -------------------------------------------------------------

class ResidualConvUnit(nn.Module):
    """x + conv(ReLU(conv(ReLU(x)))), 3×3 convs (pre-activation residual unit)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """RefineNet-style fusion: (coarser path [+ unit₁(skip)]) -> unit₂ -> ×2 bilinear (align_corners
    True) -> 1×1 conv. The coarsest block has no coarser path: it takes its layer alone."""

    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)  # MiDaS's names, camel case included
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = F.interpolate(self.resConfUnit2(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Decoder(nn.Module):
    """The four layers -> 3×3 convs to one width -> fusion from layer 4 up -> the head: (B, H, W)."""

    def __init__(self, config: DepthConfig):
        super().__init__()
        f = config.features
        widths = config.stage_widths[:2] + config.reassemble_widths
        self.layer1_rn, self.layer2_rn, self.layer3_rn, self.layer4_rn = (
            nn.Conv2d(w, f, 3, padding=1, bias=False) for w in widths)
        self.refinenet1, self.refinenet2, self.refinenet3, self.refinenet4 = (FusionBlock(f) for _ in range(4))
        self.output_conv = nn.Sequential(
            nn.Conv2d(f, f // 2, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(f // 2, config.head_width, 3, padding=1), nn.ReLU(), nn.Conv2d(config.head_width, 1, 1),
            nn.ReLU())  # the last ReLU: MiDaS's non_negative=True

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        layer1, layer2, layer3, layer4 = layers
        path = self.refinenet4(self.layer4_rn(layer4))  # (B, F, H/16, W/16)
        path = self.refinenet3(path, self.layer3_rn(layer3))  # H/8
        path = self.refinenet2(path, self.layer2_rn(layer2))  # H/4
        path = self.refinenet1(path, self.layer1_rn(layer1))  # (B, F, H/2, W/2)
        return self.output_conv(path)[:, 0]  # (B, H, W)


class DepthEstimator(nn.Module):
    """DPT-Hybrid: `forward(pixel_values)` -> relative inverse depth, see the module's docstring."""

    def __init__(self, config: DepthConfig):
        super().__init__()
        self.config = config
        self.pretrained = Encoder(config)
        self.scratch = Decoder(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, 3, H, W) in [-1, 1] (`prepare`), H and W multiples of 32 -> (B, H, W),
        relative inverse depth: ≥ 0, larger nearer, no fixed scale."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        H, W = pixel_values.shape[-2:]
        if H % MULTIPLE_OF or W % MULTIPLE_OF:
            raise ValueError(f"the depth model needs sides that are multiples of {MULTIPLE_OF}, got {H}×{W} "
                             "(`prepare` resizes images so)")
        return self.scratch(self.pretrained(pixel_values))


# ---- the input transform and the output's size ---------------------------------------------------

def resized_size(height: int, width: int, keep_aspect: bool = False, size: int = DPT_SIZE) -> tuple[int, int]:
    """The (H, W) the depth model sees an image at.

    keep_aspect=False (diffusers' pipeline, `Intel/dpt-hybrid-midas`'s preprocessor): size × size.
    keep_aspect=True (MiDaS's `Resize(keep_aspect_ratio=True, ensure_multiple_of=32,
    resize_method="minimal")`, which SD's own depth scripts use, and `DPTImageProcessor` with
    `keep_aspect_ratio=True, ensure_multiple_of=32`): one scale for both sides, whichever of size/H
    and size/W is closer to 1 (the smaller change), then each side rounded to the nearest multiple of
    32 (Python's round: halves go to the even multiple, as numpy's does in MiDaS), and up to 32 from 0.
    """
    if not keep_aspect:
        return size, size
    scale_h, scale_w = size / height, size / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    return tuple(max(round(scale * side / MULTIPLE_OF), 1) * MULTIPLE_OF for side in (height, width))


def _as_images(images) -> list[Image.Image]:
    if isinstance(images, (Image.Image, str, Path, np.ndarray)):
        images = [images]
    if not isinstance(images, Sequence) or not images:
        raise ValueError("images must be a PIL image, a path, a uint8 array, or a non-empty list of them")
    return [open_image(image, "image").convert("RGB") for image in images]


def prepare(images, keep_aspect: bool = False, size: int = DPT_SIZE) -> torch.Tensor:
    """PIL image(s) (or paths, uint8 arrays) -> pixel_values (B, 3, h, w) in [-1, 1], float32: resized
    (PIL; bilinear to size × size, or bicubic keeping the aspect, see `resized_size`), /255, then
    (x − 0.5) / 0.5. With keep_aspect, every image must give the same size."""
    batch = []
    for image in _as_images(images):
        h, w = resized_size(image.height, image.width, keep_aspect, size)
        resample = Image.BICUBIC if keep_aspect else Image.BILINEAR
        pixels = np.asarray(image.resize((w, h), resample), dtype=np.float32) / 255.0  # (h, w, 3) in [0, 1]
        batch.append(torch.from_numpy((pixels - DPT_MEAN) / DPT_STD).permute(2, 0, 1))
    if len({tuple(p.shape) for p in batch}) > 1:
        raise ValueError(f"the images resize to different sizes ({', '.join(str(tuple(p.shape[1:])) for p in batch)}); "
                         "pass them one at a time")
    return torch.stack(batch)


@torch.no_grad()
def estimate_depth(estimator: DepthEstimator, images, size: tuple[int, int] | None = None,
                   keep_aspect: bool = False) -> torch.Tensor:
    """Relative inverse depth (B, H, W) of the image(s), float32 on the estimator's device, resized
    bicubically (align_corners False, as transformers' `post_process_depth_estimation` and MiDaS's
    `run.py`) to `size` = (H, W), by default the images' own size (they must share one).

    For parity with diffusers' depth2img, resize the model's own output once, straight to the latent
    size: `estimate_depth(estimator, image, size=(H // 8, W // 8))`, not this map resized again."""
    images = _as_images(images)
    if size is None:
        sizes = {(image.height, image.width) for image in images}
        if len(sizes) > 1:
            raise ValueError(f"the images differ in size ({sorted(sizes)}); pass size=(H, W)")
        size = sizes.pop()
    parameter = next(estimator.parameters())
    pixel_values = prepare(images, keep_aspect).to(parameter.device, parameter.dtype)
    depth = estimator(pixel_values)[:, None]  # (B, 1, h, w)
    return F.interpolate(depth.float(), size=size, mode="bicubic", align_corners=False)[:, 0]


# ---- loading --------------------------------------------------------------------------------------

def load_depth_estimator(path: str | Path, config: DepthConfig | None = None, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> DepthEstimator:
    """A DPT-Hybrid from MiDaS's `dpt_hybrid-midas-501f0c75.pt`, SD 2's `512-depth-ema.ckpt` (its
    `depth_model.model.*` only), or a transformers folder (`Intel/dpt-hybrid-midas`: config.json +
    model.safetensors or pytorch_model.bin). Sizes are read off the tensors; `config` gives what the
    file does not record (heads, groups, tapped blocks; default: the official preset, or a transformers
    folder's config.json). Missing or unknown tensors are errors naming the file and the tensors."""
    return build_depth_estimator(read_depth_weights(path), config, device, dtype)


def depth_estimator_from_state_dict(sd: dict[str, torch.Tensor], config: DepthConfig | None = None,
                                    source: str = "state dict", device: str | torch.device = "cpu",
                                    dtype: torch.dtype = torch.float32) -> DepthEstimator:
    """`load_depth_estimator` for a state dict already read, e.g. a whole SD 2 depth checkpoint's."""
    return build_depth_estimator(depth_weights_from_state_dict(sd, source), config, device, dtype)


def build_depth_estimator(weights: DepthWeights, config: DepthConfig | None = None,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DepthEstimator:
    """The estimator built on the meta device and filled with `weights` (strictly), nothing random."""
    base = config or replace(DepthConfig.dpt_hybrid(), **weights.config_fields)
    try:
        config = DepthConfig.from_state_dict(weights.tensors, base)
    except KeyError as err:
        raise CheckpointError(f"{weights.source}: no {weights.name_in_file(err.args[0])}, which a DPT-Hybrid has") from None
    except ValueError as err:
        raise CheckpointError(f"{weights.source}: {err} (pass config= with what the file does not record)") from None
    with torch.device("meta"):
        estimator = DepthEstimator(config)
    weights.check({k: t.shape for k, t in estimator.state_dict().items()})
    estimator.load_state_dict({k: t.to(device, dtype) for k, t in weights.tensors.items()}, strict=True, assign=True)
    return estimator.eval()


def depth_picture(depth: torch.Tensor) -> Image.Image:
    """A depth map (H, W) or (1, H, W), e.g. `estimate_depth`'s, as the hint picture a depth ControlNet
    reads: its range stretched to 0–255, the farthest black and the nearest white, grey RGB (what
    lllyasviel's MiDaS annotator gives: (d − min) / (max − min) · 255, here rounded)."""
    if depth.ndim == 3 and depth.shape[0] == 1:
        depth = depth[0]
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W) or (1, H, W), got {tuple(depth.shape)}")
    d = depth.detach().float().cpu()
    low, high = d.min(), d.max()
    if not torch.isfinite(d).all() or high == low:
        raise ValueError("depth must be finite and not constant to make a picture of it")
    grey = ((d - low) / (high - low) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(grey).convert("RGB")
