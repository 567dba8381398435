"""SD 2.x's parts against the reference libraries on the same random weights (tiny configurations)."""
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sd_scratch
from sd_scratch.attention import attention
from sd_scratch.checkpoints.rules import convert, original_unet_shape, unet_rules
from sd_scratch.unet import UNet, UNetConfig
from tests.reference import (SD15_SCHEDULER, SD15_SCHEDULER_CONFIG, TINY_SD2_TEXT, TINY_SD2_UNET, TINY_VAE,
                             make_text_encoder, make_unet, make_vae, rel_err, sd2_single_file_layout,
                             write_diffusers_folder)
from tests.test_pipelines import NEGATIVE, SIZE, as_uint8, assert_close_images, make_image, reference_uint8


@pytest.fixture(scope="module")
def sd2_unet():
    return make_unet(TINY_SD2_UNET)


def unet_inputs(width: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 1]), torch.randn(2, 77, width, generator=g)


def test_the_sd2_unet_equals_diffusers_from_its_config(sd2_unet):
    config = UNetConfig.from_diffusers_config(dict(sd2_unet.config))
    assert (config.heads, config.linear_projection, config.upcast_attention) == ((1, 2, 2), True, True)
    ours = UNet(config).eval()
    ours.load_state_dict(sd2_unet.state_dict(), strict=True)
    x, t, context = unet_inputs(128)
    with torch.no_grad():
        assert rel_err(ours(x, t, context), sd2_unet(x, t, context).sample) <= 1e-4


def test_the_sd2_unet_is_read_off_its_single_file_tensors(sd2_unet):
    """A single file records neither heads nor upcasting: the family's 64-wide heads give 1/2/2."""
    config = UNetConfig.from_state_dict(sd2_unet.state_dict(), head_dim=64, upcast_attention=True)
    assert config == UNetConfig.from_diffusers_config(dict(sd2_unet.config))
    rules = unet_rules(len(config.channels), config.layers_per_level, config.attention_levels)
    original = convert(sd2_unet.state_dict(), rules, "original")
    assert original["input_blocks.1.1.proj_in.weight"].ndim == 2  # Linear in the CompVis file too
    assert original_unet_shape(original) == (3, 2, (True, True, False))
    back = convert(original, rules, "ours")
    assert all(torch.equal(back[k], v) for k, v in sd2_unet.state_dict().items())


def test_upcast_attention_stays_finite_where_fp16_overflows():
    """q·kᵀ of 4e3-sized entries over 64 dims is ~1e9: beyond fp16's 65504, so plain fp16 attention
    gives inf/NaN; upcast computes it in fp32 and returns fp16."""
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 1, 16, 64, generator=g) * 4e3).half()
    k, v = q.clone(), torch.randn(1, 1, 16, 64, generator=g).half()
    scores = (q.float() @ k.float().transpose(-1, -2)) / 8
    assert scores.abs().max() > torch.finfo(torch.float16).max
    plain = (torch.softmax((q @ k.transpose(-1, -2)) / 8, dim=-1) @ v)  # fp16 arithmetic throughout
    assert not torch.isfinite(plain).all()
    up = attention(q, k, v, upcast=True)
    assert up.dtype == torch.float16 and torch.isfinite(up).all()
    assert rel_err(up.float(), attention(q.float(), k.float(), v.float())) <= 5e-3


# ---- whole SD 2.x checkpoints, both layouts ----------------------------------------------------

PROMPTS = ["a red circle at the top left", "an astronaut riding a horse, on the moon"]


@pytest.fixture(scope="module")
def sd2_models(sd2_unet):
    return {"unet": sd2_unet, "vae": make_vae(TINY_VAE), "text_encoder": make_text_encoder(TINY_SD2_TEXT)}


@pytest.fixture(scope="module")
def sd2_files(sd2_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    write_diffusers_folder(sd2_models, root / "v-folder", scheduler=dict(SD15_SCHEDULER, prediction_type="v_prediction"))
    write_diffusers_folder(sd2_models, root / "base-folder")
    save_file(sd2_single_file_layout(sd2_models), str(root / "v2-1_768-ema-pruned.safetensors"))
    return root


def check_sd2_parity(model, models):
    assert model.tokenizer.pad_id == 0  # OpenCLIP pads with 0
    ids = model.tokenizer(PROMPTS)
    assert ids[0, -1] == 0
    x, t, context = unet_inputs(128)
    with torch.no_grad():
        assert rel_err(model.text_encoder(ids), models["text_encoder"](ids).last_hidden_state) <= 1e-4
        assert rel_err(model.unet(x, t, context), models["unet"](x, t, context).sample) <= 1e-4


def test_an_sd2_diffusers_folder_loads_with_its_scheduler_saying_v_or_epsilon(sd2_files, sd2_models):
    v = sd_scratch.load(sd2_files / "v-folder")
    assert (v.family.name, v.prediction_type, v.native_resolution) == ("sd2-v", "v_prediction", 768)
    assert any("scheduler/scheduler_config.json" in n for n in v.report.notes)
    check_sd2_parity(v, sd2_models)
    base = sd_scratch.load(sd2_files / "base-folder")
    assert (base.family.name, base.prediction_type, base.native_resolution) == ("sd2", "epsilon", 512)


def test_an_sd2_single_file_keeps_all_blocks_and_reads_the_penultimate(sd2_files, sd2_models):
    model = sd_scratch.load(sd2_files / "v2-1_768-ema-pruned.safetensors", prediction_type="v_prediction")
    assert model.family.name == "sd2-v" and any("given as prediction_type" in n for n in model.report.notes)
    cfg = model.text_encoder.config
    assert (cfg.layers, cfg.layers_used, cfg.activation) == (3, 2, "gelu")  # 3 blocks kept, 2 read
    assert model.unet.config.heads == (1, 2, 2) and model.unet.config.upcast_attention
    check_sd2_parity(model, sd2_models)


def test_an_sd2_single_file_written_back_is_the_same_file(sd2_files, tmp_path):
    path = sd2_files / "v2-1_768-ema-pruned.safetensors"
    model = sd_scratch.load(path, prediction_type="epsilon")
    sd_scratch.save_single_file(model, tmp_path / "again.safetensors")
    original, again = load_file(path), load_file(tmp_path / "again.safetensors")
    kept = {k for k in original if not k.startswith(("betas", "alphas", "sqrt_", "logvar", "model_ema."))}
    assert kept == set(again)
    assert all(torch.equal(original[k], again[k]) for k in kept)


def test_diffusers_reads_our_openclip_layout_back(sd2_files, sd2_models):
    """Our inverse map against diffusers' own single-file converter: every tensor bit-equal."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    checkpoint = load_file(sd2_files / "v2-1_768-ema-pruned.safetensors")
    converted = convert_open_clip_checkpoint(sd2_models["text_encoder"], checkpoint)
    expected = sd2_models["text_encoder"].state_dict()
    shared = [k for k in expected if k in converted]
    assert len(shared) == len([k for k in expected if not k.endswith("position_ids")])
    assert all(torch.equal(converted[k], expected[k]) for k in shared)


def test_save_single_file_from_an_sd2_folder_is_read_back_by_diffusers_converters(sd2_files, sd2_models, tmp_path):
    """An SD 2.x folder written as a single file by us: diffusers' own converters read every UNet and
    text-encoder tensor back bit-equal (the folder has 23 blocks, so the file has them all)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    sd_scratch.save_single_file(sd_scratch.load(sd2_files / "v-folder"), tmp_path / "from-folder.safetensors")
    checkpoint = load_file(tmp_path / "from-folder.safetensors")
    unet = convert_ldm_unet_checkpoint(checkpoint, dict(sd2_models["unet"].config))
    text = convert_open_clip_checkpoint(sd2_models["text_encoder"], checkpoint)
    for part, converted in (("unet", unet), ("text_encoder", text)):
        ref = {k: v for k, v in sd2_models[part].state_dict().items() if not k.endswith("position_ids")}
        assert set(ref) <= set(converted), part
        assert all(torch.equal(converted[k], ref[k]) for k in ref), part


def test_a_yaml_beside_the_file_says_v(sd2_files, tmp_path):
    path = tmp_path / "v2-1_768-ema-pruned.safetensors"
    path.write_bytes((sd2_files / path.name).read_bytes())
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    model = sd_scratch.load(path)
    assert model.prediction_type == "v_prediction"
    assert any("v2-1_768-ema-pruned.yaml" in n for n in model.report.notes)
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert sd_scratch.load(path).prediction_type == "epsilon"  # a yaml without parameterization: ε


def test_with_nothing_to_say_the_probe_guesses_and_says_so(sd2_files):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sd_scratch.load(sd2_files / "v2-1_768-ema-pruned.safetensors")
    assert model.prediction_type in ("epsilon", "v_prediction")
    assert any("probe" in str(w.message) for w in caught)
    assert any("guessed" in n for n in model.report.notes)


# ---- the pipelines on SD 2.x: ε and v ----------------------------------------------------------

SD2_SAMPLERS = ["ddim", "pndm", "euler", "euler_a", "dpmpp_2m"]
DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
                        "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def sd2_reference(cls_name: str, models, folder, scheduler: str, prediction_type: str):
    import diffusers
    from transformers import CLIPTokenizer

    # SD 2's tokenizer_config.json pads with "!", id 0, as OpenCLIP does
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", pad_token="!")
    config = dict(SD15_SCHEDULER_CONFIG, prediction_type=prediction_type)
    pipe = getattr(diffusers, cls_name)(
        vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer, unet=models["unet"],
        scheduler=getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler]).from_config(config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# PLMS on a v-model: the original SD 2 code (ldm PLMSSampler) turns each UNet output into ε at its
# own x and t, and so does guidance.UNetCall; diffusers' PNDMScheduler converts the Adams–Bashforth
# mix of past v's at the current step's x and ᾱ instead, a different sampler (47 levels apart here).
PLMS_V = "diffusers' PNDM converts the multistep mix of v's, not each v (the original SD 2 PLMS converts each)"
CASES = [pytest.param(s, p, marks=pytest.mark.skip(reason=PLMS_V)) if (s, p) == ("pndm", "v_prediction")
         else (s, p) for s in SD2_SAMPLERS for p in ("v_prediction", "epsilon")]


@pytest.mark.parametrize("scheduler,prediction_type", CASES)
def test_sd2_txt2img_and_img2img_match_diffusers(sd2_files, sd2_models, scheduler, prediction_type):
    folder = sd2_files / ("v-folder" if prediction_type == "v_prediction" else "base-folder")
    ours = sd_scratch.load(folder)
    assert ours.prediction_type == prediction_type
    ref = sd2_reference("StableDiffusionPipeline", sd2_models, folder, scheduler, prediction_type)
    images = ours.txt2img(PROMPTS, NEGATIVE, height=SIZE, width=SIZE, steps=6, seed=5, scheduler=scheduler,
                          progress=False)
    expected = ref(PROMPTS, negative_prompt=[NEGATIVE] * 2, height=SIZE, width=SIZE, num_inference_steps=6,
                   generator=torch.Generator("cpu").manual_seed(5), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))

    ref = sd2_reference("StableDiffusionImg2ImgPipeline", sd2_models, folder, scheduler, prediction_type)
    image = make_image()
    images = ours.img2img(PROMPTS[0], image, NEGATIVE, strength=0.6, steps=8, seed=11, scheduler=scheduler,
                          progress=False)
    expected = ref(PROMPTS[0], image=image, negative_prompt=NEGATIVE, strength=0.6, num_inference_steps=8,
                   generator=torch.Generator("cpu").manual_seed(11), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))


# ---- training a v-model ----------------------------------------------------------------------

def test_the_v_target_is_diffusers_velocity_and_undoes_eps_from_v():
    from diffusers import DDPMScheduler

    from sd_scratch.guidance import eps_from_v
    from sd_scratch.noise_schedule import add_noise, alpha_bars
    from sd_scratch.training.losses import velocity

    g = torch.Generator().manual_seed(7)
    x0, eps = torch.randn(2, 3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    alpha_bar_t = alpha_bars()[t][:, None, None, None]
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert rel_err(velocity(x0, eps, alpha_bar_t), reference.get_velocity(x0, eps, t)) <= 1e-6
    x_t = add_noise(x0, eps, alpha_bar_t)
    assert rel_err(eps_from_v(x_t, velocity(x0, eps, alpha_bar_t), alpha_bar_t), eps) <= 1e-5


def test_the_training_loss_takes_a_prediction_type():
    from sd_scratch.noise_schedule import add_noise, alpha_bars
    from sd_scratch.text_encoder import CLIPTextEncoder, TextEncoderConfig
    from sd_scratch.training.losses import DiffusionLoss

    unet = UNet(UNetConfig(channels=(32, 64), attention_levels=(True, False), layers_per_level=1, context_dim=64))
    text = CLIPTextEncoder(TextEncoderConfig(width=64, layers=1, heads=1, mlp_width=128))
    x0, ids = torch.randn(2, 4, 8, 8), torch.zeros(2, 77, dtype=torch.long)
    loss = DiffusionLoss(text, unet, prediction_type="v_prediction")(x0, ids, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # the loss's draws, in its order: t, then ε
    t = torch.randint(0, 1000, (2,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    alpha_bar_t = alpha_bars()[t][:, None, None, None]
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(unet(add_noise(x0, eps, alpha_bar_t), t, text(ids)),
                                                alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0)
    assert rel_err(loss.detach(), expected) <= 1e-5
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionLoss(text, unet, prediction_type="x0")


def test_the_cli_takes_a_prediction_type(sd2_files, tmp_path, capsys):
    from PIL import Image

    from sd_scratch.cli import main

    out = tmp_path / "v.png"
    assert main(["txt2img", "a red circle", "--checkpoint", str(sd2_files / "v2-1_768-ema-pruned.safetensors"),
                 "--prediction-type", "v_prediction", "--height", "32", "--width", "32", "--steps", "2", "--quiet",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    assert "Model: v2-1_768-ema-pruned" in Image.open(out).text["parameters"]
    assert main(["txt2img", "a", "--prediction-type", "x0", "-o", str(out)]) == 2
    assert "prediction-type" in capsys.readouterr().err


# ---- full SD 2.x sizes -------------------------------------------------------------------------

@pytest.mark.full_size
def test_full_size_sd2_single_file_loads_and_matches_the_references():
    """At the real SD 2.x sizes: the official parameter counts, and each part's output equal to the
    reference's, through the single-file layout (24 OpenCLIP blocks, 23 read)."""
    from sd_scratch.checkpoints.load import from_single_file_state_dict
    from tests.reference import SD2_PARAMETERS, SD2_TEXT, SD2_UNET, SD15_VAE

    models = {"unet": make_unet(SD2_UNET), "vae": make_vae(SD15_VAE), "text_encoder": make_text_encoder(SD2_TEXT)}
    assert sum(p.numel() for p in models["unet"].parameters()) == SD2_PARAMETERS["unet"]
    assert sum(p.numel() for p in models["text_encoder"].parameters()) == SD2_PARAMETERS["text_encoder"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unexpected, nothing non-finite
        model = from_single_file_state_dict(sd2_single_file_layout(models), prediction_type="v_prediction")
    assert (model.family.name, model.native_resolution) == ("sd2-v", 768)
    assert sum(p.numel() for p in model.unet.parameters()) == SD2_PARAMETERS["unet"]
    read = [p for name, p in model.text_encoder.named_parameters()
            if not name.startswith(("encoder.layers.23.", "text_projection", "logit_scale"))]
    assert sum(p.numel() for p in read) == SD2_PARAMETERS["text_encoder"]
    ids = model.tokenizer(PROMPTS)
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 1]), torch.randn(2, 77, 1024, generator=g)
    with torch.no_grad():
        assert rel_err(model.text_encoder(ids), models["text_encoder"](ids).last_hidden_state) <= 1e-4
        assert rel_err(model.unet(x, t, context), models["unet"](x, t, context).sample) <= 1e-4


# ---- beyond stock 2.x: zero terminal SNR, trailing spacing, guidance rescale ------------------

ZERO_SNR_SAMPLERS = ["ddpm", "ddim", "euler", "euler_a", "dpmpp_2m"]  # diffusers' classes with the option


@pytest.mark.parametrize("name", ZERO_SNR_SAMPLERS)
@pytest.mark.parametrize("steps", (1, 7, 25, 50))
def test_zero_terminal_snr_schedules_equal_diffusers(name, steps):
    import diffusers

    from sd_scratch.samplers import SIGMA_SAMPLERS, make_sampler

    cls = {"ddpm": "DDPMScheduler", **DIFFUSERS_SCHEDULERS}[name]
    ref = getattr(diffusers, cls).from_config(dict(SD15_SCHEDULER_CONFIG, rescale_betas_zero_snr=True,
                                                   timestep_spacing="trailing"))
    ref.set_timesteps(steps)
    ours = make_sampler(name, steps, spacing="trailing", zero_terminal_snr=True)
    assert torch.equal(ours.alpha_bar, ref.alphas_cumprod)
    assert torch.equal(ours.timesteps, ref.timesteps)
    if name in SIGMA_SAMPLERS:
        assert torch.equal(ours.sigmas, ref.sigmas)
        assert ours.init_noise_sigma == float(ref.init_noise_sigma)
    if name in ("ddpm", "ddim"):
        assert ours.alpha_bar[999] == 0 and ours.timesteps[0] == 999  # the first step is pure noise


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_zero_snr_trailing_and_guidance_rescale_match_diffusers(sd2_files, sd2_models, scheduler):
    import diffusers
    from transformers import CLIPTokenizer

    folder = sd2_files / "v-folder"
    ours = sd_scratch.load(folder)
    config = dict(SD15_SCHEDULER_CONFIG, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                  timestep_spacing="trailing")
    ref = diffusers.StableDiffusionPipeline(
        vae=sd2_models["vae"], text_encoder=sd2_models["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", pad_token="!"), unet=sd2_models["unet"],
        scheduler=getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler]).from_config(config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    images = ours.txt2img(PROMPTS, NEGATIVE, height=SIZE, width=SIZE, steps=6, seed=3, scheduler=scheduler,
                          spacing="trailing", zero_terminal_snr=True, guidance_rescale=0.7, progress=False)
    expected = ref(PROMPTS, negative_prompt=[NEGATIVE] * 2, height=SIZE, width=SIZE, num_inference_steps=6,
                   guidance_rescale=0.7, generator=torch.Generator("cpu").manual_seed(3), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))
    plain = ours.txt2img(PROMPTS, NEGATIVE, height=SIZE, width=SIZE, steps=6, seed=3, scheduler=scheduler,
                         spacing="trailing", zero_terminal_snr=True, progress=False)
    assert np.abs(as_uint8(plain) - reference_uint8(expected)).max() > 2  # the rescale is seen, not lost
    fields = images[0].info["parameters"]
    assert "CFG rescale: 0.7" in fields and "Zero terminal SNR: True" in fields and "Timestep spacing: trailing" in fields


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_sd2_inpainting_matches_diffusers(sd2_models, tmp_path, scheduler):
    from tests.test_pipelines import make_mask

    models = dict(sd2_models, unet=make_unet(dict(TINY_SD2_UNET, in_channels=9), seed=4))
    folder = write_diffusers_folder(models, tmp_path / "sd2-inpainting")
    ours = sd_scratch.load(folder)
    assert (ours.family.name, ours.prediction_type) == ("sd2-inpainting", "epsilon")
    ref = sd2_reference("StableDiffusionInpaintPipeline", models, folder, scheduler, "epsilon")
    image, mask = make_image(3), make_mask()
    images = ours.inpaint(PROMPTS[0], image, mask, NEGATIVE, steps=6, seed=2, scheduler=scheduler, progress=False)
    expected = ref(PROMPTS[0], image=image, mask_image=mask, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                   num_inference_steps=6, generator=torch.Generator("cpu").manual_seed(2), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))
