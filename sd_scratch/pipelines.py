"""Generation: txt2img, img2img (SDEdit) and inpainting, each the denoising loop of the documents.

`000 · 文生图（txt2img）` and `001`'s six steps, with classifier-free guidance applied (document 001's
code sample declares guidance_scale but never uses it):

    prompt ──tokenizer──► ids ──text encoder──► context (B,77,768); the negative prompt likewise
    seed ──► x_T ~ N(0, I), (B,4,H/8,W/8), scaled by the sampler's initial σ
    for each timestep t:  ε = model(x_t, t)         the model function of guidance.py: the UNet call,
                                                     the concat condition, ε_uncond + w·(ε_cond − ε_uncond)
                          x_{t−1} = sampler.step(ε, x_t)
    x_0 / 0.18215 ──VAE decoder──► image in [-1, 1] ──► uint8 pixels   (images.py)

The loop, `denoise`, takes only the model function and the sampler: what the UNet is conditioned
on is a layer of the model function, not a parameter of the loop.

img2img (`004 · 图生图`, SDEdit) encodes the image, noises its latent to the step that `strength`
picks and denoises from there. Inpainting keeps the unmasked region: with the 9-channel inpainting
UNet by conditioning on the mask and the masked image's latent, with an ordinary UNet by putting the
(re-noised) known latent back outside the mask after every step.

Seeds work as in other SD tools: all random draws come from one `torch.Generator("cpu")` seeded
with `seed`, in diffusers' order (VAE posterior sample, initial noise, ancestral noise), so a seed
gives diffusers' picture on any device. With conventions="a1111" they work as in AUTOMATIC1111 with
its RNG source "CPU": image k of the batch has its own generator, seeded with seed + k, which draws
its initial noise and then its ancestral noise, so each image can be made again alone from its own
seed; the σ's and the start x = ε σ_max are k-diffusion's (`noise_schedule.a1111_schedule`). Every
returned image carries its settings, its seed included, in `image.info["parameters"]`
(AUTOMATIC1111's text, as the CLI writes it into the PNG).
"""
from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .guidance import (AsEpsilon, ClassifierFreeGuidance, ClassifierGuidance, ComposedGuidance, ConcatCondition, Context,
                       ContextSchedule, Control, Controlled, UNetCall, Unguided)
from .images import decode, encode, image_to_tensor, image_to_unit_tensor, mask_to_tensor, open_image
from .noise_schedule import SPACINGS, RandomSource, draw_noise
from .prompts import (EMPHASES, LONG_PROMPT_MODES, SYNTAXES, as_prompt_list, encode_prompts, prompt_schedule,
                      split_and)
from .samplers import (A1111_NAMES, CONVENTIONS, DEFAULT_SPACING, SAMPLER_NAMES, SIGMA_SAMPLERS, Sampler,
                       make_sampler, parse_sampler_name)
from .tokenizer import CONTEXT_LENGTH

if TYPE_CHECKING:
    from .guidance import Prediction
    from .stable_diffusion import StableDiffusion

# AUTOMATIC1111's img2img runs int(min(strength, 0.999) · steps) + 1 steps (`sd_samplers_common.setup_img2img_steps`).
A1111_MAX_STRENGTH = 0.999


@dataclass
class StepInfo:
    """What the per-step callback receives."""

    step: int  # index into the steps actually run (0 = first)
    t: int | float  # the timestep the UNet saw (fractional for Euler's linspace and Karras timesteps)
    x_t: torch.Tensor  # the latent after this step
    x0_pred: torch.Tensor  # the sampler's prediction of the clean latent
    eps_cond: torch.Tensor  # the UNet's ε given the prompt
    eps_uncond: torch.Tensor | None  # ε given the negative prompt (None without guidance)


@dataclass
class GenerationSettings:
    """The arguments every pipeline shares, checked once. height/width None: txt2img takes the
    model family's native resolution, img2img and inpainting the image's size."""

    height: int | None = None
    width: int | None = None
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int | None = 0
    scheduler: str = "ddim"  # ours (samplers.SAMPLERS), an alias, or A1111's name ("Euler a", "DPM++ 2M Karras")
    num_images: int = 1
    eta: float = 0.0
    karras: bool = False
    spacing: str | None = None  # the timestep spacing; None: the sampler's own default (DEFAULT_SPACING)
    guidance_rescale: float = 0.0  # φ of Lin et al. 2023's guidance rescale (0: plain CFG; they use 0.7)
    zero_terminal_snr: bool = False  # the schedule rescaled so that ᾱ_999 = 0 (Lin et al. 2023; v-models only)
    clip_skip: int = 0
    long_prompts: str = "truncate"
    prompt_syntax: str = "a1111"  # AUTOMATIC1111's (word:1.2), [word], BREAK; "plain": the text as it is
    emphasis: str = "original"  # A1111's "Original" (weights, then the mean restored) or "no_norm"
    conventions: str = "diffusers"  # or "a1111": AUTOMATIC1111's σ's, start and per-image seeds (samplers.CONVENTIONS)

    def check(self, factor: int) -> None:
        """`factor`: the VAE's downsampling factor (8 for SD), which height and width must divide."""
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < factor or value % factor):
                raise ValueError(f"{name} must be a positive multiple of {factor}, got {value!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer ≥ 1, got {self.steps!r}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be ≥ 0, got {self.guidance_scale!r}")
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise ValueError(f"num_images must be an integer ≥ 1, got {self.num_images!r}")
        if self.scheduler not in SAMPLER_NAMES:
            raise ValueError(f"scheduler must be one of {', '.join(SAMPLER_NAMES)}, got {self.scheduler!r}")
        if self.conventions not in CONVENTIONS:
            raise ValueError(f"conventions must be one of {', '.join(CONVENTIONS)}, got {self.conventions!r}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)} or None, got {self.spacing!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be ≥ 0, got {self.eta!r}")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}")
        if self.long_prompts not in LONG_PROMPT_MODES:
            raise ValueError(f"long_prompts must be one of {LONG_PROMPT_MODES}, got {self.long_prompts!r}")
        if self.prompt_syntax not in SYNTAXES:
            raise ValueError(f"prompt_syntax must be one of {SYNTAXES}, got {self.prompt_syntax!r}")
        if self.emphasis not in EMPHASES:
            raise ValueError(f"emphasis must be one of {EMPHASES}, got {self.emphasis!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        self.sampler()  # the sampler's own checks: karras, eta, spacing and conventions together

    @property
    def guided(self) -> bool:
        """Classifier-free guidance needs the unconditional pass only when w > 1. Any w ≤ 1, 0
        included, gives plain ε_cond, as in diffusers (not the unconditional ε that w = 0 means in
        the formula); for an unconditional picture, prompt with ""."""
        return self.guidance_scale > 1.0

    def sampler(self) -> Sampler:
        return make_sampler(self.scheduler, self.steps, spacing=self.spacing, karras=self.karras, eta=self.eta,
                            zero_terminal_snr=self.zero_terminal_snr, conventions=self.conventions)


def parameters_text(prompt: str, negative_prompt: str, s: GenerationSettings, size: tuple[int, int], model: str,
                    strength: float | None = None, index: int = 0) -> str:
    """The settings as AUTOMATIC1111 writes them into a PNG's `parameters` chunk: the prompt,
    `Negative prompt: ...` (when there is one), then one line of `Key: value` pairs. A1111 counts
    clip skip from 1 (1 = the last layer). The spacing is written only when it is not the sampler's
    default (A1111 has no such key). `index`: the image's place in the batch; with A1111's
    conventions each image has its own seed, seed + index, and the text says "RNG: CPU" (A1111's
    key for noise from CPU generators) and the schedule type apart, as A1111 ≥ 1.9 writes them."""
    name, named_karras = parse_sampler_name(s.scheduler)
    karras = s.karras or named_karras
    a1111 = s.conventions == "a1111"
    fields = {"Steps": s.steps, "Sampler": A1111_NAMES[name] + (" Karras" if karras and not a1111 else "")}
    if a1111:
        fields["Schedule type"] = "Karras" if karras else "Uniform"
    fields |= {"CFG scale": s.guidance_scale, "Seed": s.seed + index if a1111 else s.seed,
               "Size": f"{size[0]}x{size[1]}", "Model": model}
    if s.num_images > 1 and not a1111:
        fields["Batch size"] = s.num_images  # one seed: the whole batch comes from one generator
    if strength is not None:
        fields["Denoising strength"] = strength
    if s.clip_skip > 0:
        fields["Clip skip"] = s.clip_skip + 1
    if s.eta:
        fields["Eta"] = s.eta
    if s.spacing is not None and s.spacing != DEFAULT_SPACING[name]:
        fields["Timestep spacing"] = s.spacing
    if s.guidance_rescale:
        fields["CFG rescale"] = s.guidance_rescale
    if s.zero_terminal_snr:
        fields["Zero terminal SNR"] = True
    if a1111:
        fields["RNG"] = "CPU"
    lines = [prompt, f"Negative prompt: {negative_prompt}" if negative_prompt else None,
             ", ".join(f"{key}: {value}" for key, value in fields.items())]
    return "\n".join(line for line in lines if line is not None)


# The fields of an AUTOMATIC1111 `parameters` text's last line: `Key: value` pairs, a value in
# double quotes where it holds commas.
_FIELD = re.compile(r'\s*([^:,]+?):\s*("(?:\\.|[^"\\])*"|[^,]*)\s*(?:,|$)')
# Recorded for the record only: what a picture was made with that these settings do not choose.
INFORMATIONAL = ("Model", "Model hash", "Version", "VAE", "VAE hash", "Lora hashes", "TI hashes")
# Keys that AUTOMATIC1111 writes and sd-scratch under diffusers' conventions never does: a text with
# one of them was sampled with A1111's conventions.
A1111_KEYS = ("Version", "Model hash", "RNG")
# The samplers whose "Schedule type: Automatic" is Karras (A1111 ≥ 1.9: DPM++ 2M's options say
# 'scheduler': 'karras'); for the others it is k-diffusion's uniform σ's.
AUTOMATIC_KARRAS = ("dpmpp_2m",)


@dataclass
class PngParameters:
    """What an AUTOMATIC1111 `parameters` text says, in our settings, and what it says that we cannot honour."""

    prompt: str
    negative_prompt: str
    settings: dict
    strength: float | None = None
    not_honoured: list[str] = field(default_factory=list)  # "Key: value" entries left aside, each with why


def read_parameters(text: str) -> PngParameters:
    """Read an AUTOMATIC1111 `parameters` text (as `parameters_text` and A1111 write it) into our
    settings. Fields that name something we do not have are listed in `not_honoured`, not dropped silently.
    A text that A1111 wrote (one of A1111_KEYS) selects conventions="a1111" where the sampler has
    them; noise that A1111 drew on a GPU (no "RNG: CPU") is listed as not honoured."""
    lines = text.strip("\n").split("\n")
    last = lines[-1] if lines and _FIELD.match(lines[-1]) and "Steps:" in lines[-1] else ""
    body = lines[:-1] if last else lines
    negative_at = next((i for i, line in enumerate(body) if line.startswith("Negative prompt:")), len(body))
    prompt = "\n".join(body[:negative_at])
    negative = "\n".join(body[negative_at:]).removeprefix("Negative prompt:").strip()
    fields = {m.group(1).strip(): m.group(2).strip().strip('"') for m in _FIELD.finditer(last) if m.group(1).strip()}
    out = PngParameters(prompt, negative, {})
    s = out.settings
    from_a1111 = any(key in fields for key in A1111_KEYS)
    sampler = fields.pop("Sampler", None)
    schedule = fields.pop("Schedule type", None)
    rng = fields.pop("RNG", "GPU")  # A1111 writes the key for the other sources only
    if sampler is not None:
        try:
            s["scheduler"], s["karras"] = parse_sampler_name(sampler)
        except ValueError:
            out.not_honoured.append(f"Sampler: {sampler} (sd-scratch has {', '.join(A1111_NAMES.values())})")
    if schedule is not None:
        if schedule in ("Karras", "Uniform"):
            s["karras"] = schedule == "Karras"
        elif schedule == "Automatic":
            s["karras"] = s.get("karras", False) or s.get("scheduler") in AUTOMATIC_KARRAS
        else:
            out.not_honoured.append(f"Schedule type: {schedule} (sd-scratch has Karras and Uniform)")
    if from_a1111 and s.get("scheduler") in SIGMA_SAMPLERS:
        s["conventions"] = "a1111"
        if rng != "CPU":
            out.not_honoured.append(f"RNG: {rng} (A1111's noise source for this picture; sd-scratch draws the noise "
                                    "from CPU generators with the same seeds, as A1111's source CPU does)")
    elif from_a1111 and sampler is not None and "scheduler" in s:
        out.not_honoured.append(f"Sampler: {sampler} with A1111's conventions (sd-scratch has them for "
                                f"{', '.join(A1111_NAMES[n] for n in SIGMA_SAMPLERS)}; diffusers' are used)")
    readers = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
               "Batch size": ("num_images", int), "Eta": ("eta", float), "Timestep spacing": ("spacing", str),
               "CFG rescale": ("guidance_rescale", float), "Zero terminal SNR": ("zero_terminal_snr", lambda v: v == "True"),
               "Clip skip": ("clip_skip", lambda v: int(v) - 1)}  # A1111 counts clip skip from 1
    for key, value in fields.items():
        if key in readers:
            name, convert = readers[key]
            s[name] = convert(value)
        elif key == "Size":
            width, _, height = value.partition("x")
            s["width"], s["height"] = int(width), int(height)
        elif key == "Denoising strength":
            out.strength = float(value)
        elif key not in INFORMATIONAL:
            out.not_honoured.append(f"{key}: {value}")
    return out


# ---- the loop -------------------------------------------------------------------------------------

def denoise(model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Prediction], sampler: Sampler, x: torch.Tensor,
            generator: RandomSource, begin: int = 0, after_step: Callable | None = None,
            callback: Callable[[StepInfo], None] | None = None, progress: bool = True) -> torch.Tensor:
    """Run the sampler from timestep index `begin` to the end; return the final latent x_0.
    `model(x, t, ᾱ_t)` is the model function of `guidance.py`, conditioning and guidance included;
    `after_step(i, x)` may change x after each step (inpainting with an ordinary UNet)."""
    indices = range(begin, len(sampler.timesteps))
    for n, i in enumerate(tqdm(indices, desc="denoising", disable=not progress, leave=False)):
        t = sampler.timesteps[i]
        prediction = model(sampler.scale_model_input(x, i), t, sampler.alpha_bar_at(i).to(x))
        result = sampler.step(prediction.eps, i, x, generator=generator, x0=prediction.x0)
        x = result.prev_sample
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback(StepInfo(n, t.item(), x, result.x0_pred, prediction.eps_cond, prediction.eps_uncond))
    return x


def encode_prompt(sd: StableDiffusion, prompt: str | list[str], negative_prompt: str | list[str] | None = "",
                  settings: GenerationSettings | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond, uncond): the prompts' and the negative prompts' text embeddings, (N, 77·chunks, width)
    each, weighted as the settings' prompt syntax says. The two are encoded as separate batches (the
    weights' mean is restored per batch, as AUTOMATIC1111 does) and the shorter is padded with the
    empty prompt's chunks. negative_prompt None: no uncond."""
    s = settings or GenerationSettings()
    prompts = as_prompt_list(prompt, "prompt")
    cond = _encode(sd, prompts, s)
    if negative_prompt is None:
        return cond, None
    negatives = as_prompt_list(negative_prompt, "negative_prompt")
    negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
    cond, uncond = _padded_to_longest(sd, [cond, _encode(sd, negatives, s)], s)
    return cond, uncond


def _encode(sd: StableDiffusion, texts: list[str], s: GenerationSettings) -> torch.Tensor:
    return encode_prompts(sd, texts, s.clip_skip, s.long_prompts, s.prompt_syntax, s.emphasis)


def _padded_to_longest(sd: StableDiffusion, contexts: list[torch.Tensor], s: GenerationSettings) -> list[torch.Tensor]:
    """Contexts for the same N images made equally long (they are batched in one UNet call), the
    shorter ones lengthened with the empty prompt's chunks, as AUTOMATIC1111 does."""
    length = max(c.shape[1] for c in contexts)
    if all(c.shape[1] == length for c in contexts):
        return contexts
    empty = _encode(sd, [""] * contexts[0].shape[0], s)  # (N, 77, C)
    return [torch.cat([c, empty.repeat(1, (length - c.shape[1]) // CONTEXT_LENGTH, 1)], dim=1) for c in contexts]


@dataclass
class _Run:
    """What the three pipelines share once the settings are checked: the prompts (each repeated
    num_images times), their embeddings, the seeded generator, the sampler and its first index."""

    prompts: list[str]
    negatives: list[str]
    cond: Context  # (B, T, C), or a ContextSchedule of them (prompt editing)
    uncond: Context | None  # the same for the negative prompts, or None without guidance
    generator: RandomSource  # the images' noise: one generator, or one per image (A1111's conventions)
    vae_generator: torch.Generator  # the VAE's posterior samples
    sampler: Sampler
    begin: int
    composed: tuple | None = None  # AND: (contexts, weights, uncond), see _composed

    @property
    def batch(self) -> int:
        return len(self.prompts)


def _start(sd: StableDiffusion, prompt, negative_prompt, s: GenerationSettings, strength: float = 1.0) -> _Run:
    s.check(sd.vae.config.factor)
    first = check_strength(strength, s.steps, s.conventions)
    prompts = as_prompt_list(prompt, "prompt")
    negatives = as_prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt must be one string or one per prompt ({len(prompts)}), got {len(negatives)}")
    if s.seed is None:
        s.seed = random.randrange(2**32)  # recorded in every image's parameters
    generator = torch.Generator("cpu").manual_seed(s.seed)
    vae_generator = generator
    if s.conventions == "a1111":
        # A1111 draws the VAE's sample from torch's global generator, which its seeds do not fix.
        vae_generator = torch.Generator("cpu").manual_seed(s.seed)
        generator = [torch.Generator("cpu").manual_seed(s.seed + k) for k in range(len(prompts) * s.num_images)]
    sampler = s.sampler()
    begin = first * sampler.order
    sampler.start_at(begin)
    composed = _composed(sd, prompts, negatives, s)
    if composed is None:
        cond, uncond = _contexts(sd, prompts, negatives if s.guided else None, s, sampler.timesteps[begin:])
    else:
        cond, uncond = composed[0][0], composed[2]
    repeat = [p for p in prompts for _ in range(s.num_images)]
    negatives = [p for p in negatives for _ in range(s.num_images)]
    return _Run(repeat, negatives, cond, uncond, generator, vae_generator, sampler, begin, composed)


def _contexts(sd: StableDiffusion, prompts: list[str], negatives: list[str] | None, s: GenerationSettings,
              timesteps: torch.Tensor) -> tuple[Context, Context | None]:
    """The text embeddings for the run, each repeated num_images times: fixed tensors, or, where a
    prompt edits itself during sampling (`[from:to:when]`, `[a|b]`), a ContextSchedule with the
    embeddings of the text each step reads (step k of the run: its k-th timestep, counted from 1)."""
    def repeat(c: torch.Tensor | None) -> torch.Tensor | None:
        return None if c is None else c.repeat_interleave(s.num_images, dim=0)

    steps = len(timesteps)
    texts = prompts + (negatives or [])
    schedules = [prompt_schedule(t, steps) if s.prompt_syntax == "a1111" else [(steps, t)] for t in texts]
    if all(len(schedule) == 1 for schedule in schedules):
        cond, uncond = encode_prompt(sd, prompts, negatives, s)
        return repeat(cond), repeat(uncond)
    encoded: dict[tuple[str, ...], tuple] = {}
    conds, unconds = [], []
    for k in range(1, steps + 1):
        now = tuple(next(text for end, text in schedule if k <= end) for schedule in schedules)
        if now not in encoded:
            cond, uncond = encode_prompt(sd, list(now[:len(prompts)]), None if negatives is None else
                                         list(now[len(prompts):]), s)
            encoded[now] = (repeat(cond), repeat(uncond))
        conds.append(encoded[now][0])
        unconds.append(encoded[now][1])
    return (ContextSchedule(timesteps, conds),
            None if negatives is None else ContextSchedule(timesteps, unconds))


def _composed(sd: StableDiffusion, prompts: list[str], negatives: list[str], s: GenerationSettings):
    """For prompts with AND (or a part weight): K contexts, their (K, B) weights and the uncond, each
    repeated num_images times; None when no prompt composes."""
    parts = [split_and(p) for p in prompts] if s.prompt_syntax == "a1111" else [[(p, 1.0)] for p in prompts]
    if all(len(p) == 1 and p[0][1] == 1.0 for p in parts):
        return None
    if any(len(prompt_schedule(text, s.steps)) > 1 for p in parts for text, _ in p):
        raise ValueError("prompt: AND together with prompt editing ([from:to:when], [a|b]) is not supported yet")
    k = max(len(p) for p in parts)
    parts = [p + [(p[0][0], 0.0)] * (k - len(p)) for p in parts]  # weight 0: a part that adds nothing
    conds = [_encode(sd, [p[i][0] for p in parts], s) for i in range(k)]
    *conds, uncond = (c.repeat_interleave(s.num_images, dim=0)
                      for c in _padded_to_longest(sd, [*conds, _encode(sd, negatives, s)], s))
    weights = torch.tensor([[p[i][1] for p in parts] for i in range(k)]).repeat_interleave(s.num_images, dim=1)
    return conds, weights, uncond


def _controls(control) -> list[Control]:
    """`control=` as a list (None, one Control or several), each image opened once, here."""
    controls = [] if control is None else [control] if isinstance(control, Control) else control
    if not isinstance(controls, (list, tuple)) or not all(isinstance(c, Control) for c in controls):
        raise ValueError("control must be a guidance.Control, a list of them or None, got "
                         f"{type(control).__name__}")
    return [replace(c, image=open_image(c.image, f"control[{k}].image")) for k, c in enumerate(controls)]


def _hints(sd: StableDiffusion, controls: list[Control], run: _Run, s: GenerationSettings) -> list[torch.Tensor]:
    """Each Control's image as the hint its ControlNet reads: RGB in [0, 1] at the picture's size,
    (B, 3, H, W) for the run's B images."""
    factor = sd.vae.config.factor
    hints = []
    for k, control in enumerate(controls):
        net_factor = getattr(control.net, "hint_factor", factor)
        if net_factor != factor:
            raise ValueError(f"control[{k}]: this ControlNet's hint encoder shrinks the hint {net_factor} times, "
                             f"the VAE {factor} times; it was made for another model")
        hint = image_to_unit_tensor(control.image, s.height, s.width).repeat(run.batch, 1, 1, 1)
        hints.append(hint.to(sd.device, sd.dtype))
    return hints


def _model(sd: StableDiffusion, run: _Run, s: GenerationSettings, condition: torch.Tensor | None = None,
           classifier: Callable | None = None, classifier_scale: float = 0.0, controls: list[Control] = ()):
    """The model function of `guidance.py` for this run: the UNet call (with the ControlNets'
    residuals, if any), the concat condition if any, classifier-free guidance or none, the output as
    ε, then the classifier's gradient if any."""
    if controls:
        out_of = Controlled(sd.unet, controls, _hints(sd, controls, run, s), run.sampler.timesteps[run.begin:])
    else:
        out_of = UNetCall(sd.unet)
    if condition is not None:
        out_of = ConcatCondition(out_of, condition)
    if run.composed is not None:
        conds, weights, uncond = run.composed
        guided = ComposedGuidance(out_of, conds, weights, uncond, s.guidance_scale, s.guidance_rescale)
    elif s.guided:
        guided = ClassifierFreeGuidance(out_of, run.cond, run.uncond, s.guidance_scale, s.guidance_rescale)
    else:
        guided = Unguided(out_of, run.cond)
    model = AsEpsilon(guided, sd.prediction_type)
    return model if classifier is None else ClassifierGuidance(model, classifier, classifier_scale)


def _finish(sd: StableDiffusion, x: torch.Tensor, run: _Run, s: GenerationSettings,
            strength: float | None = None) -> list[Image.Image]:
    """Decode, and put every image's settings (its seed included) into `image.info["parameters"]`,
    in AUTOMATIC1111's text, as the CLI writes them into the PNG."""
    images = decode(sd, x)
    for k, (image, prompt, negative) in enumerate(zip(images, run.prompts, run.negatives)):
        image.info["parameters"] = parameters_text(prompt, negative, s, image.size, sd.name, strength, index=k)
    return images


def _noise(shape, run: _Run, sd: StableDiffusion) -> torch.Tensor:
    return draw_noise(shape, run.generator, sd.device, sd.dtype)


def _size_from_image(image: Image.Image, s: GenerationSettings, factor: int) -> tuple[int, int]:
    """(height, width): as given, else the image's size rounded down to a multiple of the VAE factor."""
    width = s.width or image.width - image.width % factor
    height = s.height or image.height - image.height % factor
    if width < factor or height < factor:
        raise ValueError(f"image is {image.width}×{image.height}; it must be at least {factor}×{factor}")
    return height, width


def check_strength(strength: float, steps: int, conventions: str = "diffusers") -> int:
    """The index of the first step to run: strength 1 runs all `steps`, 0.5 the last half (diffusers:
    int(steps · strength) of them). A1111's: int(min(strength, 0.999) · steps) + 1, so at least one."""
    if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if conventions == "a1111":
        return steps - int(min(strength, A1111_MAX_STRENGTH) * steps) - 1
    steps_run = min(int(steps * strength), steps)
    if steps_run < 1:
        raise ValueError(f"steps × strength must be ≥ 1 (got {steps} × {strength}); raise steps or strength")
    return steps - steps_run


@torch.no_grad()
def txt2img(sd: StableDiffusion, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
            height: int | None = None, width: int | None = None, callback=None, progress: bool = True,
            classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            classifier_scale: float = 1.0, control: Control | list[Control] | None = None,
            **settings) -> list[Image.Image]:
    """Text to image. height/width default to the model family's native resolution (512 for SD v1,
    64 for the built-in model), or with `control` to its (first) image's size. `settings`: steps,
    guidance_scale, seed, scheduler, num_images, eta, karras, spacing, clip_skip, long_prompts,
    conventions (see GenerationSettings). control: ControlNets (`guidance.Control`).
    classifier: classifier guidance, `log_prob(x_t, t) -> (B,)` of a classifier of noisy latents
    (e.g. `training.classifier.NoisyLatentClassifier.log_prob` with the wanted attributes), its
    gradient added to the score × classifier_scale (`guidance.ClassifierGuidance`)."""
    if classifier is not None and not callable(classifier):
        raise ValueError(f"classifier must be a function log_prob(x_t, t) -> (B,), got {type(classifier).__name__}")
    s = GenerationSettings(height=height, width=width, **settings)
    controls = _controls(control)
    run = _start(sd, prompt, negative_prompt, s)
    factor = sd.vae.config.factor
    if controls:
        s.height, s.width = _size_from_image(controls[0].image, s, factor)
    s.height, s.width = s.height or sd.native_resolution, s.width or sd.native_resolution
    x = _noise((run.batch, sd.unet.config.out_channels, s.height // factor, s.width // factor), run, sd)
    x = x * run.sampler.init_noise_sigma
    model = _model(sd, run, s, classifier=classifier, classifier_scale=classifier_scale, controls=controls)
    x = denoise(model, run.sampler, x, run.generator, callback=callback, progress=progress)
    return _finish(sd, x, run, s)


@torch.no_grad()
def img2img(sd: StableDiffusion, prompt: str | list[str], image, negative_prompt: str | list[str] = "", *,
            strength: float = 0.8, height: int | None = None, width: int | None = None, callback=None,
            progress: bool = True, control: Control | list[Control] | None = None, **settings) -> list[Image.Image]:
    """SDEdit: encode `image`, noise it to the step `strength` picks (1 = pure noise), denoise from
    there. control: ControlNets (`guidance.Control`), their images resized to the picture's size."""
    s = GenerationSettings(height=height, width=width, **settings)
    return _sdedit(sd, prompt, open_image(image, "image"), negative_prompt, strength, s, callback, progress,
                   controls=_controls(control))


def _sdedit(sd: StableDiffusion, prompt, image: Image.Image, negative_prompt, strength: float, s: GenerationSettings,
            callback, progress: bool, condition: Callable[[int, int], torch.Tensor] | None = None,
            controls: list[Control] = ()) -> list[Image.Image]:
    """img2img's loop; `condition(h, w)`: the concat condition at the latent size, if any (depth)."""
    run = _start(sd, prompt, negative_prompt, s, strength)
    factor = sd.vae.config.factor
    s.height, s.width = _size_from_image(image, s, factor)
    x0 = encode(sd, image_to_tensor(image, s.height, s.width), run.vae_generator).repeat(run.batch, 1, 1, 1)
    x = run.sampler.add_noise(x0, _noise(x0.shape, run, sd), run.begin)
    extra = None if condition is None else condition(s.height // factor, s.width // factor)
    x = denoise(_model(sd, run, s, extra, controls=controls), run.sampler, x, run.generator, begin=run.begin,
                callback=callback, progress=progress)
    return _finish(sd, x, run, s, strength)


DEPTH_CHANNELS = 1  # SD 2 depth's UNet reads the latent and one depth channel (5 in all)


@torch.no_grad()
def depth2img(sd: StableDiffusion, prompt: str | list[str], image, depth_map, negative_prompt: str | list[str] = "", *,
              strength: float = 0.8, height: int | None = None, width: int | None = None, callback=None,
              progress: bool = True, **settings) -> list[Image.Image]:
    """Depth-to-image (`004 · 深度图转图像`, SD 2 depth): img2img whose UNet also reads a depth map as a
    fifth input channel, so the picture keeps the image's layout while the prompt changes what is
    in it. `depth_map`: relative inverse depth (larger = nearer), a tensor (H, W), (1 or B, H, W) or
    (1 or B, 1, H, W) at any size, or a grayscale image; it is resized bicubically to the latent's
    size and set to [−1, 1] per image, 2·(d − min)/(max − min) − 1, as diffusers does. With
    `StableDiffusion.depth2img` it may be omitted: the model's depth estimator (MiDaS) makes it."""
    check_depth_model(sd)
    s = GenerationSettings(height=height, width=width, **settings)
    depth = depth_tensor(depth_map)
    images_wanted = len(as_prompt_list(prompt, "prompt")) * s.num_images
    if depth.shape[0] not in (1, images_wanted):
        raise ValueError(f"depth_map holds {depth.shape[0]} maps; give one, or one per image ({images_wanted})")

    def condition(h: int, w: int) -> torch.Tensor:
        d = F.interpolate(depth.to(sd.device, torch.float32), size=(h, w), mode="bicubic", align_corners=False)
        low, high = d.amin(dim=(1, 2, 3), keepdim=True), d.amax(dim=(1, 2, 3), keepdim=True)
        d = 2 * (d - low) / (high - low) - 1  # (B, 1, h, w) in [-1, 1]
        return d.to(sd.dtype).repeat(images_wanted // d.shape[0], 1, 1, 1)

    return _sdedit(sd, prompt, open_image(image, "image"), negative_prompt, strength, s, callback, progress, condition)


def check_depth_model(sd: StableDiffusion) -> None:
    """depth2img needs a UNet that reads the latent and the depth map (SD 2 depth's 5 channels)."""
    expected = sd.vae.config.latent_channels + DEPTH_CHANNELS
    if sd.unet.config.in_channels != expected:
        raise ValueError(f"depth2img needs SD 2 depth's UNet ({expected} input channels: the latent and the depth), "
                         f"this model's has {sd.unet.config.in_channels}")


def depth_tensor(depth_map) -> torch.Tensor:
    """A depth map as (N, 1, H, W) float32: from a tensor of 2, 3 or 4 dimensions, or from an image
    (its grayscale, /255); a map with no range (max = min) or with NaN/Inf values is an error."""
    if isinstance(depth_map, torch.Tensor):
        depth = depth_map.detach().float().cpu()
        shapes = {2: lambda d: d[None, None], 3: lambda d: d[:, None], 4: lambda d: d}
        if depth.ndim not in shapes or (depth.ndim == 4 and depth.shape[1] != 1):
            raise ValueError(f"depth_map must be (H, W), (N, H, W) or (N, 1, H, W), got {tuple(depth_map.shape)}")
        depth = shapes[depth.ndim](depth)
    else:
        gray = open_image(depth_map, "depth_map").convert("L")
        depth = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None, None]
    if min(depth.shape[-2:]) < 1:
        raise ValueError(f"depth_map is empty: {tuple(depth.shape[-2:])}")
    if not torch.isfinite(depth).all():
        raise ValueError("depth_map holds NaN or Inf values")
    flat = depth.flatten(1)
    if (flat.amax(1) == flat.amin(1)).any():
        raise ValueError("depth_map is constant (max = min), so it says nothing about depth and cannot be set to [-1, 1]")
    return depth


@torch.no_grad()
def inpaint(sd: StableDiffusion, prompt: str | list[str], image, mask, negative_prompt: str | list[str] = "", *,
            strength: float = 1.0, height: int | None = None, width: int | None = None, callback=None,
            progress: bool = True, control: Control | list[Control] | None = None, **settings) -> list[Image.Image]:
    """Repaint where `mask` is white, keep where it is black. control: ControlNets (`guidance.Control`);
    with the 9-channel UNet a ControlNet reads the 4-channel latent, as diffusers' does."""
    controls = _controls(control)
    if sd.unet.config.in_channels not in (4, 9):
        raise ValueError(f"inpainting needs a UNet with 4 or 9 input channels, this one has {sd.unet.config.in_channels}")
    s = GenerationSettings(height=height, width=width, **settings)
    if s.conventions == "a1111":
        raise ValueError("conventions='a1111' is for txt2img and img2img; inpainting follows diffusers' conventions "
                         "(A1111 blends its mask into x̂₀ at every step, which is not reproduced here)")
    image, mask = open_image(image, "image"), open_image(mask, "mask")
    if mask.size != image.size:
        warnings.warn(f"mask is {mask.width}×{mask.height} but image is {image.width}×{image.height}; "
                      "the mask is resized to the image", stacklevel=2)
        mask = mask.resize(image.size, Image.LANCZOS)
    run = _start(sd, prompt, negative_prompt, s, strength)
    factor = sd.vae.config.factor
    s.height, s.width = _size_from_image(image, s, factor)
    nine_channels = sd.unet.config.in_channels == 9
    sampler, batch = run.sampler, run.batch

    pixels = image_to_tensor(image, s.height, s.width)
    m = mask_to_tensor(mask, s.height, s.width)  # (1, 1, H, W), 1 = repaint
    latent_shape = (batch, sd.unet.config.out_channels, s.height // factor, s.width // factor)
    # The draws, in diffusers' order: the image's latent (when it is needed), the noise, then the
    # masked image's latent.
    known = None
    if not nine_channels or strength < 1:
        known = encode(sd, pixels, run.vae_generator).repeat(batch, 1, 1, 1)
    noise = _noise(latent_shape, run, sd)
    x = noise * sampler.init_noise_sigma if strength == 1 else sampler.add_noise(known, noise, run.begin)
    masked_latent = encode(sd, pixels * (m < 0.5), run.vae_generator).repeat(batch, 1, 1, 1)
    m_latent = F.interpolate(m, size=latent_shape[-2:]).to(sd.device, sd.dtype).repeat(batch, 1, 1, 1)

    condition, after_step = None, None
    if nine_channels:
        condition = torch.cat([m_latent, masked_latent], dim=1)  # (B, 1 + 4, h, w)
    else:
        def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
            """Outside the mask, replace the latent by the known one noised to the next level."""
            x_known = sampler.add_noise(known, noise, i + 1) if i + 1 < len(sampler.timesteps) else known
            return (1 - m_latent) * x_known + m_latent * x

    x = denoise(_model(sd, run, s, condition, controls=controls), sampler, x, run.generator, begin=run.begin,
                after_step=after_step, callback=callback, progress=progress)
    return _finish(sd, x, run, s, strength)


def outpaint(sd: StableDiffusion, prompt: str | list[str], image, negative_prompt: str | list[str] = "", *,
             left: int = 0, top: int = 0, right: int = 0, bottom: int = 0, **settings) -> list[Image.Image]:
    """Outpainting (`003 · 图像编辑`): a larger canvas with `image` in it, the new border repainted.
    It is inpainting whose mask is everything outside the old picture: the canvas gets `left`,
    `top`, `right`, `bottom` pixels more, filled by repeating the image's edge pixels (what the
    masked region starts from matters only at strength < 1), and `inpaint` does the rest."""
    image = open_image(image, "image")
    sides = {"left": left, "top": top, "right": right, "bottom": bottom}
    for name, pad in sides.items():
        if not isinstance(pad, int) or pad < 0:
            raise ValueError(f"{name} must be a whole number of pixels ≥ 0, got {pad!r}")
    if not any(sides.values()):
        raise ValueError("outpaint needs left, top, right or bottom > 0: how many pixels to add on each side")
    width, height = image.width + left + right, image.height + top + bottom
    factor = sd.vae.config.factor
    if width % factor or height % factor:
        raise ValueError(f"the canvas would be {width}×{height}; image size plus left+right and top+bottom must be "
                         f"multiples of {factor} (the VAE's factor)")
    pixels = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full((height, width), 255, dtype=np.uint8)
    mask[top:top + image.height, left:left + image.width] = 0  # black: keep the old picture
    return inpaint(sd, prompt, Image.fromarray(pixels), Image.fromarray(mask), negative_prompt,
                   height=height, width=width, **settings)
