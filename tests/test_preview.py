"""The preview decoder: TAESD against diffusers' AutoencoderTiny on the same random weights, in both
layouts; the shipped decoder for the built-in model against its VAE; the cheap matrix; refusals."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import sd_scratch
from sd_scratch.addons.preview import (BUILTIN_PREVIEW, SD_V1_CHEAP, TAESDConfig, TAESDDecoder, TAESDEncoder,
                                       cheap_matrix_for, cheap_preview, diffusers_name, load_preview_decoder,
                                       load_taesd_decoder, load_taesd_encoder, official_name)
from sd_scratch.checkpoints.files import CheckpointError
from sd_scratch.training.preview import image_error, vae_decoded, world_latents
from tests.reference import randomize_, rel_err

NARROW = 16
# What the shipped decoder reaches on held-out pictures' latents (scripts/train_preview.py measures
# 512 of them; weights/README.md): bounds with a margin, in uint8 levels of mean |difference| and dB.
SHIPPED_MAX_LEVELS, SHIPPED_MIN_PSNR = 6.5, 23.0  # measured: 4.9 levels, 24.8 dB
CHEAP_MAX_LEVELS = 28.0  # measured: 24.3 levels (SD v1's matrix on these latents: far worse)


def reference_tiny(width: int):
    from diffusers import AutoencoderTiny

    ref = AutoencoderTiny(encoder_block_out_channels=(width,) * 4, decoder_block_out_channels=(width,) * 4)
    return randomize_(ref, seed=width).eval()


def official_layout(ref, part: str) -> dict[str, torch.Tensor]:
    """The reference's `part` in the official taesd_*.pth names, by our inverse map."""
    return {official_name(k)[1]: v for k, v in ref.state_dict().items() if k.startswith(f"{part}.")}


@pytest.fixture(scope="module", params=[64, NARROW], ids=["width-64", f"width-{NARROW}"])
def written(request, tmp_path_factory):
    """One randomised AutoencoderTiny, written as a diffusers folder, as taesd_decoder/encoder.pth and
    as official-layout .safetensors."""
    ref = reference_tiny(request.param)
    root = tmp_path_factory.mktemp(f"taesd{request.param}")
    ref.save_pretrained(root / "folder")
    for part in ("decoder", "encoder"):
        torch.save(official_layout(ref, part), root / f"taesd_{part}.pth")
        save_file({k: v.contiguous() for k, v in official_layout(ref, part).items()}, str(root / f"taesd_{part}.safetensors"))
    return ref, root


def test_the_name_rule_goes_both_ways_and_gives_our_keys():
    ref = reference_tiny(NARROW)
    for name in ref.state_dict():
        assert diffusers_name(*official_name(name)) == name
    assert set(official_layout(ref, "decoder")) == set(TAESDDecoder(TAESDConfig(width=NARROW)).state_dict())
    assert set(official_layout(ref, "encoder")) == set(TAESDEncoder(TAESDConfig(width=NARROW)).state_dict())
    assert official_name("decoder.layers.0.weight") == ("decoder", "1.weight")  # the clamp has no weights
    assert official_name("encoder.layers.2.weight") == ("encoder", "2.weight")


def test_taesd_has_taesds_parameter_count():
    assert sum(p.numel() for p in TAESDDecoder().parameters()) == 1_222_531  # "~1.2 M" (FORMATS.md)


@pytest.mark.parametrize("layout", ["folder", "taesd_{}.pth", "taesd_{}.safetensors"])
@torch.no_grad()
def test_decoder_equals_autoencoder_tiny_decode(written, layout):
    ref, root = written
    decoder = load_taesd_decoder(root / layout.format("decoder"))
    assert decoder.config.width == ref.config.decoder_block_out_channels[0]
    z = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(0))
    ours = decoder(z)
    assert ours.shape == (2, 3, 32, 40)
    assert rel_err(ours, (ref.decode(z).sample + 1) / 2) <= 1e-4  # diffusers returns 2·image − 1


@pytest.mark.parametrize("layout", ["folder", "taesd_{}.pth", "taesd_{}.safetensors"])
@torch.no_grad()
def test_encoder_equals_autoencoder_tiny_encode(written, layout):
    ref, root = written
    encoder = load_taesd_encoder(root / layout.format("encoder"))
    images = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))  # [0, 1]
    ours = encoder(images)
    assert ours.shape == (2, 4, 4, 5)
    assert rel_err(ours, ref.encode(images * 2 - 1).latents) <= 1e-4  # diffusers takes [-1, 1]


@torch.no_grad()
def test_the_preview_decoder_clamps_to_0_1_and_keeps_the_latents_device_and_takes_any_dtype(written):
    _, root = written
    preview = load_preview_decoder(root / "folder")
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2)) * 3
    images = preview(z.half())
    assert images.dtype == torch.float32 and images.shape == (1, 3, 24, 24)
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, preview.network(z.half().float()).clamp(0, 1))
    assert preview.pictures(z)[0].size == (24, 24)


@pytest.fixture(scope="module")
def builtin():
    sd = sd_scratch.load()
    sd.vae.float()
    latents = world_latents(sd.vae, 32, seed=123, held_out=True)
    return sd, latents, vae_decoded(sd.vae, latents)


def test_the_shipped_file_is_small_fp16_in_the_official_layout():
    assert BUILTIN_PREVIEW.stat().st_size <= 0.8e6
    with safe_open(str(BUILTIN_PREVIEW), "pt") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    width = load_taesd_decoder(BUILTIN_PREVIEW).config.width
    assert keys == set(TAESDDecoder(TAESDConfig(width=width)).state_dict())


def test_the_shipped_preview_of_held_out_pictures_is_close_to_the_vaes_decode(builtin):
    sd, latents, reference = builtin
    levels, psnr = image_error(load_preview_decoder()(latents), reference)
    assert levels <= SHIPPED_MAX_LEVELS and psnr >= SHIPPED_MIN_PSNR, (levels, psnr)


def test_the_built_in_models_cheap_matrix_beats_sd_v1s_on_its_latents(builtin):
    sd, latents, reference = builtin
    errors = {m.name: image_error(F.interpolate(cheap_preview(latents, m), scale_factor=8), reference)[0]
              for m in (cheap_matrix_for(sd.family.name), SD_V1_CHEAP)}
    ours, a1111 = errors.values()
    assert ours <= CHEAP_MAX_LEVELS and ours < a1111, errors


def test_cheap_preview_is_the_matrix_per_latent_pixel():
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(3))
    rgb = cheap_preview(z, SD_V1_CHEAP)
    assert rgb.shape == (2, 3, 3, 5)
    m = torch.tensor(SD_V1_CHEAP.matrix)
    assert torch.allclose(rgb[1, :, 2, 4], ((z[1, :, 2, 4] @ m + 1) / 2).clamp(0, 1))
    assert cheap_matrix_for("sd15") is SD_V1_CHEAP


def test_a_vae_given_as_a_preview_decoder_is_refused_in_words(tmp_path):
    for name, key in (("vae.safetensors", "decoder.conv_in.weight"),
                      ("model.safetensors", "first_stage_model.decoder.conv_in.weight")):
        save_file({key: torch.zeros(8, 4, 3, 3)}, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=rf"{name}: is a Stable Diffusion checkpoint or its full VAE"):
            load_preview_decoder(tmp_path / name)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="describes a AutoencoderKL, not an AutoencoderTiny"):
        load_preview_decoder(folder)


def test_files_that_do_not_fit_are_refused_naming_the_tensor(tmp_path):
    tensors = TAESDDecoder(TAESDConfig(width=8)).state_dict()
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != "7.weight"}, r"1 missing, e\.g\. `7\.weight`"),
        "extra": ({**tensors, "20.weight": torch.zeros(1)}, r"1 that it does not have, e\.g\. `20\.weight`"),
        "shape": ({**tensors, "8.conv.2.weight": torch.zeros(8, 4, 3, 3)}, r"`8\.conv\.2\.weight` is \(8, 4, 3, 3\)"),
        "stray": ({**tensors, "ema.decay": torch.zeros(1)}, r"1 tensors are no part of a TAESD decoder, e\.g\. `ema\.decay`"),
        "other": ({"text.weight": torch.zeros(1)}, r"holds no TAESD tensors"),
    }
    for case, (state, message) in cases.items():
        save_file(state, str(tmp_path / f"{case}.safetensors"))
        with pytest.raises(CheckpointError, match=rf"{case}\.safetensors: .*{message}"):
            load_taesd_decoder(tmp_path / f"{case}.safetensors")
    save_file(TAESDEncoder(TAESDConfig(width=8)).state_dict(), str(tmp_path / "taesd_encoder.safetensors"))
    with pytest.raises(CheckpointError, match="is a TAESD encoder .*; a TAESD decoder was asked for"):
        load_taesd_decoder(tmp_path / "taesd_encoder.safetensors")


def test_a_diffusers_folder_with_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny",
                                                      "num_decoder_blocks": [1, 1, 1, 1]}))
    with pytest.raises(CheckpointError, match=r"num_decoder_blocks = \[1, 1, 1, 1\]; TAESD's layers need \[3, 3, 3, 1\]"):
        load_taesd_decoder(tmp_path)


def test_latents_of_the_wrong_shape_are_refused():
    preview = load_preview_decoder()
    with pytest.raises(ValueError, match=r"latents of shape \(B, 4, h, w\); got \(1, 3, 8, 8\)"):
        preview(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\); got \(4, 8, 8\)"):
        cheap_preview(torch.zeros(4, 8, 8))


def test_the_cli_writes_previews_close_to_the_final_picture(tmp_path):
    """`--preview 2`: steps 2 and 4 of 4 written beside the output; the last step's x̂₀, through the
    shipped preview decoder, is close to the VAE's final picture (the decoder's measured error)."""
    from sd_scratch.cli import main

    out = tmp_path / "out.png"
    assert main(["txt2img", "a red circle", "--steps", "4", "--quiet", "--preview", "2", "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-step2.png", "out-step4.png", "out.png"]
    final = np.asarray(Image.open(out), dtype=np.float32)
    last = np.asarray(Image.open(tmp_path / "out-step4.png"), dtype=np.float32)
    assert last.shape == final.shape and np.abs(last - final).mean() < 12


def test_the_cli_preview_of_another_model_uses_the_cheap_matrix(tiny_checkpoint, tmp_path):
    from sd_scratch.cli import main

    out = tmp_path / "out.png"
    assert main(["txt2img", "a", "--checkpoint", str(tiny_checkpoint["folder"]), "--height", "32", "--width", "32",
                 "--steps", "2", "--quiet", "--preview", "1", "-o", str(out)]) == 0
    assert Image.open(tmp_path / "out-step1.png").size == (32, 32)
