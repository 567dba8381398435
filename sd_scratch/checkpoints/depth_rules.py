"""The MiDaS DPT-Hybrid depth model's three files, read into one naming: MiDaS's.

Our depth modules (`addons/depth.py`) are named as isl-org/MiDaS names them, so its
`dpt_hybrid-midas-501f0c75.pt` loads as it is. SD 2's `512-depth-ema.ckpt` holds the same tensors
under `depth_model.model.` (ldm's `MiDaSInference.model`), beside the whole SD model. transformers'
`Intel/dpt-hybrid-midas` folder names them its own way, through one rule-based map:

    ours (MiDaS)                                     transformers
    pretrained.model.patch_embed.backbone.stem.conv  dpt.embeddings.backbone.bit.embedder.convolution
    pretrained.model.patch_embed.backbone.stages.1.blocks.0.conv2
                                                     dpt.embeddings.backbone.bit.encoder.stages.1.layers.0.conv2
    pretrained.model.blocks.8.attn.qkv    [3D, D]    dpt.encoder.layer.8.attention.attention.{query,key,value} [D, D]
    pretrained.act_postprocess4.4                    neck.reassemble_stage.layers.3.resize
    scratch.layer1_rn                                neck.convs.0
    scratch.refinenet4.resConfUnit1.conv1            neck.fusion_stage.layers.0.residual_layer1.convolution1
    scratch.output_conv.0                            head.head.0

The rules are generated from the model's shape (ResNet stages, ViT blocks) and read both ways
(`checkpoints/rules.py`'s `Rule`). Nothing here builds a layer.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import CheckpointError, read_checkpoint, read_sharded
from .rules import Rule, convert, rename

DEPTH_PREFIX = "depth_model.model."  # the MiDaS model inside SD 2's 512-depth-ema.ckpt
SD_UNET_PREFIX = "model.diffusion_model."  # tells an SD checkpoint without a depth model from other files
# In the MiDaS files but read by nothing: the ViT's final LayerNorm and its ImageNet classifier (DPT
# takes the outputs of blocks 8 and 11, before both). transformers keeps the norm, as dpt.layernorm.
UNUSED_PREFIXES = ("pretrained.model.norm.", "pretrained.model.head.")
TRANSFORMERS_UNUSED_PREFIXES = ("dpt.layernorm.",)
# A transformers folder's weight files, in order of preference.
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

_BACKBONE = "pretrained.model.patch_embed.backbone."
_BIT = "dpt.embeddings.backbone.bit."
# Whole keys (parameters that are not inside a named layer).
WHOLE_KEYS = (("pretrained.model.cls_token", "dpt.embeddings.cls_token"),
              ("pretrained.model.pos_embed", "dpt.embeddings.position_embeddings"))
VIT_BLOCK = (("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."), ("attn.proj.", "attention.output.dense."),
             ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."))
QKV = ("query", "key", "value")  # timm stacks them, in this order, in `attn.qkv`
RESIDUAL_UNIT = (("conv1.", "convolution1."), ("conv2.", "convolution2."))
FUSION_BLOCK = (("out_conv.", "projection."),) + tuple(
    (f"resConfUnit{u}.{ours}", f"residual_layer{u}.{theirs}") for u in (1, 2) for ours, theirs in RESIDUAL_UNIT)


def transformers_rules(stages: int, layers: int) -> list[Rule]:
    """Rules (ours = MiDaS, original = transformers) for a DPT-Hybrid of `stages` ResNet stages and
    `layers` ViT blocks. transformers numbers the fusion blocks in the order they run, MiDaS by the
    resolution they work at: refinenet4 (the coarsest) runs first."""
    rules = [
        Rule(_BACKBONE + "stem.conv.", _BIT + "embedder.convolution."),
        Rule(_BACKBONE + "stem.norm.", _BIT + "embedder.norm."),
        Rule("pretrained.model.patch_embed.proj.", "dpt.embeddings.projection."),
        Rule("pretrained.model.norm.", "dpt.layernorm."),
        Rule("pretrained.act_postprocess3.0.project.0.", "neck.reassemble_stage.readout_projects.2.0."),
        Rule("pretrained.act_postprocess3.3.", "neck.reassemble_stage.layers.2.projection."),
        Rule("pretrained.act_postprocess4.0.project.0.", "neck.reassemble_stage.readout_projects.3.0."),
        Rule("pretrained.act_postprocess4.3.", "neck.reassemble_stage.layers.3.projection."),
        Rule("pretrained.act_postprocess4.4.", "neck.reassemble_stage.layers.3.resize."),
        Rule("scratch.output_conv.", "head.head."),
    ]
    rules += [Rule(f"{_BACKBONE}stages.{i}.blocks.", f"{_BIT}encoder.stages.{i}.layers.") for i in range(stages)]
    rules += [Rule(f"pretrained.model.blocks.{i}.", f"dpt.encoder.layer.{i}.", VIT_BLOCK) for i in range(layers)]
    for k in (1, 2, 3, 4):
        rules.append(Rule(f"scratch.layer{k}_rn.", f"neck.convs.{k - 1}."))
        rules.append(Rule(f"scratch.refinenet{k}.", f"neck.fusion_stage.layers.{4 - k}.", FUSION_BLOCK))
    return rules


def count(keys, pattern: str) -> int:
    """1 + the largest number in place of `{}` in `pattern` among `keys` (0 if none): how many stages,
    blocks or layers the names hold."""
    head, _, tail = pattern.partition("{}")
    found = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    return 1 + max((int(m.group(1)) for k in keys if (m := found.match(k))), default=-1)


def midas_shape(keys) -> tuple[int, int]:
    """(ResNet stages, ViT blocks) of a MiDaS-named DPT-Hybrid."""
    return count(keys, _BACKBONE + "stages.{}."), count(keys, "pretrained.model.blocks.{}.")


def transformers_shape(keys) -> tuple[int, int]:
    """(ResNet stages, ViT blocks) of a transformers-named DPT-Hybrid."""
    return count(keys, _BIT + "encoder.stages.{}."), count(keys, "dpt.encoder.layer.{}.")


def transformers_to_midas(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A transformers DPT-Hybrid state dict in MiDaS's names: each block's query, key and value stacked
    into `attn.qkv`. Returns (converted, keys no rule maps)."""
    rules = transformers_rules(*transformers_shape(sd))
    whole = {theirs: ours for ours, theirs in WHOLE_KEYS}
    out, rest, unmapped = {}, {}, []
    for key, tensor in sd.items():
        head, dot, tail = key.partition(".attention.attention.")
        name, _, kind = tail.partition(".")
        if key in whole:
            out[whole[key]] = tensor
        elif dot and name in QKV:
            parts = [sd.get(f"{head}.attention.attention.{n}.{kind}") for n in QKV]
            try:
                block = rename(head + ".", rules, "ours")[0]
            except KeyError:
                unmapped.append(key)
                continue
            if name == QKV[0] and all(p is not None for p in parts):  # else the block's qkv is reported missing
                out[f"{block}attn.qkv.{kind}"] = torch.cat(parts)
        else:
            try:
                rename(key, rules, "ours")
                rest[key] = tensor
            except KeyError:
                unmapped.append(key)
    return out | convert(rest, rules, "ours"), unmapped


def midas_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `transformers_to_midas`: each `attn.qkv` split into thirds (query, key, value).
    Keys of the MiDaS files that transformers does not keep (the ImageNet classifier) are dropped."""
    rules = transformers_rules(*midas_shape(sd))
    whole = dict(WHOLE_KEYS)
    out, rest = {}, {}
    for key, tensor in sd.items():
        head, dot, kind = key.partition(".attn.qkv.")
        if key in whole:
            out[whole[key]] = tensor
        elif dot:
            block = rename(head + ".", rules, "original")[0]
            for name, part in zip(QKV, tensor.chunk(3, dim=0)):
                out[f"{block}attention.attention.{name}.{kind}"] = part
        elif not key.startswith("pretrained.model.head."):
            rest[key] = tensor
    return out | convert(rest, rules, "original")


def transformers_name(key: str, stages: int, layers: int) -> str:
    """One of our (MiDaS) keys as transformers names it, for errors about a transformers file."""
    whole = dict(WHOLE_KEYS)
    if key in whole:
        return whole[key]
    head, dot, kind = key.partition(".attn.qkv.")
    rules = transformers_rules(stages, layers)
    if dot:
        return f"{rename(head + '.', rules, 'original')[0]}attention.attention.query.{kind} (and key, value)"
    try:
        return rename(key, rules, "original")[0]
    except KeyError:
        return key


def layout_of(keys) -> str | None:
    """Which layout the keys are in: "midas", "sd-depth" (an SD 2 depth checkpoint), "sd" (an SD
    checkpoint with no depth model), "transformers", or None (none of these)."""
    keys = list(keys)
    if any(k.startswith(DEPTH_PREFIX) for k in keys):
        return "sd-depth"
    if any(k.startswith(("pretrained.model.", "scratch.")) for k in keys):
        return "midas"
    if any(k.startswith(("dpt.embeddings.", "neck.")) for k in keys):
        return "transformers"
    if any(k.startswith(SD_UNET_PREFIX) for k in keys):
        return "sd"
    return None


@dataclass
class DepthWeights:
    """A depth model's tensors in MiDaS's names, as one file held them."""

    tensors: dict[str, torch.Tensor]
    source: str  # the file, for errors
    name_in_file: Callable[[str], str]  # our key -> the file's own name for it, for errors
    dropped: list[str]  # known unused tensors left out (UNUSED_PREFIXES), in the file's names
    config_fields: dict = field(default_factory=dict)  # what a transformers config.json adds to the sizes

    def check(self, expected: dict[str, torch.Size]) -> None:
        """Every tensor a model of these sizes has, no other, each of its shape; else an error in the
        file's own names."""
        name = self.name_in_file
        missing = [k for k in expected if k not in self.tensors]
        if missing:
            raise CheckpointError(f"{self.source}: {len(missing)} tensors missing, e.g. "
                                  f"{', '.join(name(k) for k in missing[:3])}")
        extra = [k for k in self.tensors if k not in expected]
        if extra:
            raise CheckpointError(f"{self.source}: {len(extra)} tensors belong to no part of DPT-Hybrid, e.g. "
                                  f"{', '.join(name(k) for k in extra[:3])}")
        for k, t in self.tensors.items():
            if t.shape != expected[k]:
                raise CheckpointError(f"{self.source}: {name(k)} has shape {tuple(t.shape)}, the model read off the "
                                      f"other tensors expects {tuple(expected[k])}")


# What a transformers DPTConfig must say for the module built here: (key, where, default, required).
TRANSFORMERS_REQUIRED = (
    ("is_hybrid", "", False, True), ("readout_type", "", "project", "project"), ("hidden_act", "", "gelu", "gelu"),
    ("use_batch_norm_in_fusion_residual", "", False, False), ("add_projection", "", False, False),
    ("patch_size", "", 16, 16),  # the ResNet's stride: one token per 16×16 pixels
    ("layer_type", "backbone_config", "preactivation", "bottleneck"), ("hidden_act", "backbone_config", "relu", "relu"),
    ("global_padding", "backbone_config", None, "SAME"), ("embedding_dynamic_padding", "backbone_config", False, True),
)


def transformers_config_fields(config: dict, source: str) -> dict:
    """What a transformers DPT-Hybrid config.json says that the tensors do not: the heads, the
    GroupNorm groups, the ViT blocks read out (its `backbone_out_indices[2:]`) and the LayerNorm ε,
    as `DepthConfig` fields; each setting this module does not build is an error naming it."""
    backbone = config.get("backbone_config") or {}
    wrong = []
    for key, where, default, want in TRANSFORMERS_REQUIRED:
        got = (backbone if where else config).get(key, default)
        got = got.upper() if isinstance(got, str) and key == "global_padding" else got
        if got != want:
            wrong.append(f"{where + '.' if where else ''}{key} is {got!r}, not {want!r}")
    factors = list(config.get("reassemble_factors", [4, 2, 1, 0.5]))[2:]
    if factors != [1, 0.5]:
        wrong.append(f"reassemble_factors[2:] is {factors}, not [1, 0.5]")
    if wrong:
        raise CheckpointError(f"{source}: not a MiDaS DPT-Hybrid config: {'; '.join(wrong)}")
    return dict(heads=config.get("num_attention_heads", 12), width=config.get("hidden_size", 768),
                layers=config.get("num_hidden_layers", 12), taps=tuple(config.get("backbone_out_indices", [2, 5, 8, 11]))[2:],
                norm_groups=backbone.get("num_groups", 32), layer_norm_eps=config.get("layer_norm_eps", 1e-12))


def depth_weights_from_state_dict(sd: dict[str, torch.Tensor], source: str, config_fields: dict | None = None) -> DepthWeights:
    """The depth model's tensors out of any of the three layouts (an SD 2 depth checkpoint's full
    state dict included: only `depth_model.model.*` is taken). Refuses, in words, a state dict that
    holds no depth model."""
    layout = layout_of(sd)
    if layout == "sd":
        raise CheckpointError(f"{source}: is a Stable Diffusion checkpoint without a depth model (no "
                              f"{DEPTH_PREFIX}* tensors); only SD 2's 512-depth-ema.ckpt carries one")
    if layout is None:
        shown = ", ".join(sorted(sd)[:3]) or "nothing"
        raise CheckpointError(f"{source}: holds no DPT-Hybrid depth weights (it has {shown}, ...); expected MiDaS's "
                              f"pretrained.* and scratch.*, SD 2 depth's {DEPTH_PREFIX}*, or transformers' dpt.*, "
                              "neck.*, head.*")
    if layout == "transformers":
        stages, layers = transformers_shape(sd)
        dropped = [k for k in sd if k.startswith(TRANSFORMERS_UNUSED_PREFIXES)]
        sd, unmapped = transformers_to_midas({k: v for k, v in sd.items() if k not in dropped})
        if unmapped:
            raise CheckpointError(f"{source}: {len(unmapped)} tensors belong to no part of DPT-Hybrid, e.g. "
                                  f"{', '.join(sorted(unmapped)[:3])}")
        return DepthWeights(sd, source, lambda key: transformers_name(key, stages, layers), dropped, config_fields or {})
    prefix = DEPTH_PREFIX if layout == "sd-depth" else ""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    dropped = [prefix + k for k in sd if k.startswith(UNUSED_PREFIXES)]
    tensors = {k: v for k, v in sd.items() if not k.startswith(UNUSED_PREFIXES)}
    return DepthWeights(tensors, source, lambda key: prefix + key, dropped, config_fields or {})


def read_depth_weights(path: str | Path) -> DepthWeights:
    """Read a depth model from a MiDaS `.pt`, an SD 2 depth `.ckpt`/`.safetensors`, or a transformers
    folder (config.json + model.safetensors or pytorch_model.bin, sharded or not; a weight file of
    transformers' names also reads a config.json beside it). Pickles are read weights-only
    (`files.read_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: is a folder without config.json; expected a transformers DPT folder "
                                  "(config.json + model.safetensors) or a checkpoint file")
        fields = transformers_config_fields(_read_json(config_path), str(config_path))
        for name in TRANSFORMERS_WEIGHTS:
            if (path / name).is_file():
                return depth_weights_from_state_dict(read_checkpoint(path / name).tensors, str(path / name), fields)
            if (path / f"{name}.index.json").is_file():
                return depth_weights_from_state_dict(read_sharded(path / f"{name}.index.json"), str(path), fields)
        raise CheckpointError(f"{path}: no weight file found (expected {' or '.join(TRANSFORMERS_WEIGHTS)})")
    tensors = read_checkpoint(path).tensors
    beside = path.parent / "config.json"
    fields = (transformers_config_fields(_read_json(beside), str(beside))
              if layout_of(tensors) == "transformers" and beside.is_file() else None)
    return depth_weights_from_state_dict(tensors, str(path), fields)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: is not valid JSON ({err})") from None
