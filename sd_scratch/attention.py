"""Scaled dot-product attention, softmax(q·kᵀ/√d)·v, optionally a slice of queries at a time.

Used by the UNet's spatial transformers (`003 · U-Net` attention) and the VAE's mid-block attention.
Each query row's result depends only on that row, so computing the rows in slices gives the same
numbers while the (queries × keys) score matrix in memory shrinks by the slicing factor: what lets a
small GPU run large images ("attention slicing").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int | None = None,
              upcast: bool = False) -> torch.Tensor:
    """q: (..., Tq, d), k and v: (..., Tk, d) -> (..., Tq, d). `slice_size`: queries per slice, or None
    for all at once. `upcast`: under fp16/bf16, compute in float32 (SD 2.x's q·kᵀ overflows fp16's
    range at 768×768) and return the input dtype."""
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        return attention(q.float(), k.float(), v.float(), slice_size).to(q.dtype)
    if slice_size is None or q.shape[-2] <= slice_size:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q_slice, k, v) for q_slice in q.split(slice_size, dim=-2)],
                     dim=-2)
