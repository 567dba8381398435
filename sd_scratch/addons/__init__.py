"""What users bring from AUTOMATIC1111 and Civitai, one feature a file: its math, its file formats.

    lora.py               low-rank changes merged into the weights (kohya/A1111 files), and taken out again
    textual_inversion.py  new words as vectors in the text encoder's token-embedding space
    hypernetwork.py       AUTOMATIC1111's hypernetworks: small MLPs on the context that attention's keys and values read

They change a loaded model; `StableDiffusion.load_lora` (and its siblings) is the way in. Skip on a first reading.
"""
