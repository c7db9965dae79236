"""The user's webcam read as expressions (`user_expression`, ours; off in the reference).

A motion encoder trained on few faces (the built-in model's: looks of one portrait) reads the motion of a face
it never saw badly: on a real person's face its code hardly follows the jaw, the nod or the smile (docs/training.md
§6), so the avatar cannot answer them. The face mesh was trained on many real faces. With `user_expression` the
user's motion latents come from it instead of from the encoder:

1. the mesh's 468 landmarks of each webcam crop are rotated back onto the user's resting shape
   (their running mean, like `UserReference`'s): the rotation is the head pose (yaw, pitch, roll) and what is
   left over is the expression (`landmark_features`);
2. a linear read-out turns those features into the face rig's expression code (jaw, smile, lip rounding, blink,
   brows, head yaw / pitch / roll: training/rig_pairs.py), fitted on rig renders of the training faces;
3. a linear map turns the code into a motion latent as the encoder gives it for the training faces making
   that expression, added to the canonical motion (canonical.py).

So a user of any face reaches the transformer as one of the faces it was trained with, making what the user
makes. Both maps are buffers in the checkpoint (`motion_autoencoder.user_expression.*`), set by
`avatar-forcing train user-expression` (training/user_expression.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .canonical import UserReference
from .media.face_mesh import FaceMesh, euler_degrees, normalised, rigid_fit

MESH_POINTS = 468
# x, y of every landmark relative to the resting shape, then yaw, pitch, roll.
FEATURES = 2 * MESH_POINTS + 3
# The face rig's expression code: training/rig_pairs.py CODE_FIELDS (a test holds them equal).
CODE_FIELDS = 8
# Training commands accept a checkpoint without these buffers (`load_model(start_fresh=...)`).
EXTENSION_BUFFERS = ("user_expression",)


def landmark_features(points: np.ndarray, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks [468, 3] (pixels) and a resting shape [468, 3] (normalised, `normalised`) -> (features
    [FEATURES], the shape rotated back onto the rest [468, 3])."""
    shape = normalised(points)
    rotation = rigid_fit(shape, rest)
    upright = shape @ rotation
    # Not scaled onto the rest: a turn shortens the eye distance `normalised` divides by (1 % at 8 degrees), but
    # fitting the scale too took a real person's listening ratios down on all six conversations measured
    # (docs/training.md §6).
    features = np.concatenate([(upright - rest)[:, :2].reshape(-1), euler_degrees(rotation)])
    return features, upright


class UserExpressionMaps(nn.Module):
    """The two linear maps, kept in the checkpoint. Zero until `set_from`: a model whose maps were never set
    refuses to read a user (`require_set`)."""

    feature_mean: torch.Tensor
    readout: torch.Tensor
    code_mean: torch.Tensor
    directions: torch.Tensor
    offset: torch.Tensor

    def __init__(self, style_dim: int):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(FEATURES))
        self.register_buffer("readout", torch.zeros(FEATURES, CODE_FIELDS))  # features -> code
        self.register_buffer("code_mean", torch.zeros(CODE_FIELDS))
        self.register_buffer("directions", torch.zeros(CODE_FIELDS, style_dim))  # code -> latent
        self.register_buffer("offset", torch.zeros(style_dim))

    @torch.no_grad()
    def set_from(self, feature_mean: torch.Tensor, readout: torch.Tensor, code_mean: torch.Tensor,
                 directions: torch.Tensor, offset: torch.Tensor) -> None:
        for name, value in (("feature_mean", feature_mean), ("readout", readout), ("code_mean", code_mean),
                            ("directions", directions), ("offset", offset)):
            target = getattr(self, name)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"user_expression.{name}: expected shape {list(target.shape)}, got "
                                 f"{list(value.shape)}")
            target.copy_(value.float())

    def require_set(self) -> None:
        if not self.readout.any():
            raise ValueError("this checkpoint's user-expression maps were never set (its "
                             "motion_autoencoder.user_expression.* buffers are zero): make them with "
                             "`avatar-forcing train user-expression`")

    def codes(self, features: torch.Tensor) -> torch.Tensor:
        """Features [N, FEATURES] -> the rig's expression code [N, CODE_FIELDS]."""
        return (features - self.feature_mean) @ self.readout + self.code_mean

    def latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Expression codes [N, CODE_FIELDS] -> motion latents relative to the training faces' rest [N, style_dim]."""
        return codes @ self.directions + self.offset


class UserExpressionReader:
    """One user's webcam crops -> motion latents, in time order (the resting shape moves on with each). A crop
    where the mesh finds no face repeats the last reading (the rest, before any face)."""

    def __init__(self, maps: UserExpressionMaps, canonical_motion: torch.Tensor, horizon: int):
        if horizon < 1:
            raise ValueError(f"the reference horizon must be at least one frame, not {horizon}")
        self.maps = maps
        self.canonical = canonical_motion.reshape(-1)
        self.horizon = horizon
        self.mesh: FaceMesh | None = None  # made on first use, in the thread that runs the model
        self.rest: np.ndarray | None = None
        self.frames = 0
        self.last = np.zeros(FEATURES)

    def features(self, crop: np.ndarray) -> np.ndarray:
        """One crop (uint8 [S, S, 3]) -> its features; the resting shape takes it in."""
        if self.mesh is None:
            self.mesh = FaceMesh()
        points = self.mesh(crop)
        if points is None:
            return self.last
        if self.rest is None:
            self.rest = normalised(points)
        features, upright = landmark_features(points, self.rest)
        # The mean of all faces until `horizon`, then an average that forgets over `horizon` frames.
        self.frames += 1
        weight = 1.0 / min(self.frames, self.horizon)
        self.rest = (1 - weight) * self.rest + weight * upright
        self.last = features
        return features

    @torch.no_grad()
    def latents(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """Crops [N] in time order -> motion latents [N, style_dim] (float32, on the maps' device)."""
        maps = self.maps
        features = torch.from_numpy(np.stack([self.features(c) for c in crops])).to(maps.readout)
        return self.canonical.to(maps.readout) + maps.latents(maps.codes(features))


# What one user's webcam crops go through (`MotionAutoencoder.user_reference`).
UserMotionReader = UserReference | UserExpressionReader | None
