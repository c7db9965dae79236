"""Dual motion encoder (`flow_transformer.c_embedder`, MODEL_SPEC §2.3).

Fuses the user's motion with the user's audio, then the avatar's audio with that, into the per-frame
condition the flow transformer cross-attends to. Both attentions are unmasked over the window.
`user_residual` (ours, off in the reference) also adds a projection of the user state frame by frame.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import FlowTransformerConfig

# Layers of the extensions, zero-initialised: a checkpoint made without them may start training with them as
# they are (`load_model(start_fresh=...)`), which is the reference's behaviour.
EXTENSION_LAYERS = ("user_to_avatar",)


class DualMotionEncoder(nn.Module):
    """Fuses the avatar's audio, the user's audio and the user's motion into one condition per frame with
    two cross-attentions (MODEL_SPEC §2.3; the transformer's `c_embedder`)."""

    def __init__(self, cfg: FlowTransformerConfig):
        super().__init__()
        d = cfg.dim_a
        self.motion_embedder = nn.Sequential(
            nn.Linear(cfg.dim_w, d), nn.LayerNorm(d), nn.SiLU(),
            nn.Linear(d, d), nn.LayerNorm(d), nn.SiLU(),
        )
        self.dual_modal_attn = nn.MultiheadAttention(d, cfg.condition_heads, batch_first=True)
        self.ln1 = nn.LayerNorm(d)
        self.user_agent_attn = nn.MultiheadAttention(d, cfg.condition_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.to_cond_user = nn.Linear(d, cfg.dim_h)
        self.act = nn.SiLU()
        # Starts at zero, so training starts from the reference's condition and learns how much to add.
        self.user_to_avatar = nn.Linear(d, d) if cfg.user_residual else None
        if self.user_to_avatar is not None:
            nn.init.zeros_(self.user_to_avatar.weight)
            nn.init.zeros_(self.user_to_avatar.bias)

    def user_state(self, wa_user: torch.Tensor, motion_user: torch.Tensor) -> torch.Tensor:
        """The user's motion embedding attending to the user's audio."""
        m = self.motion_embedder(motion_user)
        return self.act(self.ln1(m + self.dual_modal_attn(m, wa_user, wa_user, need_weights=False)[0]))

    def avatar_state(self, wa: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """The avatar's audio attending to the user state (plus a projection of that state, frame by frame,
        with user_residual: unmasked attention from null audio gives every frame the same mix)."""
        fused = wa + self.user_agent_attn(wa, user, user, need_weights=False)[0]
        if self.user_to_avatar is not None:
            fused = fused + self.user_to_avatar(user)
        return self.act(self.ln2(fused))

    def forward(self, wa_user: torch.Tensor, motion_user: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
        """[B, L, dim_a], [B, L, dim_w], [B, L, dim_a] -> condition [B, L, dim_h]."""
        return self.to_cond_user(self.avatar_state(wa, self.user_state(wa_user, motion_user)))
