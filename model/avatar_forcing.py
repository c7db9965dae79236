"""The whole Avatar Forcing model under the official top-level names.

`motion_autoencoder.*`, `audio_encoder.*` and `flow_transformer.*` are the state-dict prefixes of the
released checkpoints, so `AvatarForcing(cfg).load_state_dict(official_state_dict, strict=True)` works.
"""

from __future__ import annotations

import torch
from torch import nn

from .audio_encoder import AudioEncoder
from .config import AvatarForcingConfig
from .flow_transformer import FlowTransformer, rope_table
from .motion_autoencoder import MotionAutoencoder, ToFlow, identity_grid


class AvatarForcing(nn.Module):
    """The whole model under the official parameter names: motion auto-encoder, audio encoder and the
    flow transformer (whose c_embedder is the dual motion encoder)."""

    def __init__(self, cfg: AvatarForcingConfig):
        super().__init__()
        self.config = cfg
        self.motion_autoencoder = MotionAutoencoder(cfg.motion)
        self.audio_encoder = AudioEncoder(cfg.audio)
        self.flow_transformer = FlowTransformer(cfg.transformer)

    def rebuild_derived_buffers(self) -> None:
        """Recompute the non-persistent tables (needed after materialising a model built on `meta`)."""
        ft = self.flow_transformer
        cfg = ft.config
        device = next(self.parameters()).device
        ft.rope = torch.view_as_real(rope_table(cfg.head_dim, cfg.rope_max_positions, cfg.rope_theta)).to(device)
        for module in self.motion_autoencoder.modules():
            if isinstance(module, ToFlow):
                module.grid = identity_grid(module.grid.shape[1]).to(device)


def build_model(cfg: AvatarForcingConfig, device: torch.device | str = "cpu") -> AvatarForcing:
    """Instantiate in eval mode. On `meta` nothing is allocated (for shape and key checks)."""
    with torch.device(device):
        model = AvatarForcing(cfg)
    # A few tensors are created on the CPU whatever the default device (numpy grids, transformers' init).
    return model.to(device).eval().requires_grad_(False)
