"""Optional drift control for long sessions: a pose anchor on the generated motion latents.

Over minutes, an autoregressive rollout can wander away from the portrait's own pose (a streaming fork of
the reference reports blurrier frames after a few minutes). The anchor keeps an exponential moving average
of each block's mean latent; when it strays from the portrait's reference motion r_s by more than a
dead band, the new frames are pulled back a little, ramped in over the block so there is no visible step.
It changes the model's outputs, so it is off by default; `avatar-forcing bench drift` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PoseAnchorSettings:
    """Optional drift control: how strongly, and outside which band, new frames are pulled to the portrait's pose."""

    ema: float = 0.08  # weight of the newest block in the running mean
    deadband: float = 0.25  # no correction while |mean - r_s| <= deadband * |r_s|
    gain: float = 0.25  # fraction of the excess removed per block
    max_step: float = 0.05  # at most this * |r_s| per block


class PoseAnchor:
    """Per-session state of the anchor."""

    def __init__(self, settings: PoseAnchorSettings):
        self.s = settings
        self.mean: torch.Tensor | None = None
        self.corrections = 0

    def apply(self, new_frames: torch.Tensor, r_s: torch.Tensor) -> torch.Tensor:
        """new_frames [L, D] of one block, r_s [D] -> corrected frames (the input when inside the band)."""
        block_mean = new_frames.mean(0)
        self.mean = block_mean if self.mean is None else self.mean + self.s.ema * (block_mean - self.mean)
        offset = self.mean - r_s
        distance, scale = offset.norm(), r_s.norm()
        excess = distance - self.s.deadband * scale
        if excess <= 0:
            return new_frames
        step = torch.clamp(self.s.gain * excess, max=self.s.max_step * scale)
        ramp = torch.arange(1, new_frames.shape[0] + 1, device=new_frames.device, dtype=new_frames.dtype)
        ramp = ramp / new_frames.shape[0]
        self.corrections += 1
        return new_frames - ramp[:, None] * (offset / distance * step)[None, :]
