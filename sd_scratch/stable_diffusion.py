"""The four parts of Stable Diffusion held together: tokenizer → text encoder → UNet (+ scheduler) → VAE.

`000 · Stable Diffusion原理` splits SD into the text encoder, the "图像优化模块" (UNet and scheduler)
and the image decoder (the VAE). `sd_scratch.load(...)` returns this object; the generation
pipelines are built on it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from . import pipelines
from .addons import controlnet, depth, hypernetwork, lora, textual_inversion
from .memory.vae_tiling import check_tile
from .text_encoder import CLIPTextEncoder
from .tokenizer import CLIPTokenizer
from .unet import UNet
from .vae import AutoencoderKL

if TYPE_CHECKING:
    from .checkpoints.families import Family

# The names a dtype may be given by, in the API and on the command line.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def as_dtype(dtype: torch.dtype | str, name: str = "dtype") -> torch.dtype:
    """A floating torch dtype, or one of DTYPES' names, as a torch dtype; anything else is an error."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"{name} must be a floating torch dtype or one of {sorted(DTYPES)}, got {dtype!r}")


def vae_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype when none is asked for: the model's, except float32 for fp16, because SD's VAE
    overflows in fp16 and decodes NaN (black pictures)."""
    return torch.float32 if dtype == torch.float16 else dtype


class StableDiffusion:
    """Holds `.tokenizer`, `.text_encoder`, `.unet`, `.vae`, the `.family` they belong to (native size,
    prediction type; `checkpoints/families.py`), `.name` and `.report` (what loading read and chose)."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextEncoder, unet: UNet, vae: AutoencoderKL,
                 family: Family, name: str = "sd-scratch", report=None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.family = family
        self.name = name  # the model's name in the pictures' parameters ("Model: ...")
        self.report = report
        self.vae_tile: int | None = None  # decode in tiles of this many latent pixels (None: whole)
        self.lora = lora.LoRAState()  # the LoRAs merged into the weights, and the weights they changed
        self.depth_estimator: depth.DepthEstimator | None = None  # SD 2 depth's MiDaS, for depth2img
        self.depth_input_size = depth.DPT_SIZE  # the side it reads images at

    @property
    def native_resolution(self) -> int:
        """The image side, in pixels, the family was trained at: the default height and width."""
        return self.family.native_resolution

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon" (the noise) for every family sd-scratch loads today."""
        return self.family.prediction_type

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device=device, dtype=dtype)
        return self

    def optimize(self, compile: bool = True) -> StableDiffusion:
        """The fast mode: the UNet (where nearly all the time goes) in channels_last memory layout
        and compiled with torch.compile. The first call with each new input shape compiles (slow).
        The module stays the same `UNet` (only its forward is compiled), so its weights keep their
        names: `save_single_file` and `state_dict()` work as before."""
        self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet.compile()
        return self

    def set_attention_slicing(self, slice_size: int | None = 1024) -> StableDiffusion:
        """Compute every attention `slice_size` queries at a time (None: all at once). Same numbers,
        less memory: at 512×512 the UNet's largest score matrix is 8 heads × 4096 × 4096."""
        if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
            raise ValueError(f"slice_size must be a positive integer or None, got {slice_size!r}")
        for module in (*self.unet.modules(), *self.vae.modules()):
            if hasattr(module, "slice_size"):
                module.slice_size = slice_size
        return self

    def set_vae_tiling(self, tile: int | None = 64) -> StableDiffusion:
        """Decode the pipelines' images `tile`×`tile` latent pixels at a time (None: whole): the same
        numbers, less memory for large images, a little slower; see `memory/vae_tiling.py`."""
        if tile is not None:
            check_tile(tile)  # now, not at the first decode
        self.vae_tile = tile
        return self

    def load_lora(self, path, scale: float = 1.0, text_encoder_scale: float | None = None,
                  strict: bool = True) -> StableDiffusion:
        """Merge a kohya/A1111 LoRA file into the weights (UNet × scale, text encoder ×
        text_encoder_scale, default scale); several may be merged. See `addons/lora.py`."""
        lora.load_lora(self, path, scale, text_encoder_scale, strict)
        return self

    def load_textual_inversion(self, path, token: str | None = None) -> str:
        """Teach the text encoder a word: an embedding file's vectors stand for `token` (default: the
        file's name) in every prompt. Returns the word. See `addons/textual_inversion.py`."""
        return textual_inversion.load_textual_inversion(self, path, token)

    def unload_lora(self) -> StableDiffusion:
        """Take every merged LoRA out again: the original weights, bit for bit."""
        lora.unload_lora(self)
        return self

    def load_hypernetwork(self, path, multiplier: float = 1.0) -> StableDiffusion:
        """Apply an AUTOMATIC1111 hypernetwork file: small MLPs on the context that attention's keys
        and values read, × multiplier; several apply one after another. See `addons/hypernetwork.py`."""
        hypernetwork.load_hypernetwork(self, path, multiplier)
        return self

    def unload_hypernetwork(self) -> StableDiffusion:
        """Take every hypernetwork off again: the model's own outputs, exactly."""
        hypernetwork.unload_hypernetwork(self)
        return self

    def load_controlnet(self, path) -> controlnet.ControlNet:
        """A ControlNet file or diffusers folder for this model, on its device and in its dtype; pass it
        to the pipelines as `control=Control(net, image, scale, start, end)`. See `addons/controlnet.py`."""
        return controlnet.load_controlnet(path, self.unet.config, self.device, self.dtype)

    def load_depth_estimator(self, path_or_tensors, input_size: int | None = None,
                             source: str | None = None) -> StableDiffusion:
        """The depth model `depth2img` estimates depth maps with: MiDaS's `dpt_hybrid-midas-501f0c75.pt`,
        SD 2's `512-depth-ema.ckpt`, a transformers DPT folder, or such tensors already read. It runs
        in float32 (its GroupNorm'd, weight-standardised convs are not fp16-safe), images squashed to
        input_size × input_size (None: DPT-Hybrid's 384) as diffusers' depth pipeline does. See `addons/depth.py`."""
        if isinstance(path_or_tensors, dict):
            estimator = depth.depth_estimator_from_state_dict(path_or_tensors, source=source or "state dict")
        else:
            estimator = depth.load_depth_estimator(path_or_tensors)
        self.depth_estimator = estimator.to(self.device, torch.float32).requires_grad_(False)
        self.depth_input_size = input_size or depth.DPT_SIZE
        return self

    @torch.no_grad()
    def estimate_depth(self, image) -> torch.Tensor:
        """The depth estimator's relative inverse depth of `image`, (1, s, s) at its input size s."""
        if self.depth_estimator is None:
            raise ValueError("this model has no depth estimator: pass depth_map=, or sd.load_depth_estimator(path) "
                             "with MiDaS's dpt_hybrid-midas-501f0c75.pt")
        pixel_values = depth.prepare(image, size=self.depth_input_size).to(self.device, torch.float32)
        return self.depth_estimator(pixel_values)

    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = "",
                      **settings) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond) text embeddings, weighted as the prompt syntax says; see `pipelines.encode_prompt`."""
        return pipelines.encode_prompt(self, prompt, negative_prompt, pipelines.GenerationSettings(**settings))

    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, lora_dir=None,
                **kwargs) -> list[Image.Image]:
        """Text to image; see `pipelines.txt2img` for the settings. `<lora:name:m>` tags in the prompt
        merge `name` from the folder `lora_dir` for this call (AUTOMATIC1111's extra networks)."""
        return self._with_prompt_loras(pipelines.txt2img, prompt, lora_dir, negative_prompt, **kwargs)

    def img2img(self, prompt: str | list[str], image, negative_prompt: str | list[str] = "", *, lora_dir=None,
                **kwargs) -> list[Image.Image]:
        """Image to image (SDEdit) with `strength`; see `pipelines.img2img`."""
        return self._with_prompt_loras(pipelines.img2img, prompt, lora_dir, image, negative_prompt, **kwargs)

    def inpaint(self, prompt: str | list[str], image, mask, negative_prompt: str | list[str] = "", *,
                lora_dir=None, **kwargs) -> list[Image.Image]:
        """Repaint the white part of `mask`; see `pipelines.inpaint`."""
        return self._with_prompt_loras(pipelines.inpaint, prompt, lora_dir, image, mask, negative_prompt, **kwargs)

    def depth2img(self, prompt: str | list[str], image, negative_prompt: str | list[str] = "", *, depth_map=None,
                  lora_dir=None, **kwargs) -> list[Image.Image]:
        """Depth-to-image (SD 2 depth): img2img that keeps `image`'s layout through a depth map, given
        or estimated by the depth estimator (`estimate_depth`); see `pipelines.depth2img`."""
        pipelines.check_depth_model(self)  # before the estimator runs
        if depth_map is None:
            depth_map = self.estimate_depth(image)
        return self._with_prompt_loras(pipelines.depth2img, prompt, lora_dir, image, depth_map, negative_prompt,
                                       **kwargs)

    def outpaint(self, prompt: str | list[str], image, negative_prompt: str | list[str] = "", *, lora_dir=None,
                 **kwargs) -> list[Image.Image]:
        """Extend the canvas by left/top/right/bottom pixels and paint the new border; see `pipelines.outpaint`."""
        return self._with_prompt_loras(pipelines.outpaint, prompt, lora_dir, image, negative_prompt, **kwargs)

    def _with_prompt_loras(self, pipeline, prompt, lora_dir, *args, **kwargs) -> list[Image.Image]:
        """Run `pipeline` on the prompt without its `<lora:…>` tags, those LoRAs merged meanwhile;
        the images' recorded prompts keep the tags, as AUTOMATIC1111's do."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if prompts is None or not all(isinstance(p, str) for p in prompts):
            return pipeline(self, prompt, *args, **kwargs)  # the pipeline names what is wrong
        stripped, tags = zip(*(lora.prompt_tags(p) for p in prompts))
        by_name = {t.name: t for t in reversed([t for ts in tags for t in ts])}  # each LoRA once, its first tag's
        with lora.applied_for_a_run(self, list(by_name.values()), lora_dir):
            images = pipeline(self, stripped[0] if isinstance(prompt, str) else list(stripped), *args, **kwargs)
        per_image = len(images) // len(prompts)
        for k, image in enumerate(images):
            original, bare = prompts[k // per_image], stripped[k // per_image]
            text = image.info.get("parameters", "")
            if original != bare and text.startswith(bare):
                image.info["parameters"] = original + text[len(bare):]
        return images
