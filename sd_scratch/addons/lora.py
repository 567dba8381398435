"""LoRA: a low-rank change to a trained network's weights, W' = W + m · (α / r) · up @ down.

Mirrors `004 · LoRA`: instead of fine-tuning W (out × in), train two thin matrices, down (r × in)
and up (out × r) with r ≪ in, out; their product is the change. A file holds, per wrapped module,
`<name>.lora_down.weight`, `<name>.lora_up.weight` and optionally `<name>.alpha` (kohya's and
AUTOMATIC1111's layout, what Civitai serves; LyCORIS's LoHa and LoKr factor ΔW otherwise, see
`change_of`; diffusers' own files name modules `unet.<path>.lora_A/lora_B`); the change is scaled by α / r (1 without α) and by the
user's multiplier m, separately for the text encoder and the UNet.

`<name>` is `lora_unet_` or `lora_te_` and the module's path with "." written "_", in diffusers'
names (`lora_unet_down_blocks_0_attentions_0_proj_in`) or, from some tools, CompVis's
(`lora_unet_input_blocks_1_1_proj_in`); both are generated here from the model's own module names
and the key rules of `checkpoints/rules.py`, not from a table. Factors may be 4-D: 1×1 for SD v1's
convolutional projections, k×k for LoCon's ResNet convolutions (then ΔW[o,i,:,:] = Σ_r up[o,r] ·
down[r,i,:,:]). The change is merged into the weights; the original tensors are kept, so
`unload_lora` puts them back bit for bit.
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..checkpoints.files import CheckpointError, read_checkpoint
from ..checkpoints.rules import rename, unet_rules

if TYPE_CHECKING:
    from ..stable_diffusion import StableDiffusion

UNET_PREFIX, TEXT_PREFIX = "lora_unet_", "lora_te_"
TEXT_MODEL = "text_model."  # kohya names the text encoder as transformers' CLIPTextModel, under text_model.
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
PEFT_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"))
# LyCORIS's LoHa (Hadamard product) and LoKr (Kronecker product) tensors; CP/Tucker cores are refused
LYCORIS = tuple((f".{n}", n) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                        "lokr_t2")) + ((".lora_mid.weight", "mid"),)
# diffusers' attention-processor LoRA names (before it used PEFT) and the module each wraps
OLD_DIFFUSERS_PROCESSORS = ((".processor.to_q_lora", ".to_q"), (".processor.to_k_lora", ".to_k"),
                            (".processor.to_v_lora", ".to_v"), (".processor.to_out_lora", ".to_out.0"))


@dataclass
class LoRAState:
    """What is merged: the original weights of every module touched (kept once, the first time) and
    the files applied, with their multipliers."""

    originals: dict[int, tuple[nn.Module, torch.Tensor]] = field(default_factory=dict)
    applied: list[tuple[str, float, float]] = field(default_factory=list)  # (file, unet scale, text scale)


def _linear_or_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def module_names(sd: StableDiffusion) -> dict[str, tuple[nn.Module, str]]:
    """{LoRA name: (module, "unet" or "text encoder")} for every Linear and Conv2d, under diffusers'
    names and, for the UNet, CompVis's too."""
    names: dict[str, tuple[nn.Module, str]] = {}
    cfg = sd.unet.config
    rules = unet_rules(len(cfg.channels), cfg.layers_per_level, cfg.attention_levels)
    for name, module in sd.unet.named_modules():
        if _linear_or_conv(module):
            names[UNET_PREFIX + name.replace(".", "_")] = (module, "unet")
            compvis = rename(name + ".weight", rules, "original")[0].removesuffix(".weight")
            names[UNET_PREFIX + compvis.replace(".", "_")] = (module, "unet")
    for name, module in sd.text_encoder.named_modules():
        if _linear_or_conv(module):
            names[TEXT_PREFIX + (TEXT_MODEL + name).replace(".", "_")] = (module, "text encoder")
    return names


def delta_weight(down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """up @ down in the weight's shape: Linear (out, in); a 1×1 factor pair onto a Linear or a 1×1
    conv; a k×k down with a 1×1 up onto a k×k conv (each of the k×k taps its own up @ down)."""
    up2 = up.flatten(1)  # (out, r)
    if down.ndim == 4 and down.shape[-2:] != (1, 1):
        return torch.einsum("or,rikl->oikl", up2, down)
    return (up2 @ down.flatten(1)).reshape(shape) if len(shape) == 4 else up2 @ down.flatten(1)


def _kohya_name(diffusers_key: str) -> str | None:
    """A diffusers-layout module path (`unet.down_blocks.0…to_q`, `text_encoder.text_model…q_proj`)
    as kohya's name, or None for another prefix."""
    for prefix, lora_prefix in (("unet.", UNET_PREFIX), ("text_encoder.", TEXT_PREFIX)):
        if diffusers_key.startswith(prefix):
            return lora_prefix + diffusers_key[len(prefix):].replace(".", "_")
    return None


def _split_key(key: str) -> tuple[str, str] | None:
    """(kohya name, "down"/"up"/"alpha") of one key in any of the layouts read, or None."""
    for suffix, part in ((DOWN, "down"), (UP, "up"), (ALPHA, "alpha"), *LYCORIS):  # kohya / A1111 / LyCORIS
        if key.endswith(suffix) and key.startswith((UNET_PREFIX, TEXT_PREFIX)):
            return key[: -len(suffix)], part
    for suffix, part in PEFT_SUFFIXES:  # diffusers / PEFT: unet.<path>.lora_A.weight
        if key.endswith(suffix):
            name = _kohya_name(key[: -len(suffix)])
            return None if name is None else (name, part)
    for old, new in OLD_DIFFUSERS_PROCESSORS:  # diffusers before PEFT: …attn1.processor.to_q_lora.down.weight
        for suffix, part in ((".down.weight", "down"), (".up.weight", "up")):
            if key.endswith(old + suffix):
                name = _kohya_name(key[: -len(old + suffix)] + new)
                return None if name is None else (name, part)
    return None


def read_lora(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya name: {"down", "up", optionally "alpha"}} from a kohya/A1111 file or a diffusers/PEFT
    one (`unet.<module>.lora_A.weight`/`lora_B.weight`, alpha-less: scale 1), read safely."""
    tensors = read_checkpoint(path).tensors
    groups: dict[str, dict[str, torch.Tensor]] = {}
    leftovers = []
    for key, tensor in tensors.items():
        where = _split_key(key)
        if where is None:
            leftovers.append(key)
        else:
            groups.setdefault(where[0], {})[where[1]] = tensor
    if leftovers:
        raise CheckpointError(f"{path}: {len(leftovers)} keys are in no LoRA layout read here (kohya lora_down/"
                              f"lora_up/alpha, diffusers lora_A/lora_B), e.g. {', '.join(sorted(leftovers)[:3])}")
    for name, g in groups.items():
        kind = _kind(g)
        if kind is None:
            raise CheckpointError(f"{path}: {name} has {', '.join(sorted(g))}, which make no LoRA, LoHa or LoKr "
                                  "(lora_down+lora_up; hada_w1_a/b+hada_w2_a/b; lokr_w1(_a/_b)+lokr_w2(_a/_b))")
        if kind == "tucker":
            raise CheckpointError(f"{path}: {name} is a LyCORIS CP/Tucker factorisation (hada_t*/lokr_t2/lora_mid), "
                                  "which sd-scratch does not read yet")
    return groups


def _kind(g: dict[str, torch.Tensor]) -> str | None:
    if any(k in g for k in ("hada_t1", "hada_t2", "lokr_t2", "mid")):
        return "tucker"
    if {"down", "up"} <= set(g):
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(g):
        return "loha"
    def has(w: str) -> bool:  # whole, or as a product of two factors
        return w in g or {w + "_a", w + "_b"} <= set(g)

    if has("lokr_w1") and has("lokr_w2"):
        return "lokr"
    return None


def _alpha_over_rank(g: dict[str, torch.Tensor], rank: int | None) -> float:
    """α / r, or 1 where the file gives no α (or 0) or the change has no rank."""
    if rank is None or "alpha" not in g or float(g["alpha"]) == 0:
        return 1.0
    return float(g["alpha"]) / rank


def change_of(g: dict[str, torch.Tensor], shape: torch.Size) -> tuple[torch.Tensor, float]:
    """(ΔW in the weight's shape, its factor α/r) for one module's tensors:
    LoRA ΔW = up @ down; LoHa (Hyeon-Woo et al. 2022) ΔW = (w1a @ w1b) ⊙ (w2a @ w2b);
    LoKr ΔW = w1 ⊗ w2 (Kronecker), each w given whole or as a product a @ b."""
    f = {k: v.to(torch.float32) for k, v in g.items()}
    kind = _kind(g)
    if kind == "lora":
        return delta_weight(f["down"], f["up"], shape), _alpha_over_rank(g, f["down"].shape[0])
    if kind == "loha":
        delta = (f["hada_w1_a"] @ f["hada_w1_b"].flatten(1)) * (f["hada_w2_a"] @ f["hada_w2_b"].flatten(1))
        return delta.reshape(shape), _alpha_over_rank(g, f["hada_w1_b"].shape[0])
    ranks = [f[w + "_b"].shape[0] for w in ("lokr_w1", "lokr_w2") if w + "_b" in f]
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1)
    if len(shape) == 4:
        w1 = w1[:, :, None, None]
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if w2.ndim == 2 else w2
    return torch.kron(w1, w2).reshape(shape), _alpha_over_rank(g, ranks[0] if ranks else None)


@torch.no_grad()
def load_lora(sd: StableDiffusion, path: str | Path, scale: float = 1.0, text_encoder_scale: float | None = None,
              strict: bool = True, state: LoRAState | None = None) -> list[str]:
    """Merge the LoRA at `path` into `sd`'s weights: the UNet's changes times `scale`, the text
    encoder's times `text_encoder_scale` (default: `scale`). Several files may be merged one after
    another. A name that matches no module is an error listing a few (a warning with strict=False).
    Returns the names merged."""
    te_scale = scale if text_encoder_scale is None else text_encoder_scale
    groups = read_lora(path)
    names = module_names(sd)
    unmatched = sorted(n for n in groups if n not in names)
    if unmatched:
        message = (f"{path}: {len(unmatched)} of {len(groups)} LoRA modules match no module of this model, e.g. "
                   f"{', '.join(unmatched[:3])}")
        if strict:
            raise CheckpointError(message + " (is it for another model family?); strict=False merges the rest")
        warnings.warn(message + "; they are left out", stacklevel=3)
    state = sd.lora if state is None else state
    for name in sorted(n for n in groups if n in names):
        module, part = names[name]
        weight = module.weight
        delta, factor = change_of(groups[name], weight.shape)
        if delta.shape != weight.shape and delta.ndim == 4 and delta.shape[1] < weight.shape[1]:
            delta = nn.functional.pad(delta, (0, 0, 0, 0, 0, weight.shape[1] - delta.shape[1]))  # 9-ch conv_in
        if delta.shape != weight.shape:
            raise CheckpointError(f"{path}: {name} changes a {tuple(delta.shape)} weight, the model's is "
                                  f"{tuple(weight.shape)}")
        state.originals.setdefault(id(module), (module, weight.detach().clone()))
        m = scale if part == "unet" else te_scale
        weight.add_((m * factor * delta).to(weight.dtype))
    state.applied.append((str(path), scale, te_scale))
    return sorted(n for n in groups if n in names)


@torch.no_grad()
def unload_lora(sd: StableDiffusion, state: LoRAState | None = None) -> None:
    """Put back every weight a LoRA changed, bit for bit."""
    state = sd.lora if state is None else state
    for module, original in state.originals.values():
        module.weight.copy_(original)
    state.originals.clear()
    state.applied.clear()


# ---- <lora:name:multiplier> in a prompt (AUTOMATIC1111's extra networks) ---------------------------

# <lora:NAME>, <lora:NAME:m>, <lora:NAME:te:unet>, and the keyword forms te=…, unet=…
PROMPT_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass(frozen=True)
class LoRATag:
    name: str
    unet: float
    text_encoder: float


def prompt_tags(prompt: str) -> tuple[str, list[LoRATag]]:
    """The prompt without its `<lora:…>` tags, and the tags (A1111: the UNet multiplier defaults to
    the text encoder's, which defaults to 1)."""
    tags = []
    for match in PROMPT_TAG.finditer(prompt):
        te = unet = None
        positional = []
        for arg in match.group(2).split(":")[1:]:
            key, eq, value = arg.partition("=")
            if eq and key.strip() in ("te", "unet"):
                te, unet = (float(value), unet) if key.strip() == "te" else (te, float(value))
            elif arg.strip():
                positional.append(float(arg))
        te = positional[0] if te is None and positional else te
        unet = positional[1] if unet is None and len(positional) > 1 else unet
        te = 1.0 if te is None else te
        tags.append(LoRATag(match.group(1).strip(), te if unet is None else unet, te))
    return PROMPT_TAG.sub("", prompt), tags


def find_lora_file(folder: str | Path, name: str) -> Path:
    folder = Path(folder)
    for suffix in FILE_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    raise FileNotFoundError(f"<lora:{name}>: no {name}{{{','.join(FILE_SUFFIXES)}}} in {folder}")


@contextmanager
def applied_for_a_run(sd: StableDiffusion, tags: list[LoRATag], folder: str | Path | None):
    """The prompt's LoRAs merged for one generation, the weights put back afterwards."""
    if not tags:
        yield
        return
    if folder is None:
        names = ", ".join(f"<lora:{t.name}>" for t in tags)
        raise ValueError(f"the prompt names {names}; pass lora_dir= (--lora-dir) for the folder that holds them")
    state = LoRAState()
    try:
        for tag in tags:
            load_lora(sd, find_lora_file(folder, tag.name), tag.unet, tag.text_encoder, state=state)
        yield
    finally:
        unload_lora(sd, state)
