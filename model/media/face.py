"""Finding the face and cropping the square the model was trained on.

The reference detects with SFD (face_alignment) on the image scaled to height 360 and crops a square
of twice the face size around the face centre. We use OpenCV's Haar frontal-face cascade, which ships
inside opencv-python-headless 4.x and needs no download, with the same scaling and crop rule.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from avatar_forcing.errors import MediaError, NoFaceError, UserError
from avatar_forcing.model.media.image import resize_square

# Haar frontal-face cascades shipped in opencv-python-headless 4.x. Measured on the 396 frames of the
# sample user video (every 3rd) and on 60 noise / blurred-noise images, at scale 1.1, 5 neighbours:
#   "alt":     3% frames missed, 2/60 false positives, ~27 ms per 512x512 frame (2 CPU threads, idle)
#   "default": 17% frames missed (head tilted down), 8/60 false positives, ~22 ms
# Both give the same box size on faces (mean width 236 vs 237 px), so "alt" is the default.
DEFAULT_CASCADE = "haarcascade_frontalface_alt.xml"
BASELINE_CASCADE = "haarcascade_frontalface_default.xml"


class Box(NamedTuple):
    """A face box in pixel coordinates of the original image; score = the detector's confidence."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


def _cascade_path(cascade: str | Path) -> Path:
    """A bare file name is looked up among OpenCV's packaged cascades; anything else is a path."""
    p = Path(cascade)
    if p.parent != Path("."):
        return p
    data = getattr(cv2, "data", None)
    folder = getattr(data, "haarcascades", "") if data is not None else ""
    return Path(folder) / p.name


class FaceDetector:
    """Haar-cascade frontal face detector (`cascade`: a packaged cascade's file name, or a path).

    `score` is the number of raw detections merged into the box (OpenCV's neighbour count): larger
    means more certain, it is not a probability. The cascade object is not safe to share between
    threads, so calls are serialised with a lock.
    """

    def __init__(
        self,
        cascade: str | Path = DEFAULT_CASCADE,
        detect_height: int = 360,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_face_ratio: float = 0.1,
    ):
        path = _cascade_path(cascade)
        if not path.is_file():
            raise UserError(
                f"the face detector's cascade file is missing ({path}); opencv-python-headless 5.x ships none: "
                'install "opencv-python-headless<5"'
            )
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise UserError(
                f"the face detector's cascade file {path} could not be loaded: reinstall opencv-python-headless<5"
            )
        self.detect_height = int(detect_height)
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_face_ratio = float(min_face_ratio)
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Faces in an RGB (or grey) uint8 image, largest first (ties: most confident first)."""
        img = np.asarray(rgb)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        shape_ok = img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))
        if img.dtype != np.uint8 or img.size == 0 or not shape_ok:
            raise ValueError(f"expected a uint8 image [H, W, 3], got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        # Same working resolution as the reference (height 360): keeps the cost fixed per frame.
        scale = self.detect_height / h
        small_size = (max(1, round(w * scale)), self.detect_height)
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        small = cv2.resize(img, small_size, interpolation=interpolation)
        if small.ndim == 2:
            gray = small
        else:
            gray = cv2.cvtColor(small, cv2.COLOR_RGBA2GRAY if small.shape[2] == 4 else cv2.COLOR_RGB2GRAY)
        gray = cv2.equalizeHist(gray)  # Haar features are contrast-sensitive: helps dim webcams
        min_side = max(20, int(self.min_face_ratio * self.detect_height))
        with self._lock:
            rects, neighbours = self._cascade.detectMultiScale2(
                gray,
                scaleFactor=self.scale_factor,
                minNeighbors=self.min_neighbors,
                minSize=(min_side, min_side),
            )
        rects_xywh, counts = np.asarray(rects).reshape(-1, 4), np.asarray(neighbours).reshape(-1)
        boxes = [
            Box(float(x / scale), float(y / scale), float((x + bw) / scale), float((y + bh) / scale), float(n))
            for (x, y, bw, bh), n in zip(rects_xywh, counts, strict=True)
        ]
        boxes.sort(key=lambda b: (b.width * b.height, b.score), reverse=True)
        return boxes


_shared_detector: FaceDetector | None = None
_shared_lock = threading.Lock()


def default_detector() -> FaceDetector:
    """One detector per process: loading the cascade takes ~50 ms."""
    global _shared_detector
    with _shared_lock:
        if _shared_detector is None:
            _shared_detector = FaceDetector()
        return _shared_detector


def square_crop_box(box, image_w: int, image_h: int, pad_ratio: float = 1.0) -> tuple[int, int, int, int]:
    """The reference's crop: a square around the face centre, half-side = max(w, h) / 2 * (1 + pad_ratio).

    Where the square would leave the image it is clamped, and then made square again by shrinking the
    half-side to the nearest border, so the face stays centred (no black borders, no stretching).
    `box` is anything starting with x0, y0, x1, y1. Returns int (x0, y0, x1, y1), x1/y1 exclusive.
    """
    x0, y0, x1, y1 = (float(v) for v in tuple(box)[:4])
    cx = int(round((x0 + x1) / 2))
    cy = int(round((y0 + y1) / 2))
    cx = min(max(cx, 1), image_w - 1)
    cy = min(max(cy, 1), image_h - 1)
    half = int(max(x1 - x0, y1 - y0) / 2 * (1 + pad_ratio))
    half = max(1, min(half, cx, cy, image_w - cx, image_h - cy))
    return cx - half, cy - half, cx + half, cy + half


def _crop_resize(rgb: np.ndarray, crop: tuple[int, int, int, int], size: int) -> np.ndarray:
    x0, y0, x1, y1 = crop
    return resize_square(rgb[y0:y1, x0:x1], size)


def crop_portrait(
    rgb: np.ndarray, size: int = 512, detector: FaceDetector | None = None, pad_ratio: float = 1.0
) -> np.ndarray:
    """Avatar reference image -> the square face crop [size, size, 3] the model expects."""
    detector = detector or default_detector()
    boxes = detector.detect(rgb)
    if not boxes:
        raise NoFaceError(
            "no face found in the portrait: use a frontal, well-lit photo with one face clearly visible "
            "(not in profile, not too small)"
        )
    h, w = rgb.shape[:2]
    return _crop_resize(rgb, square_crop_box(boxes[0], w, h, pad_ratio), size)


def _centre_square(image_w: int, image_h: int) -> tuple[int, int, int, int]:
    side = min(image_w, image_h)
    x0 = (image_w - side) // 2
    y0 = (image_h - side) // 2
    return x0, y0, x0 + side, y0 + side


class FaceTracker:
    """Square face crops of a live webcam stream, cheap per frame.

    Detection runs on the first frame, then every `redetect_every` frames while a face is visible, and
    every `lost_redetect_every` frames while none is found. Between detections the crop box eases
    towards the last detection by `ema` per frame (an exponential moving average of centre and size),
    so new detections glide in instead of jumping. When the face is lost the last good box is held; when
    no face was ever seen the crop is the centre square. A change of frame size starts over.
    """

    def __init__(
        self,
        detector: FaceDetector | None = None,
        size: int = 512,
        redetect_every: int = 50,
        lost_redetect_every: int = 10,
        ema: float = 0.25,
        pad_ratio: float = 1.0,
    ):
        if redetect_every < 1 or lost_redetect_every < 1 or not 0 < ema <= 1:
            raise ValueError("redetect intervals must be >= 1 and ema in (0, 1]")
        self.detector = detector or default_detector()
        self.size = int(size)
        self.redetect_every = int(redetect_every)
        self.lost_redetect_every = int(lost_redetect_every)
        self.ema = float(ema)
        self.pad_ratio = float(pad_ratio)
        self.reset()

    def reset(self) -> None:
        self.face_seen = False  # a face was found at least once since the start / reset
        self.face_visible = False  # the latest detection found a face
        self.crop_box: tuple[int, int, int, int] | None = None  # the crop used for the last frame
        self._frames_since_detect: int | None = None
        self._target: np.ndarray | None = None  # latest detected face: centre x, centre y, side
        self._smooth: np.ndarray | None = None  # eased face: centre x, centre y, side
        self._shape: tuple[int, int] | None = None

    def _redetect_interval(self) -> int:
        return self.redetect_every if self.face_visible else self.lost_redetect_every

    def _pick(self, boxes: list[Box]) -> Box:
        """Stay on the same person: among faces at least half the largest, the one nearest the last box."""
        if self._target is None or len(boxes) == 1:
            return boxes[0]
        biggest = boxes[0].width
        near = [b for b in boxes if b.width >= 0.5 * biggest]
        cx, cy = self._target[0], self._target[1]
        return min(near, key=lambda b: ((b.x0 + b.x1) / 2 - cx) ** 2 + ((b.y0 + b.y1) / 2 - cy) ** 2)

    def _detect(self, rgb: np.ndarray) -> None:
        boxes = self.detector.detect(rgb)
        self.face_visible = bool(boxes)
        if not boxes:
            return  # hold the last good target
        b = self._pick(boxes)
        self._target = np.array([(b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2, max(b.width, b.height)])
        if self._smooth is None:
            self._smooth = self._target.copy()  # first sighting: jump, do not glide in from the centre
        self.face_seen = True

    def crop(self, rgb: np.ndarray) -> np.ndarray:
        """One webcam frame (RGB uint8) -> face crop [size, size, 3]."""
        h, w = rgb.shape[:2]
        if self._shape != (h, w):
            self.reset()
            self._shape = (h, w)
        since = self._frames_since_detect
        if since is None or since >= self._redetect_interval():  # never detected since reset, or due again
            self._detect(rgb)
            since = 0
        self._frames_since_detect = since + 1
        if self._smooth is None:
            self.crop_box = _centre_square(w, h)
        else:
            self._smooth += self.ema * (self._target - self._smooth)
            cx, cy, side = self._smooth
            face = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            self.crop_box = square_crop_box(face, w, h, self.pad_ratio)
        return _crop_resize(rgb, self.crop_box, self.size)


def fixed_crop_box(
    frames: Iterable[np.ndarray],
    detector: FaceDetector | None = None,
    pad_ratio: float = 1.0,
    detect_stride: int = 1,
) -> tuple[int, int, int, int]:
    """The reference's offline crop of a user video: one fixed square for the whole clip.

    The face centre and size are averaged over the detections of every `detect_stride`-th frame (1 = every
    frame, as the reference does). Frames may be any iterable (a file streamed from disk, say).
    """
    detector = detector or default_detector()
    found = []
    shape = None
    for i, frame in enumerate(frames):
        shape = frame.shape
        if i % max(1, int(detect_stride)):
            continue
        boxes = detector.detect(frame)
        if boxes:
            b = boxes[0]
            found.append(((b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2, max(b.width, b.height)))
    if shape is None:
        raise MediaError("the user video has no frames: record a non-empty video")
    if not found:
        raise NoFaceError(
            "no face found in any frame of the user video: film a frontal, well-lit face that fills a good "
            "part of the picture"
        )
    cx, cy, side = np.mean(np.array(found), axis=0)
    h, w = shape[:2]
    return square_crop_box((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), w, h, pad_ratio)


def crop_video_fixed(
    frames: np.ndarray | Sequence[np.ndarray],
    size: int = 512,
    detector: FaceDetector | None = None,
    pad_ratio: float = 1.0,
    detect_stride: int = 1,
) -> np.ndarray:
    """All frames cropped with `fixed_crop_box`: uint8 [N, size, size, 3]."""
    crop = fixed_crop_box(frames, detector, pad_ratio, detect_stride)
    return np.stack([_crop_resize(f, crop, size) for f in frames])
