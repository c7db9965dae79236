"""Where a session's conditions come from.

`PrecomputedInputs` holds per-frame features computed elsewhere (the offline generator's whole-utterance
encoding, or a test's recorded tensors). `LiveInputs` takes raw avatar speech, microphone PCM and webcam
frames as they arrive and hands the engine raw windows, so the engine can run wav2vec2 and the motion
encoder once for all due sessions together.

Both speak in session frames (25 fps). Frames [0, origin) are a silent lead-in that lets a live session
prime its cache at once; input time 0 lands on frame `origin`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..media.audio import StreamingResampler, pcm16_to_float
from ..media.face import FaceDetector, FaceTracker
from ..sampler import Conditions
from .timeline import AudioTrack, FrameTrack, StreamingNormalizer


@dataclass
class LiveWindows:
    """Raw inputs of one block, to be encoded by the engine."""

    first_frame: int  # session frame of the windows' first feature
    avatar_pcm: np.ndarray  # normalised, window_frames * samples_per_frame
    user_pcm: np.ndarray
    avatar_first_frame: int  # the avatar window may run ahead of the span (queued speech)
    frame_ids: list[int | None]  # webcam frame feeding each frame of the span (None = null motion)
    images: dict[int, np.ndarray]  # face crops of those frames (ids whose crop is gone read as null)


@dataclass
class PrecomputedRequest:
    """A block's conditions, ready: [1, L, d] tensors for input frames [start, stop)."""

    start: int
    stop: int
    conditions: Conditions


@dataclass
class LiveRequest:
    """A block's raw input windows for input frames [start, stop); the engine encodes them."""

    start: int
    stop: int
    windows: LiveWindows


BlockRequest = PrecomputedRequest | LiveRequest


class SessionInputs(Protocol):
    """Where a session's conditions come from, on its input frame axis (what the engine relies on)."""

    @property
    def origin(self) -> int:
        """Input frames [0, origin) are a silent lead-in; input time 0 lands here."""
        ...

    @property
    def total_frames(self) -> int | None:
        """None: a live session without end."""
        ...

    def ready_until(self, now_frame: float) -> int:
        """Input frames before this one have final conditions (now_frame: the real-time frame now)."""
        ...

    def request(self, start: int, stop: int) -> BlockRequest:
        """Claim frames [start, stop) for a block about to be generated."""
        ...

    def skip(self, first: int, count: int) -> None:
        """The engine jumps over input frames [first, first + count) (catch-up): what was queued to be
        said there is said after them instead."""
        ...

    def avatar_audio(self, start: int, stop: int) -> np.ndarray:
        """The avatar's speech belonging to input frames [start, stop)."""
        ...

    def consumed(self, frame: int) -> None:
        """Input frames before `frame` are generated."""
        ...


class PrecomputedInputs:
    """Per-frame features [T, d] for the whole clip; frames past the end replicate the last one."""

    def __init__(self, wa: torch.Tensor, wa_user: torch.Tensor, motion_user: torch.Tensor,
                 avatar_pcm: np.ndarray | None = None, samples_per_frame: int = 640):
        if not (wa.shape[0] == wa_user.shape[0] == motion_user.shape[0]):
            raise ValueError("precomputed conditions must have the same number of frames")
        self.cond = Conditions(wa[None], wa_user[None], motion_user[None])
        self.total_frames = wa.shape[0]
        self.origin = 0
        self.samples_per_frame = samples_per_frame
        self.avatar = AudioTrack()
        if avatar_pcm is not None:
            self.avatar.write(0, avatar_pcm)

    def ready_until(self, now_frame: float) -> int:
        return self.total_frames

    def request(self, start: int, stop: int) -> BlockRequest:
        return PrecomputedRequest(start, stop, self.cond.frames(start, stop))

    def skip(self, first: int, count: int) -> None:
        raise RuntimeError("precomputed inputs are never behind real time: nothing to skip")

    def avatar_audio(self, start: int, stop: int) -> np.ndarray:
        spf = self.samples_per_frame
        return self.avatar.read(start * spf, stop * spf)

    def consumed(self, frame: int) -> None:
        pass


@dataclass
class LiveSettings:
    """How live inputs are windowed and waited for (audio window, look-ahead, late-input wait, lead-in)."""

    fps: int = 25
    sample_rate: int = 16000
    window_frames: int = 60  # wav2vec2 context per block (2.4 s)
    avatar_lookahead_frames: int = 25  # queued speech past the block may inform its features (free: the
                                       # 60-frame window already covers 12 + 25 frames)
    lead_in_frames: int = 50  # silent priming window; input time 0 lands here (the engine sets clip_frames)
    max_wait_frames: int = 5  # a block waits this long past its end for late microphone audio
    motion_hold_s: float = 1.0  # a webcam frame stands in for missing ones this long
    avatar_fixed_std: float | None = None  # fix the avatar speech normalisation (TTS at a known level)
    context_frames: int = 2
    frame_size: int = 512  # face crops are resized to the model's input size
    normalize: bool = True  # False: the pushed audio is already normalised (measurements)


class LiveInputs:
    """Inputs of a live session, on the session's frame axis.

    Pushes may come from different threads (one per stream); each stream keeps its own resampler, and the
    webcam stream its own face tracker (detection is CPU work in the pushing thread, never in the engine).
    """

    def __init__(self, settings: LiveSettings, detector: FaceDetector | None = None):
        self.s = settings
        self._speech_lock = threading.RLock()  # reentrant: subclasses extend skip() under it
        self._speech_resampler: StreamingResampler | None = None
        self._mic_resampler: StreamingResampler | None = None
        self.tracker = FaceTracker(detector or FaceDetector(), size=settings.frame_size)
        self.spf = settings.sample_rate // settings.fps
        self.origin = settings.lead_in_frames
        self.total_frames: int | None = None
        self.avatar = AudioTrack()  # speech the avatar says, in output time
        self.user = AudioTrack()  # microphone, placed by capture time
        self.frames = FrameTrack(settings.fps, hold_s=settings.motion_hold_s)
        self.avatar_norm = StreamingNormalizer(fixed_std=settings.avatar_fixed_std)
        self.user_norm = StreamingNormalizer()
        # First frame not yet claimed by a block (requested, so possibly being generated right now):
        # speech pushed or interrupted from now on only touches frames from here.
        self.next_frame = 0
        self._normalised_until = {"avatar": 0, "user": 0}

    # -- pushes (any thread) ------------------------------------------------------------------------------

    def _resampled(self, pcm: np.ndarray, rate: int | None, which: str) -> np.ndarray:
        """PCM (float32 or int16, mono) at `rate` -> float32 at the model's rate."""
        if rate is None or rate == self.s.sample_rate:
            return pcm16_to_float(pcm) if pcm.dtype == np.int16 else np.asarray(pcm, dtype=np.float32)
        attr = f"_{which}_resampler"
        resampler = getattr(self, attr)
        if resampler is None or resampler.in_rate != rate:
            resampler = StreamingResampler(rate, self.s.sample_rate)
            setattr(self, attr, resampler)
        return resampler.push(pcm)

    def push_speech(self, pcm: np.ndarray, sample_rate: int | None = None) -> int:
        """Queue avatar speech to play after what is queued; returns the frame it starts at."""
        pcm = self._resampled(pcm, sample_rate, "speech")
        with self._speech_lock:  # where it goes and writing it there are one step
            start = max(self.avatar.end, self.next_frame * self.spf, self.origin * self.spf)
            self.avatar.write(start, pcm)
        return start // self.spf

    def interrupt(self) -> None:
        """Drop queued speech no block has claimed yet (barge-in); a block being generated keeps its
        speech, since its lips are being made from it."""
        with self._speech_lock:
            self.avatar.truncate(self.next_frame * self.spf)

    def queued_speech_frames(self) -> int:
        """Frames of speech not generated yet (speech never starts inside the silent lead-in)."""
        return max(0, math.ceil(self.avatar.end / self.spf) - max(self.next_frame, self.origin))

    def push_user_audio(self, pcm: np.ndarray, time_s: float | None = None, sample_rate: int | None = None) -> None:
        """Microphone PCM captured at time_s on the session clock (None: right after the last chunk)."""
        pcm = self._resampled(pcm, sample_rate, "mic")
        if time_s is None:
            self.user.append(pcm)
        else:
            self.user.write(self.origin * self.spf + int(round(time_s * self.s.sample_rate)), pcm)

    def push_user_frame(self, rgb: np.ndarray, time_s: float) -> None:
        """A webcam frame (RGB uint8, any size) captured at time_s on the session clock."""
        self.frames.push(self.tracker.crop(rgb), time_s)

    def push_user_crop(self, crop: np.ndarray, time_s: float) -> None:
        """A face crop already at the model's input size (skips face tracking)."""
        self.frames.push(crop, time_s)

    # -- engine side --------------------------------------------------------------------------------------

    def ready_until(self, now_frame: float) -> int:
        """Frames whose conditions are final: covered by microphone audio, or given up waiting for."""
        covered = self.user.end // self.spf
        waited = int(now_frame) - self.s.max_wait_frames
        return max(covered, waited, self.origin)

    def request(self, start: int, stop: int) -> BlockRequest:
        # Long enough to cover the span even when the avatar window slides ahead into queued speech; the
        # same for both tracks (and every session) so the engine encodes them in one batch.
        self.next_frame = max(self.next_frame, stop)
        w = max(self.s.window_frames, stop - start + self.s.avatar_lookahead_frames)
        lookahead = min(self.s.avatar_lookahead_frames, max(0, math.ceil(self.avatar.end / self.spf) - stop))
        user_first, avatar_first = stop - w, stop + lookahead - w
        self._advance_normalizers(stop)
        avatar = self.avatar.read(avatar_first * self.spf, (avatar_first + w) * self.spf)
        user = self.user.read(user_first * self.spf, stop * self.spf)
        if self.s.normalize:
            avatar, user = self.avatar_norm(avatar), self.user_norm(user)
        ids = [self.frames.slot(f - self.origin).frame_id if f >= self.origin else None for f in range(start, stop)]
        images = {fid: img for fid in dict.fromkeys(f for f in ids if f is not None)
                  if (img := self.frames.image(fid)) is not None}
        return LiveRequest(start, stop, LiveWindows(user_first, avatar, user, avatar_first, ids, images))

    def skip(self, first: int, count: int) -> None:
        with self._speech_lock:
            self.avatar.shift(first * self.spf, count * self.spf)
            self.next_frame = max(self.next_frame, first + count)

    def avatar_audio(self, start: int, stop: int) -> np.ndarray:
        return self.avatar.read(start * self.spf, stop * self.spf)

    def consumed(self, frame: int) -> None:
        """Frames before `frame` are generated; keep only what later windows can still read."""
        keep = (self.s.window_frames + 16) * self.spf
        self.avatar.mark_consumed(frame * self.spf, keep)
        self.user.mark_consumed(frame * self.spf, keep)
        # The next block re-reads its context frames.
        self.frames.mark_consumed((frame - self.origin - 2 * self.s.context_frames) / self.s.fps)

    def _advance_normalizers(self, stop: int) -> None:
        """Feed the running statistics with the audio up to this block, 400 ms at a time."""
        chunk = 10 * self.spf
        for name, track, norm in (("avatar", self.avatar, self.avatar_norm), ("user", self.user, self.user_norm)):
            pos = self._normalised_until[name]
            while pos + chunk <= stop * self.spf:
                norm.update(track.read(pos, pos + chunk))
                pos += chunk
            self._normalised_until[name] = pos
