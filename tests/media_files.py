"""Media files made on the fly for tests (WAV bodies, short clips, an audio-only mp4)."""

from __future__ import annotations

import struct
from pathlib import Path

import av
import numpy as np

from avatar_forcing.model.media.audio import load_audio
from avatar_forcing.model.media.video import Mp4Writer


def wav_bytes(samples: np.ndarray, rate: int, kind: str = "pcm16", extensible: bool = False) -> bytes:
    """Build a WAV body. samples: float [n] or [n, channels] in [-1, 1]."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    channels = x.shape[1]
    if kind == "pcm16":
        tag, bits, raw = 1, 16, np.round(x * 32767).astype("<i2").tobytes()
    elif kind == "pcm24":
        v = np.round(x * 8388607).astype(np.int32).reshape(-1)
        b = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8)
        tag, bits, raw = 1, 24, b.tobytes()
    elif kind == "pcm32":
        tag, bits, raw = 1, 32, np.round(x * 2147483647).astype("<i4").tobytes()
    elif kind == "float32":
        tag, bits, raw = 3, 32, x.astype("<f4").tobytes()
    else:
        raise ValueError(kind)
    block = channels * bits // 8
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0)
        fmt += struct.pack("<H", tag) + guid_tail
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
    return b"RIFF" + struct.pack("<I", len(body)) + body


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def numbered_frames(n: int, size: int = 64) -> np.ndarray:
    """Frames whose brightness encodes their index (survives H.264 at these levels)."""
    levels = (np.arange(n) * 200 // max(1, n - 1) + 20).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, size, size, 3)).copy()


def write_clip(path: Path, n: int, fps: float, size: int = 64) -> np.ndarray:
    frames = numbered_frames(n, size)
    with Mp4Writer(path, fps=fps, width=size, height=size, audio_rate=None) as w:
        w.write_frames(frames)
    return frames


def write_audio_only_mp4(path: Path, seconds: float = 1.0) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        f = av.AudioFrame.from_ndarray(sine(440, 16000, seconds)[None, :], format="fltp", layout="mono")
        f.sample_rate = 16000
        f.pts = 0
        for p in s.encode(f):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def write_wav(path: Path, samples: np.ndarray, rate: int, kind: str = "pcm16") -> None:
    Path(path).write_bytes(wav_bytes(samples, rate, kind))


def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """A video-only H.264 mp4 of the given RGB frames at `fps`."""
    with Mp4Writer(path, fps=fps, width=frames.shape[2], height=frames.shape[1], audio_rate=None) as w:
        w.write_frames(frames)


def write_scaled_copy(source: Path, path: Path, side: int, audio_rate: int = 16000) -> None:
    """`source`'s pictures at side x side px, with its sound: for tests that run several peers in the test
    process, where encoding full-size cameras on the 2-core CI machine starves the server beside it."""
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        fps = stream.average_rate
        frames = np.stack([f.to_ndarray(width=side, height=side, format="rgb24") for f in container.decode(stream)])
    with Mp4Writer(path, fps=fps, width=side, height=side, audio_rate=audio_rate) as writer:
        writer.write_frames(frames)
        writer.write_audio(load_audio(source, audio_rate))
