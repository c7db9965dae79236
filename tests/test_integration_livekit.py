"""The LiveKit avatar worker against the real server (small model, real aiortc WebRTC), through a fake room.

No LiveKit server can run here. What is real: the agent's side of LiveKit's avatar protocol is the SDK's own
`DataStreamAudioOutput` (what `AvatarSession.start` installs: TTS as a byte stream on `lk.audio_stream`,
RPC `lk.clear_buffer`, waiting for `lk.playback_finished`), the avatar's side is our `run_in_room` with the
SDK's `DataStreamAudioReceiver`, and media are the SDK's native `AudioSource` / `VideoSource` tracks read
back with `AudioStream` / `VideoStream`. What is fake: `FakeSFU` below, which carries RPCs, byte streams and
track publications between the participants in-process, in place of a LiveKit server's signalling and SFU.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import av
import numpy as np
import pytest
from agent_speech import dense_speech, pcm16
from golden_data import MEDIA_DIR
from server_harness import needs_golden, needs_media, needs_rtc_host, running_server

pytest.importorskip("livekit.agents", reason="needs the livekit extra: pip install -e '.[livekit]'")

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import DataStreamAudioOutput  # noqa: E402

from avatar_forcing.integrations.livekit import AVATAR_IDENTITY, AvatarSession, RoomMedia, run_in_room  # noqa: E402
from avatar_forcing.integrations.remote import RemoteAvatar  # noqa: E402

pytestmark = [pytest.mark.slow, needs_rtc_host, needs_golden, needs_media]

AGENT, USER = "agent", "user"
LOUD_RMS = 0.02


# -- the fake room transport ------------------------------------------------------------------------------


class FakeSFU:
    """Participants of one room, each with its own FakeRoom view; delivers what one sends to the others."""

    def __init__(self, name: str = "room-1"):
        self.name = name
        self.rooms: dict[str, FakeRoom] = {}
        self.rpc_log: list[tuple[float, str, str, str, str]] = []  # (time, caller, callee, method, payload)

    def join(self, identity: str, kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD) -> FakeRoom:
        room = FakeRoom(self, identity, kind)
        for other in self.rooms.values():
            other.add_remote(room.local_participant)
            room.add_remote(other.local_participant)
        self.rooms[identity] = room
        return room


class FakeRemoteParticipant:
    def __init__(self, identity: str, kind: int):
        self.identity, self.kind = identity, kind
        self.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self.attributes: dict[str, str] = {}
        self.track_publications: dict[str, FakePublication] = {}


class FakePublication:
    def __init__(self, track, source: int):
        self.sid, self.track, self.source = f"TR_{uuid.uuid4().hex[:8]}", track, source
        self.kind, self.name = track.kind, track.name
        self.subscribed = True


class FakeByteStream:
    """One byte stream: the writer the sender gets, and the reader (same interface as rtc.ByteStreamReader
    as DataStreamAudioReceiver uses it: `info` and async iteration of chunks) each receiver gets."""

    def __init__(self, info: rtc.ByteStreamInfo, receivers: int):
        self.info = info
        self.queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(receivers)]

    async def write(self, data: bytes) -> None:
        for queue in self.queues:
            queue.put_nowait(bytes(data))

    async def aclose(self) -> None:
        for queue in self.queues:
            queue.put_nowait(None)  # the trailer: the segment ends

    def reader(self, index: int) -> FakeByteReader:
        return FakeByteReader(self.info, self.queues[index])


class FakeByteReader:
    def __init__(self, info: rtc.ByteStreamInfo, queue: asyncio.Queue):
        self.info, self._queue = info, queue

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._queue.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class FakeLocalParticipant:
    def __init__(self, sfu: FakeSFU, identity: str, kind: int):
        self.sfu, self.identity, self.kind = sfu, identity, kind
        self.attributes: dict[str, str] = {}
        self.track_publications: dict[str, FakePublication] = {}
        self._rpc_handlers: dict = {}  # the SDK's helpers look at this attribute

    def register_rpc_method(self, method: str, handler):
        self._rpc_handlers[method] = handler
        return handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float | None = None, max_round_trip_latency: float | None = None) -> str:
        self.sfu.rpc_log.append((time.monotonic(), self.identity, destination_identity, method, payload))
        callee = self.sfu.rooms[destination_identity].local_participant
        handler = callee._rpc_handlers.get(method)
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, f"{method} is not registered")
        data = rtc.RpcInvocationData(request_id=uuid.uuid4().hex, caller_identity=self.identity, payload=payload,
                                     response_timeout=response_timeout or 10.0, method=method)
        result = handler(data)
        return await result if asyncio.iscoroutine(result) else result

    async def stream_bytes(self, name: str, *, topic: str = "", attributes: dict[str, str] | None = None,
                           destination_identities: list[str] | None = None, **_options) -> FakeByteStream:
        info = rtc.ByteStreamInfo(stream_id=uuid.uuid4().hex, mime_type="application/octet-stream", topic=topic,
                                  timestamp=int(time.time() * 1000), size=None, attributes=attributes or {},
                                  name=name)
        targets = [room for identity, room in self.sfu.rooms.items() if identity != self.identity
                   and (destination_identities is None or identity in destination_identities)
                   and topic in room.byte_handlers]
        stream = FakeByteStream(info, len(targets))
        for index, room in enumerate(targets):
            room.byte_handlers[topic](stream.reader(index), self.identity)
        return stream

    async def publish_track(self, track, options: rtc.TrackPublishOptions) -> FakePublication:
        publication = FakePublication(track, options.source)
        self.track_publications[publication.sid] = publication
        mine = self.sfu.rooms[self.identity]
        mine.emit("local_track_published", publication, track)
        for identity, room in self.sfu.rooms.items():
            if identity != self.identity:
                remote = room.remote_participants[self.identity]
                remote.track_publications[publication.sid] = publication
                room.emit("track_published", publication, remote)
                room.emit("track_subscribed", track, publication, remote)  # everyone auto-subscribes
        return publication


class FakeRoom(rtc.EventEmitter):
    """What the SDK's avatar helpers and our run_in_room use of rtc.Room."""

    def __init__(self, sfu: FakeSFU, identity: str, kind: int):
        super().__init__()
        self.name = sfu.name
        self.local_participant = FakeLocalParticipant(sfu, identity, kind)
        self.remote_participants: dict[str, FakeRemoteParticipant] = {}
        self.byte_handlers: dict = {}

    def isconnected(self) -> bool:
        return True

    def register_byte_stream_handler(self, topic: str, handler) -> None:
        self.byte_handlers[topic] = handler

    def add_remote(self, local: FakeLocalParticipant) -> None:
        remote = FakeRemoteParticipant(local.identity, local.kind)
        remote.track_publications.update(local.track_publications)  # subscribed on joining
        self.remote_participants[local.identity] = remote
        self.emit("participant_connected", remote)
        self.emit("participant_active", remote)


# -- media --------------------------------------------------------------------------------------------------


class RecordingMedia(RoomMedia):
    """The worker's RoomMedia (real SDK sources and tracks, published into the fake room), noting what it
    feeds them and when: what a LiveKit server would forward to subscribers. Without a server, reading a
    local track back through the SDK's AudioStream is not a faithful subscriber (it delivered a fraction of
    the audio here), so the test checks the frames at the point where the worker hands them to LiveKit."""

    def __init__(self, room, width: int, height: int):
        super().__init__(room, width, height)
        self.video_times: list[float] = []
        self.video_digests: list[bytes] = []
        self.sound: list[tuple[float, float, float]] = []  # (time, rms, seconds) of the voice fed

    async def send_video(self, rgb: np.ndarray) -> None:
        self.video_times.append(time.monotonic())
        self.video_digests.append(rgb[::16, ::16].tobytes())
        await super().send_video(rgb)

    async def send_audio(self, pcm: np.ndarray, rate: int) -> None:
        x = pcm.astype(np.float32) / 32768
        self.sound.append((time.monotonic(), float(np.sqrt(np.mean(x ** 2))) if len(x) else 0.0, len(x) / rate))
        await super().send_audio(pcm, rate)

    def loud(self, since: float, until: float = float("inf")) -> list[float]:
        return [t for t, rms, _ in self.sound if since <= t < until and rms > LOUD_RMS]


async def play_user(audio: rtc.AudioSource, video: rtc.VideoSource) -> None:
    """user.mp4 as the user's microphone and camera, in real time, looped."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
    while True:
        with av.open(str(MEDIA_DIR / "user.mp4")) as container:
            t0 = time.monotonic()
            for frame in container.decode(*container.streams.audio[:1], *container.streams.video[:1]):
                due = t0 + float(frame.time or 0.0)
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                if isinstance(frame, av.VideoFrame):
                    rgb = frame.to_ndarray(format="rgb24")
                    video.capture_frame(rtc.VideoFrame(frame.width, frame.height, rtc.VideoBufferType.RGB24,
                                                       rgb.tobytes()))
                else:
                    for out in resampler.resample(frame):
                        pcm = out.to_ndarray().reshape(-1)
                        await audio.capture_frame(rtc.AudioFrame(pcm.tobytes(), 48000, 1, len(pcm)))


async def say(output: DataStreamAudioOutput, audio: np.ndarray, rate: int = 24000) -> None:
    """The agent's TTS: 100 ms frames into its audio output, then the end of the segment."""
    data = pcm16(audio)
    step = 2 * rate // 10
    for i in range(0, len(data), step):
        chunk = data[i:i + step]
        await output.capture_frame(rtc.AudioFrame(chunk, rate, 1, len(chunk) // 2))
    output.flush()


async def wait_for(predicate, within_s: float, what: str):
    deadline = time.monotonic() + within_s
    while not (result := predicate()):  # noqa: ASYNC110 (polls what the tracks delivered)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return result


# -- the test ----------------------------------------------------------------------------------------------


def test_livekit_worker_follows_the_avatar_protocol_publishes_in_sync_and_listens(tmp_path):
    async def run():
        with running_server(tmp_path, max_sessions=1) as server:
            sfu = FakeSFU()
            agent_room = sfu.join(AGENT, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
            user_room = sfu.join(USER)
            # The user's microphone and camera, published before the avatar joins.
            mic, cam = rtc.AudioSource(48000, 1), rtc.VideoSource(640, 480)
            await user_room.local_participant.publish_track(rtc.LocalAudioTrack.create_audio_track("mic", mic),
                                                            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
            await user_room.local_participant.publish_track(rtc.LocalVideoTrack.create_video_track("cam", cam),
                                                            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))
            user_media = asyncio.ensure_future(play_user(mic, cam))
            # The avatar worker joins (what a launch request starts) and finds the user's tracks there.
            avatar_room = sfu.join(AVATAR_IDENTITY, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
            avatar = RemoteAvatar(server.base_url, portrait=(MEDIA_DIR / "rumi.jpg").read_bytes())
            media = RecordingMedia(avatar_room, 512, 512)
            worker = asyncio.ensure_future(run_in_room(avatar_room, avatar, agent_identity=AGENT, media=media))
            published: list[str] = []
            user_room.on("track_subscribed", lambda track, pub, participant: published.append(track.name)
                         if participant.identity == AVATAR_IDENTITY else None)

            # The agent's audio output, as AvatarSession.start installs it.
            output = DataStreamAudioOutput(agent_room, destination_identity=AVATAR_IDENTITY,
                                           wait_remote_track=rtc.TrackKind.KIND_VIDEO, wait_playback_start=True)
            events: list[tuple[float, str, object]] = []
            output.on("playback_started", lambda ev: events.append((time.monotonic(), "playback_started", ev)))
            output.on("playback_finished", lambda ev: events.append((time.monotonic(), "playback_finished", ev)))
            try:
                await wait_for(lambda: worker.done() or len(media.video_times) > 25, 60,
                               "the avatar's first second of video")
                if worker.done():
                    worker.result()  # raises what stopped it
                # A reply: one segment on lk.audio_stream, then the finish it waits for.
                t_reply = time.monotonic()
                await say(output, dense_speech(1.5))
                finished = await asyncio.wait_for(output.wait_for_playout(), 20)
                t_finished = time.monotonic()
                await asyncio.sleep(1.0)  # every published frame of the reply has arrived
                heard = media.loud(t_reply)
                fps = sum(t > time.monotonic() - 4 for t in media.video_times) / 4
                fresh = len(set(media.video_digests[-100:]))
                # A long reply, cleared by the agent while it plays (the user interrupted).
                speaking = asyncio.ensure_future(say(output, dense_speech(6.0)))
                await wait_for(lambda: sum(kind == "playback_started" for _, kind, _ in events) == 2, 20, "start")
                await speaking
                await asyncio.sleep(1.0)
                t_clear = time.monotonic()
                output.clear_buffer()
                cleared = await asyncio.wait_for(output.wait_for_playout(), 5)
                t_cleared = time.monotonic()
                await asyncio.sleep(2.5)
                # The voice reaches the worker `lag` after the server's events do (its WebRTC path; seconds
                # on a loaded 2-core machine): silence is due at the server 150 ms after the clear, so here
                # `lag` later. lag: the reply's first sound against its lk.playback_started, same instant
                # at the server.
                t_started = next(t for t, kind, _ in events if kind == "playback_started")
                lag = media.loud(t_reply)[0] - t_started
                after = media.loud(t_clear + lag + 0.15)
                info = await avatar.http.get(f"/v1/sessions/{avatar.session_id}")
                stats = info.json()["stats"]
                # Audio and video fed to the tracks over the whole exchange, in seconds of media each.
                t_end = time.monotonic()
                av_seconds = (sum(s for t, _, s in media.sound if t_reply <= t < t_end),
                              sum(t_reply <= t < t_end for t in media.video_times) / 25)
            finally:
                worker.cancel()
                user_media.cancel()
                await asyncio.gather(worker, user_media, return_exceptions=True)
                await mic.aclose()
        return locals()

    r = asyncio.run(run())
    t0 = r["t_reply"]
    rpcs = [(round(t - t0, 3), f"{caller}->{callee}", method, payload) for t, caller, callee, method, payload
            in r["sfu"].rpc_log]
    print(f"\nlivekit RPCs (s after the reply's first TTS frame): {rpcs}")
    heard = r["heard"]
    assert heard, "no avatar speech on the published audio track"
    print(f"first sound on the published track {heard[0] - t0:.3f} s after the TTS; lk.playback_started "
          f"{r['t_started'] - t0:.3f} s; clear -> interrupted finish {r['t_cleared'] - r['t_clear']:.3f} s")
    # lk.playback_finished after the last sample was played out (not when queued), with what was played.
    assert r["finished"].interrupted is False and r["finished"].playback_position == pytest.approx(1.5, abs=0.05)
    assert r["t_finished"] >= heard[-1] - 0.25, f"finished {heard[-1] - r['t_finished']:.2f} s before the last sound"
    assert r["t_finished"] - t0 >= 1.5
    # Published in step: over the whole exchange the worker fed as many seconds of voice as of pictures
    # (neither track falls behind the other), the sound no earlier than the server said it started.
    audio_s, video_s = r["av_seconds"]
    print(f"fed to the tracks: {audio_s:.2f} s of audio, {video_s:.2f} s of video; video {r['fps']:.1f} fps")
    assert abs(audio_s - video_s) < 0.2, r["av_seconds"]
    assert heard[0] >= r["t_started"] - 0.1, (heard[0], r["t_started"])
    assert r["fps"] >= 23 and r["fresh"] > 50, (r["fps"], r["fresh"])
    # After lk.clear_buffer: an interrupted lk.playback_finished, and silence.
    methods = [m for _, _, _, m, _ in r["sfu"].rpc_log]
    assert methods.count("lk.clear_buffer") == 1 and methods[-1] == "lk.playback_finished", methods
    # What was heard of the cleared reply: some, and no more than had time to play since it started.
    t_started_2 = [t for t, kind, _ in r["events"] if kind == "playback_started"][1]
    assert r["cleared"].interrupted is True, r["cleared"]
    assert 0 < r["cleared"].playback_position <= r["t_clear"] - t_started_2 + 0.1, r["cleared"]
    print(f"voice lag behind the server's events at the worker: {r['lag']:.3f} s")
    assert not r["after"], (f"avatar speech {r['after'][-1] - r['t_clear'] - r['lag']:.2f} s after lk.clear_buffer "
                            "reached the server")
    assert sorted(r["published"]) == ["avatar_audio", "avatar_video"], r["published"]
    # It listened: the user's microphone and camera reached the server through the worker.
    stats = r["stats"]
    assert stats["user_audio_seconds_received"] > 3 and stats["user_video_frames_received"] > 50, stats


def test_avatar_session_token_lets_the_worker_publish_for_the_agent():
    from livekit import api
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

    sfu = FakeSFU("room-7")
    room = sfu.join(AGENT, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
    token = AvatarSession(launch_url="http://worker/launch").token(room, "key", "secret-" + "x" * 32)
    claims = api.TokenVerifier("key", "secret-" + "x" * 32).verify(token)
    assert claims.identity == AVATAR_IDENTITY and claims.kind == "agent"
    assert claims.video.room_join and claims.video.room == "room-7"
    assert claims.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: AGENT}
