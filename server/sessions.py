"""All sessions of the server: admission against capacity, lookup, timeouts, and periodic statistics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

from . import session as session_module
from .avatars import Avatar
from .config import ServerSettings
from .errors import ApiError
from .memory import release_free_memory
from .metrics import ServerMetrics
from .session import ServerSession
from .speech import SpeechInputs
from .worker import ModelWorker

log = logging.getLogger("avatar_forcing.server.sessions")

RETRY_AFTER_FULL_S = 10
RETRY_AFTER_LOADING_S = 5
ENDED_VISIBLE_S = 60  # an ended session still answers GET (state "closed") this long
OVERLOAD_ON, OVERLOAD_OFF = 0.9, 0.75  # worker utilisation over the last 5 s


class SessionManager:
    def __init__(self, settings: ServerSettings, worker: ModelWorker, metrics: ServerMetrics, executor: Executor,
                 fps: int, sample_rate: int):
        self.settings, self.worker, self.metrics, self.executor = settings, worker, metrics, executor
        self.fps, self.sample_rate = fps, sample_rate
        self.overloaded = False
        self.sessions: dict[str, ServerSession] = {}
        self.draining = False
        self.ended: dict[str, tuple[float, dict]] = {}  # recently ended: when, final snapshot
        self._housekeeping: asyncio.Task | None = None
        self._ended_since_trim = False
        self.prepare_offer: Callable[[str], str] = lambda sdp: sdp  # e.g. the preferred video codec first

    @property
    def free(self) -> int:
        return max(0, self.settings.max_sessions - len(self.sessions))

    def _update_gauges(self) -> None:
        self.metrics.sessions_active.set(len(self.sessions))
        self.metrics.capacity_free.set(self.free if self.refusal() is None else 0)

    def refusal(self) -> ApiError | None:
        """Why a new session would be refused now (503 with Retry-After), or None: the one rule behind
        POST /v1/sessions, /readyz and the free-capacity gauge."""
        if self.draining:
            return ApiError(503, "draining", "this server is shutting down; open the session on another one",
                            {"Retry-After": "1"})
        if not self.worker.ready.is_set():
            reason = f"the model failed to load: {self.worker.error}" if self.worker.error else "the model is loading"
            return ApiError(503, "not_ready", reason, {"Retry-After": str(RETRY_AFTER_LOADING_S)})
        if self.free == 0:
            return ApiError(503, "at_capacity", f"all {self.settings.max_sessions} sessions of this server are in "
                                                f"use; retry later or on another server",
                            {"Retry-After": str(RETRY_AFTER_FULL_S)})
        if self.settings.overload_admission == "predict" and self.would_overload():
            return ApiError(503, "overloaded", "this server's sessions are already behind real time; a new one "
                                               "would slow them further: retry later or on another server",
                            {"Retry-After": str(RETRY_AFTER_FULL_S)})
        return None

    def admit(self) -> None:
        refused = self.refusal()
        if refused is not None:
            self.metrics.sessions_rejected.labels(refused.code).inc()
            raise refused

    async def create(self, avatar: Avatar, sdp: str, kind: str, seed: int | None) -> tuple[ServerSession, str]:
        self.admit()  # again: capacity may have gone while the request was read
        engine = self.worker.live_engine()  # admit(): the worker is ready, so its engine is loaded
        inputs = await asyncio.get_running_loop().run_in_executor(self.executor, SpeechInputs, engine.live_settings)
        self.admit()  # and again after that await: the check and the insert below must not be split
        session = ServerSession(self.settings, avatar, inputs, self.worker, self.metrics, self.executor,
                                self.fps, self.sample_rate, seed)
        session.on_closed = self._closed
        self.sessions[session.id] = session  # holds the capacity while negotiating
        self._update_gauges()
        try:
            answer = await session.negotiate(self.prepare_offer(sdp), kind)
        except ApiError:
            self.metrics.sessions_rejected.labels("bad_offer").inc()
            await session.close("bad_offer")
            raise
        except BaseException:
            await session.close("error")
            raise
        session.negotiated = True
        self.metrics.sessions_started.inc()
        log.info("session %s opened with avatar %s", session.id, avatar.avatar_id, extra={"session_id": session.id})
        return session, answer

    def get(self, session_id: str) -> ServerSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(404, "unknown_session", f"no session {session_id!r} on this server (it ended, or never "
                                                   "existed)")
        return session

    def describe(self, session_id: str) -> dict:
        """A live session's state, or for a while after it ended, its final state ("closed", with why)."""
        ended = self.ended.get(session_id)
        if ended is not None:
            return ended[1]
        return self.get(session_id).snapshot()

    def _closed(self, session: ServerSession, reason: str) -> None:
        if self.sessions.pop(session.id, None) is not None and session.negotiated:
            self.metrics.sessions_ended.labels(reason).inc()
        self.ended[session.id] = (time.monotonic(), session.snapshot())
        self._ended_since_trim = True
        self._update_gauges()

    async def close(self, session_id: str, reason: str) -> None:
        """End a session; ending one that has just ended is not an error (a DELETE may race a hang-up)."""
        if session_id in self.ended and session_id not in self.sessions:
            return
        await self.get(session_id).close(reason)

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self.sessions.values())), return_exceptions=True)

    # -- housekeeping ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            await asyncio.gather(self._housekeeping, return_exceptions=True)

    async def _housekeep(self, period: float = 1.0) -> None:
        tick = 0
        while True:
            await asyncio.sleep(period)
            tick += 1
            now = time.monotonic()
            for sid in [sid for sid, (when, _) in self.ended.items() if now - when > ENDED_VISIBLE_S]:
                del self.ended[sid]
            for s in list(self.sessions.values()):
                if s.state == "connecting" and now - s.created_mono > self.settings.connect_timeout_s:
                    s.close("connect_timeout")
                elif s.state == "live" and now - s.last_input > self.settings.idle_timeout_s:
                    s.close("idle")
            self._check_overload()
            if self._ended_since_trim:  # what ended sessions held is free by now: give it back
                self._ended_since_trim = False
                # a few ms, on the worker between steps: no thread of the media pool is woken (or started) for it
                self.worker.submit(lambda engine: release_free_memory())
            if tick % 2 == 0:
                await self._collect_stats()
            self._update_gauges()
            self.metrics.loop_tasks.set(len(asyncio.all_tasks()))
            self.metrics.threads.set(threading.active_count())
            self.metrics.session_objects.set(len(session_module.ALIVE))
            self.metrics.queue_depth.labels("output_frames").set(
                sum(s.playout.queued_frames() for s in self.sessions.values()))
            self.metrics.queue_depth.labels("speech_seconds").set(
                sum(s.queued_speech_seconds() for s in self.sessions.values()))

    def would_overload(self) -> bool:
        """Whether one more session would leave the worker no spare time: the load measured over the
        last seconds plus, for each session not yet live (and the new one), the marginal cost the worker
        measured at warm-up; with none live yet, the cost of a first session. An idle server always admits
        one: there is nothing to protect, and a machine too slow (or too busy at warm-up) for real time still
        serves that session with late work skipped, rather than refusing everyone for good."""
        if not self.sessions:
            return False
        if self.overloaded:
            return True
        worker = self.worker
        live = sum(1 for s in self.sessions.values() if s.state == "live")
        newcomers = len(self.sessions) - live + 1
        if live:
            predicted = worker.utilisation() + worker.cost_more * newcomers
        else:
            predicted = worker.cost_first + worker.cost_more * (newcomers - 1)
        return predicted > OVERLOAD_ON

    def _check_overload(self) -> None:
        """Overloaded while the worker has had no spare time lately (with hysteresis): its sessions are
        behind real time, and admitting another would make every one of them later."""
        busy = self.worker.utilisation()
        if busy >= OVERLOAD_ON:
            self.overloaded = True
        elif busy < OVERLOAD_OFF:
            self.overloaded = False
        self.metrics.worker_utilisation.set(busy)
        self.metrics.overloaded.set(int(self.overloaded))

    async def _collect_stats(self) -> None:
        for s in list(self.sessions.values()):
            if s.state != "live":
                continue
            try:
                await s.collect_webrtc_stats()
            except Exception as exc:  # best effort, but a failure of a live one is a bug worth seeing
                (log.debug if s.state == "closed" else log.warning)("stats of %s failed: %r", s.id, exc)
            s.flush_metrics()
