"""The same numbers with less memory: tools a first reading skips.

    vae_tiling.py  the VAE decoder run tile by tile, equal to a whole decode up to float rounding

The knobs that switch them on are `StableDiffusion.set_vae_tiling` and `set_attention_slicing`.
"""
