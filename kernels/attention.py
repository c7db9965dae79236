"""Attention of new tokens over [cached | new] keys with a boolean mask (True = may attend).

Reference: the explicit softmax(q k^T / sqrt(d)) v with the mask applied as -inf. Fast: PyTorch's
scaled_dot_product_attention, which on a GPU runs a fused kernel (memory-efficient attention accepts
these masks) instead of materialising the score matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .choice import Kernel, any_device


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, n, d], k/v [B, H, m, d], mask [n, m] bool -> [B, H, n, d]."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


ATTENTION = Kernel("attention", attention_reference, attention_sdpa, any_device)
