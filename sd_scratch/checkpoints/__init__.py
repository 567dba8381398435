"""Reading the files users have: bytes -> tensors -> our names. Skip on a first reading.

A first reading of Stable Diffusion needs none of this: the modules one folder up build the model,
and `sd_scratch.load(path)` (`load.py`) fills it from a file. Here is how that works:

    files.py     one file -> {name: tensor}, safely (pickles never run code), or a plain error
    rules.py     the rule-based map between the CompVis single-file names and ours (diffusers')
    families.py  which model a file holds (SD 1.x, inpainting, the built-in model; refusals), as rows
    load.py      `load()` and `save_single_file()`: the above put together, failing loudly

Nothing here defines a layer, and nothing here imports the pipelines.
"""
