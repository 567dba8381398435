"""Which model a file holds: each model family is one row of `FAMILIES`, refusals included.

A family fixes what the tensors cannot say: the text encoder's kind and its pad id, whether the
UNet predicts ε or v, the resolution it was trained at (the default image size). A file is matched
to a row by its `Signature`, a few facts read off its key names and shapes (or a diffusers folder's
config files) before anything is built: the row's text encoder and every size it gives must agree.
The first row that matches wins; a row with a `refusal` stops the load with that reason. A new
family (SD 2.x's 512-base and 768-v, say) is a new row, not a new code path.
"""
from __future__ import annotations

from dataclasses import dataclass
from ..tokenizer import END_OF_TEXT

OPENCLIP_PAD_ID = 0  # OpenCLIP's tokenizer pads the 77-id row with 0 after the end token (SD v1's CLIP pads with 49407)
SD2_HEAD_DIM = 64  # v2-inference.yaml `num_head_channels: 64`: SD 2.x's UNet heads are 64 wide (5/10/20/20 of them)

LATENT_CHANNELS = 4  # SD's latent; the inpainting UNet adds 1 (mask) + 4 (masked image's latent)
INPAINT_CHANNELS = LATENT_CHANNELS + 1 + LATENT_CHANNELS


@dataclass(frozen=True)
class Signature:
    """What a file tells about its model before it is built."""

    text_encoder: str  # "clip" (SD v1's CLIP ViT-L/14), "openclip" (SD 2.x's OpenCLIP ViT-H/14), "sdxl" (two)
    context_dim: int | None  # the width of the text the UNet's cross-attention reads
    in_channels: int | None  # the UNet's input channels
    unet_widths: tuple[int, ...] = ()  # the UNet's distinct level widths, down the U

    def __str__(self) -> str:
        widths = "×".join(map(str, self.unet_widths)) or "?"
        return (f"{self.text_encoder} text encoder, {self.context_dim}-wide context, "
                f"{self.in_channels}-channel UNet input, UNet widths {widths}")


@dataclass(frozen=True)
class Family:
    """One model family. The first group of fields both describes it and recognises it: a file is of
    this family when its signature has this text encoder and every size the row gives (None: any)."""

    name: str
    title: str
    text_encoder: str = "clip"  # the text encoder's preset: CLIP ViT-L/14's layout and quick-GELU
    context_dim: int | None = None  # the text width the UNet's cross-attention reads
    in_channels: int | None = None  # the UNet's input channels
    unet_widths: tuple[int, ...] | None = None  # the UNet's distinct level widths
    pad_id: int = END_OF_TEXT  # what the tokenizer pads the 77-id row with (SD v1's CLIP: 49407)
    prediction_type: str = "epsilon"  # "epsilon": the UNet predicts the noise ε; "v_prediction": v
    native_resolution: int = 512  # pixels per side it was trained at: the default image size
    unet_head_dim: int | None = None  # heads of this width (None: SD v1's 8 heads at every level)
    upcast_attention: bool = False  # attention in fp32 under fp16/bf16 (SD 2.x's original code always did)
    refusal: str | None = None  # why sd-scratch does not load this family (None: it does)

    def recognises(self, s: Signature) -> bool:
        wanted = ((self.context_dim, s.context_dim), (self.in_channels, s.in_channels),
                  (self.unet_widths, s.unet_widths))
        return s.text_encoder == self.text_encoder and all(want is None or want == got for want, got in wanted)


SD2 = dict(text_encoder="openclip", pad_id=OPENCLIP_PAD_ID, unet_head_dim=SD2_HEAD_DIM, upcast_attention=True)
FAMILIES: tuple[Family, ...] = (
    Family("sdxl", "SDXL", text_encoder="sdxl", refusal="it is an SDXL checkpoint; sd-scratch supports SD v1.x and 2.x"),
    # SD 2.x: no tensor says ε or v, so two rows share a signature and the file's declared (or
    # probed) prediction type picks one (checkpoints/load.py `prediction_type_of`).
    Family("sd2-v", "SD 2.x 768-v", in_channels=LATENT_CHANNELS, prediction_type="v_prediction",
           native_resolution=768, **SD2),
    Family("sd2", "SD 2.x 512-base", in_channels=LATENT_CHANNELS, **SD2),
    Family("sd2-inpainting", "SD 2.x inpainting", in_channels=INPAINT_CHANNELS, **SD2),
    Family("sd2-depth", "SD 2.x depth", in_channels=LATENT_CHANNELS + 1, **SD2),  # the latent and a depth map
    # The built-in model (weights/README.md): SD v1's layout at toy sizes, trained on 64×64 pictures.
    Family("tiny-shapes", "the built-in shapes model", context_dim=128, in_channels=LATENT_CHANNELS,
           unet_widths=(64, 128), native_resolution=64),
    Family("sd1-inpainting", "SD 1.x inpainting", in_channels=INPAINT_CHANNELS),
    # SD v1.x at any size of its layout (v1-5-pruned-emaonly, sd-v1-4, and small test configs).
    Family("sd1", "SD 1.x", in_channels=LATENT_CHANNELS),
)
BY_NAME = {family.name: family for family in FAMILIES}


class UnknownFamily(ValueError):
    """No row of FAMILIES matches (`refused` False), or the matching row is a refusal (True)."""

    def __init__(self, message: str, refused: bool):
        super().__init__(message)
        self.refused = refused


def candidates(signature: Signature) -> list[Family]:
    """Every row that recognises `signature`, in table order."""
    return [family for family in FAMILIES if family.recognises(signature)]


def family_of(signature: Signature, source: str, prediction_type: str | None = None) -> Family:
    """The first family whose row recognises `signature` (and predicts `prediction_type`, if given);
    refusals and no match raise, naming `source`."""
    for family in FAMILIES:
        if family.recognises(signature) and prediction_type in (None, family.prediction_type):
            if family.refusal:
                raise UnknownFamily(f"{source}: {family.refusal}", refused=True)
            return family
    raise UnknownFamily(f"{source}: matches no model family sd-scratch knows ({signature}); "
                        f"known: {', '.join(f.title for f in FAMILIES if not f.refusal)}", refused=False)


def _ordered_unique(values) -> tuple[int, ...]:
    out: list[int] = []
    for v in values:
        if not out or out[-1] != v:
            out.append(v)
    return tuple(out)


def single_file_signature(keys_and_shapes: dict[str, tuple[int, ...]]) -> Signature:
    """The signature of a single (CompVis-layout) file, from its key names and tensor shapes."""
    keys = keys_and_shapes
    if any(k.startswith("conditioner.embedders.") for k in keys):
        text_encoder = "sdxl"
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        text_encoder = "openclip"
    else:
        text_encoder = "clip"
    unet = "model.diffusion_model."
    context = [shape[1] for k, shape in keys.items()
               if k.startswith(unet) and k.endswith("attn2.to_k.weight") and len(shape) == 2]
    conv_in = keys.get(unet + "input_blocks.0.0.weight")
    resnet_outs = sorted((int(k.split(".")[3]), shape[0]) for k, shape in keys.items()
                         if k.startswith(unet + "input_blocks.") and k.endswith(".0.out_layers.3.weight"))
    return Signature(text_encoder, context[0] if context else None, conv_in[1] if conv_in else None,
                     _ordered_unique(width for _, width in resnet_outs))


def folder_signature(unet_config: dict, text_config: dict, has_second_text_encoder: bool) -> Signature:
    """The signature of a diffusers folder, from `unet/config.json` and `text_encoder/config.json`.
    SD 2.x folders hold OpenCLIP's tower in CLIP's layout; its exact GELU tells it from CLIP's quick-GELU."""
    context = unet_config.get("cross_attention_dim", text_config.get("hidden_size"))
    text_encoder = "openclip" if text_config.get("hidden_act") == "gelu" else "clip"
    return Signature("sdxl" if has_second_text_encoder else text_encoder,
                     context if isinstance(context, int) else None, unet_config.get("in_channels", LATENT_CHANNELS),
                     _ordered_unique(unet_config.get("block_out_channels", ())))
