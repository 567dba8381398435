"""ControlNet: the residuals equal diffusers' ControlNetModel on the same (re-randomised) weights, every
file layout loads to the same tensors, and the pipelines give diffusers' ControlNet pipelines' pictures.

Reference: `ControlNetModel.from_unet` on the tiny random UNet, then every tensor re-randomised (the
zero convolutions start at zero, and an untouched ControlNet adds nothing and tests nothing);
`StableDiffusionControlNetPipeline` and its img2img and inpaint variants, same seed, fp32; images
within 2 uint8 levels. The tiny VAE shrinks 4 times, so the pipelines' ControlNets have a hint
encoder of three widths (two stride-2 convs); the module tests use SD's four.
"""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sd_scratch
from sd_scratch import Control
from sd_scratch.addons.controlnet import controlnet_state_dict, guess_mode_scales, load_controlnet
from sd_scratch.checkpoints.files import CheckpointError
from sd_scratch.unet import UNetConfig
from tests.reference import TINY_SD2_UNET, make_unet, randomize_, rel_err
from tests.test_pipelines import (NEGATIVE, PROMPTS, SIZE, as_uint8, assert_close_images, make_image, make_mask,
                                  reference_scheduler, reference_uint8)

TOLERANCE = 1e-4
TINY_HINT_WIDTHS = (16, 32, 96)  # factor 4, the tiny VAE's


def reference_controlnet(unet, seed: int, hint_widths=(16, 32, 96, 256)):
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_widths)
    return randomize_(net, seed).eval()


@pytest.fixture(scope="module")
def sd15_shaped(tiny_models):
    """A ControlNet with SD's hint encoder (four widths, ÷8) for the tiny UNet, and the UNet's config."""
    unet = tiny_models["unet"]
    return reference_controlnet(unet, 7), UNetConfig.from_diffusers_config(dict(unet.config))


def inputs(batch=2, hint_size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, hint_size // 8, hint_size // 8, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 7, 128, generator=g), torch.rand(batch, 3, hint_size, hint_size, generator=g))


def assert_residuals_match(ours, ref, scale=1.0, guess_mode=False):
    x, t, context, hint = inputs()
    with torch.no_grad():
        expected_down, expected_mid = ref(x, t, context, hint, conditioning_scale=scale, guess_mode=guess_mode,
                                          return_dict=False)
        down, mid = ours(x, t, context, hint, scale, guess_mode)
    assert len(down) == len(expected_down) == 1 + 3 * 2 + 2  # conv_in's, 2 per level, 2 downsamplers
    for got, want in zip([*down, mid], [*expected_down, expected_mid]):
        assert want.norm() > 0  # a zero residual would test nothing
        assert rel_err(got, want) <= TOLERANCE


@pytest.mark.parametrize("scale,guess_mode", [(1.0, False), (0.6, False), (0.8, True)])
def test_residuals_match_diffusers(sd15_shaped, tmp_path, scale, guess_mode):
    ref, unet_config = sd15_shaped
    ref.save_pretrained(tmp_path / "folder")
    assert_residuals_match(load_controlnet(tmp_path / "folder", unet_config), ref, scale, guess_mode)


def test_guess_mode_law_is_diffusers_logspace():
    assert torch.allclose(guess_mode_scales(13), torch.tensor([10 ** (-1 + i / 12) for i in range(13)]))
    assert guess_mode_scales(13)[0].item() == pytest.approx(0.1) and guess_mode_scales(13)[-1].item() == 1.0


def test_our_compvis_names_round_trip_through_diffusers_converter(sd15_shaped):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    ref, unet_config = sd15_shaped
    ours = load_controlnet_from_reference(ref, unet_config)
    compvis = controlnet_state_dict(ours, "compvis")
    assert "control_model.input_hint_block.14.weight" in compvis and "control_model.zero_convs.8.0.weight" in compvis
    assert "control_model.middle_block_out.0.bias" in compvis
    back = convert_controlnet_checkpoint(compvis, dict(ref.config))
    expected = ref.state_dict()
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def load_controlnet_from_reference(ref, unet_config):
    """Ours on the reference's tensors (diffusers' names are ours)."""
    from sd_scratch.addons.controlnet import ControlNet, ControlNetConfig

    sd = ref.state_dict()
    net = ControlNet(ControlNetConfig.from_state_dict(sd, unet_config))
    net.load_state_dict(sd, strict=True)
    return net.eval()


@pytest.mark.parametrize("layout", ["compvis.safetensors", "compvis.pth", "bare.safetensors", "bare-fp16.safetensors",
                                    "full-model.pth", "diffusers-fp16"])
def test_every_layout_loads_to_the_reference(sd15_shaped, tmp_path, layout):
    ref, unet_config = sd15_shaped
    compvis = controlnet_state_dict(load_controlnet_from_reference(ref, unet_config), "compvis")
    bare = {k.removeprefix("control_model."): t for k, t in compvis.items()}
    path = tmp_path / layout
    if layout == "compvis.safetensors":
        save_file(compvis, str(path))
    elif layout == "compvis.pth":
        torch.save({"state_dict": compvis}, path)
    elif layout == "bare.safetensors":
        save_file(bare, str(path))
    elif layout == "bare-fp16.safetensors":
        save_file({k: t.half() for k, t in bare.items()}, str(path))
    elif layout == "full-model.pth":  # ControlNet 1.0's files hold the whole model beside control_model.*
        torch.save(compvis | {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3),
                              "first_stage_model.decoder.conv_out.bias": torch.zeros(3)}, path)
    else:
        ref.half().save_pretrained(path, variant="fp16")
        ref.float()
    ours = load_controlnet(path, unet_config)
    if "fp16" in layout:  # the reference at the file's values, rounded to fp16, computing in fp32 as ours does
        ref = copy.deepcopy(ref)
        ref.load_state_dict({k: t.half().float() for k, t in ref.state_dict().items()})
    assert_residuals_match(ours, ref, 0.9)


def test_an_sd2_controlnet_matches_diffusers_in_both_layouts(tmp_path):
    """SD 2.x ControlNets (Linear projections, per-level heads, a 1024-wide text in the real ones)
    through the same code: the family's UNet config gives what the tensors do not."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    sd2_unet = make_unet(TINY_SD2_UNET)
    ref = reference_controlnet(sd2_unet, 5)
    unet_config = UNetConfig.from_diffusers_config(dict(sd2_unet.config))
    ref.save_pretrained(tmp_path / "folder")
    ours = load_controlnet(tmp_path / "folder", unet_config)
    compvis = controlnet_state_dict(ours, "compvis")
    back = convert_controlnet_checkpoint(compvis, dict(ref.config))
    assert all(torch.equal(back[k], t) for k, t in ref.state_dict().items())
    save_file(compvis, str(tmp_path / "sd2-control.safetensors"))
    x, t, context, hint = inputs()
    for net in (ours, load_controlnet(tmp_path / "sd2-control.safetensors", unet_config)):
        with torch.no_grad():
            want_down, want_mid = ref(x, t, context, hint, conditioning_scale=0.8, return_dict=False)
            down, mid = net(x, t, context, hint, 0.8)
        assert max(rel_err(a, b) for a, b in zip([*down, mid], [*want_down, want_mid])) <= TOLERANCE


def test_a_controlnet_for_another_family_is_refused_in_words(tmp_path, tiny_checkpoint):
    sd2_net = reference_controlnet(make_unet(TINY_SD2_UNET), 3)
    sd2_net.save_pretrained(tmp_path / "sd2")
    sd = sd_scratch.load(tiny_checkpoint["folder"])
    with pytest.raises(CheckpointError, match="made for another model: its level widths .*linear attention projections"):
        sd.load_controlnet(tmp_path / "sd2")


def test_a_file_without_a_controlnet_is_refused(tiny_checkpoint):
    sd = sd_scratch.load(tiny_checkpoint["folder"])
    with pytest.raises(CheckpointError, match="holds no ControlNet"):
        sd.load_controlnet(tiny_checkpoint["single"])


def test_missing_tensors_are_named(sd15_shaped, tmp_path):
    ref, unet_config = sd15_shaped
    compvis = controlnet_state_dict(load_controlnet_from_reference(ref, unet_config), "compvis")
    del compvis["control_model.zero_convs.3.0.weight"]
    save_file(compvis, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*controlnet_down_blocks.3.weight"):
        load_controlnet(tmp_path / "broken.safetensors", unet_config)


def test_a_hint_of_the_wrong_size_is_refused(sd15_shaped):
    ref, unet_config = sd15_shaped
    ours = load_controlnet_from_reference(ref, unet_config)
    x, t, context, _ = inputs()
    with pytest.raises(ValueError, match="must be 64×64"):
        ours(x, t, context, torch.rand(2, 3, 32, 32))


# ---- pipelines ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_nets(tiny_models, tiny_checkpoint, tmp_path_factory):
    """Two reference ControlNets (hint ÷4) for the tiny model, and ours loaded from their folders."""
    sd = sd_scratch.load(tiny_checkpoint["folder"])
    refs, folders = [], []
    for seed in (11, 12):
        refs.append(reference_controlnet(tiny_models["unet"], seed, TINY_HINT_WIDTHS))
        folders.append(tmp_path_factory.mktemp("controlnet") / f"net{seed}")
        refs[-1].save_pretrained(folders[-1])
    return sd, refs, [sd.load_controlnet(f) for f in folders], folders


def reference_control_pipeline(cls, models, folder, scheduler, controlnet):
    from transformers import CLIPTokenizer

    pipe = cls(vae=models["vae"], text_encoder=models["text_encoder"],
               tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=models["unet"],
               controlnet=controlnet, scheduler=reference_scheduler(scheduler), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# (scales, starts, ends, guess_mode) for one or two ControlNets
SETTINGS = {
    "one": ([0.7], [0.2], [0.8], False),
    "two": ([0.7, 1.3], [0.0, 0.3], [0.6, 1.0], False),
    "guess": ([1.2], [0.0], [1.0], True),
}


def controls_for(nets, hints, name):
    scales, starts, ends, guess = SETTINGS[name]
    return [Control(net, hint, scale, start, end, guess) for net, hint, scale, start, end
            in zip(nets, hints, scales, starts, ends)]


def reference_kwargs(refs, hints, name, image_key="image"):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    scales, starts, ends, guess = SETTINGS[name]
    n = len(scales)
    controlnet = refs[0] if n == 1 else MultiControlNetModel(refs[:n])
    kwargs = {image_key: hints[0] if n == 1 else hints[:n], "controlnet_conditioning_scale": scales[0] if n == 1 else scales,
              "control_guidance_start": starts[0] if n == 1 else starts,
              "control_guidance_end": ends[0] if n == 1 else ends, "guess_mode": guess}
    return controlnet, kwargs


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_txt2img_with_controlnets_matches_diffusers(pipeline_nets, tiny_models, tiny_checkpoint, scheduler, name):
    from diffusers import StableDiffusionControlNetPipeline

    sd, refs, nets, _ = pipeline_nets
    hints = [make_image(20), make_image(21)]
    controlnet, kwargs = reference_kwargs(refs, hints, name)
    ref = reference_control_pipeline(StableDiffusionControlNetPipeline, tiny_models, tiny_checkpoint["folder"],
                                     scheduler, controlnet)
    images = sd.txt2img(PROMPTS, NEGATIVE, steps=6, seed=5, scheduler=scheduler, num_images=2, progress=False,
                        control=controls_for(nets, hints, name))
    expected = ref(PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=6, num_images_per_prompt=2,
                   generator=torch.Generator("cpu").manual_seed(5), output_type="np", **kwargs)
    assert images[0].size == (SIZE, SIZE)  # the hint's size, as diffusers takes it
    assert_close_images(as_uint8(images), reference_uint8(expected))


def test_the_controlnet_changes_the_picture(pipeline_nets):
    """A negative control for the parity tests: with the ControlNet, not the plain picture."""
    sd, _, nets, _ = pipeline_nets
    plain = as_uint8(sd.txt2img(PROMPTS[0], steps=4, seed=1, height=SIZE, width=SIZE, progress=False))
    steered = as_uint8(sd.txt2img(PROMPTS[0], steps=4, seed=1, progress=False, control=Control(nets[0], make_image(20))))
    assert np.abs(plain - steered).max() > 20


@pytest.mark.parametrize("name", ["one", "two"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_img2img_with_controlnets_matches_diffusers(pipeline_nets, tiny_models, tiny_checkpoint, scheduler, name):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    sd, refs, nets, _ = pipeline_nets
    hints = [make_image(22), make_image(23)]
    controlnet, kwargs = reference_kwargs(refs, hints, name, "control_image")
    ref = reference_control_pipeline(StableDiffusionControlNetImg2ImgPipeline, tiny_models, tiny_checkpoint["folder"],
                                     scheduler, controlnet)
    image = make_image(4)
    images = sd.img2img(PROMPTS, image, NEGATIVE, strength=0.7, steps=8, seed=3, scheduler=scheduler, num_images=2,
                        progress=False, control=controls_for(nets, hints, name))
    expected = ref(PROMPTS, image=image, negative_prompt=[NEGATIVE] * 2, strength=0.7, num_inference_steps=8,
                   num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(3), output_type="np", **kwargs)
    assert_close_images(as_uint8(images), reference_uint8(expected))


@pytest.fixture(scope="module")
def inpainting_models(tmp_path_factory):
    from tests.reference import make_reference_models, write_diffusers_folder

    models = make_reference_models("tiny", inpainting=True)
    return models, write_diffusers_folder(models, tmp_path_factory.mktemp("inpaint") / "sd")


@pytest.mark.parametrize("channels,strength", [(9, 1.0), (4, 0.75)])
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_inpaint_with_controlnets_matches_diffusers(pipeline_nets, tiny_models, tiny_checkpoint, inpainting_models,
                                                    scheduler, channels, strength):
    from diffusers import StableDiffusionControlNetInpaintPipeline

    _, refs, _, net_folders = pipeline_nets
    models, folder = (tiny_models, tiny_checkpoint["folder"]) if channels == 4 else inpainting_models
    sd = sd_scratch.load(folder)
    hints = [make_image(24), make_image(25)]
    nets = [sd.load_controlnet(f) for f in net_folders]
    controlnet, kwargs = reference_kwargs(refs, hints, "two", "control_image")
    ref = reference_control_pipeline(StableDiffusionControlNetInpaintPipeline, models, folder, scheduler, controlnet)
    image, mask = make_image(3), make_mask()
    images = sd.inpaint(PROMPTS[0], image, mask, NEGATIVE, strength=strength, steps=6, seed=2, scheduler=scheduler,
                        num_images=2, progress=False, control=controls_for(nets, hints, "two"))
    expected = ref(PROMPTS[0], image=image, mask_image=mask, negative_prompt=NEGATIVE, strength=strength,
                   height=SIZE, width=SIZE, num_inference_steps=6, num_images_per_prompt=2,
                   generator=torch.Generator("cpu").manual_seed(2), output_type="np", **kwargs)
    assert_close_images(as_uint8(images), reference_uint8(expected))


@pytest.mark.parametrize("control,message", [
    ("edges.png", "control must be a guidance.Control"),
    ([None], "control must be a guidance.Control"),
])
def test_bad_control_arguments_are_value_errors(pipeline_nets, control, message):
    sd = pipeline_nets[0]
    with pytest.raises(ValueError, match=message):
        sd.txt2img("a", steps=1, control=control, progress=False)


@pytest.mark.parametrize("kwargs,message", [
    (dict(start=0.8, end=0.2), "0 ≤ start < end ≤ 1"),
    (dict(end=1.5), "0 ≤ start < end ≤ 1"),
    (dict(scale=float("nan")), "scale must be a finite number"),
])
def test_bad_control_settings_are_value_errors(pipeline_nets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Control(pipeline_nets[2][0], make_image(), **kwargs)


def test_a_controlnet_whose_hint_encoder_does_not_fit_the_vae_is_refused(pipeline_nets, sd15_shaped):
    sd = pipeline_nets[0]
    net = load_controlnet_from_reference(*sd15_shaped)  # hint ÷8, the tiny VAE ÷4
    with pytest.raises(ValueError, match="shrinks the hint 8 times, the VAE 4 times"):
        sd.txt2img("a", steps=1, progress=False, control=Control(net, make_image()))


# ---- the command line --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builtin_controlnet(tmp_path_factory):
    """A ControlNet for the built-in model (its encoder copied, the rest random: it changes the picture),
    written in lllyasviel's layout, and an outline picture to steer with."""
    from PIL import Image, ImageDraw

    from sd_scratch.training.controlnet import controlnet_from_unet

    folder = tmp_path_factory.mktemp("builtin_controlnet")
    net = controlnet_from_unet(sd_scratch.load())
    for name, tensor in net.named_parameters():
        if name.startswith("controlnet_"):
            torch.nn.init.normal_(tensor, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    save_file(controlnet_state_dict(net, "compvis"), str(folder / "net.safetensors"))
    square = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(square).rectangle([16, 16, 40, 40], fill="white")
    square.save(folder / "square.png")
    return folder


def test_cli_steers_with_a_controlnet_and_canny_edges(builtin_controlnet, tmp_path):
    from PIL import Image

    from sd_scratch.cli import main

    args = ["txt2img", "a red circle", "--steps", "3", "--quiet"]
    control = ["--controlnet", builtin_controlnet / "net.safetensors", "--control-image",
               builtin_controlnet / "square.png", "--canny", "--control-scale", "0.8", "--control-end", "0.9"]
    assert main([str(a) for a in args + ["-o", tmp_path / "plain.png"]]) == 0
    assert main([str(a) for a in args + control + ["-o", tmp_path / "steered.png"]]) == 0
    plain, steered = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("plain", "steered"))
    assert np.abs(plain - steered).max() > 20


@pytest.mark.parametrize("extra,message", [
    (["--control-image", "x.png"], "0 --controlnet and 1 --control-image"),
    (["--controlnet", "net", "--control-image", "a.png", "--control-scale", "1", "--control-scale", "2",
      "--control-scale", "3"], "--control-scale given 3 times for 1 ControlNets"),
    (["--canny"], "--canny without --controlnet"),
    (["--controlnet", "net", "--control-image", "a.png", "--canny", "100"], "--canny takes no thresholds or two"),
])
def test_cli_control_options_are_checked_in_one_line(capsys, extra, message):
    from sd_scratch.cli import main

    assert main(["txt2img", "a red circle", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_bad_control_window_is_one_line(builtin_controlnet, capsys):
    from sd_scratch.cli import main

    status = main(["txt2img", "a", "--controlnet", str(builtin_controlnet / "net.safetensors"), "--control-image",
                   str(builtin_controlnet / "square.png"), "--control-start", "0.9", "--control-end", "0.1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and "0 ≤ start < end ≤ 1" in err[0]
