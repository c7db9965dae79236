"""One conversation: its peer connection, the client's incoming media, the avatar's paced outgoing media.

Everything here runs on the event loop except CPU work (frame conversion and face tracking), which runs in
the media thread pool, and model work, which the model worker does. A session ends exactly once, whatever
ends it (DELETE, ICE failure, idle or connect timeout, server shutdown), and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from concurrent.futures import Executor

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from avatar_forcing.model.engine import BlockOutput
from avatar_forcing.model.engine.clock import TimestampMapper
from avatar_forcing.model.engine.inputs import LiveInputs
from avatar_forcing.model.media.audio import frame_to_mono
from avatar_forcing.stats import percentile

from .avatars import Avatar
from .config import ServerSettings
from .errors import ApiError
from .logs import session_id_var
from .metrics import ServerMetrics
from .playout import AUDIO_FRAME_S, AvatarAudioTrack, AvatarVideoTrack, Playout
from .turn import ice_servers
from .worker import ModelWorker

log = logging.getLogger("avatar_forcing.server.session")


# Every ServerSession object still in memory (a weak set: it keeps none alive). More of them than open
# sessions, for long, means something holds ended sessions: a leak of everything they carry.
ALIVE: weakref.WeakSet = weakref.WeakSet()


def new_session_id() -> str:
    return "s_" + secrets.token_urlsafe(12)


class ServerSession:
    def __init__(self, settings: ServerSettings, avatar: Avatar, inputs: LiveInputs, worker: ModelWorker,
                 metrics: ServerMetrics, executor: Executor, fps: int, sample_rate: int, seed: int | None):
        self.id = new_session_id()
        ALIVE.add(self)
        self.settings, self.avatar, self.inputs = settings, avatar, inputs
        self.worker, self.metrics, self.executor = worker, metrics, executor
        self.seed = seed
        self.loop = asyncio.get_running_loop()
        self.state = "connecting"
        self.end_reason: str | None = None
        self.created_at = time.time()
        self.created_mono = time.monotonic()
        self.last_input = time.monotonic()
        self.clock_start: float | None = None
        self.playout = Playout(fps, sample_rate, avatar.crop.shape[0], settings.target_latency_s,
                               settings.max_latency_s)
        servers = [RTCIceServer(**s) for s in ice_servers(settings, name=self.id)]
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers or None))
        self.video_out = AvatarVideoTrack(self.playout, on_frame=self._video_sent)
        self.audio_out = AvatarAudioTrack(self.playout)
        self._tasks: set[asyncio.Task] = set()
        self._closing: asyncio.Task | None = None
        self._mic_clock, self._cam_clock = TimestampMapper(), TimestampMapper()
        self._latest_frame = None
        self._frame_ready = asyncio.Event()
        self.on_closed = None  # set by the manager
        # Counters for GET /v1/sessions/{id}
        self.user_audio_seconds = 0.0
        self.user_video_frames = 0
        self.user_video_dropped = 0
        self.blocks = 0
        self.block_latency: list[float] = []
        self.negotiated = False  # the offer was accepted: an ending counts as a session that ended
        self._stats_prev: dict[str, tuple[float, float]] = {}
        self._metric_prev: dict[str, float] = {}
        self.webrtc: dict[str, float] = {}

    # -- signalling -----------------------------------------------------------------------------------------

    def spawn(self, coro) -> asyncio.Task:
        """A task of this session (logs carry its id); cancelled when the session ends."""
        session_id_var.set(self.id)
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def negotiate(self, sdp: str, kind: str) -> str:
        """Apply the client's offer and return our answer SDP (ICE candidates included)."""
        session_id_var.set(self.id)
        if kind != "offer":
            raise ApiError(400, "bad_sdp", f"type must be 'offer', got {kind!r}")
        if "m=audio" not in sdp or "m=video" not in sdp:
            raise ApiError(400, "bad_sdp", "the offer must have an audio and a video section (microphone and "
                                           "webcam, or recvonly transceivers for both)")
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:
            raise ApiError(400, "bad_sdp", f"the SDP offer could not be parsed or applied: {exc}") from None
        self.pc.addTrack(self.video_out)
        self.pc.addTrack(self.audio_out)
        try:
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as exc:
            raise ApiError(400, "bad_sdp", f"no answer could be made for this offer: {exc}") from None
        return self.pc.localDescription.sdp

    async def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("connection %s", state)
        if self._closing is not None:
            return  # ending: nothing may start now
        if state == "connected" and self.clock_start is None:
            self.spawn(self._start_engine())
        elif state in ("failed", "closed"):
            self.close("ice_failed" if state == "failed" else "disconnected")

    async def _start_engine(self) -> None:
        # The sink first: the worker steps the priming block as soon as the session opens, possibly
        # before this coroutine resumes (Playout.push keeps blocks that come before start()).
        self.worker.set_sink(self.id, self._from_worker, on_error=self._from_worker_error)
        try:
            session = await self.worker.call(lambda engine: engine.open_session(
                self.avatar.crop, inputs=self.inputs, seed=self.seed, session_id=self.id))
        except Exception as exc:
            log.error("the engine could not open the session: %s", exc)
            self.close("engine_error")
            return
        if self._closing is not None:  # ended while the engine was opening it: undo
            sid = self.id
            self.worker.submit(lambda engine: engine.close_session(sid) if sid in engine.sessions else None)
            return
        self.seed = session.seed
        self.clock_start = session.clock_start
        self.playout.start(session.clock_start, session.inputs.origin)
        if self.state == "connecting":
            self.state = "live"
        log.info("live (seed %d)", session.seed)

    # -- avatar output ---------------------------------------------------------------------------------------

    def _from_worker(self, block: BlockOutput) -> None:
        """Called on the worker thread."""
        self.loop.call_soon_threadsafe(self._on_block, block)

    def _from_worker_error(self, message: str) -> None:
        """Called on the worker thread when this session's block failed and the engine dropped it."""
        self.loop.call_soon_threadsafe(self._engine_failed, message)

    def _engine_failed(self, message: str) -> None:
        log.error("the engine dropped this session: %s", message)
        self.close("engine_error")

    def _on_block(self, block: BlockOutput) -> None:
        if self.state == "closed":
            return
        self.blocks += 1
        self.block_latency.append(block.done_at - block.ready_at)
        del self.block_latency[:-100]
        if self.playout.push(block):
            self.metrics.late_blocks.inc()

    def _video_sent(self) -> None:
        self.metrics.av_offset.observe(self.playout.av_offset())

    # -- client input ----------------------------------------------------------------------------------------

    def _on_track(self, track) -> None:
        log.info("receiving the client's %s", track.kind)
        if track.kind == "audio":
            self.spawn(self._consume_microphone(track))
        elif track.kind == "video":
            self.spawn(self._consume_camera(track))
            self.spawn(self._process_camera())

    def _session_time(self, mapper: TimestampMapper, pts, time_base, arrival: float) -> float | None:
        if self.clock_start is None or pts is None or time_base is None:
            return None
        return mapper.map(float(pts * time_base), arrival) - self.clock_start

    async def _consume_microphone(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            self.last_input = now
            at = self._session_time(self._mic_clock, frame.pts, frame.time_base, now)
            if at is None:
                continue  # before the engine session exists: nothing to feed yet
            self.inputs.push_user_audio(frame_to_mono(frame), at, frame.sample_rate)
            self.user_audio_seconds += frame.samples / frame.sample_rate
            self.worker.wake()

    async def _consume_camera(self, track) -> None:
        """Keep only the newest frame: if face tracking falls behind, older frames are skipped (counted)."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self._frame_ready.set()
                return
            now = time.monotonic()
            self.last_input = now
            if self._latest_frame is not None:
                self.user_video_dropped += 1
            self._latest_frame = (frame, now)
            self._frame_ready.set()

    async def _process_camera(self) -> None:
        while True:
            await self._frame_ready.wait()
            self._frame_ready.clear()
            if self._latest_frame is None:
                if self.state == "closed":
                    return
                continue
            frame, arrival = self._latest_frame
            self._latest_frame = None
            at = self._session_time(self._cam_clock, frame.pts, frame.time_base, arrival)
            if at is None:
                continue
            await self.loop.run_in_executor(self.executor, self._push_frame, frame, at)
            self.user_video_frames += 1

    def _push_frame(self, frame, at: float) -> None:
        """Media thread: decode to RGB and track the face (CPU work, off the event loop)."""
        self.inputs.push_user_frame(frame.to_ndarray(format="rgb24"), at)

    # -- speech ----------------------------------------------------------------------------------------------

    def queued_speech_seconds(self) -> float:
        return self.inputs.queued_speech_frames() / self.playout.fps

    def push_speech(self, pcm: np.ndarray, rate: int) -> dict:
        seconds = len(pcm) / rate
        if self.queued_speech_seconds() + seconds > self.settings.max_speech_seconds:
            raise ApiError(413, "too_much_speech", f"{seconds:.1f} s more speech would queue over the "
                                                    f"{self.settings.max_speech_seconds:.0f} s limit; "
                                                    "send it in smaller pieces as it plays")
        first = self.inputs.push_speech(pcm, rate)
        self.last_input = time.monotonic()
        self.worker.wake()
        starts_in = 0.0
        if self.clock_start is not None:
            starts_in = max(0.0, self.playout.playout_time(first) - time.monotonic())
        return {"queued_seconds": round(self.queued_speech_seconds(), 3), "starts_in_seconds": round(starts_in, 3)}

    def interrupt(self) -> float:
        dropped = self.queued_speech_seconds()
        self.inputs.interrupt()
        return dropped + self.playout.interrupt()

    # -- stats -----------------------------------------------------------------------------------------------

    async def collect_webrtc_stats(self) -> None:
        report = await self.pc.getStats()
        if self.state == "closed":
            return  # ended meanwhile: its series are gone and must stay gone
        now = time.monotonic()
        out: dict[str, float] = {}
        bytes_by_dir = {"outbound": 0.0, "inbound": 0.0}
        lost = {"outbound": [0.0, 0.0], "inbound": [0.0, 0.0]}  # lost, total
        for stat in report.values():
            kind = stat.type
            if kind == "remote-inbound-rtp":  # the client's view of what we send
                if getattr(stat, "roundTripTime", None) is not None:
                    out["rtt"] = max(out.get("rtt", 0.0), float(stat.roundTripTime))
                lost["outbound"][0] += float(getattr(stat, "packetsLost", 0) or 0)
            elif kind == "outbound-rtp":
                bytes_by_dir["outbound"] += float(stat.bytesSent or 0)
                lost["outbound"][1] += float(stat.packetsSent or 0)
            elif kind == "inbound-rtp":
                bytes_by_dir["inbound"] += float(stat.bytesReceived or 0)
                lost["inbound"][0] += float(getattr(stat, "packetsLost", 0) or 0)
                lost["inbound"][1] += float(stat.packetsReceived or 0) + float(getattr(stat, "packetsLost", 0) or 0)
        for direction, total in bytes_by_dir.items():
            prev = self._stats_prev.get(direction)
            if prev is not None and now > prev[0]:
                out[f"bitrate_{direction}"] = 8 * (total - prev[1]) / (now - prev[0])
            self._stats_prev[direction] = (now, total)
            count_lost, count_all = lost[direction]
            if count_all > 0:
                out[f"loss_{direction}"] = min(1.0, max(0.0, count_lost / count_all))
        self.webrtc = out
        self.metrics.set_session_stats(self.id, out)

    def flush_metrics(self) -> None:
        """Add what the playout and inputs counted since the last call to the server's counters."""
        p = self.playout
        now = {"video_sent": p.video_sent, "video_repeated": p.video_repeated, "video_dropped": p.video_dropped,
               "audio_sent": p.audio_sent / p.sample_rate / AUDIO_FRAME_S,
               "audio_silent": p.audio_silent / p.sample_rate / AUDIO_FRAME_S,
               "input_late": self.inputs.user.dropped_samples / p.sample_rate}
        delta = {k: v - self._metric_prev.get(k, 0) for k, v in now.items()}
        self._metric_prev = now
        m = self.metrics
        m.frames_sent.labels("video").inc(delta["video_sent"])
        m.frames_sent.labels("audio").inc(delta["audio_sent"])
        m.frames_dropped.labels("video", "stale").inc(delta["video_dropped"])
        m.frames_dropped.labels("video", "repeated").inc(delta["video_repeated"])
        m.frames_dropped.labels("audio", "silence").inc(delta["audio_silent"])
        m.input_dropped.labels("audio_seconds").inc(delta["input_late"])

    def snapshot(self) -> dict:
        p = self.playout
        def pct(q: float) -> float | None:
            return round(1000 * percentile(self.block_latency, q), 1) if self.block_latency else None

        return {
            "session_id": self.id,
            "state": self.state,
            "avatar_id": self.avatar.avatar_id,
            "created_at": self.created_at,
            "seed": self.seed,
            "end_reason": self.end_reason,
            "stats": {
                "blocks_generated": self.blocks,
                "late_blocks": p.late_blocks,
                "video_frames_sent": p.video_sent,
                "video_frames_repeated": p.video_repeated,
                "video_frames_dropped": p.video_dropped,
                "video_ticks_skipped": self.video_out.skipped,
                "audio_ticks_skipped": self.audio_out.skipped,
                "audio_seconds_sent": round(p.audio_sent / p.sample_rate, 2),
                "audio_seconds_dropped": round(p.audio_dropped_s, 3),
                "playout_delay_seconds": round(p.delay, 3),
                "av_offset_ms": round(1000 * p.av_offset(), 1),
                "queued_speech_seconds": round(self.queued_speech_seconds(), 3),
                "user_audio_seconds_received": round(self.user_audio_seconds, 2),
                "user_video_frames_received": self.user_video_frames,
                "user_video_frames_skipped": self.user_video_dropped,
                "user_video_frames_overflowed": self.inputs.frames.dropped_frames,
                "user_audio_late_seconds": round(self.inputs.user.dropped_samples / p.sample_rate, 3),
                **{f"webrtc_{k}": round(v, 4) for k, v in self.webrtc.items()},
            },
            "timings": {"block_latency_p50_ms": pct(50), "block_latency_p99_ms": pct(99)},
        }

    # -- ending ----------------------------------------------------------------------------------------------

    def close(self, reason: str) -> asyncio.Task:
        """End the session (idempotent); returns the task doing it, which callers may await."""
        if self._closing is None:
            self.state, self.end_reason = "closed", reason
            self._closing = self.loop.create_task(self._close(reason))
        return self._closing

    async def _close(self, reason: str) -> None:
        session_id_var.set(self.id)
        self.playout.ended = True
        self.worker.set_sink(self.id, None)
        sid = self.id
        self.worker.submit(lambda engine: engine.close_session(sid) if sid in engine.sessions else None)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.video_out.stop()
        self.audio_out.stop()
        try:
            await self.pc.close()
        except Exception:
            log.exception("closing the peer connection failed")
        self.flush_metrics()
        self.metrics.drop_session(self.id)
        log.info("ended: %s", reason)
        if self.on_closed is not None:
            self.on_closed(self, reason)
        # Break the reference cycles through this object (event handlers, track callbacks), so its
        # buffers are freed now rather than at Python's next full collection.
        self.pc.remove_all_listeners()
        self.video_out.on_frame = None
        self.on_closed = None
