"""From prompt strings to the text embeddings the UNet reads: (N, 77·chunks, width).

Mirrors `000 · 文生图` 步骤一 and `004 · 文本调节`: the tokenizer turns each prompt into the 77-id
row (start, up to 75 tokens, end, padding), the text encoder turns the row into 77 vectors. A prompt
longer than 75 tokens is either truncated (with a warning naming the dropped words) or, as
AUTOMATIC1111 does, cut into chunks of 75 whose embeddings are concatenated along the token axis.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .tokenizer import CONTEXT_LENGTH, MAX_PROMPT_TOKENS

if TYPE_CHECKING:
    from .stable_diffusion import StableDiffusion

LONG_PROMPT_MODES = ("truncate", "chunk")


def as_prompt_list(prompt: str | list[str], name: str) -> list[str]:
    """One prompt or a non-empty list of them, as a list; `name` is the parameter, for errors."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")


def encode_prompts(sd: StableDiffusion, texts: list[str], clip_skip: int = 0,
                   long_prompts: str = "truncate") -> torch.Tensor:
    """(len(texts), 77·chunks, width): one row of token embeddings per text (chunks = 1 when truncating)."""
    if long_prompts not in LONG_PROMPT_MODES:
        raise ValueError(f"long_prompts must be one of {LONG_PROMPT_MODES}, got {long_prompts!r}")
    if long_prompts == "truncate":
        return sd.text_encoder(sd.tokenizer(texts).to(sd.device), clip_skip=clip_skip)
    return encode_in_chunks(sd, texts, clip_skip)


def encode_in_chunks(sd: StableDiffusion, texts: list[str], clip_skip: int = 0) -> torch.Tensor:
    """Long prompts as AUTOMATIC1111 encodes them: split the tokens into chunks of 75, encode each
    chunk as its own 77-id row, and concatenate the embeddings along the token axis. Every text
    gets as many chunks as the longest (empty chunks pad the others)."""
    token_lists = [sd.tokenizer.encode(t)[1:-1] for t in texts]  # without start/end tokens
    n_chunks = max(1, *(math.ceil(len(ids) / MAX_PROMPT_TOKENS) for ids in token_lists))
    rows = [sd.tokenizer.row(ids[c * MAX_PROMPT_TOKENS:(c + 1) * MAX_PROMPT_TOKENS])
            for ids in token_lists for c in range(n_chunks)]
    context = sd.text_encoder(torch.tensor(rows, device=sd.device), clip_skip=clip_skip)  # (texts·chunks, 77, C)
    return context.reshape(len(texts), n_chunks * CONTEXT_LENGTH, -1)
