"""What users bring from AUTOMATIC1111 and Civitai, one feature a file: its math, its file formats.

    lora.py               low-rank changes merged into the weights (kohya/A1111 files), and taken out again
    textual_inversion.py  new words as vectors in the text encoder's token-embedding space

They change a loaded model; `StableDiffusion.load_lora` is the way in. Skip on a first reading.
"""
