"""conventions="a1111" gives what AUTOMATIC1111 gets from k-diffusion on the same weights and seeds.

Reference: k-diffusion 0.1.1.post1 (crowsonkb/k-diffusion), run as AUTOMATIC1111 runs it: a
`CompVisDenoiser` around diffusers' UNet2DConditionModel (on the tiny random weights) with the
checkpoint's `alphas_cumprod` buffer; its `get_sigmas` ("Uniform") or `get_sigmas_karras` over the
model's own σ range ("Karras"); the start x = ε·σ_max; classifier-free guidance on the denoised
outputs, as A1111's `CFGDenoiser` combines them; and the noise of A1111's `ImageRNG` with the RNG
source "CPU" (`ImageNoise` below). Images may differ by at most 2 uint8 levels per pixel.

k-diffusion's package __init__ imports torchvision, clean-fid, wandb and more; the test loads only
the installed `utils.py`, `sampling.py` and `external.py` (CI installs it with --no-deps).
"""
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sd_scratch
from sd_scratch.pipelines import GenerationSettings, parameters_text, read_parameters
from sd_scratch.samplers import make_sampler, parse_sampler_name
from tests.reference import rel_err

MAX_LEVELS = 2  # uint8 levels per pixel
MAX_LATENT_ERR = 1e-4  # ‖ours − k-diffusion‖ / ‖k-diffusion‖ of the final latents: float rounding
SIZE = 32  # pixels; the tiny VAE's factor is 4, so latents are 8×8
PROMPT, NEGATIVE = "a red circle at the top left", "blurry"
SEED, GUIDANCE = 1234, 7.5
# k-diffusion's sampler for each A1111 name (A1111 `modules/sd_samplers_kdiffusion.py`) and the schedule type.
K_SAMPLERS = {"Euler a": ("sample_euler_ancestral", False), "Euler": ("sample_euler", False),
              "DPM++ 2M": ("sample_dpmpp_2m", False), "DPM++ 2M Karras": ("sample_dpmpp_2m", True),
              "Euler a Karras": ("sample_euler_ancestral", True)}


@pytest.fixture(scope="module")
def kd() -> types.SimpleNamespace:
    """k-diffusion's `sampling` and `external` modules from the installed files, without its package
    __init__. `utils.py` imports torchvision.transforms.functional for image helpers none of this
    uses: an empty module stands in for torchvision while the files load, and sys.modules is put
    back afterwards."""
    root = Path(importlib.util.find_spec("k_diffusion").submodule_search_locations[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    stand_ins = {"k_diffusion": package} | {name: types.ModuleType(name) for name in
                                            ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")}
    before = {name: sys.modules.get(name) for name in [*stand_ins, *(f"k_diffusion.{m}" for m in ("utils", "sampling",
                                                                                                 "external"))]}
    sys.modules.update(stand_ins)
    try:
        loaded = {}
        for name in ("utils", "sampling", "external"):
            spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", root / f"{name}.py")
            module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return types.SimpleNamespace(**loaded)


class CompVisModel:
    """What k-diffusion's CompVisDenoiser reads off a CompVis LatentDiffusion model: the `alphas_cumprod`
    buffer and `apply_model(x, t, cond)`, here diffusers' UNet."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor):
        self.unet, self.alphas_cumprod = unet, alphas_cumprod

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


class ImageNoise:
    """A1111's `ImageRNG` with the RNG source "CPU" (its `modules/rng.py`), written plainly: one CPU
    generator per image, seeded with that image's seed; every draw, the initial noise first and then
    each ancestral step's, is torch.randn of one image's shape from each image's generator, stacked.
    (A1111 makes k-diffusion's torch.randn_like return the next draw; here it is the noise_sampler.)"""

    def __init__(self, seeds: list[int], shape: tuple[int, ...]):
        self.generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        self.shape = shape

    def next(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


@pytest.fixture(scope="module")
def alphas_cumprod(tiny_checkpoint) -> torch.Tensor:
    """The single file's `alphas_cumprod` buffer, as every SD checkpoint carries it and A1111 reads it."""
    return load_file(str(tiny_checkpoint["single"]))["alphas_cumprod"]


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    return sd_scratch.load(tiny_checkpoint["folder"])


def text_embeddings(models, tokenizer_folder, prompts: list[str]) -> torch.Tensor:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return models["text_encoder"](ids).last_hidden_state


def k_diffusion_sample(kd, models, tokenizer_folder, alphas_cumprod, name, steps, seeds, x0=None, strength=None):
    """The final latents A1111 gets: txt2img, or img2img from the clean latent x0 (A1111's
    `sample_img2img`: int(min(strength, 0.999)·steps) + 1 steps from the end of the σ's, x = x0 + ε σ)."""
    function, karras = K_SAMPLERS[name]
    denoiser = kd.external.CompVisDenoiser(CompVisModel(models["unet"], alphas_cumprod))
    if karras:
        sigmas = kd.sampling.get_sigmas_karras(steps, denoiser.sigmas[0].item(), denoiser.sigmas[-1].item())
    else:
        sigmas = denoiser.get_sigmas(steps)
    cond = text_embeddings(models, tokenizer_folder, [PROMPT] * len(seeds))
    uncond = text_embeddings(models, tokenizer_folder, [NEGATIVE] * len(seeds))

    def guided(x, sigma):
        denoised_cond, denoised_uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                                  cond=torch.cat([cond, uncond])).chunk(2)
        return denoised_uncond + (denoised_cond - denoised_uncond) * GUIDANCE

    channels, factor = models["unet"].config.in_channels, 2 ** (len(models["vae"].config.block_out_channels) - 1)
    noise = ImageNoise(seeds, (channels, SIZE // factor, SIZE // factor))
    if x0 is None:
        x = noise.next() * sigmas[0]
    else:
        t_enc = int(min(strength, 0.999) * steps)
        sigmas = sigmas[steps - t_enc - 1:]
        x = x0 + noise.next() * sigmas[0]
    extra = {"noise_sampler": lambda sigma, sigma_next: noise.next()} if function == "sample_euler_ancestral" else {}
    return getattr(kd.sampling, function)(guided, x, sigmas, disable=True, **extra)


@torch.no_grad()
def decoded_uint8(models, latents: torch.Tensor) -> np.ndarray:
    """diffusers' VAE decode and its uint8 rounding, (x/2 + 0.5) clamped, ·255, rounded."""
    vae = models["vae"]
    images = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.int16)


def as_uint8(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def make_image(seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


# ---- the σ's ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("karras", [False, True], ids=["uniform", "karras"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 25, 50, 1000])
def test_the_sigmas_are_k_diffusions(kd, alphas_cumprod, steps, karras):
    """Uniform: CompVisDenoiser.get_sigmas(n); Karras: get_sigmas_karras(n, σ_min, σ_max) over the
    model's own σ's, ρ = 7 (A1111's ranges); equal bit for bit. The UNet's t is sigma_to_t(σ)."""
    denoiser = kd.external.CompVisDenoiser(CompVisModel(None, alphas_cumprod))
    if karras:
        expected = kd.sampling.get_sigmas_karras(steps, denoiser.sigmas[0].item(), denoiser.sigmas[-1].item())
    else:
        expected = denoiser.get_sigmas(steps)
    for name in ("Euler", "Euler a", "DPM++ 2M"):
        sampler = make_sampler(name, steps, karras=karras, conventions="a1111")
        assert sampler.sigmas.dtype == expected.dtype and torch.equal(sampler.sigmas, expected)
        # float32 t near 999 is exact to 6e-5; ours is computed in float64 and rounded once
        torch.testing.assert_close(sampler.timesteps, denoiser.sigma_to_t(expected[:-1]), rtol=0, atol=2.5e-4)
    assert make_sampler("Euler a", steps, karras=karras, conventions="a1111").init_noise_sigma == expected[0].item()


# ---- whole pictures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(K_SAMPLERS))
def test_txt2img_matches_k_diffusion_with_a1111s_per_image_seeds(ours, tiny_models, tiny_checkpoint, alphas_cumprod,
                                                                 kd, name):
    """A batch of 2: the images' seeds are SEED and SEED + 1, each with its own generator for its
    initial and its ancestral noise."""
    latents = []
    images = ours.txt2img(PROMPT, NEGATIVE, height=SIZE, width=SIZE, steps=6, guidance_scale=GUIDANCE, seed=SEED,
                          scheduler=name, num_images=2, conventions="a1111", progress=False,
                          callback=lambda info: latents.append(info.x_t))
    with torch.no_grad():
        expected = k_diffusion_sample(kd, tiny_models, tiny_checkpoint["folder"] / "tokenizer", alphas_cumprod, name,
                                      6, [SEED, SEED + 1])
        expected_images = decoded_uint8(tiny_models, expected)
    assert rel_err(latents[-1], expected) <= MAX_LATENT_ERR
    assert np.abs(as_uint8(images) - expected_images).max() <= MAX_LEVELS
    assert [im.info["parameters"].split("Seed: ")[1].split(",")[0] for im in images] == [str(SEED), str(SEED + 1)]


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M Karras"])
def test_img2img_matches_k_diffusion_from_the_same_latent(ours, tiny_models, tiny_checkpoint, alphas_cumprod, kd,
                                                           name):
    """A1111's img2img steps: int(0.6 · 8) + 1 = 5 of 8, from x0 + ε σ_3. A1111 draws the VAE's
    posterior sample from torch's global generator, which no seed fixes; both sides take the one
    that a CPU generator seeded with SEED draws (as diffusers' `latent_dist.sample` does)."""
    from diffusers.image_processor import VaeImageProcessor

    image = make_image()
    latents = []
    images = ours.img2img(PROMPT, image, NEGATIVE, strength=0.6, steps=8, guidance_scale=GUIDANCE, seed=SEED,
                          scheduler=name, num_images=2, conventions="a1111", progress=False,
                          callback=lambda info: latents.append(info.x_t))
    assert len(latents) == 5
    with torch.no_grad():
        vae = tiny_models["vae"]
        pixels = VaeImageProcessor().preprocess(image)
        x0 = vae.encode(pixels).latent_dist.sample(torch.Generator("cpu").manual_seed(SEED)) * vae.config.scaling_factor
        expected = k_diffusion_sample(kd, tiny_models, tiny_checkpoint["folder"] / "tokenizer", alphas_cumprod, name,
                                      8, [SEED, SEED + 1], x0=x0.repeat(2, 1, 1, 1), strength=0.6)
        expected_images = decoded_uint8(tiny_models, expected)
    assert rel_err(latents[-1], expected) <= MAX_LATENT_ERR
    assert np.abs(as_uint8(images) - expected_images).max() <= MAX_LEVELS


def test_each_image_of_a_batch_is_made_again_alone_by_its_own_seed(ours):
    """What per-image seeds are for: image 2 of a batch seeded 7 is the picture of seed 8 alone."""
    settings = dict(height=SIZE, width=SIZE, steps=4, scheduler="Euler a", conventions="a1111", progress=False)
    batch = ours.txt2img(PROMPT, NEGATIVE, seed=7, num_images=2, **settings)
    alone = ours.txt2img(PROMPT, NEGATIVE, seed=8, **settings)
    assert np.abs(as_uint8(batch[1:]) - as_uint8(alone)).max() <= MAX_LEVELS
    assert batch[1].info["parameters"] == alone[0].info["parameters"]


def test_diffusers_conventions_stay_the_default(ours):
    kwargs = dict(height=SIZE, width=SIZE, steps=3, scheduler="euler_a", seed=3, num_images=2, progress=False)
    assert np.array_equal(as_uint8(ours.txt2img(PROMPT, **kwargs)),
                          as_uint8(ours.txt2img(PROMPT, conventions="diffusers", **kwargs)))


# ---- names, texts and errors ------------------------------------------------------------------------

@pytest.mark.parametrize("name, sampler, karras", [
    ("Euler a", "euler_a", False), ("Euler", "euler", False), ("DPM++ 2M", "dpmpp_2m", False),
    ("DPM++ 2M Karras", "dpmpp_2m", True), ("Euler a Karras", "euler_a", True), ("DDIM", "ddim", False),
    ("PLMS", "pndm", False), ("plms", "pndm", False), ("dpmpp_2m", "dpmpp_2m", False)])
def test_a1111_sampler_names_are_ours_with_karras_where_the_name_says_it(name, sampler, karras):
    assert parse_sampler_name(name) == (sampler, karras)


def test_a_name_ending_in_karras_spaces_the_sigmas():
    assert torch.equal(GenerationSettings(scheduler="DPM++ 2M Karras", steps=10).sampler().sigmas,
                       make_sampler("dpmpp_2m", 10, karras=True).sigmas)


@pytest.mark.parametrize("settings, words", [
    (dict(scheduler="DPM++ SDE"), ["scheduler", "'DPM++ SDE'", "Euler a", "DPM++ 2M Karras", "euler_a", "PLMS"]),
    (dict(scheduler="DDIM Karras"), ["scheduler", "'DDIM Karras'", "Euler Karras"]),
    (dict(conventions="comfy"), ["conventions must be one of diffusers, a1111", "'comfy'"]),
    (dict(scheduler="DDIM", conventions="a1111"), ["conventions='a1111'", "Euler, Euler a, DPM++ 2M", "DDIM"]),
    (dict(scheduler="Euler", spacing="trailing", conventions="a1111"), ["spacing='trailing'", "conventions='a1111'"]),
    (dict(scheduler="Euler", zero_terminal_snr=True, conventions="a1111"), ["zero_terminal_snr", "a1111"]),
])
def test_bad_settings_are_errors_naming_the_setting(settings, words):
    with pytest.raises(ValueError) as err:
        GenerationSettings(**settings).check(factor=8)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_inpainting_refuses_a1111s_conventions_in_words(ours):
    with pytest.raises(ValueError, match="conventions='a1111' is for txt2img and img2img"):
        ours.inpaint(PROMPT, make_image(), make_image(1), scheduler="Euler a", conventions="a1111")


A1111_TAIL = "CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"


def test_an_a1111_text_selects_its_conventions_and_says_when_its_noise_came_from_a_gpu():
    cpu = read_parameters(f"a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, {A1111_TAIL}, RNG: CPU, "
                          "Version: v1.10.1")
    assert cpu.settings == dict(scheduler="dpmpp_2m", karras=True, conventions="a1111", steps=20, guidance_scale=7.0,
                                seed=1, width=512, height=512)
    assert cpu.not_honoured == []
    # A1111 ≥ 1.9: "Automatic" is Karras for DPM++ 2M, uniform for Euler a; no RNG key: drawn on the GPU
    automatic = read_parameters(f"a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, {A1111_TAIL}")
    assert (automatic.settings["karras"], automatic.settings["conventions"]) == (True, "a1111")
    assert len(automatic.not_honoured) == 1 and automatic.not_honoured[0].startswith("RNG: GPU (")
    euler_a = read_parameters(f"a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, {A1111_TAIL}")
    assert (euler_a.settings["scheduler"], euler_a.settings["karras"]) == ("euler_a", False)
    # A1111's DDIM is its own loop: diffusers' DDIM runs, and the text says so
    ddim = read_parameters(f"a cat\nSteps: 20, Sampler: DDIM, {A1111_TAIL}, RNG: CPU")
    assert "conventions" not in ddim.settings and ddim.not_honoured[0].startswith("Sampler: DDIM with A1111's")


def test_our_texts_read_back_with_their_conventions():
    diffusers = GenerationSettings(steps=20, seed=5, scheduler="euler_a", num_images=2)
    assert "conventions" not in read_parameters(parameters_text("a cat", "", diffusers, (64, 64), "m")).settings
    a1111 = GenerationSettings(steps=20, seed=5, scheduler="DPM++ 2M Karras", num_images=2, conventions="a1111")
    text = parameters_text("a cat", "", a1111, (64, 64), "m", index=1)
    assert text == ("a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 6, "
                    "Size: 64x64, Model: m, RNG: CPU")
    recorded = read_parameters(text)
    assert recorded.settings == dict(scheduler="dpmpp_2m", karras=True, conventions="a1111", steps=20,
                                     guidance_scale=7.5, seed=6, width=64, height=64)
    assert recorded.not_honoured == []
