"""Motion latents a model generates for training clips, through the streaming engine (the same sampler,
guidance, priming and KV-cache blocks a live session runs). Used for DPO losers and for evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..avatar_forcing import AvatarForcing
from ..engine import EngineSettings, PrecomputedInputs, StreamingEngine
from ..motion_autoencoder import PortraitCode
from .data import Clip


@torch.no_grad()
def generate_latents(model: AvatarForcing, clips: Sequence[Clip], seed: int, drop_user: bool = False,
                     sessions: int = 8) -> list[torch.Tensor]:
    """One [T, dim_w] latent sequence per clip (CPU, fp32). `drop_user` nulls the user's audio and motion, so
    the user guidance branch equals the unconditional one and only avatar-audio guidance is left: the
    paper's label-free losing sample. Clip i's noise is seeded with seed + i."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    engine = StreamingEngine(model, EngineSettings(max_sessions=max(1, min(sessions, len(clips))), decode=False))
    project = model.audio_encoder.audio_projection
    out: list[torch.Tensor | None] = [None] * len(clips)
    for first in range(0, len(clips), engine.settings.max_sessions):
        pieces: dict[str, list[torch.Tensor]] = {}
        rows: dict[str, int] = {}
        for i in range(first, min(first + engine.settings.max_sessions, len(clips))):
            clip = clips[i]
            wa = project(clip.audio.to(device, dtype))
            wa_user = project(clip.user_audio.to(device, dtype))
            motion = clip.user_motion.to(device, dtype)
            if drop_user:
                wa_user, motion = torch.zeros_like(wa_user), torch.zeros_like(motion)
            # Only r_s matters without decoding: the portrait's appearance code and maps stay empty.
            portrait = PortraitCode(torch.zeros_like(clip.r_s[None]).to(device, dtype), [],
                                    clip.r_s[None].to(device, dtype))
            session = engine.open_session(portrait, inputs=PrecomputedInputs(wa, wa_user, motion), seed=seed + i)
            pieces[session.id], rows[session.id] = [], i
        while any(not engine.sessions[sid].finished for sid in pieces):
            for block in engine.step():
                pieces[block.session_id].append(block.latents.float().cpu())
        for sid, blocks in pieces.items():
            out[rows[sid]] = torch.cat(blocks)[:clips[rows[sid]].num_frames]
            engine.close_session(sid)
    return [x for x in out if x is not None]
