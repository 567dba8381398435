"""sd-scratch: a from-scratch, readable Stable Diffusion v1.x in pure PyTorch.

Reading order, as in the documents' diagram: tokenizer.py → text_encoder.py → unet.py (+ schedulers.py)
→ vae.py, then pipelines.py; checkpoint_files.py, checkpoint_keys.py and loading.py read the official
weight files. `sd_scratch.load(path)` is the way in.
"""
import importlib

# The public names, imported on first use (PEP 562), so that `import sd_scratch` stays cheap and
# `python -m sd_scratch.tokenizer` runs that module fresh.
_PUBLIC = {"load": "loading", "save_single_file": "loading", "LoadReport": "loading",
           "StableDiffusion": "stable_diffusion", "LATENT_SCALE": "vae"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'sd_scratch' has no attribute {name!r}")
