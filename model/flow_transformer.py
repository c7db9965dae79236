"""Causal diffusion-forcing transformer (DFoT) over motion latents (MODEL_SPEC §2.4-2.5).

Every frame is a token with its own diffusion time. Self-attention is causal with a small look-ahead and
uses rotary position embeddings on adjacent channel pairs; cross-attention reads the dual motion encoder's
condition inside a narrow window around the frame. A streaming call passes 2 context + 10 new tokens and
attends to a KV cache of earlier frames (keys stored already rotated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from avatar_forcing.kernels.attention import ATTENTION

from .config import FlowTransformerConfig
from .dual_motion_encoder import DualMotionEncoder

# ----------------------------------------------------------------------------------------------------------
# Positional pieces


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Raw diffusion time (0..1000, per frame) -> [..., dim] features, cos half first, in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_table(head_dim: int, num_positions: int, theta: float = 10000.0) -> torch.Tensor:
    """Unit complex rotations [num_positions, head_dim // 2]; angles position * frequency in fp32."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim)
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) as complex numbers. x [B, H, L, D]; rot [B, L, D/2, 2]
    (cos, sin). Written in real arithmetic (the same products and sums as a complex multiply) so that
    compilers handle it."""
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = rot[:, None, ..., 0], rot[:, None, ..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).type_as(x)


def lookahead_mask(num_queries: int, num_keys: int, lookahead: int) -> torch.Tensor:
    """Queries are the last `num_queries` of `num_keys` slots; slot k visible to slot q when k <= q + lookahead."""
    q = torch.arange(num_keys - num_queries, num_keys)[:, None]
    k = torch.arange(num_keys)[None, :]
    return k <= q + lookahead


def window_mask(num_queries: int, num_keys: int, window: int) -> torch.Tensor:
    """Queries are the last `num_queries` of `num_keys` slots; visible when |k - q| <= window."""
    q = torch.arange(num_keys - num_queries, num_keys)[:, None]
    k = torch.arange(num_keys)[None, :]
    return (k - q).abs() <= window


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------------------
# Cache


@dataclass
class LayerKV:
    """Keys/values of one layer, [B, heads, length, head_dim]. Self keys are stored rotated."""

    self_k: torch.Tensor
    self_v: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor

    def map(self, fn) -> LayerKV:
        """The same function applied to all four tensors (row padding, gathering, ...)."""
        return LayerKV(fn(self.self_k), fn(self.self_v), fn(self.cross_k), fn(self.cross_v))


# ----------------------------------------------------------------------------------------------------------
# Modules


class TimestepEmbedder(nn.Module):
    """Raw diffusion time t in [0, 1000] -> a sinusoid (cos half first) -> an MLP, per frame."""

    def __init__(self, hidden: int, frequency_embedding_size: int, max_period: float):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_sinusoid(t, self.frequency_embedding_size, self.max_period)
        first: nn.Linear = self.mlp[0]  # type: ignore[assignment]  # nn.Sequential indexes as Module
        return self.mlp(freq.to(first.weight.dtype))


class InputEmbedder(nn.Module):
    """Linear over [x_t | r_s] per frame."""

    def __init__(self, dim_w: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(2 * dim_w, hidden)

    def forward(self, x: torch.Tensor, r_s: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([x, r_s[:, None, :].expand_as(x)], dim=-1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
           mask: torch.Tensor) -> torch.Tensor:
    """Attention of q [B, H, n, d] over [cached | new] keys/values; returns [B, n, H * d]."""
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    out = ATTENTION.choose(q.device)(q, k, v, mask)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Block-causal self-attention with RoPE on q and k; cached keys are stored already rotated."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, rot: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        return self.proj(attend(q, k, v, past, mask)), k, v


class CrossAttention(nn.Module):
    """Attention from frame tokens to the per-frame conditions, windowed around each frame."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, d).transpose(1, 2)
        k, v = self.kv(cond).reshape(b, cond.shape[1], 2, self.heads, d).permute(2, 0, 3, 1, 4)
        return self.proj(attend(q, k, v, past, mask)), k, v


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2, as timm's Mlp with the reference's settings."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DFoTBlock(nn.Module):
    """One transformer block: AdaLN-modulated self-attention and MLP, and an ungated cross-attention."""

    def __init__(self, cfg: FlowTransformerConfig):
        super().__init__()
        h = cfg.dim_h
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(h, cfg.num_heads)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(h, cfg.mlp_hidden)
        self.norm3 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(h, cfg.num_heads)

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], cond: torch.Tensor, rot: torch.Tensor,
                self_mask: torch.Tensor, cross_mask: torch.Tensor,
                past: LayerKV | None) -> tuple[torch.Tensor, LayerKV]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        attn, k, v = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rot, self_mask,
                               None if past is None else (past.self_k, past.self_v))
        x = x + gate_msa * attn
        # The cross-attention residual is neither gated nor modulated.
        cross, ck, cv = self.cross_attn(self.norm3(x), cond, cross_mask,
                                        None if past is None else (past.cross_k, past.cross_v))
        x = x + cross
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, LayerKV(k, v, ck, cv)


class FinalLayer(nn.Module):
    """AdaLN-modulated projection of the tokens back to motion-latent velocities."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, t_embed: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(t_embed).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class FlowTransformer(nn.Module):
    """Predicts the flow-matching velocity v = noise - x0 for every frame token."""

    # Registered buffers (declared for the type checker).
    block_bidir_causal_lookahead_mask: torch.Tensor  # [clip, clip] priming self-attention mask
    alignment_mask: torch.Tensor  # [clip, clip] priming cross-attention mask
    rope: torch.Tensor  # [positions, head_dim / 2, 2] rotations as real pairs

    def __init__(self, cfg: FlowTransformerConfig):
        super().__init__()
        self.config = cfg
        h = cfg.dim_h
        self.x_embedder = InputEmbedder(cfg.dim_w, h)
        self.t_embedder = TimestepEmbedder(h, cfg.frequency_embedding_size, cfg.max_period)
        self.c_embedder = DualMotionEncoder(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))  # shared by all blocks
        self.blocks = nn.ModuleList(DFoTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(h, cfg.dim_w)

        n, blk = cfg.clip_frames, cfg.block_frames
        q = torch.arange(n)[:, None]
        k = torch.arange(n)[None, :]
        self.register_buffer("block_bidir_causal_lookahead_mask", (k // blk < q // blk) | (k <= q + cfg.lookahead))
        self.register_buffer("alignment_mask", (k - q).abs() <= cfg.attention_window)
        self._mask_cache: dict = {}
        self.register_buffer("rope", torch.view_as_real(rope_table(cfg.head_dim, cfg.rope_max_positions,
                                                                     cfg.rope_theta)), persistent=False)

    # -- conditions ---------------------------------------------------------------------------------------

    def condition(self, wa_user: torch.Tensor, motion_user: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
        return self.c_embedder(wa_user, motion_user, wa)

    def time_modulation(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame times [B, L] -> (t_embed [B, L, h], adaLN output [B, L, 6h])."""
        t_embed = self.t_embedder(t)
        return t_embed, self.adaLN_modulation(t_embed)

    # -- masks --------------------------------------------------------------------------------------------

    def masks(self, num_tokens: int, past: list[LayerKV] | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if past is None and num_tokens == cfg.clip_frames:
            return self.block_bidir_causal_lookahead_mask, self.alignment_mask
        cached = (0, 0) if past is None else (past[0].self_k.shape[2], past[0].cross_k.shape[2])
        key = (num_tokens, cached, str(device))
        if key not in self._mask_cache:  # a handful of layouts: build each once, on its device
            window = cfg.attention_window if past is None else cfg.stream_cross_window
            self._mask_cache[key] = (lookahead_mask(num_tokens, cached[0] + num_tokens, cfg.lookahead).to(device),
                                     window_mask(num_tokens, cached[1] + num_tokens, window).to(device))
        return self._mask_cache[key]

    # -- forward ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, r_s: torch.Tensor,
                positions: torch.Tensor, past: list[LayerKV] | None = None,
                masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, list[LayerKV]]:
        """
        x [B, L, dim_w] noisy latents; t [B, L] diffusion time per frame (0..1000); cond [B, L, dim_h];
        r_s [B, dim_w]; positions [B, L] RoPE positions; past: per-layer cache (None for a priming call).
        Returns the velocity [B, L, dim_w] and this call's per-layer keys/values (self keys rotated).
        """
        # Callers on an accelerator keep positions in range themselves (the engine rebases with plain
        # integers); checking a device tensor here would stall the GPU on every call, and a compiled graph
        # would break at the branch.
        if (positions.device.type == "cpu" and not torch.compiler.is_compiling()
                and positions.max() >= self.rope.shape[0]):
            raise ValueError(f"RoPE position {int(positions.max())} beyond the table of {self.rope.shape[0]}; "
                             "rebase the session's positions")
        t_embed, ada = self.time_modulation(t)
        mod = ada.chunk(6, dim=-1)
        rot = self.rope[positions]
        self_mask, cross_mask = masks if masks is not None else self.masks(x.shape[1], past, x.device)
        h = self.x_embedder(x, r_s)
        new_kv = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, mod, cond, rot, self_mask, cross_mask, None if past is None else past[i])
            new_kv.append(kv)
        return self.final_layer(h, t_embed), new_kv
