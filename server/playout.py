"""Pacing the avatar's video and audio out of one shared clock, so lips stay in sync for hours.

Timeline. Session frame f was captured (as user input) at `origin_time + f / fps` and plays at that time
plus `delay`. Both outgoing tracks tick on their own steady clocks (video: one frame every 40 ms with
90 kHz pts; audio: 20 ms frames) and, at every tick, pick the content whose playout time is now. Because
both map content through the same `delay`, the audio and the video of a frame leave together.

Policy for late and stale content, stated:
- A block that is not ready when its frames are due: the video repeats its last frame and the audio is
  silent; neither advances, and the block's frames that are already stale when it arrives are skipped.
  Every late block raises `delay` by its lateness plus one frame (up to `max_delay`), so a session whose
  compute time grew stops stalling; once no block has been late for `RELAX_AFTER_S`, `delay` returns to
  its target a frame every `RELAX_EVERY_S` (from 1.5 s to 0.7 s in about 6 s), skipping that frame.
- Frames the engine skipped (it fell behind and regenerated from newer input: a gap between one block's
  last frame and the next block's first) are never generated: while their playout time is still ahead,
  the picture holds and the audio is silent for exactly the gap, then playout moves on; when their time
  has passed they are skipped at once with the rest of the stale content. Nothing waits for them.
- Barge-in mutes (it does not regenerate): speech already generated is silenced from the next audio
  frame, and a block whose speech was claimed before the interrupt (the one being generated) plays its
  frames without sound when it arrives.
- Stale content is dropped video first: video more than half a frame behind its playout time is skipped
  at once, audio only when more than 120 ms behind (a short audio gap is worse than a skipped frame).
- Buffers are bounded: blocks older than both tracks' positions are released, and at most `max_blocks`
  are kept (the oldest go first).
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_forcing.model.engine import BlockOutput

VIDEO_CLOCK = 90000
AUDIO_FRAME_S = 0.02
AUDIO_STALE_S = 0.12
RELAX_AFTER_S = 2.0  # no late block for this long: the delay may come back towards its target
RELAX_EVERY_S = 0.2  # ... one frame at a time, this often
RELAX_WINDOW_S = 10.0  # ... and only while every block of this window would still have been on time
RELAX_MARGIN_S = 0.1  # ... this early (a step's jitter on a busy CPU; less would invite the next late block)
MAX_GAPS = 16  # skipped spans remembered (older ones are behind playout anyway)


class PlayableBlock(Protocol):
    """What playout reads of a generated block (a BlockOutput has it; so does ReadyBlock)."""

    first_frame: int
    frames: np.ndarray | None
    audio: np.ndarray  # the block's frames' speech at the playout rate (frames * samples per frame)
    lead_in: bool


@dataclass
class ReadyBlock:
    """A block as it crosses from the model worker to the event loop: the pictures and the sound, without
    the motion latents (GPU tensors the loop has no use for, whose memory would otherwise be held, and
    freed, on the loop thread while playout keeps the block)."""

    first_frame: int
    frames: np.ndarray | None
    audio: np.ndarray
    lead_in: bool
    latency: float  # seconds from the block's last input to its outputs

    @classmethod
    def of(cls, block: BlockOutput) -> ReadyBlock:
        return cls(block.first_frame, block.frames, block.audio, block.lead_in, block.done_at - block.ready_at)


class Playout:
    def __init__(self, fps: int, sample_rate: int, frame_size: int, delay: float, max_delay: float,
                 clock: Callable[[], float] = time.monotonic, max_blocks: int = 8):
        self.fps, self.sample_rate, self.frame_size = fps, sample_rate, frame_size
        self.spf = sample_rate // fps
        self.delay, self.target_delay, self.max_delay = delay, delay, max_delay
        self.clock = clock
        self.max_blocks = max_blocks
        self.origin_time: float | None = None  # set when the engine session opens
        self.blocks: deque[PlayableBlock] = deque()
        self.video_next = 0  # next session frame to show
        self.audio_next = 0  # next session audio sample to play
        self.last_frame = np.zeros((frame_size, frame_size, 3), dtype=np.uint8)
        self.last_late = -math.inf
        self._last_relax = -math.inf
        # (arrival, earliness) of recent blocks: how long before its first frame's slot a block arrived,
        # with no playout delay (its slack is earliness + delay). A lower delay must keep them all on time.
        self._earliness: deque[tuple[float, float]] = deque()
        self.generated_until = 0  # end of the newest block pushed
        self.gaps: deque[tuple[int, int]] = deque(maxlen=MAX_GAPS)  # [start, stop) the engine skipped
        self.mute_before = 0  # barge-in: speech of frames before this was claimed before an interrupt
        self._started = False
        self.ended = False
        # Counters (read by the session's stats and the metrics).
        self.late_blocks = 0
        self.video_sent = self.video_repeated = self.video_dropped = 0
        self.skipped_frames = self.skipped_blocks = 0  # the engine's skip-ahead, as gaps in the blocks
        self.gap_frames_held = 0  # skipped frames whose slot was still ahead (picture held, silence)
        self.audio_sent = self.audio_silent = self.audio_dropped_s = 0.0
        self.video_lag = self.audio_lag = 0.0  # how late the last content left vs its playout time

    # -- timeline -------------------------------------------------------------------------------------------

    def start(self, clock_start: float, origin_frame: int) -> None:
        self.origin_time = clock_start - origin_frame / self.fps
        if not self._started:
            # Begin with whatever is playable now (the end of the silent lead-in), not frame 0.
            first = max(0, math.ceil((self.clock() - self.origin_time - self.delay) * self.fps))
            self.video_next = first
            self.audio_next = first * self.spf
            self._started = True

    def playout_time(self, frame: float) -> float:
        if self.origin_time is None:  # callers check first: there is no timeline before start()
            raise RuntimeError("the playout has not started: no timeline yet")
        return self.origin_time + frame / self.fps + self.delay

    def push(self, block: PlayableBlock) -> bool:
        """Add a generated block; returns True when it is late (its first frame was already due)."""
        block = self._muted(block)
        if block.first_frame > self.generated_until and self.generated_until > 0:
            self.gaps.append((self.generated_until, block.first_frame))
            self.skipped_frames += block.first_frame - self.generated_until
            self.skipped_blocks += 1
        self.generated_until = max(self.generated_until, block.first_frame + self._count(block))
        self.blocks.append(block)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popleft()
        if self.origin_time is None:
            return False
        now = self.clock()
        lateness = now - self.playout_time(block.first_frame)
        if not block.lead_in:
            self._earliness.append((now, -lateness - self.delay))
            while self._earliness and self._earliness[0][0] < now - RELAX_WINDOW_S:
                self._earliness.popleft()
        if lateness <= 0 or block.lead_in:
            self._relax(now)
            return False
        self.late_blocks += 1
        self.last_late = now
        self.delay = min(self.max_delay, self.delay + lateness + 1 / self.fps)
        return True

    def _relax(self, now: float) -> None:
        """Bring a raised delay back towards its target, a frame at a time, once no block has been late for
        a while, and only as far as the recent blocks allow: lowering it below what they needed would
        make the next ones late again (a delay that oscillates drops speech every few seconds)."""
        if not (self.delay > self.target_delay and now - self.last_late > RELAX_AFTER_S
                and now - self._last_relax > RELAX_EVERY_S):
            return
        lower = max(self.target_delay, self.delay - 1 / self.fps)
        # The blocks since the last late one (that one raised the delay by what it needed).
        needed = max((-e for at, e in self._earliness if at > self.last_late), default=-math.inf)
        if lower < needed + RELAX_MARGIN_S:
            return
        self.delay = lower
        self._last_relax = now

    def _muted(self, block: PlayableBlock) -> PlayableBlock:
        """The block with the sound of frames before `mute_before` removed (its speech predates a barge-in)."""
        stop = min(self.mute_before, block.first_frame + self._count(block)) - block.first_frame
        if stop > 0 and np.any(block.audio[: stop * self.spf]):
            block.audio = block.audio.copy()
            block.audio[: stop * self.spf] = 0
        return block

    def interrupt(self, claimed_until: int = 0) -> float:
        """Barge-in: silence speech already generated but not played yet, and mute the speech of frames
        before `claimed_until` in blocks still to come; returns seconds silenced now."""
        self.mute_before = max(self.mute_before, claimed_until)
        silenced = 0
        for block in self.blocks:
            start = block.first_frame * self.spf
            skip = max(0, self.audio_next - start)
            if skip < len(block.audio) and np.any(block.audio[skip:]):
                silenced += len(block.audio) - skip
                block.audio = block.audio.copy()
                block.audio[skip:] = 0
        return silenced / self.sample_rate

    def _count(self, block: PlayableBlock) -> int:
        """Frames in a block: its audio covers exactly its frames (the latents stay with the worker)."""
        return len(block.audio) // self.spf

    def queued_frames(self) -> int:
        return sum(self._count(b) for b in self.blocks if b.first_frame + self._count(b) > self.video_next)

    def _release(self) -> None:
        keep_from = min(self.video_next, self.audio_next // self.spf)
        while self.blocks and self.blocks[0].first_frame + self._count(self.blocks[0]) <= keep_from:
            self.blocks.popleft()

    def _newest_frame_before(self, frame: int) -> np.ndarray | None:
        for block in reversed(self.blocks):
            if block.frames is not None and block.first_frame < frame:
                return block.frames[min(frame, block.first_frame + len(block.frames)) - 1 - block.first_frame]
        return None

    def _gap_end(self, frame: int) -> int | None:
        """End of the skipped span holding `frame`, or None."""
        for start, stop in self.gaps:
            if start <= frame < stop:
                return stop
        return None

    def _block_of(self, frame: int) -> PlayableBlock | None:
        for block in self.blocks:
            if block.first_frame <= frame < block.first_frame + self._count(block):
                return block
        return None

    # -- content at a tick ----------------------------------------------------------------------------------

    def video_frame(self, tick: float) -> np.ndarray:
        """The frame to send at this tick."""
        if self.origin_time is None:
            self.video_repeated += 1
            return self.last_frame
        self._relax(tick)
        due = self.playout_time(self.video_next)
        # Stale: skip to the frame playing now. Not while its block is still being made: a late block is
        # waited for (the picture holds), and its arrival raises the delay so that it plays whole.
        if due < tick - 0.5 / self.fps and self.video_next < self.generated_until:
            target = math.floor((tick - self.origin_time - self.delay) * self.fps)
            self.video_dropped += target - self.video_next
            self.video_next = target
            due = self.playout_time(self.video_next)
        block = self._block_of(self.video_next) if due <= tick + 0.5 / self.fps else None
        if block is None and due <= tick + 0.5 / self.fps and self._gap_end(self.video_next) is not None:
            # Skipped by the engine, its slot is now: hold the picture for that slot, then move on.
            self.video_next += 1
            self.video_repeated += 1
            self.gap_frames_held += 1
            return self.last_frame
        if block is None or block.frames is None:
            # Ahead of time, or its block is late: hold the newest picture generated so far (never black
            # once anything was generated).
            newest = self._newest_frame_before(self.video_next)
            if newest is not None:
                self.last_frame = newest
            self.video_repeated += 1
            return self.last_frame
        self.last_frame = block.frames[self.video_next - block.first_frame]
        self.video_lag = tick - due
        self.video_next += 1
        self.video_sent += 1
        self._release()
        return self.last_frame

    def audio_chunk(self, tick: float, samples: int) -> np.ndarray:
        """The `samples` of audio (playout rate) to send at this tick."""
        silence = np.zeros(samples, dtype=np.float32)
        if self.origin_time is None:
            self.audio_silent += samples
            return silence
        due = self.playout_time(self.audio_next / self.spf)
        if due < tick - AUDIO_STALE_S and self.audio_next < self.generated_until * self.spf:  # as video_frame
            target = math.floor((tick - self.origin_time - self.delay) * self.sample_rate)
            self.audio_dropped_s += (target - self.audio_next) / self.sample_rate
            self.audio_next = target
            due = self.playout_time(self.audio_next / self.spf)
        if due > tick + AUDIO_FRAME_S / 2:
            self.audio_silent += samples
            return silence
        out = np.zeros(samples, dtype=np.float32)
        filled = 0
        while filled < samples:
            frame = (self.audio_next + filled) // self.spf
            block = self._block_of(frame)
            if block is None:
                gap_end = self._gap_end(frame)
                if gap_end is None:
                    break
                filled += min(samples - filled, gap_end * self.spf - (self.audio_next + filled))  # silence
                continue
            offset = self.audio_next + filled - block.first_frame * self.spf
            take = min(samples - filled, len(block.audio) - offset)
            out[filled:filled + take] = block.audio[offset:offset + take]
            filled += take
        if filled == 0:
            self.audio_silent += samples
            return silence  # the block is late: wait for it
        self.audio_lag = tick - due
        self.audio_next += filled  # a late next block then starts where this one ended, not 20 ms in
        self.audio_sent += filled
        self._release()
        return out

    def av_offset(self) -> float:
        return abs(self.audio_lag - self.video_lag)


class _PacedTrack(MediaStreamTrack):
    """A track whose recv() returns one frame per tick of its own steady clock.

    When recv() comes late (a busy loop, a slow encoder), video skips the missed ticks (its rate stays 25
    fps and its timestamps stay true) while audio catches up by up to `max_catch_up` (a receiver's jitter
    buffer absorbs a short burst of audio better than a gap).
    """

    period: float
    max_catch_up: float

    def __init__(self, playout: Playout, on_frame: Callable[[], None] | None = None):
        super().__init__()
        self.playout = playout
        self.on_frame = on_frame
        self._start: float | None = None
        self._index = 0
        self.skipped = 0

    async def _next_tick(self) -> float:
        if self.readyState != "live" or self.playout.ended:
            raise MediaStreamError
        clock = self.playout.clock
        if self._start is None:
            self._start = clock()
        tick = self._start + self._index * self.period
        wait = tick - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        elif -wait > self.max_catch_up:
            behind = int(-wait // self.period)
            self._index += behind
            self.skipped += behind
            tick += behind * self.period
        self._index += 1
        return tick


class AvatarVideoTrack(_PacedTrack):
    kind = "video"
    max_catch_up = 0.02  # half a frame: late ticks are skipped, never burst

    def __init__(self, playout: Playout, on_frame=None):
        super().__init__(playout, on_frame)
        self.period = 1 / playout.fps
        self._time_base = fractions.Fraction(1, VIDEO_CLOCK)

    async def recv(self) -> av.VideoFrame:
        tick = await self._next_tick()
        frame = av.VideoFrame.from_ndarray(self.playout.video_frame(tick), format="rgb24")
        frame.pts = (self._index - 1) * (VIDEO_CLOCK // self.playout.fps)
        frame.time_base = self._time_base
        if self.on_frame is not None:
            self.on_frame()
        return frame


class AvatarAudioTrack(_PacedTrack):
    kind = "audio"
    max_catch_up = 0.2

    def __init__(self, playout: Playout, on_frame=None):
        super().__init__(playout, on_frame)
        self.period = AUDIO_FRAME_S
        self.samples = int(round(AUDIO_FRAME_S * playout.sample_rate))
        self._time_base = fractions.Fraction(1, playout.sample_rate)

    async def recv(self) -> av.AudioFrame:
        tick = await self._next_tick()
        pcm = self.playout.audio_chunk(tick, self.samples)
        data = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout="mono")
        frame.sample_rate = self.playout.sample_rate
        frame.pts = (self._index - 1) * self.samples
        frame.time_base = self._time_base
        if self.on_frame is not None:
            self.on_frame()
        return frame
