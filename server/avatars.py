"""Uploaded portraits: the face found and cropped once, kept by id (least recently used forgotten first)."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from avatar_forcing.errors import MediaError
from avatar_forcing.model.media.face import FaceDetector, crop_portrait
from avatar_forcing.model.media.image import load_image

from .image_header import image_size

# Largest portrait decoded: 40 megapixels (a 48 MP phone photo must be downscaled first). Decoding needs
# about 6 bytes a pixel, so this bounds one upload to ~250 MB however small its file.
MAX_IMAGE_PIXELS = 40_000_000


class ImageTooLarge(MediaError):
    """The image declares more pixels than the server decodes."""


@dataclass
class Avatar:
    avatar_id: str
    crop: np.ndarray  # RGB uint8, the model's input size
    jpeg: bytes
    source_size: tuple[int, int]  # width, height of the upload
    created_at: float


class AvatarStore:
    def __init__(self, size: int, capacity: int):
        self.size = size
        self.capacity = capacity
        self._items: OrderedDict[str, Avatar] = OrderedDict()
        self._lock = threading.Lock()
        self._local = threading.local()  # one cascade per thread: OpenCV detectors are not thread-safe

    def _detector(self) -> FaceDetector:
        if not hasattr(self._local, "detector"):
            self._local.detector = FaceDetector()
        return self._local.detector

    def add(self, data: bytes) -> Avatar:
        """Decode, find the face, crop (CPU work: call from a worker thread). Raises MediaError."""
        width, height = image_size(data)  # from the header: a pixel bomb is refused before decoding
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"the image is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS // 10**6} "
                                "megapixel limit: send a smaller photo (a portrait needs under 2000x2000)")
        if width == 0 or height == 0:
            raise MediaError(f"the image header declares {width}x{height} pixels: re-export the photo")
        image = load_image(data)
        crop = crop_portrait(image, size=self.size, detector=self._detector())
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        avatar = Avatar(secrets.token_urlsafe(9), crop, jpeg.tobytes() if ok else b"",
                        (image.shape[1], image.shape[0]), time.time())
        with self._lock:
            self._items[avatar.avatar_id] = avatar
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return avatar

    def get(self, avatar_id: str) -> Avatar | None:
        with self._lock:
            avatar = self._items.get(avatar_id)
            if avatar is not None:
                self._items.move_to_end(avatar_id)
            return avatar

    def list(self) -> list[Avatar]:
        with self._lock:
            return list(reversed(self._items.values()))
