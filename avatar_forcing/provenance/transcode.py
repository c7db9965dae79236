"""What happens to frames after they leave us, for robustness measurements: rescale, then a lossy codec at a
given bitrate (VP8 as WebRTC's realtime encoders run it, H.264 as a recorder would), then decode."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import cv2
import numpy as np

CODECS = {"vp8": ("libvpx", "webm"), "h264": ("libx264", "mp4")}


def rescale(frames: np.ndarray, factor: float) -> np.ndarray:
    """Resize RGB uint8 frames [N, H, W, 3] by `factor` (area filter when shrinking), sizes kept even."""
    if factor == 1.0:
        return frames
    h, w = frames.shape[1:3]
    size = (max(2, round(w * factor / 2) * 2), max(2, round(h * factor / 2) * 2))
    mode = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return np.stack([cv2.resize(f, size, interpolation=mode) for f in frames])


def transcode(frames: np.ndarray, codec: str, bitrate: int, fps: int = 25) -> np.ndarray:
    """Encode RGB uint8 frames [N, H, W, 3] with `codec` ('vp8' or 'h264') at `bitrate` bit/s, decode back."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    name, container_format = CODECS[codec]
    h, w = frames.shape[1:3]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as out:
        stream: av.video.stream.VideoStream = out.add_stream(name, rate=Fraction(fps))  # type: ignore[assignment]
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = bitrate
        if codec == "vp8":  # realtime rate control, as in a WebRTC sender
            stream.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "end-usage": "cbr"}
        else:
            stream.options = {"preset": "veryfast", "tune": "zerolatency"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    buffer.seek(0)
    with av.open(buffer, mode="r") as inp:
        return np.stack([f.to_ndarray(format="rgb24") for f in inp.decode(video=0)])
