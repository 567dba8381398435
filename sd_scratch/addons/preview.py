"""Previews of a latent while it is denoised: TAESD, a small stand-in for the VAE's decoder, and a 4×3 matrix.

Mirrors `001 · VAE模型` from the other side: the VAE's decoder turns a latent into the picture, and
doing that at every step, to watch the picture form, costs a full decode each time. Previews trade
exactness for speed, as AUTOMATIC1111 and ComfyUI do:

- **TAESD** (Ollin Boer Bohan, github.com/madebyollin/taesd): a small decoder of plain 3×3
  convolutions and ReLUs (no attention, no normalisation), distilled to imitate the SD VAE's
  decoder: 141 GFLOP for a 512×512 picture against the VAE decoder's 2,515 (torch's flop
  counter). `scripts/train_preview.py` distills one for the built-in model's VAE, shipped as
  `sd_scratch/data/tiny-shapes-preview.safetensors`; for SD v1/v2, load the official
  `taesd_decoder.pth` or a diffusers `AutoencoderTiny` folder. The encoder half loads too.
- **the cheap matrix**: no weights at all, rgb = zᵀ·M + b at every latent pixel (one pixel per 8×8
  of the picture), M a 4×3 matrix fitted by least squares.

**Which latents.** Everything here reads the latents the pipelines hold, x_t and x̂₀ in the UNet's
space, which is the VAE's latent × LATENT_SCALE (0.18215): TAESD was trained on those, so nothing is
divided by 0.18215 first (`images.decode` divides before the VAE; a preview does not). Images come
out in [0, 1], not the VAE's [-1, 1]; TAESD's encoder likewise takes [0, 1] and gives scaled latents.

The decoder is an `nn.Sequential` whose indices are the keys of the official `taesd_decoder.pth`
(w = the width, 64 in TAESD; every convolution is 3×3, padding 1):

     0      soft clamp tanh(z / 3) · 3 (no weights): the latent limited to ±3 smoothly
     1, 2   conv 4 → w, ReLU
     3–5    3 Blocks, 6 nearest ×2 upsampling, 7 conv w → w without bias      (h × w   → 2h × 2w)
     8–10   3 Blocks, 11 upsampling, 12 conv                                   (        → 4h × 4w)
    13–15   3 Blocks, 16 upsampling, 17 conv                                   (        → 8h × 8w)
    18      1 Block, 19 conv w → 3

and the encoder mirrors it: 0 conv 3 → w, 1 Block; then three times a stride-2 conv without bias
(2, 6, 10) and 3 Blocks; 14 conv w → 4. A Block(c_in, c_out) is ReLU(conv(x) + skip(x)) with
conv = conv-ReLU-conv-ReLU-conv and skip a 1×1 convolution without bias where c_in ≠ c_out (the
identity otherwise, as in every Block here, all w → w), so its keys are `conv.0/2/4.weight/bias`.

diffusers' `AutoencoderTiny` holds the same layers in `decoder.layers.N` / `encoder.layers.N`, but its
decoder's clamp is a line of its forward, not a layer, so its indices are one lower
(`DIFFUSERS_INDEX_SHIFT`); its decode also returns 2·image − 1 and its encode takes [-1, 1] images.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import nn

from ..checkpoints.files import CheckpointError, read_checkpoint
from ..images import tensor_to_images

BUILTIN_PREVIEW = Path(__file__).resolve().parent.parent / "data" / "tiny-shapes-preview.safetensors"

# Blocks per level, as in TAESD (diffusers: num_decoder_blocks / num_encoder_blocks). The decoder
# runs from the latent's size up; the encoder from the image's size down.
DECODER_BLOCKS = (3, 3, 3, 1)
ENCODER_BLOCKS = (1, 3, 3, 3)
CLAMP = 3.0  # TAESD's decoder first squashes the latent into (-3, 3) with tanh(z / 3) · 3

# official Sequential index = diffusers' `<part>.layers.<n>` index + this
DIFFUSERS_INDEX_SHIFT = {"decoder": 1, "encoder": 0}
DIFFUSERS_NAME = re.compile(r"(decoder|encoder)\.layers\.(\d+)\.(.+)")
OFFICIAL_NAME = re.compile(r"(\d+)\.(.+)")
# keys that say "this is a whole SD checkpoint or its AutoencoderKL", to refuse it in words
FULL_VAE_HINTS = ("first_stage_model.", "model.diffusion_model.", "post_quant_conv.", "decoder.conv_in.",
                  "encoder.conv_in.", "decoder.mid.", "decoder.mid_block.")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# what a diffusers config.json must say for the layers above to be its layers
DIFFUSERS_EXPECTED = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
                      "num_decoder_blocks": list(DECODER_BLOCKS), "num_encoder_blocks": list(ENCODER_BLOCKS),
                      "scaling_factor": 1.0, "shift_factor": 0.0}


@dataclass(frozen=True)
class TAESDConfig:
    """The sizes of a TAESD half; TAESD's own are the defaults. `width` is every convolution's channel
    count (diffusers' `decoder_block_out_channels` / `encoder_block_out_channels`, all equal)."""

    width: int = 64
    latent_channels: int = 4
    image_channels: int = 3

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], part: str) -> TAESDConfig:
        """Read the sizes off the first and last convolutions (official names)."""
        first, last = ("1.weight", "19.weight") if part == "decoder" else ("0.weight", "14.weight")
        w_out, w_in = tensors[first].shape[:2]
        if part == "decoder":
            return cls(width=w_out, latent_channels=w_in, image_channels=tensors[last].shape[0])
        return cls(width=w_out, latent_channels=tensors[last].shape[0], image_channels=w_in)


def conv(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """tanh(z / 3) · 3: the identity near 0, never beyond ±3."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / CLAMP) * CLAMP


class Block(nn.Module):
    """ReLU(conv(x) + skip(x)), conv = conv-ReLU-conv-ReLU-conv (3×3); skip a 1×1 conv when widths differ."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(c_in, c_out), nn.ReLU(), conv(c_out, c_out), nn.ReLU(), conv(c_out, c_out))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TAESDDecoder(nn.Sequential):
    """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), about [0, 1] (not clamped: `PreviewDecoder` clamps)."""

    def __init__(self, config: TAESDConfig = TAESDConfig()):
        w = config.width
        layers: list[nn.Module] = [SoftClamp(), conv(config.latent_channels, w), nn.ReLU()]
        for level, n_blocks in enumerate(DECODER_BLOCKS):
            layers += [Block(w, w) for _ in range(n_blocks)]
            if level < len(DECODER_BLOCKS) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(w, w, bias=False)]
        layers.append(conv(w, config.image_channels))
        super().__init__(*layers)
        self.config = config


class TAESDEncoder(nn.Sequential):
    """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, 4, H/8, W/8), the UNet's space."""

    def __init__(self, config: TAESDConfig = TAESDConfig()):
        w = config.width
        layers: list[nn.Module] = []
        for level, n_blocks in enumerate(ENCODER_BLOCKS):
            layers.append(conv(config.image_channels, w) if level == 0 else conv(w, w, stride=2, bias=False))
            layers += [Block(w, w) for _ in range(n_blocks)]
        layers.append(conv(w, config.latent_channels))
        super().__init__(*layers)
        self.config = config


NETWORKS = {"decoder": TAESDDecoder, "encoder": TAESDEncoder}


def official_name(diffusers_name: str) -> tuple[str, str]:
    """`decoder.layers.0.weight` -> ("decoder", "1.weight"): diffusers' name as (part, official key)."""
    match = DIFFUSERS_NAME.fullmatch(diffusers_name)
    if match is None:
        raise ValueError(f"`{diffusers_name}` is not an AutoencoderTiny name (decoder.layers.N..., encoder.layers.N...)")
    part, index, rest = match.groups()
    return part, f"{int(index) + DIFFUSERS_INDEX_SHIFT[part]}.{rest}"


def diffusers_name(part: str, name: str) -> str:
    """The inverse: ("decoder", "1.weight") -> `decoder.layers.0.weight`."""
    index, rest = OFFICIAL_NAME.fullmatch(name).groups()
    return f"{part}.layers.{int(index) - DIFFUSERS_INDEX_SHIFT[part]}.{rest}"


def _check_diffusers_config(folder: Path) -> None:
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except OSError:
        raise CheckpointError(f"{folder}: is a folder without config.json; a diffusers AutoencoderTiny folder "
                              "has config.json and diffusion_pytorch_model.safetensors") from None
    except ValueError:
        raise CheckpointError(f"{config_path}: is not JSON") from None
    kind = config.get("_class_name", "AutoencoderTiny")
    if kind != "AutoencoderTiny":
        raise CheckpointError(f"{config_path}: describes a {kind}, not an AutoencoderTiny (TAESD)"
                              + (", the full VAE" if kind == "AutoencoderKL" else ""))
    for key, expected in DIFFUSERS_EXPECTED.items():
        if key in config and config[key] != expected:
            raise CheckpointError(f"{config_path}: {key} = {config[key]!r}; TAESD's layers need {expected!r}")
    for key in ("decoder_block_out_channels", "encoder_block_out_channels"):
        if len(set(config.get(key, [64]))) != 1:
            raise CheckpointError(f"{config_path}: {key} = {config[key]!r}; TAESD's layers have one width "
                                  "throughout (diffusers' own blocks cannot change width either)")


def _read(path: Path, part: str) -> tuple[dict[str, torch.Tensor], Callable[[str], str], Path]:
    """The `part`'s tensors under official names, a function giving an official name's name in the
    file (for errors), and the weights file read."""
    if path.is_dir():
        _check_diffusers_config(path)
        weights = next((path / name for name in DIFFUSERS_WEIGHTS if (path / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: has config.json but no {DIFFUSERS_WEIGHTS[0]}")
        path = weights
    found = read_checkpoint(path).tensors
    if any(k.startswith(FULL_VAE_HINTS) for k in found):
        raise CheckpointError(f"{path}: is a Stable Diffusion checkpoint or its full VAE (AutoencoderKL), not a "
                              "TAESD preview decoder (taesd_decoder.pth, an AutoencoderTiny folder, or "
                              f"{BUILTIN_PREVIEW.name})")
    if any(DIFFUSERS_NAME.fullmatch(k) for k in found):
        other_part = [k for k in found if DIFFUSERS_NAME.fullmatch(k) and official_name(k)[0] != part]
        tensors = {official_name(k)[1]: v for k, v in found.items()
                   if DIFFUSERS_NAME.fullmatch(k) and official_name(k)[0] == part}
        strays = sorted(k for k in found if not DIFFUSERS_NAME.fullmatch(k))
        if not tensors:
            raise CheckpointError(f"{path}: holds an AutoencoderTiny's {official_name(other_part[0])[0]} but no "
                                  f"{part} (no `{part}.layers.*` tensors)")
        in_file = partial(diffusers_name, part)
    else:
        tensors = {k: v for k, v in found.items() if OFFICIAL_NAME.fullmatch(k)}
        strays = sorted(k for k in found if k not in tensors)
        if not tensors:
            raise CheckpointError(f"{path}: holds no TAESD tensors (expected the official Sequential keys such as "
                                  f"`1.weight`, `3.conv.0.weight`, or AutoencoderTiny's `{part}.layers.0.weight`); "
                                  f"it has e.g. `{next(iter(found), '(nothing)')}`")
        if ("0.weight" in tensors) != (part == "encoder"):
            what = ("encoder (taesd_encoder.pth: its layer 0 is a conv)" if part == "decoder" else
                    "decoder (taesd_decoder.pth: its layer 0 is the weightless clamp)")
            raise CheckpointError(f"{path}: is a TAESD {what}; a TAESD {part} was asked for")
        in_file = str  # the file's names are the official ones
    if strays:
        raise CheckpointError(f"{path}: {len(strays)} tensors are no part of a TAESD {part}, e.g. `{strays[0]}`")
    return tensors, in_file, path


def _load(path: str | Path, part: str) -> nn.Sequential:
    tensors, in_file, path = _read(Path(path), part)
    ends = ("1.weight", "19.weight") if part == "decoder" else ("0.weight", "14.weight")
    if not all(name in tensors for name in ends):
        raise CheckpointError(f"{path}: lacks `{in_file(ends[0])}` or `{in_file(ends[1])}`, the first and last "
                              f"convolutions of a TAESD {part}, whose shapes give its sizes")
    config = TAESDConfig.from_state_dict(tensors, part)
    with torch.device("meta"):  # every tensor comes from the file
        network = NETWORKS[part](config)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(tensors), key=_index_order)
    extra = sorted(set(tensors) - set(expected), key=_index_order)
    if missing or extra:
        said = ([f"{len(missing)} missing, e.g. `{in_file(missing[0])}`"] if missing else []) + \
               ([f"{len(extra)} that it does not have, e.g. `{in_file(extra[0])}`"] if extra else [])
        raise CheckpointError(f"{path}: does not fit a TAESD {part} of width {config.width}: tensors "
                              + " and ".join(said))
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{path}: `{in_file(name)}` is {tuple(tensor.shape)}, but a TAESD {part} of "
                                  f"width {config.width} (read off its first conv) needs {tuple(expected[name].shape)}")
    network.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    return network.eval()


def _index_order(name: str) -> tuple[int, str]:
    index, rest = OFFICIAL_NAME.fullmatch(name).groups()
    return int(index), rest


def load_taesd_decoder(path: str | Path) -> TAESDDecoder:
    """A TAESD decoder, float32, from `taesd_decoder.pth`/`.safetensors` (official keys), a file in
    diffusers' names, or a diffusers AutoencoderTiny folder; the width is read off the tensors."""
    return _load(path, "decoder")


def load_taesd_encoder(path: str | Path) -> TAESDEncoder:
    """A TAESD encoder, from `taesd_encoder.pth`/`.safetensors` or an AutoencoderTiny file or folder."""
    return _load(path, "encoder")


def as_pictures(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images."""
    return tensor_to_images(images * 2 - 1)


class PreviewDecoder:
    """The pipelines' latents -> preview images: `preview(x0_pred)` is (B, 3, 8h, 8w) in [0, 1].

    Takes the latents as the pipelines hold them (x_t, x̂₀: the UNet's space, VAE latent × LATENT_SCALE),
    in any dtype and on any device; returns float32 on the latents' device."""

    def __init__(self, network: TAESDDecoder, source: str = ""):
        # channels-last: the same numbers, faster on a CPU for convolutions this narrow (1.8× at batch 64 here)
        self.network = network.to(memory_format=torch.channels_last)
        self.source = source

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PreviewDecoder:
        self.network.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        channels = self.network.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != channels:
            raise ValueError(f"a preview decodes latents of shape (B, {channels}, h, w); got {tuple(latents.shape)}")
        weight = self.network[1].weight
        images = self.network(latents.to(weight.device, weight.dtype))
        return images.clamp(0, 1).float().to(latents.device)

    def pictures(self, latents: torch.Tensor) -> list[Image.Image]:
        return as_pictures(self(latents))


def load_preview_decoder(path: str | Path | None = None) -> PreviewDecoder:
    """A preview decoder from a TAESD file or folder; None: the one distilled for the built-in model."""
    path = BUILTIN_PREVIEW if path is None else Path(path)
    return PreviewDecoder(load_taesd_decoder(path), str(path))


@dataclass(frozen=True)
class LatentToRGB:
    """rgb = zᵀ·matrix + bias at each latent pixel, z the scaled latent's 4 values, rgb about [-1, 1]."""

    name: str
    matrix: tuple[tuple[float, float, float], ...]  # one (r, g, b) row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


# AUTOMATIC1111's "Approx cheap" live preview for SD v1 (and 2.x, whose VAE is v1's):
# `modules/sd_vae_approx.py`, `cheap_approximation`, which cites the forum post it comes from,
# discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2 (no bias).
SD_V1_CHEAP = LatentToRGB("sd-v1 (AUTOMATIC1111's approx cheap)", (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
))
# The built-in model's: least squares of its VAE's decodes (each 8×8 patch's mean colour) on the scaled
# latents of 2,000 pictures of its world, with a bias; fitted and printed by scripts/train_preview.py.
TINY_SHAPES_CHEAP = LatentToRGB("tiny-shapes (least squares on its VAE's decodes)", (
    (1.8796, 1.1186, 0.7304),
    (-0.2368, -0.1594, -0.0475),
    (1.1347, 0.3915, 0.0103),
    (-0.4988, -0.278, -0.1053),
), (0.0092, -0.097, -0.1516))
CHEAP_MATRICES = {"tiny-shapes": TINY_SHAPES_CHEAP}  # by family name; any other family: SD_V1_CHEAP


def cheap_matrix_for(family: str) -> LatentToRGB:
    """The matrix for a model family (`sd.family.name`): the built-in model's own, else SD v1's."""
    return CHEAP_MATRICES.get(family, SD_V1_CHEAP)


def cheap_preview(latents: torch.Tensor, matrix: LatentToRGB = SD_V1_CHEAP) -> torch.Tensor:
    """The pipelines' latents (B, 4, h, w), UNet space, -> (B, 3, h, w) in [0, 1], one pixel per latent
    pixel (upsample it to show it at the picture's size)."""
    m = torch.tensor(matrix.matrix, dtype=torch.float32, device=latents.device)
    if latents.ndim != 4 or latents.shape[1] != m.shape[0]:
        raise ValueError(f"the cheap preview maps latents of shape (B, {m.shape[0]}, h, w); got {tuple(latents.shape)}")
    bias = torch.tensor(matrix.bias, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->brhw", latents.float(), m) + bias[:, None, None]
    return ((rgb + 1) / 2).clamp(0, 1)
