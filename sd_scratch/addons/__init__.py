"""What users bring from AUTOMATIC1111 and Civitai, one feature a file: its math, its file formats.

    lora.py               low-rank changes merged into the weights (kohya/A1111 files), and taken out again
    textual_inversion.py  new words as vectors in the text encoder's token-embedding space
    hypernetwork.py       AUTOMATIC1111's hypernetworks: small MLPs on the context that attention's keys and values read
    controlnet.py         ControlNet: a copy of the UNet's encoder that reads a hint image and adds to the UNet's skips
    preview.py            live previews: TAESD decoders (official and diffusers files, one distilled for the built-in model) and latent→RGB matrices
    depth.py              MiDaS DPT-Hybrid, the depth estimator SD 2's depth-to-image model reads
    canny.py              Canny edges in torch (blur, Sobel, thinning, hysteresis), the picture a Canny ControlNet reads; cv2.Canny's pixels

They change a loaded model; `StableDiffusion.load_lora` (and its siblings) is the way in. Skip on a first reading.
"""
