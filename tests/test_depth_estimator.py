"""The MiDaS DPT-Hybrid depth estimator against transformers' `DPTForDepthEstimation`, on the same
random weights, loaded from each of the three layouts; and its input transform against the
`DPTImageProcessor` that diffusers' depth2img pipeline calls."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor
from transformers.image_utils import PILImageResampling

from sd_scratch.addons.depth import (DepthConfig, depth_estimator_from_state_dict, estimate_depth,
                                     load_depth_estimator, prepare, resized_size)
from sd_scratch.checkpoints.depth_rules import (DEPTH_PREFIX, UNUSED_PREFIXES, midas_to_transformers,
                                                transformers_rules, transformers_to_midas)
from sd_scratch.checkpoints.files import CheckpointError
from sd_scratch.checkpoints.rules import rename
from tests.reference import randomize_, rel_err

# A tiny DPT-Hybrid of the shape diffusers' depth2img fast test builds (BiT bottlenecks, "SAME"
# padding, GroupNorm of 2 groups), smaller still: stages of 2, 1, 1 blocks, a 3-block ViT whose
# blocks 1 and 2 are read out, and every width distinct so that a swapped tensor cannot fit.
TINY_BACKBONE = dict(global_padding="same", layer_type="bottleneck", depths=[2, 1, 1], embedding_size=16,
                     hidden_sizes=[32, 64, 96], out_features=["stage1", "stage2", "stage3"],
                     embedding_dynamic_padding=True, num_groups=2)
TINY_DPT = dict(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=37, backbone_out_indices=(0, 1, 1, 2), is_hybrid=True, backbone_config=TINY_BACKBONE,
                backbone_featmap_shape=[1, 96, 4, 4], neck_hidden_sizes=[32, 64, 48, 40], fusion_hidden_size=24,
                reassemble_factors=[1, 1, 1, 0.5], layer_norm_eps=1e-6)
# What the MiDaS files do not record, for the tiny model (the official preset has 12, 32, (8, 11)).
TINY = DepthConfig(heads=4, norm_groups=2, taps=(1, 2))
# diffusers' depth2img pipeline calls the DPTImageProcessor of stabilityai/stable-diffusion-2-depth,
# that of Intel/dpt-hybrid-midas: 384×384 whatever the aspect (transformers.js's test of that
# preprocessor: a 480×640 image gives 384×384), bilinear (the processor's default in transformers
# 4.26, which wrote the folder), mean = std = 0.5.
PIPELINE_PROCESSOR = dict(size={"height": 384, "width": 384}, keep_aspect_ratio=False,
                          resample=PILImageResampling.BILINEAR, image_mean=[0.5] * 3, image_std=[0.5] * 3)
TOLERANCE = 1e-4


def reference_depth(model: DPTForDepthEstimation, pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' predicted_depth at any size. Its hybrid embedding refuses sizes other than
    config.image_size and its neck assumes a square grid unless told the grid, though both its
    position-embedding resize and its neck (`patch_height`, `patch_width`) handle any: so its own
    modules are run in its forward's order, the grid passed, as MiDaS's forward_flex does."""
    H, W = pixel_values.shape[-2:]
    model.dpt.embeddings.image_size = (H, W)  # only the size check reads it
    with torch.no_grad():
        out = model.dpt(pixel_values, output_hidden_states=True)
        taps = model.config.backbone_out_indices[2:]
        layers = list(out.intermediate_activations) + [h for i, h in enumerate(out.hidden_states[1:]) if i in taps]
        return model.head(model.neck(layers, H // 16, W // 16))


@pytest.fixture(scope="module")
def reference() -> DPTForDepthEstimation:
    """Every tensor random: weights, biases, GroupNorm and LayerNorm scales and shifts, cls token and
    position embeddings; the last conv's bias shifted up so that the final ReLU keeps most of the map."""
    torch.manual_seed(0)
    model = randomize_(DPTForDepthEstimation(DPTConfig(**TINY_DPT)), seed=14).eval()
    with torch.no_grad():
        model.head.head[4].bias += 2.0  # its input sums to about -1.6 ± 1.2 here
    return model


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory) -> dict:
    """The reference's weights in the three layouts: a transformers folder, a MiDaS .pt (written by
    our inverse map, with the ImageNet classifier MiDaS's files carry), and an SD 2 depth .ckpt."""
    root = tmp_path_factory.mktemp("depth")
    reference.save_pretrained(root / "transformers")
    midas, unmapped = transformers_to_midas(reference.state_dict())
    assert unmapped == []
    midas |= {"pretrained.model.head.weight": torch.randn(10, 32), "pretrained.model.head.bias": torch.randn(10)}
    torch.save(midas, root / "dpt_hybrid-midas-501f0c75.pt")
    sd_ckpt = {DEPTH_PREFIX + k: v for k, v in midas.items()} | {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 5, 3, 3),
        "first_stage_model.decoder.conv_out.bias": torch.randn(3),
        "cond_stage_model.model.ln_final.weight": torch.randn(8)}
    torch.save({"state_dict": sd_ckpt, "global_step": 1}, root / "512-depth-ema.ckpt")
    return {"root": root, "midas": midas, "transformers": root / "transformers",
            "midas.pt": root / "dpt_hybrid-midas-501f0c75.pt", "sd.ckpt": root / "512-depth-ema.ckpt"}


SIZES = {"square": (64, 64), "non-square": (64, 96)}


@pytest.fixture(scope="module")
def reference_outputs(reference) -> dict:
    """{size name: (pixel_values, transformers' depth)}, computed once for every loader."""
    g = torch.Generator().manual_seed(1)
    inputs = {name: torch.randn(2, 3, *size, generator=g) for name, size in SIZES.items()}
    return {name: (x, reference_depth(reference, x)) for name, x in inputs.items()}


LOADERS = {
    "transformers folder": lambda f: load_depth_estimator(f["transformers"]),
    "MiDaS .pt": lambda f: load_depth_estimator(f["midas.pt"], TINY),
    "SD 2 depth .ckpt": lambda f: load_depth_estimator(f["sd.ckpt"], TINY),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("size", SIZES)
def test_each_loader_gives_the_references_depth(reference_outputs, files, loader, size):
    """Relative inverse depth ≤ 1e-4 from transformers' on the same pixels; at 64×96 the position
    embeddings (learnt on a 4×4 grid) are resized to 4×6."""
    estimator = LOADERS[loader](files)
    pixel_values, ref = reference_outputs[size]
    with torch.no_grad():
        ours = estimator(pixel_values)
    assert ours.shape == ref.shape == (2, *SIZES[size])
    assert (ref > 0).float().mean() > 0.5  # the final ReLU leaves a map, not zeros
    assert rel_err(ours, ref) <= TOLERANCE


def test_the_sizes_are_read_off_the_file_and_the_rest_taken_from_the_config(files):
    estimator = load_depth_estimator(files["transformers"])
    assert estimator.config == DepthConfig(stem_width=16, stage_widths=(32, 64, 96), stage_depths=(2, 1, 1),
                                           norm_groups=2, width=32, layers=3, heads=4, mlp_width=37, grid=4,
                                           taps=(1, 2), layer_norm_eps=1e-6, reassemble_widths=(48, 40),
                                           features=24, head_width=32)
    assert DepthConfig.from_state_dict(files["midas"], TINY) == estimator.config
    assert not any(p.is_meta for p in estimator.parameters())


def test_the_official_preset_is_dpt_hybrid():
    c = DepthConfig.dpt_hybrid()
    assert (c.stage_widths, c.stage_depths, c.width, c.layers, c.heads, c.grid, c.taps) == (
        (256, 512, 1024), (3, 4, 9), 768, 12, 12, 24, (8, 11))


def test_the_input_transform_is_the_pipelines_processor():
    """A 50×77 image is squeezed to 384×384, as diffusers' depth2img pipeline's processor does."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 77, 3), dtype=np.uint8))
    ref = DPTImageProcessor(**PIPELINE_PROCESSOR)(images=image, return_tensors="pt").pixel_values
    ours = prepare(image)
    assert ours.shape == ref.shape == (1, 3, 384, 384)
    assert (ours - ref).abs().max() <= 1e-6
    assert -1 <= ours.min() and ours.max() <= 1


@pytest.mark.parametrize("hw", [(50, 77), (480, 640), (720, 1280), (300, 1000), (376, 400)])
def test_keeping_the_aspect_rounds_as_midas_does(hw):
    """keep_aspect: the smaller change of scale, each side the nearest multiple of 32 (480×640 ->
    384×512, 720×1280 -> 384×672), equal to DPTImageProcessor(keep_aspect_ratio=True,
    ensure_multiple_of=32), which mirrors MiDaS's Resize(..., resize_method="minimal")."""
    image = Image.fromarray(np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8))
    processor = DPTImageProcessor(**(PIPELINE_PROCESSOR | dict(keep_aspect_ratio=True, ensure_multiple_of=32,
                                                               resample=PILImageResampling.BICUBIC)))
    ref = processor(images=image, return_tensors="pt").pixel_values
    ours = prepare(image, keep_aspect=True)
    assert ours.shape == ref.shape and ours.shape[2:] == resized_size(*hw, keep_aspect=True)
    assert all(side % 32 == 0 for side in ours.shape[2:])
    assert (ours - ref).abs().max() <= 1e-6


def test_estimate_depth_is_the_pipeline_chain_resized_back(reference, files):
    """processor -> model -> bicubic to the image's size (transformers' post_process_depth_estimation),
    at the image's own size by default or at a given one (the latent's, for depth2img)."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    processor = DPTImageProcessor(**PIPELINE_PROCESSOR)
    reference.dpt.embeddings.image_size = (384, 384)
    with torch.no_grad():
        outputs = reference(processor(images=image, return_tensors="pt").pixel_values)
    estimator = load_depth_estimator(files["transformers"])
    for size in [(40, 56), (5, 7)]:
        ref = processor.post_process_depth_estimation(outputs, target_sizes=[size])[0]["predicted_depth"]
        ours = estimate_depth(estimator, image, size=None if size == (40, 56) else size)
        assert ours.shape == (1, *size)
        assert rel_err(ours[0], ref) <= TOLERANCE


def test_the_key_map_goes_both_ways(reference, files):
    """transformers -> MiDaS -> transformers gives every tensor back; MiDaS -> transformers -> MiDaS
    every key (the ImageNet classifier aside, which transformers does not keep)."""
    theirs = reference.state_dict()
    back = midas_to_transformers(transformers_to_midas(theirs)[0])
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    midas = {k: v for k, v in files["midas"].items() if not k.startswith("pretrained.model.head.")}
    again, unmapped = transformers_to_midas(midas_to_transformers(midas))
    assert unmapped == [] and again.keys() == midas.keys() and all(torch.equal(again[k], midas[k]) for k in midas)
    rules = transformers_rules(stages=3, layers=12)
    assert rename("scratch.refinenet4.resConfUnit1.conv1.weight", rules, "original")[0] == \
        "neck.fusion_stage.layers.0.residual_layer1.convolution1.weight"
    assert rename("neck.reassemble_stage.layers.3.resize.bias", rules, "ours")[0] == "pretrained.act_postprocess4.4.bias"


def test_our_names_are_midas_names(files):
    """The MiDaS layout is ours: its tensors, less the two it never reads (the ViT's final norm and the
    ImageNet classifier), are the module's state dict."""
    estimator = load_depth_estimator(files["midas.pt"], TINY)
    assert set(estimator.state_dict()) == {k for k in files["midas"] if not k.startswith(UNUSED_PREFIXES)}


def test_files_without_a_depth_model_say_so(files, tmp_path):
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(unrelated))
    with pytest.raises(CheckpointError, match="unrelated.safetensors: holds no DPT-Hybrid depth weights"):
        load_depth_estimator(unrelated)
    sd_without = tmp_path / "512-base-ema.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, sd_without)
    with pytest.raises(CheckpointError, match="512-base-ema.ckpt: is a Stable Diffusion checkpoint without a depth "
                                              "model \\(no depth_model.model.\\* tensors\\)"):
        load_depth_estimator(sd_without)


def test_missing_and_unknown_tensors_are_named_in_the_files_own_names(files, tmp_path):
    midas = files["midas"]
    sd = {DEPTH_PREFIX + k: v for k, v in midas.items() if k != "scratch.refinenet2.resConfUnit1.conv2.bias"}
    with pytest.raises(CheckpointError, match="ckpt: 1 tensors missing, e.g. "
                                              "depth_model.model.scratch.refinenet2.resConfUnit1.conv2.bias"):
        depth_estimator_from_state_dict(sd, TINY, source="ckpt")
    theirs = midas_to_transformers(midas)
    del theirs["dpt.encoder.layer.1.attention.attention.key.weight"]
    with pytest.raises(CheckpointError, match="dpt.encoder.layer.1.attention.attention.query.weight \\(and key, value\\)"):
        depth_estimator_from_state_dict(theirs, TINY)
    with pytest.raises(CheckpointError, match="belong to no part of DPT-Hybrid, e.g. pretrained.model.blocks.0.attn.bias_k"):
        depth_estimator_from_state_dict(midas | {"pretrained.model.blocks.0.attn.bias_k": torch.zeros(3)}, TINY)
    with pytest.raises(CheckpointError, match="no pretrained.model.pos_embed, which a DPT-Hybrid has"):
        depth_estimator_from_state_dict({k: v for k, v in midas.items() if k != "pretrained.model.pos_embed"}, TINY)
    with pytest.raises(CheckpointError, match=r"width 32 does not split into 12 heads \(pass config="):
        depth_estimator_from_state_dict(midas)


def test_inputs_the_model_cannot_take_are_refused(files):
    estimator = load_depth_estimator(files["transformers"])
    with pytest.raises(ValueError, match="multiples of 32, got 64×80"):
        estimator(torch.zeros(1, 3, 64, 80))
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\)"):
        estimator(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="resize to different sizes"):
        prepare([Image.new("RGB", (64, 32)), Image.new("RGB", (32, 64))], keep_aspect=True)


def test_depth_picture_stretches_the_range_farthest_black_nearest_white(reference, files):
    from sd_scratch.addons.depth import depth_picture

    picture = depth_picture(torch.tensor([[1.0, 2.0], [3.0, 5.0]]))
    assert picture.mode == "RGB" and np.asarray(picture)[..., 0].tolist() == [[0, 64], [128, 255]]
    estimator = load_depth_estimator(files["transformers"])
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    depth = estimate_depth(estimator, image)[0]
    grey = np.asarray(depth_picture(depth))[..., 0]
    assert grey.shape == (48, 40) and grey.max() == 255 and grey.min() == 0
    assert grey.flat[int(depth.argmax())] == 255 and grey.flat[int(depth.argmin())] == 0
    with pytest.raises(ValueError, match="not constant"):
        depth_picture(torch.ones(4, 4))
