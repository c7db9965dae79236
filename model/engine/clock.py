"""Mapping a media stream's own timestamps onto the session clock.

Each incoming stream (microphone RTP, webcam RTP, a file) carries timestamps from its sender's clock, with
an arbitrary origin, network jitter on arrival, and a rate that drifts from ours by up to a few hundred ppm.
The mapper estimates `session_time = media_time + offset` from (media_time, arrival_time) pairs: the
offset is the smallest `arrival - media` seen over a sliding window (the least-delayed packets tell the
transport delay best), so jitter does not move it and a slow drift is followed as the window slides.
"""

from __future__ import annotations

from collections import deque


class TimestampMapper:
    """Maps a client's media timestamps to the session clock, following drift and ignoring jitter."""

    def __init__(self, window_s: float = 10.0, max_step_s: float = 0.5):
        self.window_s = window_s
        self.max_step_s = max_step_s  # larger jumps are a restart of the sender: re-anchor at once
        self._samples: deque[tuple[float, float]] = deque()  # (arrival, arrival - media)
        self.offset: float | None = None
        self.resets = 0

    def map(self, media_time: float, arrival_time: float) -> float:
        """Session time of a packet with this media timestamp that arrived at arrival_time."""
        lag = arrival_time - media_time
        if self.offset is not None and abs(lag - self.offset) > self.max_step_s:
            self._samples.clear()
            self.resets += 1
        # A monotonic deque: lags increase from front to back, so the front is the window's minimum.
        while self._samples and self._samples[-1][1] >= lag:
            self._samples.pop()
        self._samples.append((arrival_time, lag))
        while self._samples[0][0] < arrival_time - self.window_s:
            self._samples.popleft()
        self.offset = self._samples[0][1]
        return media_time + self.offset
