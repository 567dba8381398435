"""sd-scratch: a from-scratch, readable Stable Diffusion v1.x in pure PyTorch.

Reading order, the documents' diagram top to bottom (one file per part):

    tokenizer.py         prompt -> 77 token ids                       (004 · 标记器)
    prompts.py           prompts -> text embeddings, long prompts      (000 步骤一, 004 · 文本调节)
    text_encoder.py      token ids -> (B, 77, 768) embeddings          (001 · 文本编码器)
    unet.py              ε_θ(x_t, t, text)                             (003 · U-Net)
    attention.py         softmax(q·kᵀ/√d)·v, used by the UNet and the VAE
    noise_schedule.py    β, ᾱ, the forward process, which timesteps     (003 · 噪声调度, 前向扩散)
    samplers.py          one reverse step per sampler                   (003 · 反向去噪)
    guidance.py          the model function: CFG and concat conditions  (003/004 · CFG)
    pipelines.py         the loop; txt2img, img2img, inpaint           (000 · 文生图, 001's six steps)
    vae.py               pixels <-> latents                            (001 · VAE模型)
    images.py            PIL <-> tensors, latents -> pictures           (001 step 6)
    stable_diffusion.py  the parts held together, with their family

One folder down, what a first reading skips: checkpoints/ (reading the files users have),
memory/ (the same numbers with less memory), training/ (how the built-in model was made),
lab/ (what the notebooks look through). `sd_scratch.load(path)` is the way in.
"""
import importlib

# The public names, imported on first use (PEP 562), so that `import sd_scratch` stays cheap and
# `python -m sd_scratch.tokenizer` runs that module fresh.
_PUBLIC = {"load": "checkpoints.load", "save_single_file": "checkpoints.load", "LoadReport": "checkpoints.load",
           "StableDiffusion": "stable_diffusion", "LATENT_SCALE": "vae", "Control": "guidance"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'sd_scratch' has no attribute {name!r}")
