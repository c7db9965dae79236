"""Face parameters measured on video frames, for evaluation: the 468-point face mesh, then head pose, mouth
opening, smile and expression from it.

The mesh itself and the geometry of its landmarks (scale, rigid pose) are in model/media/face_mesh.py: serving
reads the user's webcam with them too.

Measures, all scale-free (divided by the distance between the outer eye corners, the interocular distance):
- mouth opening: inner upper lip to inner lower lip;
- smile: mouth corner to mouth corner (width);
- head pose: yaw, pitch, roll (degrees) of the rigid fit of the landmarks to a reference shape (the first
  video's mean shape: a clip's pose is relative, which rPCC, Var and SID do not mind);
- expression: what the rigid fit leaves (the non-rigid residual), reduced by PCA fitted on reference videos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..media.face_mesh import (
    LOWER_LIP,
    MOUTH_LEFT,
    MOUTH_RIGHT,
    UPPER_LIP,
    euler_degrees,
    interocular,
    normalised,
    rigid_fit,
)

# -- measures ---------------------------------------------------------------------------------------------------


def mouth_opening(points: np.ndarray) -> np.ndarray:
    """[T] inner-lip gap over interocular distance (0 closed, ~0.3-0.5 wide open)."""
    gap = np.linalg.norm(points[..., UPPER_LIP, :2] - points[..., LOWER_LIP, :2], axis=-1)
    return gap / interocular(points)


def smile(points: np.ndarray) -> np.ndarray:
    """[T] mouth width over interocular distance (grows with a smile)."""
    width = np.linalg.norm(points[..., MOUTH_LEFT, :2] - points[..., MOUTH_RIGHT, :2], axis=-1)
    return width / interocular(points)


def head_motion_energy(pose: np.ndarray, mask: np.ndarray, smoothing: int = 5, window: int = 50) -> float:
    """Mean squared head movement (degrees^2) over the frames in `mask`: the pose [T, 3] smoothed over
    `smoothing` frames (the mesh's frame-to-frame jitter out), minus its `window`-frame moving average (slow
    drift out). A listener who nods scores high; one who only sways, low."""
    def moving(x: np.ndarray, n: int) -> np.ndarray:
        kernel = np.ones(n) / n
        padded = np.pad(x, ((n // 2, n - 1 - n // 2), (0, 0)), mode="edge")
        return np.stack([np.convolve(padded[:, k], kernel, mode="valid") for k in range(x.shape[1])], 1)

    movement = moving(pose, smoothing) - moving(pose, window)
    mask = np.asarray(mask, bool)
    return float((movement[mask] ** 2).sum(1).mean()) if mask.any() else 0.0


@dataclass
class FaceParameters:
    """Per-frame measures of one video."""

    pose: np.ndarray  # [T, 3] yaw, pitch, roll (degrees, relative to the reference shape)
    residual: np.ndarray  # [T, 468 * 3] non-rigid residual (normalised units)
    mouth: np.ndarray  # [T]
    smile: np.ndarray  # [T]


def face_parameters(points: np.ndarray, reference: np.ndarray) -> FaceParameters:
    """Measures of a video's landmarks [T, 468, 3] against a reference shape [468, 3] (normalised)."""
    shapes = normalised(points)
    pose, residual = [], []
    for shape in shapes:
        r = rigid_fit(shape, reference)
        pose.append(euler_degrees(r))
        residual.append((shape @ r - reference).reshape(-1))  # the shape, rotated back, minus the reference
    return FaceParameters(np.array(pose), np.array(residual), mouth_opening(points), smile(points))


class LandmarkExtractor:
    """Table-4 parameters from videos: {"exp": expression PCA coordinates [T, k], "pose": [T, 3]}, and the
    mouth opening for the lip-sync proxy. `fit` sets the reference shape and the expression basis from
    reference videos' landmarks (e.g. the ground truth's)."""

    def __init__(self, components: int = 10):
        self.components = components
        self.reference: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.basis: np.ndarray | None = None  # [k, 468 * 3]

    def fit(self, videos: list[np.ndarray]) -> LandmarkExtractor:
        """videos: landmarks [T, 468, 3] each (frames without a face are NaN and left out)."""
        shapes = [normalised(v[~np.isnan(v).any(axis=(1, 2))]) for v in videos]
        self.reference = np.concatenate(shapes).mean(0)
        residual = np.concatenate([face_parameters(v[~np.isnan(v).any(axis=(1, 2))], self.reference).residual
                                   for v in videos])
        self.mean = residual.mean(0)
        _, _, vt = np.linalg.svd(residual - self.mean, full_matrices=False)
        self.basis = vt[: self.components]
        return self

    def __call__(self, points: np.ndarray) -> dict[str, np.ndarray]:
        if self.reference is None or self.basis is None or self.mean is None:
            raise RuntimeError("fit the extractor on reference videos first")
        p = face_parameters(points, self.reference)
        return {"exp": (p.residual - self.mean) @ self.basis.T, "pose": p.pose}

    def mouth_opening(self, points: np.ndarray) -> np.ndarray:
        return mouth_opening(points)
