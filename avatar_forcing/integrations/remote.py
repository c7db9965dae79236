"""One conversation with an avatar server, for agent frameworks: the WebRTC session (the user's microphone
and camera go up so the avatar listens; the avatar's video and voice come down) and the speech WebSocket
(the agent's TTS goes up; playback events come down). One connection per conversation, reused for every
turn. The Pipecat service and the LiveKit avatar worker both drive the server through this class.

    avatar = RemoteAvatar("http://gpu-host:8080", portrait=open("face.jpg", "rb").read())
    avatar.on_video = lambda frame: ...          # av.VideoFrame, 25 fps
    avatar.on_audio = lambda frame: ...          # av.AudioFrame, 48 kHz mono, in sync with the video
    avatar.on_event = lambda event: ...          # {"type": "playback_finished", ...} (docs/api.md)
    await avatar.start()
    await avatar.say(pcm16_bytes, 24000); await avatar.flush()
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import av
import httpx
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_forcing.server.config import CLIENT_KEEP_ALIVE_S

log = logging.getLogger("avatar_forcing.integrations")

Callback = Callable[[Any], Awaitable[None] | None]
VIDEO_CLOCK = 90000


class RemoteError(RuntimeError):
    """The avatar server refused a request, or the conversation broke; the message says which and why."""


class FedTrack(MediaStreamTrack):
    """A track the application feeds frame by frame (the user's microphone or camera as the agent
    framework hands them over). Only the newest few frames wait: a stalled sender never piles up delay."""

    def __init__(self, kind: str, max_queued: int):
        super().__init__()
        self.kind = kind
        self._queue: asyncio.Queue = asyncio.Queue(max_queued)
        self._pts = 0
        self._t0: float | None = None

    def put_audio(self, pcm: bytes, rate: int, channels: int = 1) -> None:
        samples = np.frombuffer(pcm, dtype="<i2")
        if channels > 1:  # the server listens in mono
            samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts, frame.time_base = self._pts, fractions.Fraction(1, rate)
        self._pts += len(samples)
        self._put(frame)

    def put_image(self, rgb: bytes, size: tuple[int, int]) -> None:
        width, height = size
        frame = av.VideoFrame.from_ndarray(np.frombuffer(rgb, np.uint8).reshape(height, width, 3), format="rgb24")
        now = time.monotonic()
        self._t0 = now if self._t0 is None else self._t0
        frame.pts, frame.time_base = int((now - self._t0) * VIDEO_CLOCK), fractions.Fraction(1, VIDEO_CLOCK)
        self._put(frame)

    def _put(self, frame) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(frame)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        return await self._queue.get()


class RemoteAvatar:
    def __init__(self, url: str, *, portrait: bytes | None = None, avatar_id: str | None = None,
                 token: str | None = None, seed: int | None = None, timeout_s: float = 30.0):
        if (portrait is None) == (avatar_id is None):
            raise ValueError("give the avatar as portrait=<image bytes> or avatar_id=<id from POST /v1/avatars>")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the server URL {url!r} must start with http:// or https://")
        self.url, self.token, self.seed = url.rstrip("/"), token, seed
        self.portrait, self.avatar_id = portrait, avatar_id
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout_s,
                                      limits=httpx.Limits(keepalive_expiry=CLIENT_KEEP_ALIVE_S))
        self.microphone = FedTrack("audio", max_queued=50)  # 1 s of 20 ms frames
        self.camera = FedTrack("video", max_queued=2)
        self.on_video: Callback | None = None
        self.on_audio: Callback | None = None
        self.on_event: Callback | None = None
        self.session_id: str | None = None
        self.pc: RTCPeerConnection | None = None
        self._ws: Any = None
        self._ws_rate: int | None = None
        self._tasks: set[asyncio.Task] = set()
        self.events: list[dict] = []  # every message of the speech socket, with "received_at" (monotonic)

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> str:
        """Open the session; returns its id once the server answered (media flow as ICE connects)."""
        if self.avatar_id is None:
            reply = await self._ok(await self.http.post("/v1/avatars", content=self.portrait,
                                                        headers={"content-type": "application/octet-stream"}))
            self.avatar_id = reply["avatar_id"]
        self.pc = pc = RTCPeerConnection()
        pc.addTrack(self.microphone)
        pc.addTrack(self.camera)
        pc.on("track", lambda track: self._spawn(self._receive(track)))
        await pc.setLocalDescription(await pc.createOffer())
        answer = await self._ok(await self.http.post("/v1/sessions", json={
            "sdp": pc.localDescription.sdp, "type": "offer", "avatar_id": self.avatar_id,
            "options": {"seed": self.seed}}))
        self.session_id = answer["session_id"]
        await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        return self.session_id

    async def close(self) -> None:
        """End the session on the server and close everything (idempotent)."""
        if self.session_id is not None:
            try:
                await self.http.delete(f"/v1/sessions/{self.session_id}")
            except httpx.HTTPError as exc:
                log.warning("could not end session %s: %s", self.session_id, exc)
            self.session_id = None
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        for track in (self.microphone, self.camera):
            track.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pc is not None:
            await self.pc.close()
            self.pc = None
        await self.http.aclose()

    # -- the agent's speech ---------------------------------------------------------------------------------

    async def say(self, pcm16: bytes, rate: int) -> None:
        """Queue PCM16 mono speech (a TTS chunk) in the current utterance."""
        if len(pcm16) % 2:
            raise ValueError(f"PCM16 audio has an even number of bytes, got {len(pcm16)}")
        ws = await self._speech_socket(rate)
        await ws.send(pcm16)

    async def flush(self) -> None:
        """The current utterance is complete: `playback_finished` follows once its last sample is played."""
        if self._ws is not None:
            await self._ws.send(json.dumps({"type": "flush"}))

    async def interrupt(self) -> None:
        """Barge-in: drop queued speech, silence the avatar now (`interrupted`, then an interrupted finish)."""
        if self._ws is not None:
            await self._ws.send(json.dumps({"type": "interrupt"}))
        elif self.session_id is not None:
            await self._ok(await self.http.post(f"/v1/sessions/{self.session_id}/interrupt"))

    async def _speech_socket(self, rate: int):
        """The speech WebSocket at this rate (opened once; reopened only if the TTS changes rate)."""
        if self._ws is not None and self._ws_rate == rate:
            return self._ws
        if self.session_id is None:
            raise RemoteError("start() the avatar before giving it speech")
        if self._ws is not None:
            await self.flush()
            await self._ws.close()
        url = (self.url.replace("http", "ws", 1) + f"/v1/sessions/{self.session_id}/speech"
               f"?sample_rate={rate}&events=1" + (f"&token={self.token}" if self.token else ""))
        try:
            ws = await websockets.connect(url, max_size=2**22)
        except websockets.InvalidStatus as exc:
            raise RemoteError(f"the server refused the speech stream: HTTP {exc.response.status_code}") from None
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            raise RemoteError(f"the speech stream did not open: {ready}")
        self._ws, self._ws_rate = ws, rate
        self._spawn(self._read_events(ws))
        return ws

    async def _read_events(self, ws) -> None:
        try:
            async for raw in ws:
                message = json.loads(raw)
                message["received_at"] = time.monotonic()
                self.events.append(message)
                if message.get("type") == "error":
                    log.error("the avatar server refused speech: %s", message.get("error"))
                if message.get("type") != "queued" and self.on_event is not None:
                    await _call(self.on_event, message)
        except websockets.ConnectionClosed:
            return

    # -- media ----------------------------------------------------------------------------------------------

    async def _receive(self, track) -> None:
        handler = (lambda: self.on_video) if track.kind == "video" else (lambda: self.on_audio)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            callback = handler()
            if callback is not None:
                await _call(callback, frame)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ok(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                reason = f"{error['code']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                reason = response.text[:200]
            raise RemoteError(f"the avatar server answered {response.status_code} ({reason})")
        return response.json() if response.content else {}


async def _call(callback: Callback, value: Any) -> None:
    result = callback(value)
    if asyncio.iscoroutine(result):
        await result
