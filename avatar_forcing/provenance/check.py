"""Check a video or image for the watermark: per window of frames (2 s by default) and for the whole file."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from avatar_forcing.errors import MediaError

from .watermark import DEFAULT_KEY, GRIDS, Detection, Detector

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class CheckResult:
    windows: list[Detection]
    total: Detection
    fps: float

    @property
    def marked_fraction(self) -> float:
        return sum(w.present for w in self.windows) / len(self.windows) if self.windows else 0.0

    def to_json(self) -> dict:
        return {"watermark": self.total.to_json(), "fps": self.fps, "windows": len(self.windows),
                "windows_marked": sum(w.present for w in self.windows),
                "window_z": [round(w.z, 1) for w in self.windows]}


def is_url(source: str) -> bool:
    return "://" in source


def iter_frames(source: str) -> tuple[float, Iterator[np.ndarray]]:
    """(fps, RGB uint8 frames) of a video file or URL, or one image (fps 0)."""
    if not is_url(source):
        path = Path(source)
        if not path.is_file():
            raise MediaError(f"{source} does not exist: give a video or image file, or a URL of a recording")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            from avatar_forcing.model.media.image import load_image

            return 0.0, iter([load_image(path)])
    try:
        container = av.open(source, timeout=30.0)
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"cannot open {source} ({e}): give a video (mp4, webm, mov) or image file") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{source} has no video stream: give a video or image file")
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 25)

    def frames() -> Iterator[np.ndarray]:
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as e:
            raise MediaError(f"decoding {source} failed ({e}): the file may be damaged or truncated") from None
        finally:
            container.close()

    return fps, frames()


def check_frames(frames: Iterator[np.ndarray], fps: float, window_s: float = 2.0,
                 key: str = DEFAULT_KEY) -> CheckResult:
    """Decide on each whole window of `window_s` (a shorter last one only when it is the only one)."""
    per_window = max(1, round(window_s * fps)) if fps > 0 else 1
    detector, windows = Detector(key), []
    for frame in frames:
        if min(frame.shape[:2]) < GRIDS[0]:
            raise MediaError(f"frames of {frame.shape[1]}x{frame.shape[0]} are too small to carry the mark "
                             f"(at least {GRIDS[0]} px per side)")
        detector.add(frame)
        if detector.window_frames == per_window:
            windows.append(detector.window())
    if detector.total_frames == 0:
        raise MediaError("no frames could be decoded: give a video or image file with a picture")
    if not windows:
        windows.append(detector.window())
    return CheckResult(windows, detector.total(), fps)


def check_source(source: str, window_s: float = 2.0, key: str = DEFAULT_KEY) -> CheckResult:
    fps, frames = iter_frames(source)
    return check_frames(frames, fps, window_s, key)
