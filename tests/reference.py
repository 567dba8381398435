"""Random-weight reference models, built with the reference libraries (diffusers, transformers).

The official SD v1.5 weights cannot be downloaded here, so every parity test builds models with the
*reference* libraries in the official configurations (or tiny ones of the same shape of code), fills
every tensor with distinct random values, and compares sd_scratch against them on the same weights.
This module is test-only: sd_scratch itself never imports diffusers or transformers.
"""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import torch

# ---- configurations ---------------------------------------------------------------------------
# SD v1.5 as shipped in the diffusers folder layout (unet/config.json, vae/config.json,
# text_encoder/config.json of the v1.5 release). `attention_head_dim=8` is, in SD v1, the number of
# heads (a diffusers naming quirk).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)
# Tiny configurations: the same code paths (3 UNet levels, attention at some of them, skip
# connections with channel changes, a VAE with downsampling), small enough for fast tests.
# Head counts follow the rules the single-file loader uses (8 UNet heads as in SD v1; CLIP text
# heads = width / 64), since a single file does not record them.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
)
TINY_INPAINT_UNET = dict(TINY_UNET, in_channels=9)
# SD 2.x's UNet at tiny sizes: Linear proj_in/proj_out, heads 64 wide (so one count per level, which
# diffusers' config writes as `attention_head_dim`), attention upcast to fp32.
TINY_SD2_UNET = dict(
    TINY_UNET, block_out_channels=(64, 128, 128), attention_head_dim=(1, 2, 2), use_linear_projection=True,
    upcast_attention=True, cross_attention_dim=128,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
    block_out_channels=(32, 64, 64), norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
TINY_TEXT = dict(
    SD15_TEXT, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
)
# SD 2.x's text encoder as a diffusers folder holds it: OpenCLIP's tower as a CLIP text model with
# exact GELU, one block fewer than the single file's (the penultimate block is SD 2's output).
TINY_SD2_TEXT = dict(TINY_TEXT, hidden_act="gelu", pad_token_id=0)

# Parameter counts of the real SD v1.5 components (checked against the reference classes).
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
# SD 2.x at its real sizes (the 2.1 release's unet/config.json and text_encoder/config.json): the UNet
# with 64-wide heads, Linear projections and a 1024-wide context; OpenCLIP's tower as 23 CLIP layers.
SD2_UNET = dict(SD15_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                upcast_attention=True)
SD2_TEXT = dict(SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu", pad_token_id=0)
SD2_PARAMETERS = {"unet": 865_910_724, "text_encoder": 340_387_840}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter and float buffer with distinct seeded random values, in place.

    Matrices and kernels get N(0, 1/fan_in) so activations stay O(1) through deep stacks; 1-D
    weights (norm scales) get 1 + 0.1·N(0,1) and 1-D biases 0.05·N(0,1), so that no two tensors are
    equal and a swapped norm weight or bias would show up in the outputs.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(r / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.05 * r)
    return module


def make_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return randomize_(UNet2DConditionModel(**config), seed).eval()


def make_vae(config: dict, seed: int = 1):
    from diffusers import AutoencoderKL

    return randomize_(AutoencoderKL(**config), seed).eval()


def make_text_encoder(config: dict, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    return randomize_(CLIPTextModel(CLIPTextConfig(**config)), seed).eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖, the parity measure of DEVELOPERS.md."""
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def write_tokenizer_folder(bpe_gz: Path, folder: Path) -> None:
    """Write OpenAI's merges file in the diffusers layout: vocab.json (token -> id), merges.txt."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        merge_lines = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]  # as OpenAI CLIP's simple_tokenizer
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [line.replace(" ", "") for line in merge_lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_json = json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False)
    (folder / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")


# ---- whole checkpoints in the two official layouts ------------------------------------------------

# SD v1.5's scheduler/scheduler_config.json exactly as the release ships it. It names no timestep
# spacing, so each diffusers scheduler class built `from_config` of it keeps its own default.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
# SD v1.5's scheduler/scheduler_config.json (a PNDM scheduler over the scaled_linear training
# schedule), with the "leading" spacing written out: schedulers built from this config for other
# samplers (Euler's own default is "linspace") then use SD's spacing, as the original scripts do.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
)


def make_reference_models(size: str = "tiny", inpainting: bool = False) -> dict:
    """{"unet", "vae", "text_encoder"}: random-weight reference models at `size` "tiny" or "sd15"."""
    unet_cfg, vae_cfg, text_cfg = (TINY_UNET, TINY_VAE, TINY_TEXT) if size == "tiny" else (SD15_UNET, SD15_VAE, SD15_TEXT)
    if inpainting:
        unet_cfg = dict(unet_cfg, in_channels=9)
    return {"unet": make_unet(unet_cfg), "vae": make_vae(vae_cfg), "text_encoder": make_text_encoder(text_cfg)}


def single_file_layout(models: dict) -> dict[str, torch.Tensor]:
    """The reference models' weights under the CompVis single-file names, through our inverse key map,
    with the extra tensors `v1-5-pruned-emaonly.safetensors` also carries (the training schedule's
    buffers, LitEma's counters, CLIP's position_ids)."""
    from sd_scratch.checkpoints.rules import (TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, convert, unet_rules,
                                            vae_rules)
    from sd_scratch.unet import UNetConfig
    from sd_scratch.vae import VAEConfig

    unet_sd, vae_sd = models["unet"].state_dict(), models["vae"].state_dict()
    u, v = UNetConfig.from_state_dict(unet_sd), VAEConfig.from_state_dict(vae_sd)
    sd = {UNET_PREFIX + k: t for k, t in convert(unet_sd, unet_rules(len(u.channels), u.layers_per_level,
                                                                     u.attention_levels), "original").items()}
    sd |= {VAE_PREFIX + k: t for k, t in convert(vae_sd, vae_rules(len(v.block_out_channels),
                                                                 v.layers_per_block), "original").items()}
    text_sd = models["text_encoder"].state_dict()
    sd |= {TEXT_PREFIX + k.removeprefix("text_model."): t for k, t in text_sd.items()}
    sd[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sd |= {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
           "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas_cumprod[:-1].float()]),
           "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(), "logvar": torch.zeros(1000),
           "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0, dtype=torch.int32)}
    return {k: t.clone() for k, t in sd.items()}  # copies: a test may edit them, never the models


def sd2_single_file_layout(models: dict, seed: int = 3) -> dict[str, torch.Tensor]:
    """The SD 2.x single file of `models` (a CLIP-layout text model of N blocks, as a diffusers SD 2
    folder holds it): UNet and VAE as in v1, the text encoder as OpenCLIP's tower under
    `cond_stage_model.model.` through our inverse map, with the block SD 2 skips (N + 1 in all) and
    text_projection and logit_scale, all random, as the real files carry them."""
    from sd_scratch.checkpoints.rules import OPENCLIP_PREFIX, TEXT_PREFIX, ours_to_openclip

    sd = {k: t for k, t in single_file_layout(models).items() if not k.startswith("cond_stage_model.")}
    text = {k.removeprefix("text_model."): t for k, t in models["text_encoder"].state_dict().items()}
    text.pop("embeddings.position_ids", None)
    n, width = models["text_encoder"].config.num_hidden_layers, models["text_encoder"].config.hidden_size
    g = torch.Generator().manual_seed(seed)
    for k, t in list(text.items()):
        if k.startswith("encoder.layers.0."):  # the skipped last block: same shapes, its own values
            text[k.replace("encoder.layers.0.", f"encoder.layers.{n}.")] = torch.randn(t.shape, generator=g) * 0.02
    text["text_projection"] = torch.randn(width, width, generator=g)
    text["logit_scale"] = torch.tensor(4.6052)
    sd |= {OPENCLIP_PREFIX + k: t.clone() for k, t in ours_to_openclip(text, n + 1).items()}  # copies, as above
    assert not any(k.startswith(TEXT_PREFIX) for k in sd)
    return sd


def write_diffusers_folder(models: dict, folder: Path, variant: str | None = None,
                           safe_serialization: bool = True, scheduler: dict | None = None) -> Path:
    """Save the reference models as a diffusers StableDiffusion(Inpaint)Pipeline folder."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer as ReferenceTokenizer

    from sd_scratch.tokenizer import DEFAULT_BPE_PATH

    write_tokenizer_folder(DEFAULT_BPE_PATH, folder / "tokenizer")  # save_pretrained rewrites it
    tokenizer = ReferenceTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                                   model_max_length=77)  # as in the official tokenizer_config.json
    cls = StableDiffusionInpaintPipeline if models["unet"].config.in_channels == 9 else StableDiffusionPipeline
    pipe = cls(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer, unet=models["unet"],
               scheduler=PNDMScheduler(**(scheduler or SD15_SCHEDULER)), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.save_pretrained(folder, variant=variant, safe_serialization=safe_serialization)
    return folder
