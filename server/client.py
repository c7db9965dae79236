"""A Python client of the server: opens a session over WebRTC, sends media, receives the avatar, speaks.

Used by the tests and `avatar-forcing loadtest`, and a worked example of the API for client developers:

    async with AvatarClient("http://server:8080") as client:
        avatar = await client.upload_avatar(open("portrait.jpg", "rb").read())
        await client.start(avatar, media="webcam_recording.mp4")
        await client.say_wav(open("hello.wav", "rb").read())
        ...
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamError

from avatar_forcing.model.media.audio import frame_to_mono
from avatar_forcing.server.config import CLIENT_KEEP_ALIVE_S


@dataclass
class Received:
    """What arrived from the server, with local arrival times."""

    video_times: list[float] = field(default_factory=list)
    first_video: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # set by the first frame
    fresh_times: list[float] = field(default_factory=list)  # frames whose picture changed (not repeats)
    video_size: tuple[int, int] | None = None
    audio_times: list[float] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)  # mono float32 chunks
    audio_rate: int = 48000

    def fps(self, seconds: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return sum(1 for t in self.video_times if t > now - seconds) / seconds

    def fresh_fps(self, seconds: float, now: float | None = None) -> float:
        """Frames per second whose content changed: a server repeating frames still shows 25 fps."""
        now = time.monotonic() if now is None else now
        return sum(1 for t in self.fresh_times if t > now - seconds) / seconds

    def audio_since(self, t0: float) -> np.ndarray:
        parts = [a for t, a in zip(self.audio_times, self.audio, strict=True) if t >= t0]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


class ApiError(Exception):
    def __init__(self, response: httpx.Response):
        self.status = response.status_code
        try:
            self.error = response.json()["error"]
        except (ValueError, KeyError):
            self.error = {"code": "unknown", "message": response.text}
        super().__init__(f"{self.status} {self.error.get('code')}: {self.error.get('message')}")


class AvatarClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                      limits=httpx.Limits(keepalive_expiry=CLIENT_KEEP_ALIVE_S))
        self.pc: RTCPeerConnection | None = None
        self.player: MediaPlayer | None = None
        self.session_id: str | None = None
        self.received = Received()
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> AvatarClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _ok(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            raise ApiError(response)
        return response.json() if response.content else {}

    # -- API ------------------------------------------------------------------------------------------------

    async def upload_avatar(self, image: bytes, content_type: str = "image/jpeg") -> str:
        r = await self.http.post("/v1/avatars", content=image, headers={"content-type": content_type})
        return (await self._ok(r))["avatar_id"]

    async def start(self, avatar_id: str, media: str | Path | None = None, seed: int | None = None,
                    loop_media: bool = True) -> str:
        """Open a session. `media`: a file played as webcam + microphone (None: receive only)."""
        self.pc = pc = RTCPeerConnection()
        if media is not None:
            self.player = player = MediaPlayer(str(media), loop=loop_media)
            # A file without one of the two tracks sends nothing of that kind but still receives the avatar's.
            for kind, track in (("audio", player.audio), ("video", player.video)):
                if track is not None:
                    pc.addTrack(track)
                else:
                    pc.addTransceiver(kind, direction="recvonly")
        else:
            pc.addTransceiver("audio", direction="recvonly")
            pc.addTransceiver("video", direction="recvonly")
        pc.on("track", lambda track: self._tasks.append(asyncio.ensure_future(self._receive(track))))
        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers candidates before returning
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "avatar_id": avatar_id, "options": {"seed": seed}}
        answer = await self._ok(await self.http.post("/v1/sessions", json=body))
        self.session_id = answer["session_id"]
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        return self.session_id

    async def info(self) -> dict:
        return await self._ok(await self.http.get(f"/v1/sessions/{self.session_id}"))

    async def say_wav(self, wav: bytes) -> dict:
        r = await self.http.post(f"/v1/sessions/{self.session_id}/speech", content=wav,
                                 headers={"content-type": "audio/wav"})
        return await self._ok(r)

    async def interrupt(self) -> dict:
        return await self._ok(await self.http.post(f"/v1/sessions/{self.session_id}/interrupt"))

    async def stream_speech(self, pcm: np.ndarray, rate: int, chunk_s: float = 0.1, realtime: bool = False) -> dict:
        """Send float32 mono PCM over the speech WebSocket as PCM16 chunks (as a TTS would)."""
        url = self.base_url.replace("http", "ws", 1) + f"/v1/sessions/{self.session_id}/speech?sample_rate={rate}"
        if self.token:
            url += f"&token={self.token}"
        step = int(chunk_s * rate)
        last = {}
        async with websockets.connect(url, max_size=2**22) as ws:
            ready = json.loads(await ws.recv())
            if ready.get("type") != "ready":
                raise RuntimeError(f"the speech stream did not open: {ready}")
            for i in range(0, len(pcm), step):
                data = (np.clip(pcm[i:i + step], -1, 1) * 32767).astype("<i2").tobytes()
                await ws.send(data)
                last = json.loads(await ws.recv())
                if last.get("type") == "error":
                    raise RuntimeError(f"the server refused the speech: {last['error']}")
                if realtime:
                    await asyncio.sleep(chunk_s)
        return last

    async def stop(self) -> None:
        """DELETE the session and close the connection."""
        if self.session_id is not None:
            await self.http.delete(f"/v1/sessions/{self.session_id}")
        await self._close_media()

    async def first_video(self) -> None:
        """Until the first video frame has arrived (bound it with asyncio.timeout)."""
        await self.received.first_video.wait()

    async def close(self) -> None:
        await self._close_media()
        await self.http.aclose()

    # -- media ----------------------------------------------------------------------------------------------

    async def _receive(self, track) -> None:
        r = self.received
        previous = None
        while True:
            try:
                frame = await track.recv()
            except (MediaStreamError, asyncio.CancelledError):
                return
            now = time.monotonic()
            if track.kind == "video":
                r.video_times.append(now)
                r.first_video.set()
                r.video_size = (frame.width, frame.height)
                small = frame.to_ndarray(format="gray")[::8, ::8].astype(np.int16)
                # A repeated frame decodes (nearly) identical; a new one differs by far more than 1 level.
                if previous is None or np.abs(small - previous).mean() > 1.0:
                    r.fresh_times.append(now)
                previous = small
            else:
                r.audio.append(frame_to_mono(frame))
                r.audio_times.append(now)
                r.audio_rate = frame.sample_rate

    async def _close_media(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.player is not None:
            for track in (self.player.audio, self.player.video):
                if track is not None:
                    track.stop()
            self.player = None
        if self.pc is not None:
            await self.pc.close()
            self.pc = None
