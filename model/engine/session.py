"""State of one live conversation inside the engine."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..motion_autoencoder import PortraitCode
from ..sampler import Conditions, NoiseFn
from ..user_expression import UserMotionReader
from .drift import PoseAnchor
from .inputs import SessionInputs


def generator_noise(seed: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> NoiseFn:
    """Noise from the session's own generator, so a run replays exactly. On a CPU it is the reference's
    stream (torch.manual_seed(seed) then randn); on a GPU the generator lives on the device, so noise is
    drawn there without a host round trip per block (a different, equally reproducible stream)."""
    device = torch.device(device)
    if device.type == "cpu":
        gen = torch.Generator().manual_seed(seed)
        return lambda shape: torch.randn(shape, generator=gen).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen, device=device, dtype=dtype)


@dataclass
class BlockOutput:
    """One block of one session: its frames, latents and speech, where they sit in time, and timings."""

    session_id: str
    index: int  # 0 = the priming window
    first_frame: int  # input frame of frames[0] (frames between blocks that catch-up skipped are never made)
    latents: torch.Tensor  # [N, dim_w] generated motion latents
    frames: np.ndarray | None  # [N, S, S, 3] uint8, None when decoding is off
    audio: np.ndarray  # [N * samples_per_frame] float32 avatar speech belonging to these frames
    lead_in: bool  # frames of the silent priming window of a live session
    ready_at: float  # clock time at which the block's last input was captured (its inputs complete in real time)
    done_at: float  # clock time at which the outputs were ready
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, shared by the batch
    batch_size: int = 1
    conditions: Conditions | None = None  # the new frames' conditions, when the engine records them
    skipped_frames: int = 0  # input frames skipped right before this block (the session was behind)


@dataclass
class Session:
    """The engine-side state of one conversation: its KV slot, portrait, inputs, noise and position."""

    id: str
    slot: int
    portrait: PortraitCode
    inputs: SessionInputs
    noise: NoiseFn
    seed: int
    clock_start: float
    # Model frames count the latents generated, without gaps (RoPE positions and the KV cache follow them);
    # input frames follow the inputs' clock. They differ by the frames catch-up skipped.
    next_frame: int = 0  # first model frame not generated yet (0: priming is due)
    input_offset: int = 0  # input frame = model frame + input_offset
    blocks_done: int = 0
    position_offset: int = 0  # RoPE rebasing so far
    context: torch.Tensor | None = None  # [1, context_frames, dim_w] clean latents re-fed next block
    motion_latents: OrderedDict = field(default_factory=OrderedDict)  # webcam frame id -> [dim_w] latent
    anchor: PoseAnchor | None = None  # drift control state, when enabled
    user_reference: UserMotionReader = None  # with canonical_code: what the user's webcam crops go through

    @property
    def finished(self) -> bool:
        total = self.inputs.total_frames
        return total is not None and self.next_frame + self.input_offset >= total

    def remember_motion(self, frame_id: int, latent: torch.Tensor, keep: int = 64) -> None:
        self.motion_latents[frame_id] = latent
        while len(self.motion_latents) > keep:
            self.motion_latents.popitem(last=False)
