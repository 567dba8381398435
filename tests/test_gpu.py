"""On a CUDA GPU, with random weights at the full SD v1.5 sizes: fp32 against diffusers, fp16 (eager
and `optimize()`d) against fp32, the peak memory of a 512×512 fp16 image, a 768×768 fp16 image
without NaN, and tiled decoding against whole decoding.

CI has no GPU and skips this file. On a machine with one: `python -m pytest -q tests/test_gpu.py`.
TF32 is switched off here, so that fp32 means fp32 (cuDNN uses TF32 for convolutions by default).
"""
import pytest
import torch

from sd_scratch.checkpoints.load import from_single_file_state_dict
from sd_scratch.memory.vae_tiling import decode_tiled
from tests.reference import make_reference_models, rel_err, single_file_layout

pytestmark = [pytest.mark.full_size, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FP32_TOLERANCE = 1e-4  # DEVELOPERS.md, each component against the reference
FP16_TOLERANCE = 5e-3  # DEVELOPERS.md, fp16 on a GPU
MAX_PEAK_GB = 3.75  # issue 6: one 512×512 image in fp16, weights included
PROMPT = "a photograph of an astronaut riding a horse"
CUDA = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def models():
    return make_reference_models("sd15")


@pytest.fixture(scope="module")
def weights(models):
    return single_file_layout(models)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(2, 4, 64, 64, generator=g),  # CFG's batch of 2, a 512×512 image's latent
            "context": torch.randn(2, 77, 768, generator=g),
            "z": torch.randn(1, 4, 64, 64, generator=g)}


def load(weights, dtype=torch.float32, vae_dtype=None):
    return from_single_file_state_dict(weights, device=CUDA, dtype=dtype, vae_dtype=vae_dtype)


@torch.no_grad()
def outputs(sd, inputs) -> dict[str, torch.Tensor]:
    """The UNet's ε, the text encoder's hidden states and the decoded image, as float32 on the GPU."""
    dtype, vae_dtype = sd.dtype, next(sd.vae.parameters()).dtype
    return {"unet": sd.unet(inputs["x"].to(CUDA, dtype), 500, inputs["context"].to(CUDA, dtype)).float(),
            "text encoder": sd.text_encoder(sd.tokenizer([PROMPT, ""]).to(CUDA)).float(),
            "vae decode": sd.vae.decode(inputs["z"].to(CUDA, vae_dtype)).float()}


@pytest.fixture(scope="module")
def fp32(weights, inputs):
    sd = load(weights)
    yield sd, outputs(sd, inputs)
    del sd
    torch.cuda.empty_cache()


@torch.no_grad()
def test_fp32_on_the_gpu_matches_diffusers(models, inputs, fp32):
    sd, ours = fp32
    ids = sd.tokenizer([PROMPT, ""]).to(CUDA)
    try:
        for m in models.values():
            m.to(CUDA)
        reference = {
            "unet": models["unet"](inputs["x"].to(CUDA), 500, encoder_hidden_states=inputs["context"].to(CUDA)).sample,
            "text encoder": models["text_encoder"](ids).last_hidden_state,
            "vae decode": models["vae"].decode(inputs["z"].to(CUDA)).sample}
    finally:
        for m in models.values():
            m.to("cpu")
    for name, ref in reference.items():
        assert rel_err(ours[name], ref) <= FP32_TOLERANCE, name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "optimized"])
def test_fp16_is_within_tolerance_of_fp32(weights, inputs, fp32, compiled):
    sd = load(weights, torch.float16, vae_dtype=torch.float16)
    if compiled:
        sd.optimize()
    half = outputs(sd, inputs)
    for name, full in fp32[1].items():
        assert rel_err(half[name], full) <= FP16_TOLERANCE, name


@torch.no_grad()
def test_a_512_fp16_image_fits_in_3_75_gb(weights):
    """Weights and generation together, counted from what this process already held (the fp32 model)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sd = load(weights, torch.float16)  # the VAE stays in fp32, as `load` does for fp16 by default
    sd.txt2img(PROMPT, height=512, width=512, steps=2, progress=False)
    assert (torch.cuda.max_memory_allocated() - before) / 2**30 <= MAX_PEAK_GB


def test_a_768_fp16_image_has_no_nan(weights):
    """The pipeline raises FloatingPointError on NaN or Inf in the decoded image. Random weights do not
    have the real SD VAE's large activations, so this checks the fp16 path runs clean at 768×768, not
    that the real VAE would not overflow (which is why `load` keeps it in fp32 for fp16)."""
    sd = load(weights, torch.float16)
    (image,) = sd.txt2img(PROMPT, height=768, width=768, steps=2, progress=False)
    assert image.size == (768, 768)


@torch.no_grad()
def test_tiled_decoding_on_the_gpu_is_exact_and_smaller(fp32):
    sd = fp32[0]
    z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(1)).to(CUDA)  # 1024×1024
    peaks, images = [], []
    for decode in (sd.vae.decode, lambda z: decode_tiled(sd.vae, z)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        images.append(decode(z))
        peaks.append(torch.cuda.max_memory_allocated())
    assert rel_err(images[1], images[0]) <= FP32_TOLERANCE
    assert peaks[1] < peaks[0]


@torch.no_grad()
def test_sd2_768_v_in_fp16_draws_without_nan_and_stays_near_fp32():
    """SD 2.x's 768-v at its real sizes in fp16: the upcast attention keeps q·kᵀ in fp32, so a 768×768
    image has no NaN, and the fp16 UNet stays within the fp16 bar of the fp32 one."""
    from tests.reference import SD2_TEXT, SD2_UNET, SD15_VAE, make_text_encoder, make_unet, make_vae, \
        sd2_single_file_layout

    sd2 = {"unet": make_unet(SD2_UNET), "vae": make_vae(SD15_VAE), "text_encoder": make_text_encoder(SD2_TEXT)}
    weights = sd2_single_file_layout(sd2)
    del sd2
    half = from_single_file_state_dict(weights, device=CUDA, dtype=torch.float16, prediction_type="v_prediction")
    assert half.native_resolution == 768 and half.unet.config.upcast_attention
    (image,) = half.txt2img(PROMPT, steps=2, progress=False)  # 768×768, its native size; NaN would raise
    assert image.size == (768, 768)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 96, 96, generator=g), torch.randn(2, 77, 1024, generator=g)
    eps16 = half.unet(x.to(CUDA, torch.float16), 999, context.to(CUDA, torch.float16)).float()
    del half
    full = from_single_file_state_dict(weights, device=CUDA, prediction_type="v_prediction")
    assert rel_err(eps16, full.unet(x.to(CUDA), 999, context.to(CUDA))) <= FP16_TOLERANCE
