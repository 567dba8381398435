"""How the built-in model was trained: the toy world and the training losses. Skip on a first reading.

    toy_shapes.py  the procedural world of coloured shapes: drawing a picture (with its depth and
                   edge maps), and the analysis that reads a generated picture back into attributes
    captions.py    what is drawn and how it is said: one shape or two in a relation, captions that
                   say some of the attributes in varied phrasings, the held-out combinations
    losses.py      the losses (VAE, decoder, diffusion ε-prediction) and the built-in model's sizes

`scripts/train_tiny.py` trains the built-in model with these; `scripts/evaluate_tiny.py` scores it.
"""
