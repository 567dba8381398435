"""Generation: txt2img, img2img (SDEdit) and inpainting, each the denoising loop of the documents.

`000 · 文生图（txt2img）` and `001`'s six steps, with classifier-free guidance applied (document 001's
code sample declares guidance_scale but never uses it):

    prompt ──tokenizer──► ids ──text encoder──► context (B,77,768); the negative prompt likewise
    seed ──► x_T ~ N(0, I), (B,4,H/8,W/8), scaled by the sampler's initial σ
    for each timestep t:  ε = ε_uncond + w·(ε_cond − ε_uncond)      (one UNet call on both halves)
                          x_{t−1} = sampler.step(ε, x_t)
    x_0 / 0.18215 ──VAE decoder──► image in [-1, 1] ──► uint8 pixels

img2img (`004 · 图生图`, SDEdit) encodes the image, noises its latent to the step that `strength`
picks and denoises from there. Inpainting keeps the unmasked region: with the 9-channel inpainting
UNet by conditioning on the mask and the masked image's latent, with an ordinary UNet by putting the
(re-noised) known latent back outside the mask after every step.

Seeds work as in other SD tools: all random draws come from one `torch.Generator("cpu")` seeded
with `seed`, in diffusers' order (VAE posterior sample, initial noise, ancestral noise), so a seed
gives diffusers' picture on any device.
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .schedulers import SAMPLERS, make_sampler
from .tokenizer import CONTEXT_LENGTH, END_OF_TEXT, START_OF_TEXT
from .vae import LATENT_SCALE

if TYPE_CHECKING:
    from .stable_diffusion import StableDiffusion

PROMPT_TOKENS = CONTEXT_LENGTH - 2  # 75 tokens between <|startoftext|> and <|endoftext|>
LONG_PROMPT_MODES = ("truncate", "chunk")


@dataclass
class StepInfo:
    """What the per-step callback receives."""

    step: int  # index into the steps actually run (0 = first)
    t: int  # the timestep the UNet saw
    x_t: torch.Tensor  # the latent after this step
    x0_pred: torch.Tensor  # the sampler's prediction of the clean latent
    eps_cond: torch.Tensor  # the UNet's ε given the prompt
    eps_uncond: torch.Tensor | None  # ε given the negative prompt (None without guidance)


@dataclass
class GenerationSettings:
    """The arguments every pipeline shares, checked once."""

    height: int | None = None
    width: int | None = None
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int | None = 0
    scheduler: str = "ddim"
    num_images: int = 1
    eta: float = 0.0
    karras: bool = False
    clip_skip: int = 0
    long_prompts: str = "truncate"

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
        if self.scheduler not in SAMPLERS and self.scheduler != "plms":
            raise ValueError(f"scheduler must be one of {', '.join(SAMPLERS)}, got {self.scheduler!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be ≥ 0, got {self.eta!r}")
        if self.long_prompts not in LONG_PROMPT_MODES:
            raise ValueError(f"long_prompts must be one of {LONG_PROMPT_MODES}, got {self.long_prompts!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def guided(self) -> bool:
        """Classifier-free guidance needs the unconditional pass only when w > 1. Any w ≤ 1, 0
        included, gives plain ε_cond, as in diffusers (not the unconditional ε that w = 0 means in
        the formula); for an unconditional picture, prompt with ""."""
        return self.guidance_scale > 1.0


# ---- prompts --------------------------------------------------------------------------------------

def _as_list(prompt: str | list[str], name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")


def encode_prompts(sd: StableDiffusion, prompts: list[str], negatives: list[str], s: GenerationSettings) -> torch.Tensor:
    """Text embeddings for the UNet: (2·N, T, C) as [uncond; cond] with guidance, else (N, T, C),
    where N = len(prompts) · num_images (each prompt's images next to each other)."""
    texts = (negatives + prompts) if s.guided else prompts
    if s.long_prompts == "truncate":
        context = sd.text_encoder(sd.tokenizer(texts).to(sd.device), clip_skip=s.clip_skip)
    else:
        context = _encode_in_chunks(sd, texts, s.clip_skip)
    return context.repeat_interleave(s.num_images, dim=0)


def _encode_in_chunks(sd: StableDiffusion, texts: list[str], clip_skip: int) -> torch.Tensor:
    """Long prompts as AUTOMATIC1111 encodes them: split the tokens into chunks of 75, encode each
    chunk as its own 77-token sequence, and concatenate the embeddings along the token axis. Every
    text gets as many chunks as the longest (empty chunks pad the others)."""
    token_lists = [sd.tokenizer.encode(t)[1:-1] for t in texts]  # without start/end tokens
    n_chunks = max(1, *(math.ceil(len(ids) / PROMPT_TOKENS) for ids in token_lists))
    chunks = []
    for ids in token_lists:
        for c in range(n_chunks):
            piece = ids[c * PROMPT_TOKENS:(c + 1) * PROMPT_TOKENS]
            chunks.append([START_OF_TEXT, *piece, END_OF_TEXT] + [END_OF_TEXT] * (PROMPT_TOKENS - len(piece)))
    ids = torch.tensor(chunks, device=sd.device)  # (texts · chunks, 77)
    context = sd.text_encoder(ids, clip_skip=clip_skip)
    return context.reshape(len(texts), n_chunks * CONTEXT_LENGTH, -1)


# ---- images ---------------------------------------------------------------------------------------

def _open_image(image, name: str) -> Image.Image:
    if isinstance(image, (str, Path)):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as err:
            raise ValueError(f"{name}: cannot read {image!r} as an image ({err})") from None
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image, an image file path or a uint8 array, got {type(image).__name__}")
    return image


def _default_size(image: Image.Image, s: GenerationSettings, factor: int) -> tuple[int, int]:
    """(height, width): as given, else the image's size rounded down to a multiple of the VAE factor."""
    width = s.width or image.width - image.width % factor
    height = s.height or image.height - image.height % factor
    if width < factor or height < factor:
        raise ValueError(f"image is {image.width}×{image.height}; it must be at least {factor}×{factor}")
    return height, width


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image (any mode: RGBA, palette and grayscale become RGB) -> (1, 3, H, W) in [-1, 1]."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (H, W, 3) in [0, 1]
    return pixels.permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """Mask image -> (1, 1, H, W) of 0 (keep) and 1 (repaint): grayscale, threshold at one half."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    values = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    return (values >= 0.5).float()[None, None]


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (values outside [-1, 1] are clipped to the pixel range)."""
    pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


# ---- the loop -------------------------------------------------------------------------------------

def _vae_encode_sample(sd: StableDiffusion, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Image (1,3,H,W) -> a scaled latent sample (1,4,H/8,W/8), drawing from `generator`."""
    vae_dtype = next(sd.vae.parameters()).dtype
    posterior = sd.vae.encode(image.to(sd.device, vae_dtype))
    return (posterior.sample(generator) * LATENT_SCALE).to(sd.dtype)


def _randn(shape, generator: torch.Generator, sd: StableDiffusion) -> torch.Tensor:
    """Noise drawn on the CPU in float32 (so a seed gives the same numbers on every device), then moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(sd.device, sd.dtype)


def denoise(sd: StableDiffusion, sampler, x: torch.Tensor, context: torch.Tensor, s: GenerationSettings,
            generator: torch.Generator, begin: int = 0, inpaint_condition: torch.Tensor | None = None,
            after_step: Callable | None = None, callback: Callable[[StepInfo], None] | None = None,
            progress: bool = True) -> torch.Tensor:
    """Run the sampler from timestep index `begin` to the end; return the final latent x_0."""
    indices = range(begin, len(sampler.timesteps))
    for n, i in enumerate(tqdm(indices, desc="denoising", disable=not progress, leave=False)):
        t = sampler.timesteps[i]
        x_in = torch.cat([x, x]) if s.guided else x  # (2B, 4, h, w): uncond half, cond half
        x_in = sampler.scale_model_input(x_in, i)
        if inpaint_condition is not None:  # 9-channel UNet: + mask + masked image latent
            x_in = torch.cat([x_in, inpaint_condition], dim=1)
        eps = sd.unet(x_in, t, context)
        if s.guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + s.guidance_scale * (eps_cond - eps_uncond)
        else:
            eps_uncond, eps_cond = None, eps
        result = sampler.step(eps, i, x, generator=generator)
        x = result.prev_sample
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback(StepInfo(n, int(t), x, result.x0_pred, eps_cond, eps_uncond))
    return x


def decode(sd: StableDiffusion, latents: torch.Tensor) -> list[Image.Image]:
    """x_0 -> images, decoded in the VAE's own dtype (fp32 unless asked otherwise), in tiles if
    `sd.set_vae_tiling` asked for them; NaN raises."""
    z = latents.to(next(sd.vae.parameters()).dtype) / LATENT_SCALE
    images = sd.vae.decode(z) if sd.vae_tile is None else sd.vae.decode_tiled(z, sd.vae_tile)
    if not torch.isfinite(images).all():
        raise FloatingPointError("the decoded image contains NaN or Inf values (with fp16 try dtype='fp32' or "
                                 "keep the VAE in fp32); no picture was made")
    return tensor_to_images(images)


def _start(sd, prompt, negative_prompt, s: GenerationSettings, strength: float = 1.0):
    """What the three pipelines share: the checks, the seeded generator, the text embeddings, and the
    sampler with the index of its first step (0, or later for img2img/inpainting with strength < 1).
    Returns (batch, context, generator, sampler, begin)."""
    s.check(sd.vae.config.factor)
    first = _check_strength(strength, s.steps)
    prompts = _as_list(prompt, "prompt")
    negatives = _as_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt must be one string or one per prompt ({len(prompts)}), got {len(negatives)}")
    if s.seed is None:
        s.seed = random.randrange(2**32)
    generator = torch.Generator("cpu").manual_seed(s.seed)
    context = encode_prompts(sd, prompts, negatives, s)
    sampler = make_sampler(s.scheduler, s.steps, karras=s.karras, eta=s.eta)
    begin = first * sampler.order
    sampler.start_at(begin)
    return len(prompts) * s.num_images, context, generator, sampler, begin


@torch.no_grad()
def txt2img(sd: StableDiffusion, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
            height: int = 512, width: int = 512, callback=None, progress: bool = True, **settings) -> list[Image.Image]:
    """Text to image. `settings`: steps, guidance_scale, seed, scheduler, num_images, eta, karras,
    clip_skip, long_prompts (see GenerationSettings)."""
    s = GenerationSettings(height=height, width=width, **settings)
    batch, context, generator, sampler, _ = _start(sd, prompt, negative_prompt, s)
    factor = sd.vae.config.factor
    x = _randn((batch, sd.unet.config.out_channels, height // factor, width // factor), generator, sd)
    x = x * sampler.init_noise_sigma
    x = denoise(sd, sampler, x, context, s, generator, callback=callback, progress=progress)
    return decode(sd, x)


def _check_strength(strength: float, steps: int) -> int:
    """The index of the first step to run: strength 1 runs all `steps`, 0.5 the last half."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    steps_run = min(int(steps * strength), steps)
    if steps_run < 1:
        raise ValueError(f"steps × strength must be ≥ 1 (got {steps} × {strength}); raise steps or strength")
    return steps - steps_run


@torch.no_grad()
def img2img(sd: StableDiffusion, prompt: str | list[str], image, negative_prompt: str | list[str] = "", *,
            strength: float = 0.8, height: int | None = None, width: int | None = None, callback=None,
            progress: bool = True, **settings) -> list[Image.Image]:
    """SDEdit: encode `image`, noise it to the step `strength` picks (1 = pure noise), denoise from there."""
    s = GenerationSettings(height=height, width=width, **settings)
    image = _open_image(image, "image")
    batch, context, generator, sampler, begin = _start(sd, prompt, negative_prompt, s, strength)
    height, width = _default_size(image, s, sd.vae.config.factor)
    x0 = _vae_encode_sample(sd, image_to_tensor(image, height, width), generator).repeat(batch, 1, 1, 1)
    noise = _randn(x0.shape, generator, sd)
    x = sampler.add_noise(x0, noise, begin)
    x = denoise(sd, sampler, x, context, s, generator, begin=begin, callback=callback, progress=progress)
    return decode(sd, x)


@torch.no_grad()
def inpaint(sd: StableDiffusion, prompt: str | list[str], image, mask, negative_prompt: str | list[str] = "", *,
            strength: float = 1.0, height: int | None = None, width: int | None = None, callback=None,
            progress: bool = True, **settings) -> list[Image.Image]:
    """Repaint where `mask` is white, keep where it is black."""
    if sd.unet.config.in_channels not in (4, 9):
        raise ValueError(f"inpainting needs a UNet with 4 or 9 input channels, this one has {sd.unet.config.in_channels}")
    s = GenerationSettings(height=height, width=width, **settings)
    image, mask = _open_image(image, "image"), _open_image(mask, "mask")
    if mask.size != image.size:
        warnings.warn(f"mask is {mask.width}×{mask.height} but image is {image.width}×{image.height}; "
                      "the mask is resized to the image", stacklevel=2)
        mask = mask.resize(image.size, Image.LANCZOS)
    batch, context, generator, sampler, begin = _start(sd, prompt, negative_prompt, s, strength)
    factor = sd.vae.config.factor
    height, width = _default_size(image, s, factor)
    nine_channels = sd.unet.config.in_channels == 9

    pixels = image_to_tensor(image, height, width)
    m = mask_to_tensor(mask, height, width)  # (1, 1, H, W), 1 = repaint
    latent_shape = (batch, sd.unet.config.out_channels, height // factor, width // factor)
    # The draws, in diffusers' order: the image's latent (when it is needed), the noise, then the
    # masked image's latent.
    known = None
    if not nine_channels or strength < 1:
        known = _vae_encode_sample(sd, pixels, generator).repeat(batch, 1, 1, 1)
    noise = _randn(latent_shape, generator, sd)
    x = noise * sampler.init_noise_sigma if strength == 1 else sampler.add_noise(known, noise, begin)
    masked_latent = _vae_encode_sample(sd, pixels * (m < 0.5), generator).repeat(batch, 1, 1, 1)
    m_latent = F.interpolate(m, size=latent_shape[-2:]).to(sd.device, sd.dtype).repeat(batch, 1, 1, 1)

    condition, after_step = None, None
    if nine_channels:
        condition = torch.cat([m_latent, masked_latent], dim=1)  # (B, 1 + 4, h, w)
        condition = torch.cat([condition, condition]) if s.guided else condition
    else:
        def after_step(i: int, x: torch.Tensor) -> torch.Tensor:
            """Outside the mask, replace the latent by the known one noised to the next level."""
            x_known = sampler.add_noise(known, noise, i + 1) if i + 1 < len(sampler.timesteps) else known
            return (1 - m_latent) * x_known + m_latent * x

    x = denoise(sd, sampler, x, context, s, generator, begin=begin, inpaint_condition=condition,
                after_step=after_step, callback=callback, progress=progress)
    return decode(sd, x)
