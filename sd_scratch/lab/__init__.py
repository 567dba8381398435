"""What the notebooks look through: pictures, shapes and attention maps of a running model.

    visualize.py       grids, filmstrips, latents as pictures, heatmaps, the per-step recorder
    probes.py          the tensor's shape at every module of a forward pass
    attention_maps.py  the UNet's cross-attention maps, per prompt token and step

Nothing in the package imports this folder: it only watches the model, it never changes what it
computes. Skip it on a first reading of the model itself.
"""
