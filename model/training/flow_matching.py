"""Diffusion forcing with the reference's flow-matching convention (MODEL_SPEC §3, §5).

x_t = (1 - sigma) x0 + sigma * noise, the transformer sees t = 1000 * sigma and predicts v = noise - x0, so
the sampler's update x <- x + (sigma_next - sigma_cur) v integrates exactly what was learned. Every frame
draws its own noise level from the scheduler's 1000-entry table (or one per block, as the reference's
`_get_timestep` with block_causal does), so the model learns to denoise a frame whatever the noise of its
neighbours, which is what the streaming sampler asks of it (clean context, noisy new frames).

All randomness of one training window comes from a generator keyed by (seed, step, its position in the
global batch): the same window gets the same draw whatever the number of processes or micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..scheduler import FlowMatchSchedule

# Which conditions a window keeps: one choice per window, mirroring the three guidance branches.
FULL, AUDIO_ONLY, USER_ONLY, UNCOND = range(4)


@dataclass(frozen=True)
class DropoutSettings:
    """Per-window condition dropout. The first three choices are exclusive and train the sampler's
    branches (audio-only = user audio and motion null; user-only = avatar audio null; uncond = all
    null); the reference motion is dropped independently. Null = zeros of the projected features."""

    audio_only: float = 0.1
    user_only: float = 0.1
    uncond: float = 0.1
    reference: float = 0.1

    def __post_init__(self) -> None:
        probs = (self.audio_only, self.user_only, self.uncond, self.reference)
        if any(p < 0 or p > 1 for p in probs) or self.audio_only + self.user_only + self.uncond > 1:
            raise ValueError(f"dropout probabilities must be in [0, 1] and the branch ones sum to <= 1: {probs}")


@dataclass(frozen=True)
class NoiseSettings:
    per_frame: bool = True  # False: one level per block of `block_frames` (the reference's block_causal)
    block_frames: int = 10
    clean_prefix: float = 0.0  # probability that the frames before a random block boundary are clean (t=0)
    loss_weighting: bool = True  # the reference's bell-shaped weight over t (zero at both ends)


@dataclass
class Draw:
    """The randomness of B windows: noise [B, L, D], table index [B, L] (0 = pure noise), branch [B],
    drop_reference [B]."""

    noise: torch.Tensor
    index: torch.Tensor
    branch: torch.Tensor
    drop_reference: torch.Tensor


def window_generator(seed: int, step: int, key: int) -> torch.Generator:
    # Distinct, reproducible streams per (seed, step, window); the odd multipliers avoid collisions.
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 2_654_435_761 + key & (2**63 - 1))


def draw(seed: int, step: int, keys: torch.Tensor, frames: int, dim: int, table: int, noise: NoiseSettings,
         dropout: DropoutSettings) -> Draw:
    noises, indices, branches, refs = [], [], [], []
    probs = torch.tensor([1 - dropout.audio_only - dropout.user_only - dropout.uncond,
                          dropout.audio_only, dropout.user_only, dropout.uncond]).clamp_min(0)
    for key in keys.tolist():
        gen = window_generator(seed, step, key)
        noises.append(torch.randn(frames, dim, generator=gen))
        if noise.per_frame:
            index = torch.randint(0, table, (frames,), generator=gen)
        else:
            blocks = math.ceil(frames / noise.block_frames)
            index = torch.randint(0, table, (blocks,), generator=gen).repeat_interleave(noise.block_frames)[:frames]
        u = torch.rand(3, generator=gen)
        if u[0] < noise.clean_prefix:  # streaming layout: clean history, then noisy frames
            boundary = int(torch.randint(1, math.ceil(frames / noise.block_frames), (1,), generator=gen))
            index[:boundary * noise.block_frames] = table - 1
        indices.append(index)
        branches.append(torch.multinomial(probs, 1, generator=gen)[0])
        refs.append(u[1] < dropout.reference)
    return Draw(torch.stack(noises), torch.stack(indices), torch.stack(branches), torch.stack(refs))


class FlowMatchTable:
    """sigma / t / loss weight per table index, from the sampler's own schedule."""

    def __init__(self, schedule: FlowMatchSchedule):
        self.sigmas = schedule.sigmas.double()
        self.timesteps = schedule.timesteps.double()
        n = len(self.sigmas)
        bell = torch.exp(-2 * ((self.timesteps - n / 2) / n) ** 2)
        bell = bell - bell.min()
        self.weights = bell * (n / bell.sum())  # mean weight 1 over the table

    def __len__(self) -> int:
        return len(self.sigmas)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, target v) for clean latents x0 [B, L, D] at table indices [B, L]."""
        sigma = self.sigmas[index.cpu()].to(x0.device, x0.dtype)[..., None]
        t = self.timesteps[index.cpu()].to(x0.device, x0.dtype)
        return (1 - sigma) * x0 + sigma * noise, t, noise - x0

    def frame_weights(self, index: torch.Tensor, weighted: bool) -> torch.Tensor:
        """[B, L] loss weight per frame; clean frames (sigma = 0) never count: nothing there to learn."""
        w = self.weights[index.cpu()] if weighted else torch.ones(index.shape, dtype=torch.float64)
        return torch.where(self.sigmas[index.cpu()] > 0, w, 0.0).float()


def per_window_l1(v: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B] weighted mean absolute error of each window (frames weighted, channels averaged). Each window is
    normalised on its own, so the batch mean does not depend on how windows are split over processes."""
    err = (v.float() - target.float()).abs().mean(-1)
    w = weights.to(err.device)
    return (err * w).sum(-1) / w.sum(-1).clamp_min(1e-8)
