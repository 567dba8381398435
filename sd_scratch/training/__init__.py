"""How the built-in model was trained: the toy world and the training losses. Skip on a first reading.

    toy_shapes.py  the procedural world of coloured shapes: scenes, captions, pictures, and the
                   analysis that scores a generated picture against its caption
    losses.py      the losses (VAE, decoder, diffusion ε-prediction) and the built-in model's sizes

`scripts/train_tiny.py` trains the built-in model with these; `scripts/evaluate_tiny.py` scores it.
"""
