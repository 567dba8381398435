"""The pipelines give diffusers' pictures for the same weights and seed, and refuse bad input in words.

Reference: diffusers' StableDiffusionPipeline / Img2ImgPipeline / InpaintPipeline on the same tiny
random weights, same seed (`torch.Generator("cpu").manual_seed(seed)`), fp32; uint8 images may
differ by at most 2 levels per pixel.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import sd_scratch
from sd_scratch.pipelines import StepInfo
from tests.reference import SD15_SCHEDULER_CONFIG, make_reference_models, write_diffusers_folder

MAX_LEVELS = 2  # uint8 levels per pixel
SIZE = 32  # pixels; the tiny VAE's factor is 4, so latents are 8×8
PROMPTS = ["a red circle at the top left", "a small blue square on a green background"]
NEGATIVE = "blurry"


def reference_scheduler(name: str):
    import diffusers

    classes = {"ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler,
               "euler": diffusers.EulerDiscreteScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler,
               "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
    return classes[name].from_config(SD15_SCHEDULER_CONFIG)  # as a diffusers user gets it: no overrides


def reference_pipeline(cls, models, tokenizer_folder, scheduler):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    pipe = cls(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer, unet=models["unet"],
               scheduler=reference_scheduler(scheduler), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_uint8(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def reference_uint8(output) -> np.ndarray:
    return (output.images * 255).round().astype(np.int16)  # diffusers' own numpy -> PIL rounding


def assert_close_images(ours, ref):
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= MAX_LEVELS


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    return sd_scratch.load(tiny_checkpoint["folder"])


def make_image(seed=0, mode="RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def make_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    return Image.fromarray(mask)


SAMPLERS = ["ddim", "pndm", "euler", "euler_a", "dpmpp_2m"]


@pytest.mark.parametrize("scheduler", SAMPLERS)
def test_txt2img_matches_diffusers(ours, tiny_models, tiny_checkpoint, scheduler):
    from diffusers import StableDiffusionPipeline

    ref = reference_pipeline(StableDiffusionPipeline, tiny_models, tiny_checkpoint["folder"] / "tokenizer", scheduler)
    kwargs = dict(height=SIZE, width=SIZE, guidance_scale=7.5)
    images = ours.txt2img(PROMPTS, NEGATIVE, steps=6, seed=5, scheduler=scheduler, num_images=2, progress=False,
                          **kwargs)
    expected = ref(PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=6, num_images_per_prompt=2,
                   generator=torch.Generator("cpu").manual_seed(5), output_type="np", **kwargs)
    assert len(images) == 4
    assert_close_images(as_uint8(images), reference_uint8(expected))


@pytest.mark.parametrize("scheduler", SAMPLERS)
def test_img2img_matches_diffusers(ours, tiny_models, tiny_checkpoint, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = reference_pipeline(StableDiffusionImg2ImgPipeline, tiny_models, tiny_checkpoint["folder"] / "tokenizer",
                             scheduler)
    image = make_image()
    images = ours.img2img(PROMPTS, image, NEGATIVE, strength=0.6, steps=8, seed=11, scheduler=scheduler,
                          num_images=2, progress=False)
    expected = ref(PROMPTS, image=image, negative_prompt=[NEGATIVE] * 2, strength=0.6, num_inference_steps=8,
                   num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(11), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))


@pytest.fixture(scope="module")
def inpainting_checkpoint(tiny_models, tiny_checkpoint, tmp_path_factory):
    """{4: (reference models, folder), 9: ...}: the ordinary and the 9-channel inpainting UNet."""
    models = make_reference_models("tiny", inpainting=True)
    return {4: (tiny_models, tiny_checkpoint["folder"]),
            9: (models, write_diffusers_folder(models, tmp_path_factory.mktemp("inpaint") / "sd"))}


@pytest.mark.parametrize("channels,strength", [(9, 1.0), (9, 0.7), (4, 1.0), (4, 0.75)])
@pytest.mark.parametrize("scheduler", SAMPLERS)
def test_inpaint_matches_diffusers(inpainting_checkpoint, channels, strength, scheduler):
    from diffusers import StableDiffusionInpaintPipeline

    models, folder = inpainting_checkpoint[channels]
    ours = sd_scratch.load(folder)
    ref = reference_pipeline(StableDiffusionInpaintPipeline, models, folder / "tokenizer", scheduler)
    image, mask = make_image(3), make_mask()
    images = ours.inpaint(PROMPTS[0], image, mask, NEGATIVE, strength=strength, steps=6, seed=2,
                          scheduler=scheduler, num_images=2, progress=False)
    expected = ref(PROMPTS[0], image=image, mask_image=mask, negative_prompt=NEGATIVE, strength=strength,
                   height=SIZE, width=SIZE, num_inference_steps=6, num_images_per_prompt=2,
                   generator=torch.Generator("cpu").manual_seed(2), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))


def test_guidance_scale_1_skips_the_unconditional_pass(ours, tiny_models, tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    ref = reference_pipeline(StableDiffusionPipeline, tiny_models, tiny_checkpoint["folder"] / "tokenizer", "ddim")
    calls = []
    handle = ours.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        images = ours.txt2img(PROMPTS[0], height=SIZE, width=SIZE, steps=3, guidance_scale=1.0, progress=False)
    finally:
        handle.remove()
    assert calls == [1, 1, 1]  # batch 1 per step: no unconditional half
    expected = ref(PROMPTS[0], height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=1.0,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))


def test_the_same_seed_twice_is_bit_identical(ours):
    settings = dict(height=SIZE, width=SIZE, steps=4, seed=1234, scheduler="euler_a", progress=False)
    a, b = ours.txt2img(PROMPTS[0], **settings), ours.txt2img(PROMPTS[0], **settings)
    assert np.array_equal(as_uint8(a), as_uint8(b))
    c = ours.txt2img(PROMPTS[0], **dict(settings, seed=1235))
    assert not np.array_equal(as_uint8(a), as_uint8(c))


def test_the_callback_sees_every_step(ours):
    seen: list[StepInfo] = []
    ours.txt2img(PROMPTS[0], height=SIZE, width=SIZE, steps=4, callback=seen.append, progress=False)
    assert [s.step for s in seen] == [0, 1, 2, 3]
    assert seen[0].t > seen[-1].t
    latent = (1, 4, SIZE // 4, SIZE // 4)
    for s in seen:
        assert s.x_t.shape == s.x0_pred.shape == s.eps_cond.shape == s.eps_uncond.shape == latent


def test_long_prompts_truncate_with_a_warning_or_encode_in_chunks(ours):
    long_prompt = " ".join(["a red circle"] * 30) + " and a hidden green triangle"
    with pytest.warns(UserWarning, match="triangle"):
        ours.txt2img(long_prompt, height=SIZE, width=SIZE, steps=1, progress=False)
    contexts = []
    handle = ours.unet.register_forward_hook(lambda m, args, out: contexts.append(args[2].shape))
    try:
        ours.txt2img(long_prompt, height=SIZE, width=SIZE, steps=1, long_prompts="chunk", progress=False)
    finally:
        handle.remove()
    assert contexts[0][1] == 2 * 77  # 94 tokens -> two chunks of 75, each 77 with start/end


def test_image_modes_are_converted_to_rgb(ours):
    for mode in ("RGBA", "P", "L"):
        images = ours.img2img(PROMPTS[0], make_image(mode=mode), steps=2, strength=1.0, progress=False)
        assert images[0].size == (SIZE, SIZE) and images[0].mode == "RGB"


def test_a_mask_of_another_size_is_resized_with_a_warning(ours):
    with pytest.warns(UserWarning, match="resized"):
        ours.inpaint(PROMPTS[0], make_image(), make_mask().resize((16, 16)), steps=2, progress=False)


@pytest.mark.parametrize("channels", [4, 9])
def test_outpaint_is_diffusers_inpainting_of_the_padded_canvas(inpainting_checkpoint, channels):
    from diffusers import StableDiffusionInpaintPipeline

    models, folder = inpainting_checkpoint[channels]
    ours = sd_scratch.load(folder)
    ref = reference_pipeline(StableDiffusionInpaintPipeline, models, folder / "tokenizer", "ddim")
    small = make_image(4).crop((0, 4, 24, 32))  # 24×28: 8 more on the left, 4 on the top
    images = ours.outpaint(PROMPTS[0], small, NEGATIVE, left=8, top=4, steps=6, seed=3, num_images=2, progress=False)
    canvas = np.pad(np.asarray(small), ((4, 0), (8, 0), (0, 0)), mode="edge")  # the edge pixels repeated
    mask = np.full((SIZE, SIZE), 255, np.uint8)
    mask[4:, 8:] = 0  # keep the old picture, repaint the new border
    expected = ref(PROMPTS[0], image=Image.fromarray(canvas), mask_image=Image.fromarray(mask),
                   negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=6,
                   num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(3), output_type="np")
    assert images[0].size == (SIZE, SIZE)
    assert_close_images(as_uint8(images), reference_uint8(expected))


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "needs left, top, right or bottom > 0"),
    (dict(left=-8), "left must be a whole number of pixels ≥ 0"),
    (dict(right=2.5), "right must be a whole number"),
    (dict(top=3), "must be multiples of 4"),
])
def test_outpaint_refuses_bad_padding_in_words(ours, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ours.outpaint(PROMPTS[0], make_image(), progress=False, **kwargs)


@pytest.mark.parametrize("call,kwargs,message", [
    ("txt2img", dict(height=30), "height must be a positive multiple of 4"),
    ("txt2img", dict(width=30), "width must be a positive multiple of 4"),
    ("txt2img", dict(steps=0), "steps must be an integer ≥ 1"),
    ("txt2img", dict(guidance_scale=-1), "guidance_scale must be ≥ 0"),
    ("txt2img", dict(scheduler="heun"), "scheduler must be one of ddpm, ddim"),
    ("txt2img", dict(num_images=0), "num_images"),
    ("img2img", dict(strength=0), r"strength must be in \(0, 1\]"),
    ("img2img", dict(strength=1.5), r"strength must be in \(0, 1\]"),
    ("img2img", dict(steps=3, strength=0.2), "steps × strength must be ≥ 1"),
    ("inpaint", dict(strength=0.0), r"strength must be in \(0, 1\]"),
])
def test_bad_input_is_a_value_error_naming_the_parameter(ours, call, kwargs, message):
    args = {"txt2img": (), "img2img": (make_image(),), "inpaint": (make_image(), make_mask())}[call]
    kwargs = dict(dict(height=SIZE, width=SIZE, progress=False), **kwargs)
    with pytest.raises(ValueError, match=message):
        getattr(ours, call)(PROMPTS[0], *args, **kwargs)


def test_an_image_that_is_not_an_image(ours):
    with pytest.raises(ValueError, match="image must be a PIL image"):
        ours.img2img(PROMPTS[0], torch.zeros(1, 4, 8, 8), progress=False)
