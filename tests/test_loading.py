"""`sd_scratch.load` reads both official layouts to the same tensors, matches the references, and
fails loudly on every safety and fidelity case of the official files."""
import copy
import sys
import types
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import sd_scratch
from sd_scratch.checkpoints.files import CheckpointError
from sd_scratch.checkpoints.load import from_single_file_state_dict
from tests.reference import (SD15_PARAMETERS, make_reference_models, rel_err, single_file_layout,
                             write_diffusers_folder)

PARTS = ("unet", "vae", "text_encoder")


def reference_state_dict(models: dict, part: str) -> dict[str, torch.Tensor]:
    """The reference part's tensors under our names (= diffusers names; CLIP without `text_model.`)."""
    return {k.removeprefix("text_model."): v for k, v in models[part].state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def check_parity(model, models, tol=1e-4) -> None:
    """Each loaded part against its reference on the same inputs."""
    unet_ref, vae_ref, text_ref = models["unet"], models["vae"], models["text_encoder"]
    g = torch.Generator().manual_seed(0)
    c_in, width = unet_ref.config.in_channels, text_ref.config.hidden_size
    x, context = torch.randn(2, c_in, 8, 8, generator=g), torch.randn(2, 77, width, generator=g)
    t = torch.tensor([999, 1])
    ids = model.tokenizer(["a red circle at the top left", "an astronaut riding a horse, on the moon"])
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        assert rel_err(model.unet(x, t, context), unet_ref(x, t, context).sample) <= tol
        assert rel_err(model.text_encoder(ids), text_ref(ids).last_hidden_state) <= tol
        ours, ref = model.vae.encode(images), vae_ref.encode(images).latent_dist
        assert rel_err(ours.mean, ref.mean) <= tol and rel_err(ours.logvar, ref.logvar) <= tol
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert rel_err(model.vae.decode(z), vae_ref.decode(z).sample) <= tol


# ---- both layouts ---------------------------------------------------------------------------------

def test_both_layouts_load_to_identical_tensors(tiny_checkpoint, tiny_models):
    from_folder = sd_scratch.load(tiny_checkpoint["folder"])
    from_file = sd_scratch.load(tiny_checkpoint["single"])
    assert from_folder.report.layout == "diffusers-folder" and from_file.report.layout == "single-file"
    for part in PARTS:
        assert_same_tensors(getattr(from_folder, part).state_dict(), getattr(from_file, part).state_dict())
        assert_same_tensors(getattr(from_file, part).state_dict(), reference_state_dict(tiny_models, part))


@pytest.mark.parametrize("layout", ["folder", "single"])
def test_loaded_parts_match_the_references(tiny_checkpoint, tiny_models, layout):
    check_parity(sd_scratch.load(tiny_checkpoint[layout]), tiny_models)


def test_the_official_single_file_extras_are_reported_as_ignored(tiny_checkpoint):
    report = sd_scratch.load(tiny_checkpoint["single"]).report
    for key in ("betas", "alphas_cumprod", "model_ema.decay", "cond_stage_model.transformer.text_model.embeddings.position_ids"):
        assert key in report.ignored
    assert "ignored" in str(report)


def check_round_trip_through_diffusers_converter(models):
    """Our inverse key map writes a file that diffusers' own original->diffusers converter reads back
    to the very same tensors."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    checkpoint = single_file_layout(models)
    unet = convert_ldm_unet_checkpoint(checkpoint, dict(models["unet"].config))
    vae = convert_ldm_vae_checkpoint(checkpoint, dict(models["vae"].config))
    text = convert_ldm_clip_checkpoint(checkpoint)
    for part, converted in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        ref = models[part].state_dict()
        converted = {k: v for k, v in converted.items() if k in ref or not k.endswith("position_ids")}
        assert converted.keys() == ref.keys(), part
        for k in ref:  # bit-equal, same shape
            assert converted[k].shape == ref[k].shape and torch.equal(converted[k], ref[k]), (part, k)


def test_inverse_key_map_round_trips_through_the_diffusers_converter(tiny_models):
    check_round_trip_through_diffusers_converter(tiny_models)


def test_save_single_file_round_trip(tiny_checkpoint, tmp_path):
    model = sd_scratch.load(tiny_checkpoint["folder"])
    sd_scratch.save_single_file(model, tmp_path / "ours.safetensors")
    again = sd_scratch.load(tmp_path / "ours.safetensors")
    for part in PARTS:
        assert_same_tensors(getattr(model, part).state_dict(), getattr(again, part).state_dict())


def test_the_9_channel_inpainting_unet_loads_in_both_layouts(tmp_path):
    models = make_reference_models("tiny", inpainting=True)
    write_diffusers_folder(models, tmp_path / "inpaint")
    save_file(single_file_layout(models), str(tmp_path / "inpaint.safetensors"))
    for path in (tmp_path / "inpaint", tmp_path / "inpaint.safetensors"):
        model = sd_scratch.load(path)
        assert model.unet.config.in_channels == 9
        assert model.family.name == "sd1-inpainting" and model.native_resolution == 512
        check_parity(model, models)


def test_fp16_variant_files(tiny_models, tmp_path):
    half = {part: copy.deepcopy(m).half() for part, m in tiny_models.items()}
    write_diffusers_folder(half, tmp_path / "sd", variant="fp16")
    assert (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    model = sd_scratch.load(tmp_path / "sd", variant="fp16")
    assert model.dtype == torch.float32  # fp16 files, cast to the dtype asked for
    expected = {k: v.float() for k, v in reference_state_dict(half, "unet").items()}
    assert_same_tensors(model.unet.state_dict(), expected)
    without_variant = sd_scratch.load(tmp_path / "sd")  # only fp16 files: used, and said so
    assert any("fp16" in note for note in without_variant.report.notes)


def test_a_folder_of_bin_files(tiny_models, tmp_path):
    """Older diffusers folders hold pickled `diffusion_pytorch_model.bin` / `pytorch_model.bin`."""
    write_diffusers_folder(tiny_models, tmp_path / "sd", safe_serialization=False)
    assert (tmp_path / "sd" / "text_encoder" / "pytorch_model.bin").is_file()
    model = sd_scratch.load(tmp_path / "sd")
    for part in PARTS:
        assert_same_tensors(getattr(model, part).state_dict(), reference_state_dict(tiny_models, part))


def test_dtype_argument(tiny_checkpoint):
    half = sd_scratch.load(tiny_checkpoint["single"], dtype="fp16")
    assert half.unet.conv_in.weight.dtype == half.text_encoder.final_layer_norm.weight.dtype == torch.float16
    assert half.vae.decoder.conv_out.weight.dtype == torch.float32  # the fp16 SD VAE decodes NaN
    assert sd_scratch.load(tiny_checkpoint["single"], dtype="fp16", vae_dtype="fp16").vae.decoder.conv_out.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        sd_scratch.load(tiny_checkpoint["single"], dtype="int8")


def test_pre_0_14_diffusers_vae_attention_names(tiny_checkpoint, tiny_models, tmp_path):
    import shutil
    folder = tmp_path / "old"
    shutil.copytree(tiny_checkpoint["folder"], folder)
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    sd = {}
    for k, v in load_file(vae_file).items():
        for new, old in old_names.items():
            k = k.replace("attentions.0." + new, "attentions.0." + old)
        sd[k] = v
    assert any(".query." in k for k in sd)
    save_file(sd, str(vae_file))
    model = sd_scratch.load(folder)
    assert_same_tensors(model.vae.state_dict(), reference_state_dict(tiny_models, "vae"))
    assert any("query/key/value" in note for note in model.report.notes)


# ---- safety --------------------------------------------------------------------------------------

def test_lightning_ckpt_loads(tiny_models, tmp_path, monkeypatch):
    """Official .ckpt files pickle the Lightning ModelCheckpoint class; it is stubbed, not imported."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = ModelCheckpoint
    with monkeypatch.context() as m:
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
            m.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
        torch.save({"state_dict": single_file_layout(tiny_models), "epoch": 6, "global_step": 470000,
                    "pytorch-lightning_version": "1.4.2",
                    "callbacks": {ModelCheckpoint: {"best_model_score": None}}}, tmp_path / "sd-v1-4.ckpt")
    assert "pytorch_lightning" not in sys.modules
    model = sd_scratch.load(tmp_path / "sd-v1-4.ckpt")
    assert_same_tensors(model.unet.state_dict(), reference_state_dict(tiny_models, "unet"))
    assert "callbacks" in str(model.report)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors"])
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, name):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload(marker)}, tmp_path / name)
    with pytest.raises(CheckpointError, match=rf"{name}.*not allowed"):
        sd_scratch.load(tmp_path / name)
    assert not marker.exists()


def test_truncated_file(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint["single"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        sd_scratch.load(tmp_path / "cut.safetensors")


def test_git_lfs_pointer(tmp_path):
    (tmp_path / "v1-5-pruned-emaonly.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 4265380512\n")
    with pytest.raises(CheckpointError, match=r"v1-5-pruned-emaonly\.safetensors.*git-lfs pointer"):
        sd_scratch.load(tmp_path / "v1-5-pruned-emaonly.safetensors")


# ---- fidelity ------------------------------------------------------------------------------------

def write(sd: dict, path) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_a_missing_tensor_is_an_error_naming_it(tiny_models, tmp_path):
    sd = single_file_layout(tiny_models)
    del sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*model\.diffusion_model\.input_blocks\.1\.1\.proj_in\.weight"):
        sd_scratch.load(write(sd, tmp_path / "m.safetensors"))


def test_an_unknown_tensor_is_an_error_unless_not_strict(tiny_models, tmp_path):
    sd = single_file_layout(tiny_models)
    sd["model.diffusion_model.lora_up.weight"] = torch.zeros(2, 2)
    path = write(sd, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"lora_up\.weight.*strict=False"):
        sd_scratch.load(path)
    with pytest.warns(UserWarning, match="lora_up"):
        model = sd_scratch.load(path, strict=False)
    assert "model.diffusion_model.lora_up.weight" in model.report.ignored


def with_ema(tiny_models) -> tuple[dict, dict]:
    """A file like v1-5-pruned.ckpt: raw UNet weights plus a different EMA copy under LitEma's names."""
    sd = single_file_layout(tiny_models)
    ema = {}
    for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
        ema_name = "model_ema.diffusion_model" + k.removeprefix("model.diffusion_model.").replace(".", "")
        ema[k] = sd[ema_name] = sd[k] + 1.0
    return sd, ema


def test_ema_weights_are_an_explicit_choice_defaulting_to_ema(tiny_models, tmp_path):
    sd, ema = with_ema(tiny_models)
    path = write(sd, tmp_path / "pruned.safetensors")
    default = sd_scratch.load(path)
    assert torch.equal(default.unet.conv_in.weight, ema["model.diffusion_model.input_blocks.0.0.weight"])
    assert any("EMA copy" in n for n in default.report.notes)
    assert "model.diffusion_model.input_blocks.0.0.weight" in default.report.ignored
    raw = sd_scratch.load(path, use_ema=False)
    assert torch.equal(raw.unet.conv_in.weight, sd["model.diffusion_model.input_blocks.0.0.weight"])
    assert "model_ema.diffusion_modelinput_blocks00weight" in raw.report.ignored


def test_an_incomplete_ema_copy_is_an_error(tiny_models, tmp_path):
    sd, _ = with_ema(tiny_models)
    del sd["model_ema.diffusion_modelout2weight"]
    with pytest.raises(CheckpointError, match=r"model_ema\.diffusion_modelout2weight.*use_ema=False"):
        sd_scratch.load(write(sd, tmp_path / "e.safetensors"))


def test_float_position_ids_are_ignored_and_rebuilt(tiny_models, tmp_path):
    sd = single_file_layout(tiny_models)
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    sd[key] = torch.arange(77, dtype=torch.float32)[None] + 0.4  # as some merges leave them
    model = sd_scratch.load(write(sd, tmp_path / "merged.safetensors"))
    assert key in model.report.ignored and any("float32" in n for n in model.report.notes)
    ids = model.tokenizer("a photo of a cat")
    with torch.no_grad():
        assert rel_err(model.text_encoder(ids), tiny_models["text_encoder"](ids).last_hidden_state) <= 1e-6


def test_non_finite_weights_are_reported(tiny_models, tmp_path):
    sd = single_file_layout(tiny_models)
    sd["first_stage_model.decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"NaN or Inf.*first_stage_model\.decoder\.conv_out\.weight"):
        model = sd_scratch.load(write(sd, tmp_path / "nan.safetensors"))
    assert any("decoder.conv_out.weight" in n for n in model.report.notes)


def test_parts_that_do_not_belong_together_are_refused(tiny_models, tmp_path):
    """A UNet reading a 1024-wide text next to a 128-wide CLIP text encoder."""
    sd = single_file_layout(tiny_models)
    for key in [k for k in sd if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]:
        sd[key] = torch.randn(sd[key].shape[0], 1024)
    with pytest.raises(CheckpointError, match=r"renamed\.ckpt: .*1024-wide text context .* 128 wide"):
        sd_scratch.load(write(sd, tmp_path / "renamed.ckpt"), strict=False)


def test_an_sdxl_file_is_refused_in_words(tiny_models, tmp_path):
    sd = single_file_layout(tiny_models)
    sd["conditioner.embedders.1.model.token_embedding.weight"] = torch.zeros(49408, 8)
    with pytest.raises(CheckpointError, match=r"sd_xl_base\.safetensors: it is an SDXL checkpoint"):
        sd_scratch.load(write(sd, tmp_path / "sd_xl_base.safetensors"))


def test_a_file_without_all_three_parts_is_refused(tiny_models, tmp_path):
    sd = {k: v for k, v in single_file_layout(tiny_models).items() if k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match=r"vae-only\.safetensors.*no UNet"):
        sd_scratch.load(write(sd, tmp_path / "vae-only.safetensors"))


def test_a_folder_that_is_not_a_diffusers_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json"):
        sd_scratch.load(tmp_path)


# ---- full SD v1.5 sizes --------------------------------------------------------------------------

@pytest.mark.full_size
def test_full_size_sd15_single_file_loads_and_matches_the_references():
    """At the real SD v1.5 sizes: the single-file layout, through our loader, gives parts with the
    official parameter counts whose outputs equal diffusers'/transformers' on the same weights."""
    models = make_reference_models("sd15")
    check_round_trip_through_diffusers_converter(models)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unexpected, nothing non-finite
        model = from_single_file_state_dict(single_file_layout(models))
    for part in PARTS:
        module = getattr(model, part)
        assert sum(p.numel() for p in module.parameters()) == SD15_PARAMETERS[part]
        assert_same_tensors(module.state_dict(), reference_state_dict(models, part))
    check_parity(model, models)
