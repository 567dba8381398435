"""The two official key layouts, and the one rule-based map between them.

Our modules are named after the diffusers folder layout (`unet/`, `vae/`, `text_encoder/`), so those
weights load as they are. The single-file layout of `v1-5-pruned-emaonly.safetensors` and
`sd-v1-4.ckpt` comes from the CompVis training code and names the same tensors differently:

    ours (diffusers)                          single file (CompVis)
    down_blocks.1.resnets.0.conv1.weight  <-> model.diffusion_model.input_blocks.4.0.in_layers.2.weight
    decoder.up_blocks.0.upsamplers.0.conv <-> first_stage_model.decoder.up.3.upsample.conv
    encoder.layers.0.mlp.fc1.weight       <-> cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight

A `Rule` pairs a block's prefix in both layouts (plus renames inside the block); the rules are
generated from the model's shape (levels, ResNets per level, which levels attend), and the same
rules are read left-to-right to convert a single file into ours, right-to-left to write one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Top-level prefixes of the three models inside a single-file checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14's text tower
# The CompVis EMA copy of the UNet: "model_ema." + the UNet key under "diffusion_model." with its
# dots removed (LitEma cannot use dotted buffer names), e.g. model_ema.diffusion_modelout2weight.
EMA_PREFIX = "model_ema."


@dataclass(frozen=True)
class Rule:
    ours: str  # prefix in our (diffusers) naming
    original: str  # prefix in the CompVis naming
    inner: tuple[tuple[str, str], ...] = ()  # (ours, original) renames of what follows the prefix
    conv1x1: bool = False  # ours holds Linear weights [C, C] where the original has 1x1 convs [C, C, 1, 1]


# Inside a UNet ResNet block the CompVis code uses nn.Sequential indices.
UNET_RESNET = (
    ("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."),
)
VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
VAE_ATTENTION = (
    ("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."),
)


def unet_rules(n_levels: int, layers: int, attention_levels: tuple[bool, ...]) -> list[Rule]:
    """Rules for a UNet with `n_levels` levels of `layers` ResNets (one more on the way up).

    CompVis numbers its blocks in one flat sequence: input_blocks[0] is conv_in, then per level
    `layers` blocks (ResNet at .0, transformer at .1) and a downsampler; output_blocks likewise, with
    the upsampler after the transformer in the level's last block.
    """
    rules = [
        Rule("conv_in.", "input_blocks.0.0."),
        Rule("time_embedding.linear_1.", "time_embed.0."),
        Rule("time_embedding.linear_2.", "time_embed.2."),
        Rule("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
        Rule("mid_block.attentions.0.", "middle_block.1."),
        Rule("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET),
        Rule("conv_norm_out.", "out.0."),
        Rule("conv_out.", "out.2."),
    ]
    per_level = layers + 1  # flat blocks per level: `layers` ResNets and one resampler
    for i in range(n_levels):
        for j in range(layers):
            k = 1 + i * per_level + j
            rules.append(Rule(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", UNET_RESNET))
            rules.append(Rule(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1."))
        if i < n_levels - 1:
            rules.append(Rule(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{1 + i * per_level + layers}.0.op."))
    for i in range(n_levels):
        attends = attention_levels[n_levels - 1 - i]  # up level i mirrors down level n_levels-1-i
        for j in range(layers + 1):
            k = i * per_level + j
            rules.append(Rule(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", UNET_RESNET))
            rules.append(Rule(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1."))
        if i < n_levels - 1:
            last = i * per_level + layers
            rules.append(Rule(f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last}.{2 if attends else 1}."))
    return rules


def vae_rules(n_levels: int, layers: int) -> list[Rule]:
    """Rules for the VAE. CompVis numbers the decoder's levels from the bottom (up.0 is the last to
    run), diffusers from the top (up_blocks.0 runs first)."""
    rules = [Rule("quant_conv.", "quant_conv."), Rule("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        rules += [
            Rule(f"{part}.conv_in.", f"{part}.conv_in."),
            Rule(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
            Rule(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION, conv1x1=True),
            Rule(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
            Rule(f"{part}.conv_norm_out.", f"{part}.norm_out."),
            Rule(f"{part}.conv_out.", f"{part}.conv_out."),
        ]
    for i in range(n_levels):
        for j in range(layers):
            rules.append(Rule(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET))
        if i < n_levels - 1:
            rules.append(Rule(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        up = n_levels - 1 - i
        for j in range(layers + 1):
            rules.append(Rule(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", VAE_RESNET))
        if i < n_levels - 1:
            rules.append(Rule(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample."))
    return rules


# OpenCLIP's text tower (SD 2.x single files) against our CLIP-named text encoder. Keys that are
# whole names rather than prefixes, then the renames inside each residual block.
OPENCLIP_WHOLE_KEYS = (("embeddings.position_embedding.weight", "positional_embedding"),
                       ("text_projection", "text_projection"), ("logit_scale", "logit_scale"))
OPENCLIP_BLOCK = (
    ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
)
QKV = ("q_proj", "k_proj", "v_proj")  # OpenCLIP stacks them, in this order, in `attn.in_proj_*`


def openclip_rules(layers: int) -> list[Rule]:
    """Rules for the prefix-named parts of an OpenCLIP text tower of `layers` residual blocks."""
    rules = [Rule("embeddings.token_embedding.", "token_embedding."), Rule("final_layer_norm.", "ln_final.")]
    return rules + [Rule(f"encoder.layers.{i}.", f"transformer.resblocks.{i}.", OPENCLIP_BLOCK) for i in range(layers)]


def openclip_key_is_known(key: str, layers: int) -> bool:
    """Whether `openclip_to_ours` has a place for `key` (keys without `cond_stage_model.model.`)."""
    if key in {original for _, original in OPENCLIP_WHOLE_KEYS} or key.endswith((".attn.in_proj_weight",
                                                                                   ".attn.in_proj_bias")):
        return True
    try:
        rename(key, openclip_rules(layers), "ours")
        return True
    except KeyError:
        return False


def openclip_to_ours(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower (keys without `cond_stage_model.model.`) in our names: the fused
    `in_proj` of each block split into q, k and v (each a third of its rows)."""
    whole = {original: ours for ours, original in OPENCLIP_WHOLE_KEYS}
    rules = openclip_rules(layers)
    out, rest = {}, {}
    for key, tensor in sd.items():
        if key in whole:
            out[whole[key]] = tensor
        elif key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            block, _, kind = key.rpartition(".attn.in_proj_")  # kind: "weight" or "bias"
            ours_block = rename(block + ".", rules, "ours")[0]
            for name, part in zip(QKV, tensor.chunk(3, dim=0)):
                out[f"{ours_block}self_attn.{name}.{kind}"] = part
        else:
            rest[key] = tensor
    return out | convert(rest, rules, "ours")


def ours_to_openclip(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The inverse of `openclip_to_ours`: q, k and v stacked back into each block's `in_proj`."""
    whole = dict(OPENCLIP_WHOLE_KEYS)
    rules = openclip_rules(layers)
    out, rest = {}, {}
    for key, tensor in sd.items():
        head, dot, tail = key.partition(".self_attn.")
        name, _, kind = tail.partition(".")
        if key in whole:
            out[whole[key]] = tensor
        elif dot and name in QKV:
            if name == QKV[0]:
                block = rename(head + ".", rules, "original")[0]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat([sd[f"{head}.self_attn.{n}.{kind}"] for n in QKV])
        else:
            rest[key] = tensor
    return out | convert(rest, rules, "original")


def convert(sd: dict[str, torch.Tensor], rules: list[Rule], to: str) -> dict[str, torch.Tensor]:
    """Rename every key of `sd` by `rules`, to "ours" or to "original". A key no rule covers is an
    error naming it: a map that silently drops tensors would leave layers random."""
    out = {}
    for key, tensor in sd.items():
        new_key, rule = rename(key, rules, to)
        if rule.conv1x1 and to == "original" and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        elif rule.conv1x1 and to == "ours" and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[:2])
        out[new_key] = tensor
    return out


def rename(key: str, rules: list[Rule], to: str) -> tuple[str, Rule]:
    """One key's name in the other layout, and the rule that mapped it."""
    if to not in ("ours", "original"):
        raise ValueError(f"`to` must be 'ours' or 'original', got {to!r}")
    forward = to == "original"
    by_prefix = {(r.ours if forward else r.original): r for r in rules}
    prefix = _longest_prefix(key, by_prefix)
    if prefix is None:
        raise KeyError(f"no rule maps the key {key!r} to the {to} layout")
    rule = by_prefix[prefix]
    rest = key[len(prefix):]
    for ours, original in rule.inner:
        src, dst = (ours, original) if forward else (original, ours)
        if rest.startswith(src):
            rest = dst + rest[len(src):]
            break
    return (rule.original if forward else rule.ours) + rest, rule


def _longest_prefix(key: str, prefixes: dict[str, Rule]) -> str | None:
    # Prefixes end with "." so "input_blocks.1." never matches "input_blocks.10.".
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:n]) + "."
        if candidate in prefixes:
            return candidate
    return None


def original_unet_shape(keys) -> tuple[int, int, tuple[bool, ...]]:
    """(levels, ResNets per level, which levels attend) of a CompVis UNet, read off its key names."""
    blocks = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] == "input_blocks" and len(parts) > 2:
            blocks.setdefault(int(parts[1]), set()).add(parts[2] if parts[3:4] != ["op"] else "op")
    if not blocks:
        raise ValueError("the UNet has no input_blocks.* tensors")
    downsamplers = sorted(k for k, parts in blocks.items() if "op" in parts)
    layers = downsamplers[0] - 1 if downsamplers else max(blocks)
    n_levels = len(downsamplers) + 1
    attention = tuple("1" in blocks.get(1 + i * (layers + 1), ()) for i in range(n_levels))
    return n_levels, layers, attention


def original_vae_shape(keys) -> tuple[int, int]:
    """(levels, ResNets per encoder level) of a CompVis VAE, read off its key names."""
    levels = {int(k.split(".")[2]) for k in keys if k.startswith("encoder.down.")}
    blocks = {int(k.split(".")[4]) for k in keys if k.startswith("encoder.down.0.block.")}
    if not levels or not blocks:
        raise ValueError("the VAE has no encoder.down.* tensors")
    return max(levels) + 1, max(blocks) + 1


def ema_key(unet_key: str) -> str:
    """The EMA copy's key for a UNet key in CompVis naming (without the model.diffusion_model. prefix)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")
