"""Fitting the user-expression maps (model/user_expression.py) on rig renders of the training faces.

Each training look is rendered making random conversation-like expressions (rig_pairs.random_expression); for
each render we know the rig code behind it, the face mesh's features of it (against the look's own resting
shape) and the motion encoder's latent of it (against the look at rest). Two least-squares fits:

- code -> latent (`directions`, `offset`): what the encoder's latent does when a training face makes an
  expression; it explains about 90 % of the latents' variance on a held-out look (docs/training.md §6);
- features -> code (`readout`): ridge regression, because the 939 features are many and correlated (the mesh
  moves neighbouring points together). The mesh, trained on real faces, reads other faces alike; the fit only
  learns which of its points the rig moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..media.face_mesh import FaceMesh, normalised
from ..media.image import to_model_input
from ..motion_autoencoder import MotionAutoencoder
from ..user_expression import landmark_features
from .rig import FaceRig
from .rig_pairs import CODE_FIELDS, expression_code, random_expression

RIDGE = 1e-4  # per sample, on features in units of the eye distance (chosen on a held-out look, §6)


@dataclass
class ExpressionFit:
    renders: int  # renders the mesh found a face in
    latent_r2: float  # share of the latents' variance the code explains
    code_r2: dict[str, float]  # per code field: share of its variance the features explain

    def line(self) -> str:
        fields = ", ".join(f"{k} {v:.2f}" for k, v in self.code_r2.items())
        return (f"{self.renders} renders; latent from code R2 {self.latent_r2:.3f}; code from the face mesh R2: "
                f"{fields}")


def r_squared(predicted: np.ndarray, actual: np.ndarray) -> float:
    return float(1 - ((predicted - actual) ** 2).sum() / max(((actual - actual.mean(0)) ** 2).sum(), 1e-12))


@torch.inference_mode()
def fit_user_expression(autoencoder: MotionAutoencoder, looks: Sequence[np.ndarray], renders_each: int,
                        seed: int = 0, ridge: float = RIDGE, mesh: FaceMesh | None = None) -> ExpressionFit:
    """Set `autoencoder.user_expression` from `renders_each` renders of every look (S x S face crops)."""
    maps = autoencoder.user_expression
    if maps is None:
        raise ValueError("this model has no user_expression extension: nothing to fit")
    if renders_each < 1 or not looks:
        raise ValueError(f"need at least one look and one render each, got {len(looks)} and {renders_each}")
    mesh = mesh or FaceMesh()
    param = next(autoencoder.parameters())
    features, codes, latents = [], [], []
    for index, look in enumerate(looks):
        rig = FaceRig(look, mesh=mesh)
        rest = normalised(rig.base)
        rng = np.random.default_rng([seed, index])
        frames = [look]
        mesh.reset()
        for _ in range(renders_each):
            expression = random_expression(rng)
            frame = rig.render(expression)
            points = mesh(frame)
            if points is None:
                continue
            features.append(landmark_features(points, rest)[0])
            codes.append(expression_code(expression))
            frames.append(frame)
        encoded = torch.cat([autoencoder.encode_motion(to_model_input(np.stack(frames[i:i + 50])).to(param))
                             for i in range(0, len(frames), 50)]).float().cpu().numpy()
        latents.append(encoded[1:] - encoded[:1])
    x, c, y = np.stack(features), np.stack(codes).astype(np.float64), np.concatenate(latents).astype(np.float64)
    with_one = np.concatenate([c, np.ones((len(c), 1))], 1)
    solution = np.linalg.lstsq(with_one, y, rcond=None)[0]
    x_mean, c_mean = x.mean(0), c.mean(0)
    xc = x - x_mean
    readout = np.linalg.solve(xc.T @ xc + ridge * len(xc) * np.eye(xc.shape[1]), xc.T @ (c - c_mean))
    as_tensor = lambda a: torch.from_numpy(np.asarray(a, np.float32))
    maps.set_from(as_tensor(x_mean), as_tensor(readout), as_tensor(c_mean), as_tensor(solution[:-1]),
                  as_tensor(solution[-1]))
    read = xc @ readout + c_mean
    return ExpressionFit(len(x), r_squared(with_one @ solution, y),
                         {name: r_squared(read[:, k], c[:, k]) for k, name in enumerate(CODE_FIELDS)})
