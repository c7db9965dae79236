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
from collections.abc import Callable
from concurrent.futures import Executor

import av
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from avatar_forcing.model.engine import BlockOutput
from avatar_forcing.model.engine.clock import TimestampMapper
from avatar_forcing.model.media.audio import frame_to_mono
from avatar_forcing.stats import percentile

from .avatars import Avatar
from .config import ServerSettings
from .errors import ApiError
from .logs import session_id_var
from .metrics import ServerMetrics
from .playout import AUDIO_FRAME_S, AvatarAudioTrack, AvatarVideoTrack, Playout, ReadyBlock
from .speech import SpeechInputs
from .turn import ice_servers
from .worker import ModelWorker

log = logging.getLogger("avatar_forcing.server.session")


# Every ServerSession object still in memory (a weak set: it keeps none alive). More of them than open
# sessions, for long, means something holds ended sessions: a leak of everything they carry.
ALIVE: weakref.WeakSet = weakref.WeakSet()


def new_session_id() -> str:
    return "s_" + secrets.token_urlsafe(12)


class ServerSession:
    def __init__(self, settings: ServerSettings, avatar: Avatar, inputs: SpeechInputs, worker: ModelWorker,
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
        # The avatar's speech plays at the inputs' playback rate (48 kHz), not the model's 16 kHz.
        self.playout = Playout(fps, inputs.playback_rate, avatar.crop.shape[0], settings.target_latency_s,
                               settings.max_latency_s)
        servers = [RTCIceServer(**s) for s in ice_servers(settings, name=self.id)]
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers or None))
        self.video_out = AvatarVideoTrack(self.playout, on_frame=self._video_sent)
        self.audio_out = AvatarAudioTrack(self.playout, on_frame=self._audio_sent)
        self.playback_listeners: set[asyncio.Queue] = set()  # speech sockets that asked for playback events
        self._tasks: set[asyncio.Task] = set()
        self._closing: asyncio.Task | None = None
        self.ended = asyncio.Event()  # set when the session ends (speech sockets close on it)
        self._mic_clock, self._cam_clock = TimestampMapper(), TimestampMapper()
        self._latest_frame: tuple[av.VideoFrame, float] | None = None  # newest camera frame, its arrival
        self._frame_ready = asyncio.Event()
        self.on_closed: Callable[[ServerSession, str], None] | None = None  # set by the manager
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
        """Called on the worker thread: the latents stay here (the loop needs the pictures and sound)."""
        self.loop.call_soon_threadsafe(self._on_block, ReadyBlock.of(block))

    def _from_worker_error(self, message: str) -> None:
        """Called on the worker thread when this session's block failed and the engine dropped it."""
        self.loop.call_soon_threadsafe(self._engine_failed, message)

    def _engine_failed(self, message: str) -> None:
        log.error("the engine dropped this session: %s", message)
        self.close("engine_error")

    def _on_block(self, block: ReadyBlock) -> None:
        if self.state == "closed":
            return
        self.blocks += 1
        self.block_latency.append(block.latency)
        del self.block_latency[:-100]
        if self.playout.push(block):
            self.metrics.late_blocks.inc()

    def _video_sent(self) -> None:
        self.metrics.av_offset.observe(self.playout.av_offset())

    def _audio_sent(self) -> None:
        """After every 20 ms of audio handed to the encoder: utterances that started or finished playing."""
        self._announce(self.inputs.utterances.poll(self.playout.audio_next))

    def _announce(self, events: list[dict]) -> None:
        for event in events:
            for listener in self.playback_listeners:
                listener.put_nowait(event)

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

    def push_speech(self, pcm: np.ndarray, rate: int, end_utterance: bool = False) -> dict:
        """Queue speech at its own rate in the open utterance (ending it when `end_utterance`: a WAV upload
        is one utterance). Called in a media thread (resampling is codec work)."""
        seconds = len(pcm) / rate
        if self.queued_speech_seconds() + seconds > self.settings.max_speech_seconds:
            raise ApiError(413, "too_much_speech", f"{seconds:.1f} s more speech would queue over the "
                                                    f"{self.settings.max_speech_seconds:.0f} s limit; "
                                                    "send it in smaller pieces as it plays")
        first, utterance = self.inputs.queue_speech(pcm, rate, end=end_utterance)
        self.last_input = time.monotonic()
        self.worker.wake()
        starts_in = 0.0
        if self.clock_start is not None:
            starts_in = max(0.0, self.playout.playout_time(first) - time.monotonic())
        return {"queued_seconds": round(self.queued_speech_seconds(), 3), "starts_in_seconds": round(starts_in, 3),
                "utterance_id": utterance}

    def end_utterance(self) -> int:
        """The application marked the end of what it said (flush): its playback_finished comes once heard."""
        utterance = self.inputs.end_utterance()
        self.worker.wake()
        return utterance

    def interrupt(self) -> float:
        """Barge-in: drop queued speech, silence generated speech not played yet, and mute the blocks
        that claimed their speech before now but are not delivered yet (the one being generated: its
        lips may still move for up to a block, its sound never plays)."""
        dropped = self.queued_speech_seconds()
        self.inputs.interrupt()
        # Read after the truncation: a block claimed concurrently either lost its speech to it or has a
        # first frame before this (next_frame only grows), so it is muted either way.
        claimed = self.inputs.next_frame
        dropped += self.playout.interrupt(claimed)
        self._announce(self.inputs.utterances.interrupt(self.playout.audio_next, dropped))
        return dropped

    # -- stats -----------------------------------------------------------------------------------------------

    async def collect_webrtc_stats(self) -> None:
        report = await self.pc.getStats()
        if self.state == "closed":
            return  # ended meanwhile: its series are gone and must stay gone
        now = time.monotonic()
        out: dict[str, float] = {}
        bytes_by_dir = {"outbound": 0.0, "inbound": 0.0}
        lost = {"outbound": [0.0, 0.0], "inbound": [0.0, 0.0]}  # lost, total
        # aiortc 1.16's fields: bytes only on the transport; RTT and the client's losses on remote-inbound-rtp.
        for stat in report.values():
            kind = stat.type
            if kind == "transport":
                bytes_by_dir["outbound"] += float(stat.bytesSent or 0)
                bytes_by_dir["inbound"] += float(stat.bytesReceived or 0)
            elif kind == "remote-inbound-rtp":  # the client's view of what we send
                if stat.roundTripTime is not None:
                    out["rtt"] = max(out.get("rtt", 0.0), float(stat.roundTripTime))
                lost["outbound"][0] += float(stat.packetsLost or 0)
            elif kind == "outbound-rtp":
                lost["outbound"][1] += float(stat.packetsSent or 0)
            elif kind == "inbound-rtp":
                lost["inbound"][0] += float(stat.packetsLost or 0)
                lost["inbound"][1] += float(stat.packetsReceived or 0) + float(stat.packetsLost or 0)
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
               "input_late": self.inputs.user.dropped_samples / self.inputs.s.sample_rate,
               "skipped_frames": p.skipped_frames, "skip_aheads": p.skipped_blocks}
        delta = {k: v - self._metric_prev.get(k, 0) for k, v in now.items()}
        self._metric_prev = now
        m = self.metrics
        m.frames_sent.labels("video").inc(delta["video_sent"])
        m.frames_sent.labels("audio").inc(delta["audio_sent"])
        m.frames_dropped.labels("video", "stale").inc(delta["video_dropped"])
        m.frames_dropped.labels("video", "repeated").inc(delta["video_repeated"])
        m.frames_dropped.labels("audio", "silence").inc(delta["audio_silent"])
        m.input_dropped.labels("audio_seconds").inc(delta["input_late"])
        m.skipped_frames.inc(delta["skipped_frames"])
        m.skip_aheads.inc(delta["skip_aheads"])

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
                "engine_skipped_frames": p.skipped_frames,
                "engine_skip_aheads": p.skipped_blocks,
                "skipped_frames_held": p.gap_frames_held,
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
                "user_audio_late_seconds": round(self.inputs.user.dropped_samples / self.inputs.s.sample_rate, 3),
                "utterances_unfinished": self.inputs.utterances.unfinished(),
                **{f"webrtc_{k}": round(v, 4) for k, v in self.webrtc.items()},
            },
            "timings": {"block_latency_p50_ms": pct(50), "block_latency_p99_ms": pct(99)},
            "playback_events": list(self.inputs.utterances.recent),
        }

    # -- ending ----------------------------------------------------------------------------------------------

    def close(self, reason: str) -> asyncio.Task:
        """End the session (idempotent); returns the task doing it, which callers may await."""
        if self._closing is None:
            self.state, self.end_reason = "closed", reason
            self.ended.set()
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
        self.audio_out.on_frame = None
        self.playback_listeners.clear()
        self.on_closed = None
