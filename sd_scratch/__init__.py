"""sd-scratch: a from-scratch, readable Stable Diffusion v1.x in pure PyTorch.

Reading order, as in the documents' diagram: tokenizer.py → text_encoder.py → unet.py → vae.py;
checkpoint_files.py, checkpoint_keys.py and loading.py read the official weight files.
"""
from .loading import LoadReport, load, save_single_file
from .stable_diffusion import StableDiffusion
from .vae import LATENT_SCALE

__all__ = ["load", "save_single_file", "LoadReport", "StableDiffusion", "LATENT_SCALE"]
