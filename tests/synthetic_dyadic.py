"""A synthetic dyadic set with known behaviour, made by code (no media, no networks).

Two people take turns speaking. The avatar's motion lives in four known directions of latent space:
  lip    follows the avatar's own speech envelope (lip motion)
  smile  mirrors the user's smile, 3 frames later
  nod    a nod after the user speaks: the user's smoothed speech envelope, 5 frames later
  yaw    head-pose mirroring: the user's yaw, 8 frames later
plus a little clip-specific noise. The user's motion lives in the same directions (lip = the user's own
envelope; smile, nod and yaw smooth random processes). Audio "features" (the stacked wav2vec2 output a
shard stores) are the speech envelope times a fixed direction, plus noise: enough for a model to hear
who speaks and how loud.

`exp` = (lip, smile) and `pose` = (nod, yaw) are the expression / pose groups the metrics report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avatar_forcing.model.training.data import Clip

LIP, SMILE, NOD, YAW = range(4)
GROUPS = {"exp": [LIP, SMILE], "pose": [NOD, YAW]}


@dataclass
class SyntheticSpec:
    basis: np.ndarray  # [4, dim_w] orthonormal rows: the known motion directions
    scale: float  # latent units per coordinate unit


def smooth(x: np.ndarray, width: int) -> np.ndarray:
    kernel = np.hanning(width + 2)[1:-1]
    return np.convolve(x, kernel / kernel.sum(), mode="same")


def delayed(x: np.ndarray, lag: int) -> np.ndarray:
    return np.concatenate([np.full(lag, x[0]), x[:-lag]]) if lag else x


def turns(frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Avatar / user speech envelopes in [0, 1]: alternating turns of 0.6-1.6 s with syllable modulation."""
    who = np.zeros(frames, dtype=bool)
    t, speaker = 0, bool(rng.integers(2))
    while t < frames:
        length = int(rng.integers(15, 40))
        who[t:t + length] = speaker
        speaker, t = not speaker, t + length
    time = np.arange(frames) / 25.0
    syllables = 0.5 + 0.5 * np.abs(np.sin(2 * np.pi * rng.uniform(3, 5) * time + rng.uniform(0, np.pi)))
    avatar = smooth(who * syllables, 3)
    user = smooth(~who * syllables, 3)
    return avatar.astype(np.float32), user.astype(np.float32)


def random_process(frames: int, rng: np.random.Generator, width: int = 15) -> np.ndarray:
    x = smooth(rng.standard_normal(frames + 2 * width), width)[width:-width]
    return (x / (x.std() + 1e-8)).astype(np.float32)


def make_clips(count: int, frames: int, dim_w: int, audio_features: int, seed: int = 0,
               scale: float = 0.5) -> tuple[list[Clip], SyntheticSpec]:
    rng = np.random.default_rng(seed)
    structure = np.random.default_rng(1234)  # the same directions for every split of the set
    basis = np.linalg.qr(structure.standard_normal((dim_w, 4)))[0].T.astype(np.float32)
    speech_direction = structure.standard_normal(audio_features).astype(np.float32)
    clips = []
    for n in range(count):
        env_a, env_u = turns(frames, rng)
        smile_u, nod_u, yaw_u = (random_process(frames, rng) for _ in range(3))
        user = np.stack([env_u, smile_u, 0.3 * nod_u, yaw_u], 1)
        avatar = np.stack([
            env_a,
            0.8 * delayed(smile_u, 3),
            delayed(smooth(env_u, 9), 5) * 1.5,
            0.8 * delayed(yaw_u, 8),
        ], 1) + 0.05 * rng.standard_normal((frames, 4))
        r_s = rng.standard_normal(dim_w).astype(np.float32) * 0.3
        r_u = rng.standard_normal(dim_w).astype(np.float32) * 0.3

        def features(env: np.ndarray) -> np.ndarray:
            return env[:, None] * speech_direction + 0.1 * rng.standard_normal((frames, audio_features))

        t = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32))
        clips.append(Clip(
            name=f"synthetic-{seed}-{n:04d}",
            motion=t(r_s + scale * avatar.astype(np.float32) @ basis),
            r_s=t(r_s),
            audio=t(features(env_a)),
            user_audio=t(features(env_u)),
            user_motion=t(r_u + scale * user.astype(np.float32) @ basis),
        ))
    return clips, SyntheticSpec(basis, scale)


def coordinates(latents: torch.Tensor | np.ndarray, r_s: torch.Tensor | np.ndarray, spec: SyntheticSpec) -> np.ndarray:
    """[T, dim_w] latents -> [T, 4] known coordinates (lip, smile, nod, yaw)."""
    x = np.asarray(latents, dtype=np.float64) - np.asarray(r_s, dtype=np.float64)
    return x @ spec.basis.T.astype(np.float64) / spec.scale
