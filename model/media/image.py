"""Image decoding, resizing, and conversion to and from the model's [-1, 1] tensors."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch

from avatar_forcing.errors import MediaError
from avatar_forcing.model.media._open import check_input_file


def load_image(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview) -> np.ndarray:
    """Decode a JPEG/PNG/WebP/BMP file or in-memory body -> RGB uint8 [H, W, 3].

    Grey and RGBA images are converted to 3 channels; the EXIF orientation of phone photos is applied.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        where = "the uploaded image"
        if not data:
            raise MediaError("the uploaded image is empty: send a JPEG or PNG file")
    else:
        path = check_input_file(path_or_bytes, "image")
        data = Path(path).read_bytes()
        where = f"image {path}"
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise MediaError(f"{where} is not an image OpenCV can decode: use a JPEG or PNG file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size: INTER_AREA when shrinking (no aliasing), INTER_CUBIC when enlarging.

    The input is expected to be a square crop already; a non-square one is stretched.
    """
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img.copy()
    shrinking = max(h, w) > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interpolation)


def to_model_input(frames: np.ndarray) -> torch.Tensor:
    """RGB uint8 [N, H, W, 3] or [H, W, 3] -> float32 tensor [N, 3, H, W] in [-1, 1]."""
    x = np.asarray(frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [N, H, W, 3] or [H, W, 3], got shape {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).to(torch.float32)
    return (t - 127.5) / 127.5


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Model output [N, 3, H, W] in [-1, 1] -> RGB uint8 [N, H, W, 3] numpy (see `to_uint8_tensor`)."""
    return to_uint8_tensor(frames).cpu().numpy()


def to_uint8_tensor(frames: torch.Tensor) -> torch.Tensor:
    """Model output [..., 3, H, W] in [-1, 1] -> RGB uint8 [..., H, W, 3] on the same device.

    A fixed mapping (clamp, then round((x + 1) * 127.5)), not the reference's min-max over the whole
    video: a stream cannot see the whole video, and a fixed mapping keeps brightness steady.
    """
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim < 4 or frames.shape[-3] != 3:
        raise ValueError(f"expected frames [..., 3, H, W], got shape {tuple(frames.shape)}")
    x = torch.nan_to_num(frames.detach().to(torch.float32), nan=0.0).clamp(-1.0, 1.0)
    x = torch.round((x + 1.0) * 127.5).to(torch.uint8)
    return x.movedim(-3, -1).contiguous()
