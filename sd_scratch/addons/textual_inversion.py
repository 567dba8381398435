"""Textual inversion: new words for the text encoder, learned as vectors in its token-embedding space.

Mirrors `004 · 嵌入(Embedding)`: each token becomes a vector before the transformer; textual
inversion (Gal et al. 2022) learns one or a few such vectors for a new word and leaves every
weight alone. A file holds the vectors, (n, width); the word is the file's name (AUTOMATIC1111's
rule) or the one given. In a prompt the word's own token ids are replaced by n placeholder ids past
the vocabulary, which the text encoder looks up in its `extra_vectors`.

Formats read (safely; pickles weights-only):
- AUTOMATIC1111 `.pt`: {"string_to_param": {"*": (n, width)}, "string_to_token": ..., "name", "step"};
  older ones pickle an `nn.ParameterDict` there, which `checkpoints/files.py` reads as a plain dict
- kohya `.safetensors`: {"emb_params": (n, width)}
- diffusers `learned_embeds.bin`/`.safetensors`: {"<token>": (width,) or (n, width)}, and any other
  file of a single tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoints.files import CheckpointError, read_object

if TYPE_CHECKING:
    from ..stable_diffusion import StableDiffusion

SDXL_KEYS = ("clip_l", "clip_g")  # SDXL embeddings carry a vector set per text encoder


def read_embedding(path: str | Path) -> torch.Tensor:
    """The vectors in an embedding file, (n, width)."""
    obj = read_object(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not an embedding's dict")
    if any(k in obj for k in SDXL_KEYS):
        raise CheckpointError(f"{path}: is an SDXL embedding (clip_l/clip_g); sd-scratch has SD v1.x and 2.x")
    if isinstance(obj.get("string_to_param"), dict):  # AUTOMATIC1111
        params = obj["string_to_param"]
        if len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param holds {len(params)} entries; expected one")
        vectors = next(iter(params.values()))
    elif "emb_params" in obj:  # kohya
        vectors = obj["emb_params"]
    else:
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise CheckpointError(f"{path}: holds {len(tensors)} tensors ({', '.join(map(str, list(obj)[:4]))}); "
                                  "an embedding file (A1111 string_to_param, kohya emb_params, diffusers "
                                  "learned_embeds) holds one")
        vectors = tensors[0]
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2):
        raise CheckpointError(f"{path}: the embedding is not a (width,) or (n, width) tensor")
    return vectors.reshape(-1, vectors.shape[-1]).float()


@torch.no_grad()
def load_textual_inversion(sd: StableDiffusion, path: str | Path, token: str | None = None) -> str:
    """Make the word `token` (default: the file's name) mean the file's vectors; returns the word."""
    vectors = read_embedding(path)
    token = token or Path(path).stem
    embeddings = sd.text_encoder.embeddings
    width = embeddings.token_embedding.embedding_dim
    if vectors.shape[1] != width:
        raise CheckpointError(f"{path}: its vectors are {vectors.shape[1]} wide, this text encoder's are {width} "
                              "(an embedding for another model family: SD v1 is 768, SD 2.x 1024)")
    name_ids = tuple(sd.tokenizer.encode(token)[1:-1])
    if not name_ids:
        raise ValueError(f"token {token!r} has no tokens to stand for")
    if name_ids in sd.tokenizer.embeddings:
        raise ValueError(f"an embedding named {token!r} is already loaded")
    old = embeddings.extra_vectors
    first = embeddings.token_embedding.num_embeddings + (0 if old is None else len(old))
    weight = embeddings.token_embedding.weight
    new = vectors.to(weight.device, weight.dtype)
    embeddings.extra_vectors = new if old is None else torch.cat([old, new])
    sd.tokenizer.embeddings[name_ids] = list(range(first, first + len(new)))
    return token
