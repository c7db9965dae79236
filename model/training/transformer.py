"""Wiring of a transformer training run: model + clips + settings -> a ready `Trainer`.

The exported checkpoint (`model.safetensors` in the output folder) is the whole model under the official
state-dict names with the EMA weights of the trained parts: `avatar-forcing serve --weights` loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..avatar_forcing import AvatarForcing
from ..scheduler import FlowMatchSchedule
from .data import Clip, WindowSet
from .flow_matching import FlowMatchTable
from .loop import Distributed, LoopSettings, Trainer, export_safetensors
from .objectives import DPOObjective, DPOSettings, FlowMatchingObjective, FlowSettings, Velocity, official_state_dict

CHECKPOINT_NAME = "model.safetensors"


def transformer_trainer(model: AvatarForcing, clips: Sequence[Clip], loop: LoopSettings, out_dir: str | Path,
                        flow: FlowSettings | None = None, dpo: DPOSettings | None = None,
                        device: torch.device | str = "cpu", dist_info: Distributed | None = None,
                        stride: int | None = None) -> Trainer:
    """A flow-matching run, or a DPO run when `dpo` is given (clips must then carry losers)."""
    cfg = model.config
    tcfg = cfg.transformer
    features = cfg.audio.projection_in_features()
    for clip in clips:
        clip.check(tcfg.dim_w, features)
    flow = flow or FlowSettings()
    if flow.noise.block_frames != tcfg.block_frames:
        raise ValueError(f"noise block_frames {flow.noise.block_frames} != the model's {tcfg.block_frames}")
    windows = WindowSet(clips, tcfg.clip_frames, stride or tcfg.block_frames, seed=loop.seed)
    model.to(device)
    velocity = Velocity(model).requires_grad_(True)
    table = FlowMatchTable(FlowMatchSchedule(cfg.sampler))
    if dpo is None:
        objective: FlowMatchingObjective | DPOObjective = FlowMatchingObjective(table, flow, loop.seed)
    else:
        if not windows.has_losers:
            raise ValueError("DPO needs a loser for every clip")
        objective = DPOObjective(table, flow, dpo, loop.seed, velocity)
    export = export_safetensors(lambda ema: official_state_dict(model, ema), CHECKPOINT_NAME)
    return Trainer(velocity, objective, windows, loop, out_dir, export, torch.device(device), dist_info)
