"""Depth-to-image (SD 2 depth): pictures within 2 levels of diffusers' StableDiffusionDepth2ImgPipeline on
the same random weights, with a depth map given and with the MiDaS estimator making it, from a diffusers
folder and from a single file that carries `depth_model.*`; bad depth maps and models refused in words."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sd_scratch
from sd_scratch.checkpoints.depth_rules import DEPTH_PREFIX, transformers_to_midas
from tests.reference import (SD15_SCHEDULER_CONFIG, TINY_SD2_TEXT, TINY_SD2_UNET, TINY_VAE, make_text_encoder, make_unet,
                             make_vae, randomize_, sd2_single_file_layout, write_tokenizer_folder)
from tests.test_pipelines import NEGATIVE, PROMPTS, as_uint8, assert_close_images, make_image, reference_uint8

# A tiny DPT-Hybrid with what a MiDaS file does not record set as the official preset has it (12 heads,
# GroupNorm of 32, blocks 8 and 11 read out, LayerNorm ε 1e-6), so that a single file loads it as a
# real one would; read at 384×384, diffusers' depth pipeline's size.
DPT_BACKBONE = dict(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], embedding_size=32,
                    hidden_sizes=[128, 128, 128], out_features=["stage1", "stage2", "stage3"],
                    embedding_dynamic_padding=True, num_groups=32)
DPT = dict(image_size=384, patch_size=16, hidden_size=48, num_hidden_layers=12, num_attention_heads=12,
           intermediate_size=40, backbone_out_indices=(0, 1, 8, 11), is_hybrid=True, backbone_config=DPT_BACKBONE,
           backbone_featmap_shape=[1, 128, 24, 24], neck_hidden_sizes=[128, 128, 48, 40], fusion_hidden_size=32,
           reassemble_factors=[1, 1, 1, 0.5], layer_norm_eps=1e-6)
SAMPLERS = {"ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
            "dpmpp_2m": "DPMSolverMultistepScheduler"}


def processor():
    from transformers import DPTImageProcessor
    from transformers.image_utils import PILImageResampling

    return DPTImageProcessor(size={"height": 384, "width": 384}, keep_aspect_ratio=False,
                             resample=PILImageResampling.BILINEAR, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def depth_models():
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    estimator = randomize_(DPTForDepthEstimation(DPTConfig(**DPT)), seed=21).eval()
    with torch.no_grad():
        estimator.head.head[4].bias += 2.0  # the final ReLU keeps most of the map (random weights)
    return {"unet": make_unet(dict(TINY_SD2_UNET, in_channels=5), seed=6), "vae": make_vae(TINY_VAE),
            "text_encoder": make_text_encoder(TINY_SD2_TEXT), "depth_estimator": estimator}


@pytest.fixture(scope="module")
def depth_files(depth_models, tmp_path_factory):
    """A diffusers StableDiffusionDepth2ImgPipeline folder and a 512-depth-ema-style single file."""
    from diffusers import DDIMScheduler, StableDiffusionDepth2ImgPipeline
    from transformers import CLIPTokenizer

    from sd_scratch.tokenizer import DEFAULT_BPE_PATH

    root = tmp_path_factory.mktemp("depth2img")
    write_tokenizer_folder(DEFAULT_BPE_PATH, root / "tokenizer")
    tokenizer = CLIPTokenizer(str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"),
                              model_max_length=77, pad_token="!")
    pipe = StableDiffusionDepth2ImgPipeline(
        vae=depth_models["vae"], text_encoder=depth_models["text_encoder"], tokenizer=tokenizer,
        unet=depth_models["unet"], scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        depth_estimator=depth_models["depth_estimator"], feature_extractor=processor())
    pipe.save_pretrained(root / "folder")
    single = sd2_single_file_layout(depth_models)
    midas, unmapped = transformers_to_midas(depth_models["depth_estimator"].state_dict())
    assert unmapped == []
    single |= {DEPTH_PREFIX + k: t for k, t in midas.items()}
    save_file(single, str(root / "512-depth-ema.safetensors"))
    return {"folder": root / "folder", "single": root / "512-depth-ema.safetensors"}


@pytest.fixture(scope="module")
def loaded(depth_files):
    """Ours from each layout, loaded once."""
    return {layout: sd_scratch.load(path) for layout, path in depth_files.items()}


def reference(depth_models, folder, scheduler):
    import diffusers
    from transformers import CLIPTokenizer

    pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=depth_models["vae"], text_encoder=depth_models["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", pad_token="!"), unet=depth_models["unet"],
        scheduler=getattr(diffusers, SAMPLERS[scheduler]).from_config(SD15_SCHEDULER_CONFIG),
        depth_estimator=depth_models["depth_estimator"], feature_extractor=processor())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def a_depth_map(seed=0, shape=(1, 20, 28)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_depth2img_with_a_given_map_matches_diffusers(depth_models, depth_files, loaded, scheduler):
    ours = loaded["folder"]
    assert ours.family.name == "sd2-depth"
    image, depth_map = make_image(7), a_depth_map()
    images = ours.depth2img(PROMPTS, image, NEGATIVE, depth_map=depth_map, strength=0.7, steps=6, seed=4,
                            scheduler=scheduler, progress=False)
    expected = reference(depth_models, depth_files["folder"], scheduler)(
        PROMPTS, image=image, depth_map=depth_map, negative_prompt=[NEGATIVE] * 2, strength=0.7, num_inference_steps=6,
        generator=torch.Generator("cpu").manual_seed(4), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))
    other = ours.depth2img(PROMPTS, image, NEGATIVE, depth_map=a_depth_map(1), strength=0.7, steps=6, seed=4,
                           scheduler=scheduler, progress=False)
    assert np.abs(as_uint8(other) - as_uint8(images)).max() > 2  # the map is read, not ignored


@pytest.mark.parametrize("layout", ["folder", "single"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_depth2img_with_the_estimator_matches_diffusers(depth_models, depth_files, loaded, layout, scheduler):
    ours = loaded[layout]
    assert ours.depth_estimator is not None and ours.depth_input_size == 384
    assert any("depth estimator" in note for note in ours.report.notes)
    image = make_image(8)
    images = ours.depth2img(PROMPTS[0], image, NEGATIVE, strength=0.8, steps=6, seed=9, scheduler=scheduler,
                            num_images=2, progress=False)
    expected = reference(depth_models, depth_files["folder"], scheduler)(
        PROMPTS[0], image=image, negative_prompt=NEGATIVE, strength=0.8, num_inference_steps=6, num_images_per_prompt=2,
        generator=torch.Generator("cpu").manual_seed(9), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))


def test_the_estimated_depth_equals_transformers(depth_models, loaded):
    from tests.reference import rel_err

    ours = loaded["single"]
    image = make_image(8)
    pixel_values = processor()(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = depth_models["depth_estimator"](pixel_values).predicted_depth
    assert rel_err(ours.estimate_depth(image), expected) <= 1e-4


@pytest.mark.parametrize("depth_map,message", [
    (torch.rand(1, 3, 8, 8), r"depth_map must be \(H, W\), \(N, H, W\) or \(N, 1, H, W\)"),
    (torch.ones(8, 8), "depth_map is constant"),
    (torch.full((8, 8), float("nan")), "NaN or Inf"),
    (torch.rand(3, 8, 8), "depth_map holds 3 maps; give one, or one per image"),
    ("no-such-file.png", "depth_map: cannot read"),
])
def test_bad_depth_maps_are_refused_in_words(loaded, depth_map, message):
    ours = loaded["folder"]
    with pytest.raises(ValueError, match=message):
        ours.depth2img(PROMPTS, make_image(), depth_map=depth_map, steps=2, progress=False)


def test_a_four_channel_model_is_refused_by_depth2img(tiny_checkpoint):
    ours = sd_scratch.load(tiny_checkpoint["folder"])
    with pytest.raises(ValueError, match="depth2img needs SD 2 depth's UNet .5 input channels.*has 4"):
        ours.depth2img("a", make_image(), depth_map=a_depth_map(), steps=2, progress=False)


def test_without_an_estimator_depth2img_asks_for_a_map(depth_models, tmp_path):
    single = sd2_single_file_layout(depth_models)  # no depth_model.*: loads, but cannot estimate
    save_file(single, str(tmp_path / "no-midas.safetensors"))
    ours = sd_scratch.load(tmp_path / "no-midas.safetensors")
    assert ours.family.name == "sd2-depth" and ours.depth_estimator is None
    with pytest.raises(ValueError, match="no depth estimator: pass depth_map="):
        ours.depth2img("a", make_image(), steps=2, progress=False)
    assert len(ours.depth2img("a", make_image(), depth_map=a_depth_map(), steps=2, progress=False)) == 1


def test_the_cli_draws_depth2img_with_the_estimator_or_a_map(depth_files, tmp_path, capsys):
    from PIL import Image

    from sd_scratch.cli import main

    make_image(7).save(tmp_path / "in.png")
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).save(tmp_path / "depth.png")
    base = ["depth2img", "a castle", "--image", tmp_path / "in.png", "--checkpoint", depth_files["folder"],
            "--steps", "2", "--quiet"]
    assert main([str(a) for a in base + ["-o", tmp_path / "estimated.png"]]) == 0
    assert main([str(a) for a in base + ["--depth-map", tmp_path / "depth.png", "-o", tmp_path / "given.png"]]) == 0
    estimated, given = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("estimated", "given"))
    assert estimated.shape == (32, 32, 3) and np.abs(estimated - given).max() > 2
    capsys.readouterr()
    assert main(["depth2img", "a", "--image", str(tmp_path / "in.png"), "--steps", "2", "--quiet",
                 "-o", str(tmp_path / "x.png")]) == 1  # the built-in model has 4 channels
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "depth2img needs SD 2 depth's UNet" in err[0]
