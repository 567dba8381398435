"""One entry point, `load(path)`, for every official SD v1 and 2.x file layout; and the writer of a single file.

The three parts of `000 · Stable Diffusion原理` (text encoder, UNet, VAE) arrive in one of two layouts:

* a single file, `v1-5-pruned-emaonly.safetensors` or `sd-v1-4.ckpt` (CompVis names under
  `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.`), whose sizes are
  read off the tensors' shapes;
* a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  `scheduler/`), whose sizes come from each part's `config.json`.

Loading fails loudly: a missing tensor is an error naming it; tensors we know to be extra (the EMA
copy not chosen, the training schedule's buffers, `position_ids`) are listed in the report as
ignored; any other extra tensor is an error unless `strict=False`; non-finite weights are reported.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..guidance import PREDICTION_TYPES
from ..stable_diffusion import StableDiffusion, as_dtype, vae_dtype_for
from ..text_encoder import CLIP_HEAD_DIM, CLIPTextEncoder, TextEncoderConfig
from ..tokenizer import CLIPTokenizer
from ..unet import UNet, UNetConfig
from ..vae import AutoencoderKL, VAEConfig
from .families import (Family, Signature, UnknownFamily, candidates, family_of, folder_signature,
                       single_file_signature)
from .files import CheckpointError, read_checkpoint, read_sharded
from .rules import (EMA_PREFIX, OPENCLIP_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, Rule, convert, ema_key,
                    openclip_key_is_known, openclip_to_ours, original_unet_shape, original_vae_shape,
                    ours_to_openclip, rename, unet_rules, vae_rules)

log = logging.getLogger("sd_scratch")

# Buffers of the CompVis LatentDiffusion training module: the noise schedule and the learned log
# variance. The scheduler recomputes the schedule, so they are not needed for sampling.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
})
# The EMA bookkeeping scalars of LitEma.
EMA_SCALARS = frozenset({EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"})
# CLIP's position ids are a buffer in transformers; we rebuild them as integers 0..76. Some merged
# checkpoints store them as floats, which would index wrongly, so the stored copy is never used.
POSITION_IDS = "embeddings.position_ids"
# AUTOMATIC1111's threshold for its v-or-ε probe (modules/sd_models_config.py): mean(out − x) below it is v.
PROBE_V_BELOW = -1.0
# SD 2 depth's single file carries its MiDaS depth model under this prefix (ldm's LatentDepth2ImageDiffusion).
DEPTH_MODEL_PREFIX = "depth_model."
# The built-in model (`weights/README.md`), shipped inside the package: what `load()` reads when
# it is given no path.
BUILTIN_MODEL = Path(__file__).resolve().parent.parent / "data" / "tiny-shapes.safetensors"


@dataclass
class LoadReport:
    """What `load` read and what it chose, for the reader and for the log."""

    source: str
    layout: str  # "single-file" or "diffusers-folder"
    files: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # tensors present but deliberately not used
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.source} ({self.layout})"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.ignored:
            shown = ", ".join(self.ignored[:6]) + (f", … ({len(self.ignored)} in all)" if len(self.ignored) > 6 else "")
            lines.append(f"  ignored: {shown}")
        return "\n".join(lines)


def load(path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32, *,
         use_ema: bool = True, variant: str | None = None, strict: bool = True,
         vae_dtype: torch.dtype | str | None = None, prediction_type: str | None = None) -> StableDiffusion:
    """Load an SD v1.x or 2.x checkpoint: a single `.safetensors`/`.ckpt` file or a diffusers folder;
    with no path, the built-in 64×64 shapes model (BUILTIN_MODEL, trained by scripts/train_tiny.py).

    use_ema: when a single file holds both the EMA and the raw UNet weights (e.g. `v1-5-pruned.ckpt`),
        take the EMA copy (True, the default: the weights the released samples were made with) or
        the raw ones (False). Files with one set (`*-emaonly.*`, diffusers folders) are unaffected.
    variant: for a diffusers folder, "fp16" prefers the `*.fp16.*` weight files.
    strict: raise on tensors that are neither used nor known extras (default); False lists them in
        the report as ignored and warns.
    vae_dtype: the VAE's dtype; by default `dtype`, except float32 when `dtype` is fp16 (the SD VAE
        overflows in fp16 and decodes NaN, i.e. black images).
    prediction_type: "epsilon" or "v_prediction", for files that do not say (SD 2.x: no tensor
        tells 512-base's ε from 768-v's v). Without it: a `<file stem>.yaml` beside a single file
        (`parameterization: "v"`), a folder's `scheduler/scheduler_config.json`, and only then a
        guess from one UNet call; `sd.report` says which it was.
    """
    path = Path(path) if path is not None else BUILTIN_MODEL
    dtype = as_dtype(dtype)
    vae_dtype = as_dtype(vae_dtype, "vae_dtype") if vae_dtype is not None else None
    declared = _declared_prediction_type(path, prediction_type)
    if path.is_dir():
        read = _read_diffusers_folder(path, variant, strict, declared)
    else:
        read = _read_single_file(path, use_ema, strict, declared)
    return _assemble(read, declared, device, dtype, vae_dtype)


@dataclass
class _Read:
    """A checkpoint read into our (not yet placed) modules, and what told which family it is."""

    parts: tuple[CLIPTokenizer, CLIPTextEncoder, UNet, AutoencoderKL]
    family: Family
    signature: Signature
    report: LoadReport
    depth: dict | Path | None = None  # SD 2 depth's MiDaS: its tensors (a single file) or its folder
    depth_input_size: int | None = None  # the side it reads images at, where the folder says (else its own)


def _declared_prediction_type(path: Path, explicit: str | None) -> tuple[str | None, str]:
    """(prediction type, where it was read) from what the user or the files say; (None, "") if nothing does."""
    if explicit is not None:
        if explicit not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} or None, got {explicit!r}")
        return explicit, "given as prediction_type"
    config = path / "scheduler" / "scheduler_config.json"
    if path.is_dir() and config.is_file():
        return _read_json(config).get("prediction_type", "epsilon"), "scheduler/scheduler_config.json"
    yaml = path.with_suffix(".yaml")
    if not path.is_dir() and yaml.is_file():
        v = re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", yaml.read_text(encoding="utf-8", errors="replace"),
                      re.MULTILINE)
        return ("v_prediction" if v else "epsilon"), f"{yaml.name} (parameterization)"
    return None, ""


def probe_prediction_type(unet: UNet) -> str:
    """AUTOMATIC1111's guess (modules/sd_models_config.py) from one UNet call on x = 0.5 at t = 999 with
    a context of 0.5: a v-model's output lies well below x there (mean(out − x) < −1), an ε-model's does not."""
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, unet.config.context_dim), 0.5, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        gap = (unet(x, 999, context) - x[:, : unet.config.out_channels]).float().mean().item()
    return "v_prediction" if gap < PROBE_V_BELOW else "epsilon"


def _assemble(read: _Read, declared: tuple[str | None, str], device, dtype: torch.dtype,
              vae_dtype: torch.dtype | None = None) -> StableDiffusion:
    tokenizer, text_encoder, unet, vae = read.parts
    family, report = read.family, read.report
    vae_dtype = vae_dtype or vae_dtype_for(dtype)
    for module, module_dtype in ((text_encoder, dtype), (unet, dtype), (vae, vae_dtype)):
        module.to(device=device, dtype=module_dtype).eval().requires_grad_(False)
    if len({f.prediction_type for f in candidates(read.signature) if not f.refusal}) > 1:  # ε or v?
        prediction, told_by = declared
        if prediction is None:
            prediction = probe_prediction_type(unet)
            told_by = "guessed by AUTOMATIC1111's one-UNet-call probe; pass prediction_type= to be sure"
            warnings.warn(f"{report.source}: nothing says whether this model predicts ε or v; {told_by}: "
                          f"{prediction}", stacklevel=3)
        family = family_of(read.signature, report.source, prediction)
        report.notes.insert(0, f"prediction type: {prediction} ({told_by})")
    elif declared[0] is not None and declared[0] != family.prediction_type:
        report.notes.insert(0, f"prediction type: {family.prediction_type} (the family's; {declared[1]} says "
                               f"{declared[0]}, which this family does not use)")
    report.notes.insert(0, f"model family: {family.title} ({family.name}; native {family.native_resolution}×"
                           f"{family.native_resolution}, predicts {family.prediction_type})")
    log.info("%s", report)
    model = StableDiffusion(tokenizer, text_encoder, unet, vae, family, name=Path(report.source).stem, report=report)
    if read.depth is not None:
        model.load_depth_estimator(read.depth, read.depth_input_size, source=report.source)
        report.notes.append(f"depth estimator: MiDaS DPT-Hybrid, read at {model.depth_input_size}×{model.depth_input_size}")
    return model


def _family(signature: Signature, source: Path, prediction_type: str | None) -> Family:
    try:
        return family_of(signature, str(source), prediction_type)
    except UnknownFamily as err:
        raise CheckpointError(str(err)) from None


def _openclip_to_ours(text_sd: dict[str, torch.Tensor], path: Path, strict: bool,
                      report: LoadReport) -> dict[str, torch.Tensor]:
    """SD 2.x's OpenCLIP tower in our names; tensors no rule covers are unknown extras."""
    layers = 1 + max((int(k.split(".")[2]) for k in text_sd if k.startswith("transformer.resblocks.")), default=-1)
    known = {k: t for k, t in text_sd.items() if openclip_key_is_known(k, layers)}
    _unknown_extras([OPENCLIP_PREFIX + k for k in text_sd if k not in known], path, strict, report)
    report.notes.append(f"text encoder: OpenCLIP's tower, {layers} blocks kept, the penultimate one read (SD 2.x)")
    return openclip_to_ours(known, layers)


def _text_config(text_sd: dict[str, torch.Tensor], source: Path, openclip: bool = False) -> TextEncoderConfig:
    """The text encoder's sizes read off its tensors; a width CLIP's 64-wide heads cannot divide is an
    error naming the file (the head count is not stored, so it is width / 64)."""
    width = text_sd["embeddings.token_embedding.weight"].shape[1] if "embeddings.token_embedding.weight" in text_sd else None
    if width is not None and (width < CLIP_HEAD_DIM or width % CLIP_HEAD_DIM):
        raise CheckpointError(f"{source}: the text encoder is {width} wide; a CLIP text encoder's width is a "
                              f"multiple of its {CLIP_HEAD_DIM}-wide heads (768 in SD v1)")
    try:
        return TextEncoderConfig.from_state_dict(text_sd, openclip)
    except KeyError as err:
        raise CheckpointError(f"{source}: the text encoder lacks {err.args[0]}") from None


# ---- single file --------------------------------------------------------------------------------

def _read_single_file(path: Path, use_ema: bool, strict: bool, declared: tuple[str | None, str]) -> _Read:
    contents = read_checkpoint(path)
    report = LoadReport(str(path), "single-file", files=[str(path)])
    report.notes.append(f"format: {contents.format}")
    if contents.ignored_entries:
        report.notes.append("non-tensor entries dropped: " + ", ".join(contents.ignored_entries))
    return _parts_from_single_file(contents.tensors, path, use_ema, strict, report, declared[0])


def from_single_file_state_dict(sd: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                                dtype: torch.dtype | str = torch.float32, *, use_ema: bool = True,
                                strict: bool = True, vae_dtype: torch.dtype | str | None = None,
                                source: str = "<state dict>", prediction_type: str | None = None) -> StableDiffusion:
    """`load` for tensors already in memory under the single-file (CompVis) names. The parts take
    the given tensors as their parameters (no copy where device and dtype already match)."""
    report = LoadReport(source, "single-file")
    declared = _declared_prediction_type(Path(source), prediction_type) if prediction_type else (None, "")
    read = _parts_from_single_file(sd, Path(source), use_ema, strict, report, declared[0])
    return _assemble(read, declared, device, as_dtype(dtype), as_dtype(vae_dtype, "vae_dtype") if vae_dtype else None)


def _parts_from_single_file(sd: dict[str, torch.Tensor], path: Path, use_ema: bool, strict: bool,
                            report: LoadReport, prediction_type: str | None = None) -> _Read:
    family, unknown = None, None
    signature = single_file_signature({k: tuple(t.shape) for k, t in sd.items()})
    try:
        family = family_of(signature, str(path), prediction_type)
    except UnknownFamily as err:  # a refusal stops here; no match waits for a clearer missing-part error
        if err.refused:
            raise CheckpointError(str(err)) from None
        unknown = CheckpointError(str(err))

    openclip = family is not None and family.text_encoder == "openclip"
    text_prefix = OPENCLIP_PREFIX if openclip else TEXT_PREFIX
    unet_sd = _take_prefix(sd, UNET_PREFIX)
    vae_sd = _take_prefix(sd, VAE_PREFIX)
    text_sd = _take_prefix(sd, text_prefix)
    for name, part in (("UNet", unet_sd), ("VAE", vae_sd), ("text encoder", text_sd)):
        if not part:
            prefix = {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX, "text encoder": text_prefix}[name]
            raise CheckpointError(f"{path}: has no {name} tensors ({prefix}*); a full SD v1 checkpoint has "
                                  "all three parts (is this a VAE, LoRA or embedding file?)")
    if unknown is not None:
        raise unknown

    ema_keys = {k for k in sd if k.startswith(EMA_PREFIX) and k not in EMA_SCALARS}
    if ema_keys and use_ema:
        missing = [k for k in unet_sd if ema_key(k) not in sd]
        if missing:
            raise CheckpointError(f"{path}: its EMA copy lacks {len(missing)} UNet tensors, e.g. "
                                  f"{ema_key(missing[0])}; load with use_ema=False to use the raw weights")
        report.ignored += [UNET_PREFIX + k for k in unet_sd]
        unet_sd = {k: sd[ema_key(k)] for k in unet_sd}
        report.notes.append("the file holds EMA and raw UNet weights; using the EMA copy (use_ema=True)")
    elif ema_keys:
        report.notes.append("the file holds EMA and raw UNet weights; using the raw ones (use_ema=False)")
        report.ignored += sorted(ema_keys)

    depth = {k: t for k, t in sd.items() if k.startswith(DEPTH_MODEL_PREFIX)} or None
    leftovers = [k for k in sd if not k.startswith((UNET_PREFIX, VAE_PREFIX, text_prefix, DEPTH_MODEL_PREFIX))
                 and k not in ema_keys]
    known = [k for k in leftovers if k in SCHEDULE_BUFFERS or k in EMA_SCALARS]
    report.ignored += known
    _unknown_extras([k for k in leftovers if k not in known], path, strict, report)
    if openclip:
        text_sd = _openclip_to_ours(text_sd, path, strict, report)
    else:
        _drop_position_ids(text_sd, TEXT_PREFIX, report)

    u_rules = unet_rules(*original_unet_shape(unet_sd))
    v_rules = vae_rules(*original_vae_shape(vae_sd))
    unet_sd = _convert_or_report(unet_sd, u_rules, UNET_PREFIX, path, strict, report)
    vae_sd = _convert_or_report(vae_sd, v_rules, VAE_PREFIX, path, strict, report)

    with torch.device("meta"):  # no time spent on random init: every tensor comes from the file
        unet = UNet(UNetConfig.from_state_dict(unet_sd, family.unet_head_dim, family.upcast_attention))
        vae = AutoencoderKL(VAEConfig.from_state_dict(vae_sd))
        text_encoder = CLIPTextEncoder(_text_config(text_sd, path, openclip))
    _build(unet, unet_sd, path, _original_namer(u_rules, UNET_PREFIX), strict, report)
    _build(vae, vae_sd, path, _original_namer(v_rules, VAE_PREFIX), strict, report)
    _build(text_encoder, text_sd, path, lambda k: text_prefix + k, strict, report)
    report.notes.append("tokenizer: the vendored CLIP BPE vocabulary (a single file carries none)")
    _check_context(unet, text_encoder, path)
    return _Read((CLIPTokenizer(pad_id=family.pad_id), text_encoder, unet, vae), family, signature, report, depth)


def _take_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _convert_or_report(part: dict, rules: list[Rule], prefix: str, path: Path, strict: bool, report: LoadReport):
    """Convert to our names; a tensor no rule covers is an unknown extra."""
    unmapped = []
    for k in part:
        try:
            rename(k, rules, "ours")
        except KeyError:
            unmapped.append(k)
    _unknown_extras([prefix + k for k in unmapped], path, strict, report)
    return convert({k: v for k, v in part.items() if k not in unmapped}, rules, "ours")


def _original_namer(rules: list[Rule], prefix: str):
    return lambda key: prefix + rename(key, rules, "original")[0]


# ---- diffusers folder ---------------------------------------------------------------------------

# Weight file names in a diffusers folder, in order of preference.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model", "model", "pytorch_model")
# Old diffusers releases (≤0.13) named the VAE attention's layers differently.
LEGACY_VAE_ATTENTION = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0."))


def _read_diffusers_folder(folder: Path, variant: str | None, strict: bool, declared: tuple[str | None, str]) -> _Read:
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: is a folder without model_index.json; expected a diffusers SD folder "
                              "(model_index.json, unet/, vae/, text_encoder/, tokenizer/) or a checkpoint file")
    report = LoadReport(str(folder), "diffusers-folder")
    index = _read_json(folder / "model_index.json")
    report.notes.append(f"pipeline class: {index.get('_class_name', 'unknown')}")

    unet_cfg_json = _read_json(folder / "unet" / "config.json")
    text_cfg_json = _read_json(folder / "text_encoder" / "config.json")
    signature = folder_signature(unet_cfg_json, text_cfg_json, (folder / "text_encoder_2").is_dir())
    family = _family(signature, folder, declared[0])

    unet_sd = _read_part(folder / "unet", variant, report)
    vae_sd = _read_part(folder / "vae", variant, report)
    text_sd = _read_part(folder / "text_encoder", variant, report)

    vae_sd = _rename_legacy_vae(vae_sd, report)
    text_sd = _take_prefix(text_sd, "text_model.") if any(k.startswith("text_model.") for k in text_sd) else text_sd
    _drop_position_ids(text_sd, "text_encoder: text_model.", report)

    vae_cfg_json = _read_json(folder / "vae" / "config.json")
    with torch.device("meta"):  # no time spent on random init: every tensor comes from the files
        unet = UNet(UNetConfig.from_diffusers_config(unet_cfg_json))
        vae = AutoencoderKL(VAEConfig.from_diffusers_config(vae_cfg_json))
        text_encoder = CLIPTextEncoder(TextEncoderConfig.from_transformers_config(text_cfg_json))
    _build(unet, unet_sd, folder / "unet", str, strict, report)
    _build(vae, vae_sd, folder / "vae", str, strict, report)
    _build(text_encoder, text_sd, folder / "text_encoder", lambda k: "text_model." + k, strict, report)
    if (folder / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer", pad_id=family.pad_id)
    else:
        tokenizer = CLIPTokenizer(pad_id=family.pad_id)
        report.notes.append("tokenizer: no tokenizer/ folder, so the vendored CLIP BPE vocabulary")
    _check_context(unet, text_encoder, folder)
    depth, size = None, None
    if (folder / "depth_estimator").is_dir():  # SD 2 depth: transformers' DPT folder, its processor beside it
        depth = folder / "depth_estimator"
        processor = folder / "feature_extractor" / "preprocessor_config.json"
        if processor.is_file():
            size = _read_json(processor).get("size", {}).get("height")
    return _Read((tokenizer, text_encoder, unet, vae), family, signature, report, depth, size)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a diffusers SD folder has it") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: is not valid JSON ({err})") from None


def _read_part(part: Path, variant: str | None, report: LoadReport) -> dict[str, torch.Tensor]:
    """Read one part's weights: safetensors before .bin, the requested variant before the plain files."""
    infixes = [f".{variant}", ""] if variant else ["", ".fp16"]
    for infix in infixes:
        for stem in DIFFUSERS_WEIGHTS:
            for ext in (".safetensors", ".bin"):
                file = part / f"{stem}{infix}{ext}"
                index = part / f"{stem}{infix}{ext}.index.json"
                if file.is_file() or index.is_file():
                    report.files.append(str(file if file.is_file() else index))
                    if infix != (f".{variant}" if variant else ""):
                        report.notes.append(f"{part.name}: no {'plain' if not variant else variant} weights, "
                                            f"used {file.name}")
                    return read_checkpoint(file).tensors if file.is_file() else read_sharded(index)
    raise CheckpointError(f"{part}: no weight file found (expected e.g. diffusion_pytorch_model.safetensors, "
                          "model.safetensors or pytorch_model.bin)")


def _rename_legacy_vae(vae_sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    out, renamed = {}, 0
    for k, v in vae_sd.items():
        head, sep, tail = k.partition("mid_block.attentions.0.")
        for old, new in LEGACY_VAE_ATTENTION if sep else ():
            if tail.startswith(old):
                k, renamed = head + sep + new + tail[len(old):], renamed + 1
                break
        out[k] = v
    if renamed:
        report.notes.append(f"vae: renamed {renamed} tensors from the pre-0.14 diffusers attention names "
                            "(query/key/value/proj_attn)")
    return out


# ---- shared -------------------------------------------------------------------------------------

def _drop_position_ids(text_sd: dict[str, torch.Tensor], shown_prefix: str, report: LoadReport) -> None:
    ids = text_sd.pop(POSITION_IDS, None)
    if ids is None:
        return
    report.ignored.append(shown_prefix + POSITION_IDS)
    if ids.is_floating_point():
        report.notes.append(f"the stored position_ids are {str(ids.dtype).removeprefix('torch.')} (a known defect "
                            "of some merged checkpoints); ignored, positions are rebuilt as integers")


def _check_context(unet: UNet, text_encoder: CLIPTextEncoder, source: Path) -> None:
    """The UNet's cross-attention must read vectors as wide as the text encoder writes."""
    if unet.config.context_dim != text_encoder.config.width:
        raise CheckpointError(f"{source}: the UNet reads a {unet.config.context_dim}-wide text context but the text "
                              f"encoder is {text_encoder.config.width} wide; the parts do not belong together")


def _unknown_extras(keys: list[str], source: Path, strict: bool, report: LoadReport) -> None:
    if not keys:
        return
    shown = ", ".join(sorted(keys)[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")
    if strict:
        raise CheckpointError(f"{source}: holds {len(keys)} tensors that belong to no SD v1 part: {shown}; "
                              "pass strict=False to ignore them")
    warnings.warn(f"{source}: ignoring {len(keys)} unexpected tensors: {shown}", stacklevel=3)
    report.ignored += keys


def _build(module: nn.Module, sd: dict[str, torch.Tensor], source: Path, name_in_file, strict: bool,
           report: LoadReport) -> None:
    """Load `sd` into `module` (built on the meta device) strictly, with errors in the file's own names."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        shown = ", ".join(name_in_file(k) for k in missing[:5])
        raise CheckpointError(f"{source}: {len(missing)} tensors missing, e.g. {shown}")
    extra = [k for k in sd if k not in expected]
    if extra:
        _unknown_extras([name_in_file(k) for k in extra], source, strict, report)
        sd = {k: v for k, v in sd.items() if k in expected}
    for k, t in sd.items():
        if t.shape != expected[k].shape:
            raise CheckpointError(f"{source}: {name_in_file(k)} has shape {tuple(t.shape)}, the model read off the "
                                  f"other tensors expects {tuple(expected[k].shape)}")
    nonfinite = [name_in_file(k) for k, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if nonfinite:
        warnings.warn(f"{source}: {len(nonfinite)} tensors hold NaN or Inf values: {', '.join(nonfinite[:5])}; "
                      "images made with them will be broken", stacklevel=3)
        report.notes.append(f"non-finite weights: {', '.join(nonfinite)}")
    module.load_state_dict(sd, strict=True, assign=True)


# ---- writing ------------------------------------------------------------------------------------

def single_file_state_dict(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """Our three parts under their CompVis names, as in `v1-5-pruned-emaonly.safetensors` (SD 2.x:
    the text encoder under OpenCLIP's, as in `v2-1_768-ema-pruned.safetensors`)."""
    unet_cfg, vae_cfg = model.unet.config, model.vae.config
    u_rules = unet_rules(len(unet_cfg.channels), unet_cfg.layers_per_level, unet_cfg.attention_levels)
    v_rules = vae_rules(len(vae_cfg.block_out_channels), vae_cfg.layers_per_block)
    out = {}
    text = model.text_encoder.state_dict()
    if model.family.text_encoder == "openclip":  # SD 2.x: OpenCLIP's names, q/k/v fused back
        text_part = (OPENCLIP_PREFIX, ours_to_openclip(text, model.text_encoder.config.layers))
    else:
        text_part = (TEXT_PREFIX, text)
    for prefix, sd in ((UNET_PREFIX, convert(model.unet.state_dict(), u_rules, "original")),
                       (VAE_PREFIX, convert(model.vae.state_dict(), v_rules, "original")), text_part):
        out.update({prefix + k: v.detach().contiguous() for k, v in sd.items()})
    return out


def save_single_file(model: StableDiffusion, path: str | Path) -> None:
    """Write `model` as one `.safetensors` file in the official single-file layout."""
    save_file(single_file_state_dict(model), str(path))
