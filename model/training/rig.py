"""A 2D face rig: one portrait, animated by moving its face-mesh landmarks and warping the image piecewise-
affinely over a triangulation of them, for training data made from portraits we may ship (issue: a built-in
model). Controls, in `Expression`: jaw opening, smile, lip rounding, blink, brows, and head yaw / pitch / roll.

Displacements are in units of the portrait's interocular distance (IOD), so one expression looks alike on any
face size. The face sits inside a fixed ring of anchor points (and the image border), so the background stays
put while the face moves. When the lips part, the mouth interior is painted in: a dark cavity with the upper
teeth showing. Head rotation turns the landmarks about the face centre in 3D (the mesh's z) and projects them
orthographically: plausible for the small angles of conversation (about +-20 degrees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from avatar_forcing.errors import NoFaceError

from ..media.face_mesh import EYE_OUTER_LEFT, EYE_OUTER_RIGHT, FaceMesh

# Mesh indices (the canonical MediaPipe face-mesh topology).
UPPER_LIPS_INNER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]  # corner to corner
LOWER_LIPS_INNER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
INNER_LIPS = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191]
LOWER_LIP = [95, 88, 178, 87, 14, 317, 402, 318, 324, 146, 91, 181, 84, 17, 314, 405, 321, 375]
UPPER_LIP = [415, 310, 311, 312, 13, 82, 81, 80, 191, 409, 270, 269, 267, 0, 37, 39, 40, 185]
MOUTH_CORNERS = [61, 78, 291, 308]
# Upper eyelid points and the lower-lid points under them, per eye.
UPPER_LIDS = [246, 161, 160, 159, 158, 157, 173, 466, 388, 387, 386, 385, 384, 398]
LOWER_LIDS = [7, 163, 144, 145, 153, 154, 155, 249, 390, 373, 374, 380, 381, 382]
BROWS = [70, 63, 105, 66, 107, 55, 65, 52, 53, 46, 300, 293, 334, 296, 336, 285, 295, 282, 283, 276]
CAVITY = np.array([52, 18, 24], np.float32)  # RGB of the mouth's inside
TEETH = np.array([226, 222, 210], np.float32)


@dataclass(frozen=True)
class Expression:
    jaw: float = 0.0  # 0 closed .. 1 wide open
    smile: float = 0.0  # 0 .. 1
    rounding: float = 0.0  # 0 .. 1 ("oo": the corners come in)
    blink: float = 0.0  # 0 open .. 1 shut
    brows: float = 0.0  # -1 lowered .. 1 raised
    yaw: float = 0.0  # degrees, + turns the face towards image-right
    pitch: float = 0.0  # degrees, + tilts the chin down (a nod)
    roll: float = 0.0  # degrees, + tilts the head clockwise in the image


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _triangulate(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Delaunay triangles [N, 3] (indices into points) of 2D points inside the image."""
    subdiv = cv2.Subdiv2D((0, 0, width, height))
    index = {}
    for i, (x, y) in enumerate(points):
        key = (float(np.float32(x)), float(np.float32(y)))
        if key not in index:
            index[key] = i
            subdiv.insert(key)
    triangles = []
    for t in subdiv.getTriangleList():
        corners = [index.get((float(np.float32(t[k])), float(np.float32(t[k + 1])))) for k in (0, 2, 4)]
        if None not in corners:
            triangles.append(corners)
    return np.array(triangles, dtype=np.int32)


class FaceRig:
    """A portrait you can pose: `render(Expression(...))` -> a frame like the portrait, face moved."""

    def __init__(self, portrait: np.ndarray, landmarks: np.ndarray | None = None, mesh: FaceMesh | None = None):
        self.portrait = np.ascontiguousarray(portrait)
        h, w = portrait.shape[:2]
        if landmarks is None:
            landmarks = (mesh or FaceMesh())(portrait)
            if landmarks is None:
                raise NoFaceError("the face rig found no face in the portrait: use a frontal, well-lit face")
        self.base = np.asarray(landmarks, dtype=np.float64)[:, :3].copy()
        self.iod = float(np.linalg.norm(self.base[EYE_OUTER_LEFT, :2] - self.base[EYE_OUTER_RIGHT, :2]))
        self.centre = self.base.mean(0)
        # Fixed anchors: a ring around the face and the image border.
        lo, hi = self.base[:, :2].min(0), self.base[:, :2].max(0)
        radius = 0.5 * float(np.max(hi - lo)) * 1.35
        angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        ring = self.centre[:2] + radius * np.stack([np.cos(angles), np.sin(angles)], 1)
        ring = np.clip(ring, 1, [w - 2, h - 2])
        border = np.array([[0, 0], [w / 2, 0], [w - 1, 0], [w - 1, h / 2], [w - 1, h - 1], [w / 2, h - 1],
                           [0, h - 1], [0, h / 2]], dtype=np.float64)
        self.anchors = np.concatenate([ring, border])
        self.triangles = _triangulate(np.concatenate([self.base[:, :2], self.anchors]), w, h)
        self._mouth_y = float(self.base[INNER_LIPS, 1].mean())
        self._lip_gap = float(self.base[14, 1] - self.base[13, 1])  # the portrait's own (closed: about 0)
        self._mouth_half_width = 0.5 * float(np.linalg.norm(self.base[MOUTH_CORNERS[0], :2]
                                                            - self.base[MOUTH_CORNERS[2], :2]))

    # -- the landmarks of an expression ------------------------------------------------------------------------

    def landmarks(self, e: Expression) -> np.ndarray:
        """The 468 landmarks [468, 3] of the portrait's face making this expression."""
        p = self.base.copy()
        iod, cx = self.iod, self.centre[0]
        x, y = p[:, 0], p[:, 1]
        # Jaw: the lower lip, chin and jaw line drop, most in the middle; the upper lip lifts a little.
        below = np.clip((y - self._mouth_y) / (0.08 * iod), 0, 1)
        below[LOWER_LIP] = 1.0
        below[UPPER_LIP] = 0.0
        below[MOUTH_CORNERS] = 0.0
        middle = np.exp(-((x - cx) / (0.9 * iod)) ** 2)
        # The lips part in an ellipse: full in the middle of the mouth, nothing at its corners.
        lips = np.ones(len(p))
        lips[LOWER_LIP + UPPER_LIP] = np.cos(0.5 * np.pi * np.clip(np.abs(x[LOWER_LIP + UPPER_LIP] - cx)
                                                                      / self._mouth_half_width, 0, 1)) ** 0.7
        p[:, 1] += e.jaw * 0.42 * iod * below * middle * lips
        p[UPPER_LIP, 1] -= e.jaw * 0.05 * iod * lips[UPPER_LIP]
        # Smile and rounding: the mouth corners (and the cheeks around them) move out and up, or in.
        for corner, side in ((MOUTH_CORNERS[0], -1.0), (MOUTH_CORNERS[2], 1.0)):
            near = np.exp(-(np.linalg.norm(self.base[:, :2] - self.base[corner, :2], axis=1) / (0.3 * iod)) ** 2)
            p[:, 0] += near * side * (0.13 * e.smile - 0.12 * e.rounding) * iod
            p[:, 1] -= near * 0.07 * e.smile * iod
        # A smile also parts the lips a little, so the teeth show: the thin-lipped smile alone is too subtle for
        # the motion encoder to learn (docs/training.md section 6).
        p[LOWER_LIP, 1] += e.smile * 0.08 * iod * lips[LOWER_LIP]
        p[UPPER_LIP, 1] -= e.smile * 0.03 * iod * lips[UPPER_LIP]
        # Blink: each upper-lid point comes down to the lower-lid point under it.
        p[UPPER_LIDS, 1] += e.blink * 0.92 * (self.base[LOWER_LIDS, 1] - self.base[UPPER_LIDS, 1])
        # Brows.
        p[BROWS, 1] -= e.brows * 0.12 * iod
        # Head rotation about the face centre.
        if e.yaw or e.pitch or e.roll:
            p = (p - self.centre) @ _rotation(e.yaw, e.pitch, e.roll).T + self.centre
        return p

    def mouth_region(self, e: Expression, margin: float = 0.15) -> np.ndarray:
        """bool [H, W]: the box around the lips of the face making expression e, widened by `margin` eye
        distances on every side (the cheeks a smile pulls)."""
        lips = self.landmarks(e)[LOWER_LIP + UPPER_LIP + MOUTH_CORNERS, :2]
        h, w = self.portrait.shape[:2]
        (x0, y0), (x1, y1) = lips.min(0) - margin * self.iod, lips.max(0) + margin * self.iod
        region = np.zeros((h, w), bool)
        region[max(int(y0), 0):max(int(np.ceil(y1)) + 1, 0), max(int(x0), 0):max(int(np.ceil(x1)) + 1, 0)] = True
        return region

    # -- rendering ---------------------------------------------------------------------------------------------

    def render(self, e: Expression) -> np.ndarray:
        """The portrait with the face making expression e: uint8 [H, W, 3]."""
        target = self.landmarks(e)
        frame = self._warp(np.concatenate([target[:, :2], self.anchors]))
        self._paint_mouth(frame, target)
        return frame

    def _warp(self, target: np.ndarray) -> np.ndarray:
        """Piecewise-affine: every output pixel takes its source position from the affine map of the target
        triangle it falls in."""
        h, w = self.portrait.shape[:2]
        source = np.concatenate([self.base[:, :2], self.anchors])
        owner = np.full((h, w), -1, dtype=np.int32)
        affine = np.zeros((len(self.triangles), 2, 3), dtype=np.float64)
        for t, tri in enumerate(self.triangles):
            dst = target[tri].astype(np.float32)
            affine[t] = cv2.getAffineTransform(dst, source[tri].astype(np.float32))
            cv2.fillConvexPoly(owner, np.round(dst).astype(np.int32), int(t))
        ys, xs = np.mgrid[0:h, 0:w]
        m = affine[np.maximum(owner, 0)]
        map_x = (m[..., 0, 0] * xs + m[..., 0, 1] * ys + m[..., 0, 2]).astype(np.float32)
        map_y = (m[..., 1, 0] * xs + m[..., 1, 1] * ys + m[..., 1, 2]).astype(np.float32)
        outside = owner < 0  # not covered (rounding at the border): the pixel itself
        map_x[outside], map_y[outside] = xs[outside], ys[outside]
        return cv2.remap(self.portrait, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    def _paint_mouth(self, frame: np.ndarray, target: np.ndarray) -> None:
        """Where the inner lips have parted: a dark cavity, the upper teeth along the upper lip."""
        ring = target[INNER_LIPS, :2]
        gap = float(target[14, 1] - target[13, 1])
        if gap < self._lip_gap + 0.01 * self.iod:
            return  # no wider than in the portrait: its own mouth shows
        h, w = frame.shape[:2]
        x0, y0 = np.floor(ring.min(0)).astype(int) - 1
        x1, y1 = np.ceil(ring.max(0)).astype(int) + 2
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 <= x0 or y1 <= y0:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [np.round(ring - [x0, y0]).astype(np.int32)], 255, lineType=cv2.LINE_AA)
        alpha = mask.astype(np.float32)[..., None] / 255
        rows = np.arange(y0, y1, dtype=np.float32)[:, None, None]
        # The upper teeth: down from the upper lip for a third of the local gap (at most 0.1 IOD), then the cavity.
        columns = np.arange(x0, x1)
        upper = np.interp(columns, *self._lip_line(target, UPPER_LIPS_INNER))
        lower = np.interp(columns, *self._lip_line(target, LOWER_LIPS_INNER))
        depth = np.minimum(0.33 * np.maximum(lower - upper, 0), 0.1 * self.iod)
        teeth = np.clip((upper + depth - rows[:, :, 0]) / 1.5, 0, 1)[..., None]
        colour = teeth * TEETH + (1 - teeth) * CAVITY
        patch = frame[y0:y1, x0:x1].astype(np.float32)
        frame[y0:y1, x0:x1] = np.clip(alpha * colour + (1 - alpha) * patch, 0, 255).astype(np.uint8)

    @staticmethod
    def _lip_line(target: np.ndarray, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        points = target[indices, :2]
        order = np.argsort(points[:, 0])
        return points[order, 0], points[order, 1]

