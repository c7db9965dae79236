"""Which sessions advance in the next engine step, and how they are grouped (the engine's step plan).

The scheduler only reads session state. For every session whose next block is due it plans a row: the
block's frame span, the time its last input was captured, and (for a live session that fell behind) how
many input frames to skip so that the block ends at the newest input instead of replaying stale ones.
Rows are grouped by phase (a priming window and a streaming block have different token counts) and each
group gets the static batch size (bucket) it will be padded to. The engine applies the plan.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import FlowTransformerConfig
from .session import Session


class Phase(enum.Enum):
    """The two shapes of a block: a session's priming window, or a streaming block over the cache."""

    PRIMING = "priming"  # the first window of a session: clip_frames tokens, no cache
    STREAMING = "streaming"  # a block over the KV cache: context + block_frames tokens


@dataclass(frozen=True)
class PlannedRow:
    """One session's next block as planned: its span, any catch-up skip, when its inputs were complete."""

    session: Session
    start: int  # first token's model frame (context included)
    stop: int  # one past the last token's model frame
    skip: int  # input frames to skip before this block (catch-up); 0 when on time
    ready_at: float  # clock time at which the block's last input was captured

    @property
    def phase(self) -> Phase:
        return Phase.PRIMING if self.session.next_frame == 0 else Phase.STREAMING


@dataclass(frozen=True)
class PlannedBatch:
    """Rows of one phase run together, padded to `bucket` rows."""

    phase: Phase
    rows: list[PlannedRow]
    bucket: int  # rows are padded with inert copies up to this size


@dataclass(frozen=True)
class StepPlan:
    """Everything one engine step will run, batch by batch."""

    batches: list[PlannedBatch]

    @property
    def rows(self) -> list[PlannedRow]:
        return [row for batch in self.batches for row in batch.rows]


def batch_buckets(max_sessions: int) -> tuple[int, ...]:
    """Powers of two up to the capacity, and the capacity itself: one compiled graph per bucket."""
    sizes = {1 << i for i in range(max_sessions.bit_length()) if 1 << i <= max_sessions}
    return tuple(sorted(sizes | {max_sessions}))


class Scheduler:
    """Plans each engine step from the sessions' state; never changes it."""

    def __init__(self, cfg: FlowTransformerConfig, fps: int, *, buckets: tuple[int, ...] | None = None,
                 batching: bool = True, max_lag_frames: int | None = None):
        """max_lag_frames: a live block may end at most this many frames before the newest input; beyond
        that the session skips ahead (None: never skip, as offline generation wants)."""
        self.cfg = cfg
        self.fps = fps
        self.buckets = buckets
        self.batching = batching
        self.max_lag_frames = max_lag_frames

    def plan(self, sessions: Iterable[Session], now: float) -> StepPlan:
        rows = [row for row in (self.plan_row(s, now) for s in sessions) if row is not None]
        if not self.batching:
            return StepPlan([PlannedBatch(row.phase, [row], self.bucket(1)) for row in rows])
        batches = []
        for phase in Phase:
            group = [row for row in rows if row.phase is phase]
            if group:
                batches.append(PlannedBatch(phase, group, self.bucket(len(group))))
        return StepPlan(batches)

    def plan_row(self, session: Session, now: float) -> PlannedRow | None:
        if session.finished:
            return None
        c = self.cfg
        if session.next_frame == 0:
            start, stop = 0, c.clip_frames
        else:
            start, stop = session.next_frame - c.context_frames, session.next_frame + c.block_frames
        inputs = session.inputs
        now_frame = (now - session.clock_start) * self.fps + inputs.origin
        ready = inputs.ready_until(now_frame)
        skip = self._catch_up(session, stop, ready)
        needed = stop + session.input_offset + skip
        if inputs.total_frames is not None:
            needed = min(needed, inputs.total_frames)
        if ready < needed:
            return None
        # When the block's last input was (or will have been) captured in real time.
        ready_at = session.clock_start + (needed - inputs.origin) / self.fps
        return PlannedRow(session, start, stop, skip, min(ready_at, now))

    def _catch_up(self, session: Session, stop: int, ready: int) -> int:
        """Input frames to skip so that a session behind real time generates from its newest input."""
        if self.max_lag_frames is None or session.next_frame == 0 or session.inputs.total_frames is not None:
            return 0
        behind = ready - (stop + session.input_offset)
        return behind if behind > self.max_lag_frames else 0

    def bucket(self, rows: int) -> int:
        if not self.buckets:
            return rows
        return min((size for size in self.buckets if size >= rows), default=rows)
