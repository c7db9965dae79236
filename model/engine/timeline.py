"""Per-session input timelines on the session clock.

Positions are absolute sample indices at the model's rate (16 kHz) or frame indices at 25 fps, counted from
the session's input origin. Late, missing and bursty input are normal: gaps read as silence / held frames,
data for a span already generated is dropped (and counted), and old data is trimmed so a session can run
for hours in bounded memory.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

import numpy as np


class AudioTrack:
    """Mono float32 samples placed at absolute positions; unwritten samples read as zeros."""

    def __init__(self):
        self._buf = np.zeros(0, dtype=np.float32)
        self._base = 0  # absolute index of _buf[0]
        self.end = 0  # one past the furthest sample ever written
        self.consumed = 0  # samples before this belong to generated blocks: late writes are dropped
        self.dropped_samples = 0
        self._lock = threading.Lock()

    def write(self, pos: int, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        with self._lock:
            if pos < self.consumed:  # the part that arrives after its block was generated is useless
                late = min(len(samples), self.consumed - pos)
                self.dropped_samples += late
                samples, pos = samples[late:], pos + late
            if not len(samples):
                return
            stop = pos + len(samples)
            if stop - self._base > len(self._buf):
                grown = np.zeros(max(stop - self._base, 2 * len(self._buf)), dtype=np.float32)
                grown[:len(self._buf)] = self._buf
                self._buf = grown
            self._buf[pos - self._base:stop - self._base] = samples
            self.end = max(self.end, stop)

    def append(self, samples: np.ndarray) -> int:
        """Write right after the furthest sample; returns the position written at."""
        pos = max(self.end, self.consumed)
        self.write(pos, samples)
        return pos

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros(max(0, stop - start), dtype=np.float32)
        with self._lock:
            lo, hi = max(start, self._base), min(stop, self._base + len(self._buf), self.end)
            if hi > lo:
                out[lo - start:hi - start] = self._buf[lo - self._base:hi - self._base]
        return out

    def truncate(self, pos: int) -> None:
        """Forget everything from pos on (e.g. queued speech on barge-in)."""
        with self._lock:
            if pos < self.end:
                keep = max(0, pos - self._base)
                self._buf[keep:] = 0
                self.end = max(pos, self._base)

    def shift(self, pos: int, by: int) -> None:
        """Move everything queued from pos on `by` samples later, leaving silence in [pos, pos + by)
        (the engine skipped those samples to catch up: what was to be said there is said after them).

        Not atomic against concurrent writes: callers hold their own lock around it and their writes.
        """
        pending = self.read(pos, self.end)
        self.truncate(pos)
        if np.any(pending):  # only silence queued: nothing to move, and the end stays at pos
            self.write(pos + by, pending)

    def mark_consumed(self, pos: int, keep: int) -> None:
        """Samples before pos are final; keep only the last `keep` of them for feature windows."""
        with self._lock:
            self.consumed = max(self.consumed, pos)
            drop = self.consumed - keep - self._base
            if drop > 4096 and drop > len(self._buf) // 2:
                self._buf = self._buf[drop:].copy()
                self._base += drop


class StreamingNormalizer:
    """Stand-in for the utterance-level zero-mean / unit-variance normalisation of a whole clip.

    A live stream has no "whole utterance". This keeps running estimates of the mean and of the standard
    deviation of *voiced* audio (chunks whose RMS is near the recent peak), so silence stays quiet instead
    of being amplified to unit variance (which would make the avatar mouth at background noise).
    """

    def __init__(self, min_std: float = 0.005, max_std: float = 0.2, initial_std: float = 0.05,
                 ema: float = 0.1, voiced_ratio: float = 0.25, peak_decay: float = 0.995,
                 fixed_std: float | None = None):
        self.min_std, self.max_std = min_std, max_std
        self.ema, self.voiced_ratio, self.peak_decay = ema, voiced_ratio, peak_decay
        self.fixed_std = fixed_std
        self.mean = 0.0
        self.std = initial_std if fixed_std is None else fixed_std
        self._peak = 0.0

    def update(self, chunk: np.ndarray) -> None:
        if not len(chunk):
            return
        self.mean += self.ema * (float(chunk.mean()) - self.mean)
        rms = float(np.sqrt(np.mean((chunk - self.mean) ** 2)))
        self._peak = max(rms, self._peak * self.peak_decay)
        if self.fixed_std is None and rms >= self.min_std and rms >= self.voiced_ratio * self._peak:
            self.std = float(np.clip(self.std + self.ema * (rms - self.std), self.min_std, self.max_std))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


@dataclass
class FrameSlot:
    """What feeds the user-motion condition at one 25 fps frame."""

    frame_id: int | None  # id of the pushed webcam frame to use, None = null (no face / no camera)


class FrameTrack:
    """Webcam crops with their session-clock times, resampled to the 25 fps grid by sample-and-hold.

    Frames are kept until the frames they can feed are generated; `max_frames` bounds the memory of a
    burst (the oldest frames are dropped first and counted).
    """

    def __init__(self, fps: int, hold_s: float = 1.0, max_frames: int = 250):
        self.fps = fps
        self.hold_frames = int(round(hold_s * fps))
        self.max_frames = max_frames
        self._frames: dict[int, np.ndarray] = {}
        self._times: list[tuple[float, int]] = []  # (time_s, frame_id), sorted by time
        self._next_id = 0
        self.latest_time = -1.0
        self.dropped_frames = 0
        self._lock = threading.Lock()

    def push(self, crop: np.ndarray, time_s: float) -> int:
        with self._lock:
            fid = self._next_id
            self._next_id += 1
            self._frames[fid] = crop
            bisect.insort(self._times, (time_s, fid))
            self.latest_time = max(self.latest_time, time_s)
            while len(self._times) > self.max_frames:
                self._drop_oldest()
            return fid

    def _drop_oldest(self) -> None:
        _, old = self._times.pop(0)
        self._frames.pop(old, None)
        self.dropped_frames += 1

    def mark_consumed(self, time_s: float) -> None:
        """Frames are needed from time_s on; keep one earlier frame, which may still be held."""
        with self._lock:
            while len(self._times) > 1 and self._times[1][0] <= time_s:
                _, old = self._times.pop(0)
                self._frames.pop(old, None)

    def slot(self, frame_index: int) -> FrameSlot:
        """The latest frame captured before the end of this frame's 40 ms, if not older than the hold."""
        end = (frame_index + 1) / self.fps
        with self._lock:
            i = bisect.bisect_left(self._times, (end, -1))
            best = self._times[i - 1] if i > 0 else None
        if best is None or (end - best[0]) * self.fps > self.hold_frames + 1:
            return FrameSlot(None)
        return FrameSlot(best[1])

    def image(self, frame_id: int) -> np.ndarray | None:
        with self._lock:
            return self._frames.get(frame_id)
