"""Utterances of the avatar's speech and the playback events a voice agent takes turns by.

An utterance is what the application pushed until it marked its end (`flush` / `end_of_speech` on the
speech WebSocket), or one WAV upload. Its speech sits at known places on the session's playback track
(pieces of [start, stop) samples at the playout rate); the pacer's audio position says how much of it has
left the server. The events follow LiveKit's avatar protocol:

- `playback_started` once the utterance's first sample has been played out;
- `playback_finished {position_s, interrupted: false}` once its last sample has been played out (not when
  it was queued), and only after its end was marked;
- on an interrupt: `interrupted {dropped_seconds}`, then `playback_finished {position_s, interrupted: true}`
  for every utterance not finished yet (position_s: how much of it was heard).

Pieces are added from media threads, moved by the model worker (catch-up skips frames and says the
queued speech later) and read on the event loop, hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

RECENT_EVENTS = 32  # kept for GET /v1/sessions/{id}


@dataclass
class Utterance:
    id: int
    pieces: list[list[int]] = field(default_factory=list)  # [start, stop) on the playback track
    ended: bool = False  # its end was marked: nothing more will be added
    started: bool = False
    finished: bool = False

    def played(self, position: int) -> int:
        """Samples of it played out when the pacer is at `position`."""
        return sum(max(0, min(position, stop) - start) for start, stop in self.pieces)

    @property
    def samples(self) -> int:
        return sum(stop - start for start, stop in self.pieces)


class PlaybackTracker:
    def __init__(self, rate: int, clock=time.time):
        self.rate = rate
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: deque[Utterance] = deque()  # not finished, in order
        self._open: Utterance | None = None
        self._next_id = 1
        self.recent: deque[dict] = deque(maxlen=RECENT_EVENTS)

    # -- where speech went (any thread; SpeechInputs calls these under its speech lock) ----------------------

    def add(self, start: int, stop: int) -> int:
        """Speech queued at [start, stop) belongs to the open utterance (a new one if none is open)."""
        with self._lock:
            utterance = self._open_utterance()
            if stop > start:
                last = utterance.pieces[-1] if utterance.pieces else None
                if last is not None and last[1] == start:
                    last[1] = stop  # contiguous chunks of a stream: one piece
                else:
                    utterance.pieces.append([start, stop])
            return utterance.id

    def end(self) -> int:
        """Mark the open utterance's end (an empty one if none is open: it finishes at once)."""
        with self._lock:
            utterance = self._open_utterance()
            utterance.ended = True
            self._open = None
            return utterance.id

    def shift(self, at: int, by: int) -> None:
        """Speech from `at` on now plays `by` samples later (the engine skipped frames to catch up)."""
        with self._lock:
            for utterance in self._pending:
                moved = []
                for start, stop in utterance.pieces:
                    if start >= at:
                        moved.append([start + by, stop + by])
                    elif stop > at:
                        moved += [[start, at], [at + by, stop + by]]
                    else:
                        moved.append([start, stop])
                utterance.pieces = moved

    def truncate(self, at: int) -> None:
        """Speech from `at` on is gone (barge-in)."""
        with self._lock:
            for utterance in self._pending:
                utterance.pieces = [[start, min(stop, at)] for start, stop in utterance.pieces if start < at]

    def _open_utterance(self) -> Utterance:
        if self._open is None:
            self._open = Utterance(self._next_id)
            self._next_id += 1
            self._pending.append(self._open)
        return self._open

    # -- what was heard (event loop) ------------------------------------------------------------------------

    def poll(self, position: int) -> list[dict]:
        """Events due now that the pacer has played out every sample before `position`."""
        events = []
        with self._lock:
            for utterance in self._pending:
                if not utterance.started and utterance.pieces and position > utterance.pieces[0][0]:
                    utterance.started = True
                    events.append(self._event("playback_started", utterance))
                if utterance.ended and (not utterance.pieces or position >= utterance.pieces[-1][1]):
                    utterance.finished = True
                    events.append(self._finished(utterance, position, interrupted=False))
            self._forget_finished()
        return events

    def interrupt(self, position: int, dropped_s: float) -> list[dict]:
        """Barge-in at pacer position `position`: every utterance not finished yet ends, interrupted."""
        events = [self._note({"type": "interrupted", "dropped_seconds": round(dropped_s, 3), "at": self.clock()})]
        with self._lock:
            for utterance in self._pending:
                utterance.ended = utterance.finished = True
                events.append(self._finished(utterance, position, interrupted=True))
            self._open = None
            self._forget_finished()
        return events

    def unfinished(self) -> int:
        with self._lock:
            return len(self._pending)

    def _forget_finished(self) -> None:
        while self._pending and self._pending[0].finished:
            self._pending.popleft()
        if any(u.finished for u in self._pending):  # rare: a later utterance finished first (empty one)
            self._pending = deque(u for u in self._pending if not u.finished)

    def _finished(self, utterance: Utterance, position: int, interrupted: bool) -> dict:
        played = utterance.played(position) if interrupted else utterance.samples
        return self._event("playback_finished", utterance, position_s=round(played / self.rate, 3),
                           interrupted=interrupted)

    def _event(self, kind: str, utterance: Utterance, **fields) -> dict:
        return self._note({"type": kind, "utterance_id": utterance.id, **fields, "at": self.clock()})

    def _note(self, event: dict) -> dict:
        self.recent.append(event)
        return event
