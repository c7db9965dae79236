"""Portrait codes computed once and shared by every session that uses the same portrait."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from ..media.image import resize_square, to_model_input
from ..motion_autoencoder import MotionAutoencoder, PortraitCode


def portrait_key(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


class PortraitCache:
    """LRU of PortraitCode by image content. Entries in use by a session stay valid after eviction (the
    session holds its own reference); eviction only means a new session re-encodes."""

    def __init__(self, autoencoder: MotionAutoencoder, capacity: int = 32):
        self.autoencoder = autoencoder
        self.capacity = capacity
        self._codes: OrderedDict[str, PortraitCode] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, image: np.ndarray) -> PortraitCode:
        """RGB uint8 face crop (any size; resized to the model's input) -> its code on the model's device."""
        key = portrait_key(image)
        code = self._codes.get(key)
        if code is not None:
            self.hits += 1
            self._codes.move_to_end(key)
            return code
        self.misses += 1
        size = self.autoencoder.config.input_size
        param = next(self.autoencoder.parameters())
        pixels = to_model_input(resize_square(image, size)).to(param.device, param.dtype)
        with torch.inference_mode():  # fp32 even in a bf16 engine: encoded once, reused for every frame
            code = self.autoencoder.animation_code(pixels)
        self._codes[key] = code
        while len(self._codes) > self.capacity:
            self._codes.popitem(last=False)
        return code

    def clear(self) -> None:
        self._codes.clear()

    def __len__(self) -> int:
        return len(self._codes)
