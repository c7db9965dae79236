"""The motion auto-encoder in channels_last memory (EngineSettings.channels_last) gives the frames of the default
layout: same model, same seeds, same inputs, fp32 and bf16 (a layout change must never change the picture)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden_data import model_folders, relative_l2, small_model

from avatar_forcing.model.engine import EngineSettings, StreamingEngine

LATE = 1e6


def rollout(folder, precision: str, channels_last: bool) -> tuple[np.ndarray, torch.Tensor, torch.nn.Module]:
    model = small_model(folder)  # fresh: channels_last converts the model's weights in place
    engine = StreamingEngine(model, EngineSettings(max_sessions=2, precision=precision, channels_last=channels_last))
    size = model.config.motion.input_size
    for seed in (1, 2):
        crop = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
        engine.open_session(crop, seed=seed, session_id=f"s{seed}", now=0.0)
    frames, latents = [], []
    for _ in range(3):
        for out in sorted(engine.step(now=LATE), key=lambda o: o.session_id):
            frames.append(out.frames)
            latents.append(out.latents)
    return np.concatenate(frames), torch.cat(latents), model


@pytest.mark.parametrize("folder", model_folders())
@pytest.mark.parametrize("precision,latent_bound,mean_level_bound", [("float32", 1e-5, 0.05), ("bfloat16", 2e-2, 1.5)])
def test_channels_last_gives_the_same_frames(folder, precision, latent_bound, mean_level_bound):
    plain_frames, plain_latents, _ = rollout(folder, precision, channels_last=False)
    nhwc_frames, nhwc_latents, model = rollout(folder, precision, channels_last=True)
    convs = [p for p in model.motion_autoencoder.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs), "weights converted"
    assert plain_frames.shape == nhwc_frames.shape and len(plain_frames) >= 20
    assert relative_l2(nhwc_latents, plain_latents) < latent_bound
    diff = np.abs(nhwc_frames.astype(int) - plain_frames.astype(int))
    assert diff.mean() < mean_level_bound, f"mean difference {diff.mean():.3f} levels"
