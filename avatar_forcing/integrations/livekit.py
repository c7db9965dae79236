"""The avatar in a LiveKit room, following LiveKit Agents' avatar protocol.

Two halves:
- `AvatarSession` (agent side, the plugin): asks an avatar worker to join the agent's room, with a token that
  lets it publish on the agent's behalf, and redirects the agent's audio output to the byte stream
  `lk.audio_stream` that the worker reads (`DataStreamAudioOutput`).
- `AvatarWorker` (avatar side): reads the agent's TTS from an `AudioReceiver` (in a room:
  `DataStreamAudioReceiver`, topic `lk.audio_stream`; RPC `lk.clear_buffer`), drives our server through
  `RemoteAvatar`, answers with `lk.playback_started` / `lk.playback_finished {playback_position,
  interrupted}` from the server's playback events, publishes the avatar's audio and video (paced together by
  the server), and forwards the user's microphone and camera from the same room so the avatar listens.

Not run against a real LiveKit server (none can run on these machines); docs/integrations.md says what the
tests cover.
Needs `pip install avatar-forcing-server[livekit]`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from livekit import api, rtc
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import AudioReceiver, AudioSegmentEnd, DataStreamAudioOutput, DataStreamAudioReceiver

from .remote import RemoteAvatar

log = logging.getLogger("avatar_forcing.integrations.livekit")

AVATAR_IDENTITY = "avatar-forcing"
AUDIO_RATE = 48000
AUDIO_QUEUE_MS = 100


class RoomMedia:
    """Where the avatar's pictures and voice go in a room: one video and one audio track, published on
    the agent's behalf, fed as the server delivers them (already paced and in sync)."""

    def __init__(self, room: rtc.Room, width: int, height: int):
        self.room = room
        self.video = rtc.VideoSource(width, height)
        # The server already paces the voice in real time: a deep queue here (the SDK's default is 1 s) only
        # delays the voice behind the picture, which the video source does not queue.
        self.audio = rtc.AudioSource(AUDIO_RATE, 1, queue_size_ms=AUDIO_QUEUE_MS)

    async def publish(self) -> None:
        lp = self.room.local_participant
        await lp.publish_track(rtc.LocalVideoTrack.create_video_track("avatar_video", self.video),
                               rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))
        await lp.publish_track(rtc.LocalAudioTrack.create_audio_track("avatar_audio", self.audio),
                               rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))

    async def send_video(self, rgb: np.ndarray) -> None:
        height, width = rgb.shape[:2]
        self.video.capture_frame(rtc.VideoFrame(width, height, rtc.VideoBufferType.RGB24, rgb.tobytes()))

    async def send_audio(self, pcm: np.ndarray, rate: int) -> None:
        await self.audio.capture_frame(rtc.AudioFrame(pcm.astype("<i2").tobytes(), rate, 1, len(pcm)))


class AvatarWorker:
    """One conversation: `receiver` gives the agent's speech; `send_video(rgb)` / `send_audio(pcm, rate)`
    take the avatar's output (RoomMedia's in a room)."""

    def __init__(self, avatar: RemoteAvatar, receiver: AudioReceiver,
                 send_video: Callable[[np.ndarray], Awaitable[None]],
                 send_audio: Callable[[np.ndarray, int], Awaitable[None]]):
        self.avatar, self.receiver = avatar, receiver
        self.send_video, self.send_audio = send_video, send_audio
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Until the agent's stream ends (or the task is cancelled)."""
        self.avatar.on_video = lambda frame: self.send_video(frame.to_ndarray(format="rgb24"))
        self.avatar.on_audio = self._audio
        self.avatar.on_event = self._event
        self.receiver.on("clear_buffer", lambda: self._spawn(self.avatar.interrupt()))
        await self.receiver.start()
        await self.avatar.start()
        try:
            async for item in self.receiver:
                if isinstance(item, AudioSegmentEnd):
                    await self.avatar.flush()
                else:
                    pcm = np.frombuffer(bytes(item.data), dtype="<i2")
                    if item.num_channels > 1:
                        pcm = pcm.reshape(-1, item.num_channels).mean(axis=1).astype("<i2")
                    await self.avatar.say(pcm.tobytes(), item.sample_rate)
        finally:
            for task in list(self._tasks):  # the forwarding of the users' tracks
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.avatar.close()

    async def _audio(self, frame) -> None:
        pcm = frame.to_ndarray().reshape(-1)
        channels = len(frame.layout.channels)
        if channels > 1:
            pcm = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16)
        await self.send_audio(pcm, frame.sample_rate)

    async def _event(self, event: dict) -> None:
        """The server's playback events, as LiveKit's RPCs (same semantics: docs/api.md)."""
        if event["type"] == "playback_started":
            await _maybe(self.receiver.notify_playback_started())
        elif event["type"] == "playback_finished":
            await _maybe(self.receiver.notify_playback_finished(playback_position=event["position_s"],
                                                                interrupted=event["interrupted"]))

    def listen_to(self, track: rtc.Track) -> None:
        """Forward a user's microphone or camera track of the room to the avatar (it reacts to the user)."""
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            self._spawn(self._forward_audio(rtc.AudioStream(track, sample_rate=AUDIO_RATE, num_channels=1)))
        elif track.kind == rtc.TrackKind.KIND_VIDEO:
            self._spawn(self._forward_video(rtc.VideoStream(track)))

    async def _forward_audio(self, stream: rtc.AudioStream) -> None:
        try:
            async for event in stream:
                frame = event.frame
                self.avatar.microphone.put_audio(bytes(frame.data), frame.sample_rate, frame.num_channels)
        finally:
            await stream.aclose()

    async def _forward_video(self, stream: rtc.VideoStream) -> None:
        try:
            async for event in stream:
                frame = event.frame.convert(rtc.VideoBufferType.RGB24)
                self.avatar.camera.put_image(bytes(frame.data), (frame.width, frame.height))
        finally:
            await stream.aclose()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def run_in_room(room: rtc.Room, avatar: RemoteAvatar, size: tuple[int, int] = (512, 512),
                      agent_identity: str | None = None, media: RoomMedia | None = None) -> None:
    """The avatar worker's job once it has joined `room`: publish, listen to the users, answer the agent.
    `media`: where the avatar's output goes (default: a RoomMedia of `size` in `room`)."""
    media = media or RoomMedia(room, *size)
    await media.publish()
    worker = AvatarWorker(avatar, DataStreamAudioReceiver(room, sender_identity=agent_identity),
                          media.send_video, media.send_audio)

    def subscribed(track: rtc.Track, _publication, participant: rtc.RemoteParticipant) -> None:
        if participant.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:  # users, not the agent's own tracks
            worker.listen_to(track)

    room.on("track_subscribed", subscribed)
    # Tracks subscribed while joining (the user was there first) were announced before this handler existed.
    for participant in list(room.remote_participants.values()):
        for publication in list(participant.track_publications.values()):
            if publication.track is not None:
                subscribed(publication.track, publication, participant)
    await worker.run()


async def join_and_run(livekit_url: str, token: str, avatar: RemoteAvatar) -> None:
    """What a launch request starts: join with the token the agent minted, run until the agent leaves."""
    room = rtc.Room()
    await room.connect(livekit_url, token)
    try:
        await run_in_room(room, avatar)
    finally:
        await room.disconnect()


class AvatarSession:
    """The agent-side plugin: `await AvatarSession(launch_url=...).start(session, room=ctx.room)`.

    `launch_url` is where an avatar worker takes launch requests (`POST {livekit_url, token}`), e.g. a small
    service running `join_and_run` with a RemoteAvatar per request."""

    def __init__(self, *, launch_url: str, avatar_identity: str = AVATAR_IDENTITY,
                 launch: Callable[[str, dict], Awaitable[Any]] | None = None):
        self.launch_url, self.avatar_identity = launch_url, avatar_identity
        self._launch = launch or _post_json

    def token(self, room: rtc.Room, api_key: str, api_secret: str) -> str:
        """A token for the worker: joins this room as an agent, publishes on behalf of the local agent."""
        return (api.AccessToken(api_key, api_secret)
                .with_identity(self.avatar_identity)
                .with_kind("agent")
                .with_grants(api.VideoGrants(room_join=True, room=room.name))
                .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: room.local_participant.identity})
                .to_jwt())

    async def start(self, agent_session, room: rtc.Room, *, livekit_url: str, api_key: str,
                    api_secret: str) -> None:
        await self._launch(self.launch_url, {"livekit_url": livekit_url,
                                             "token": self.token(room, api_key, api_secret)})
        agent_session.output.audio = DataStreamAudioOutput(room, destination_identity=self.avatar_identity,
                                                           wait_remote_track=rtc.TrackKind.KIND_VIDEO)


async def _post_json(url: str, body: dict) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(url, json=body)
        if response.status_code >= 400:
            raise RuntimeError(f"the avatar worker refused the launch: {response.status_code} {response.text[:200]}")


async def _maybe(result) -> None:
    if asyncio.iscoroutine(result):
        await result
