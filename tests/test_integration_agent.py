"""The example voice agent end to end with real parts: examples/voice_agent.py's app and pipeline in-process
(Pipecat's SmallWebRTC transport, Silero VAD, canned replies, espeak-ng, our avatar service) against the
real server (small model), and a real aiortc peer as the browser, sending user.mp4's camera and voice.

This one process is the browser, the agent and the avatar's client at once. At user.mp4's 512 px its camera
made the process so busy that, in one run in four or five, Pipecat's audio sender fell seconds behind (on a
2-core machine the peer got 24-42 audio frames a second instead of 50), so the camera here is that video at
128 px.

The peer's voice is user.mp4's own speech, sent only when the test says (silence otherwise), so the turns
are known: the user speaks, stops, the avatar answers; later the user speaks while the avatar is talking.
Prints the reply latency, the interruption latency and one turn's event timeline.
"""

from __future__ import annotations

import asyncio
import fractions
import shutil
import time

import httpx
import numpy as np
import pytest
from golden_data import MEDIA_DIR
from server_harness import needs_golden, needs_media, needs_rtc_host, running_server

pytest.importorskip("pipecat", reason="needs the pipecat extra: pip install -e '.[pipecat]'")

import av  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack  # noqa: E402

from avatar_forcing.integrations.local_agent import create_app  # noqa: E402
from avatar_forcing.model.media.audio import frame_to_mono, load_audio  # noqa: E402

pytestmark = [pytest.mark.slow, needs_rtc_host, needs_golden, needs_media,
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the Debian package espeak-ng")]

RATE = 16000
LOUD = 0.02  # RMS of a 20 ms frame of the avatar's voice that counts as heard
JITTER = 0.1  # s the path delay may vary within a reply
# Where user.mp4 speaks (Silero hears speech there; checked on the file): the user's turns.
FIRST_TURN, SECOND_TURN, BARGE_IN = (1.0, 2.4), (7.2, 2.4), (12.3, 2.0)


class RealTime:
    """A track's clock: frame n of a stream at `rate` frames a second is due n / rate after the first."""

    def __init__(self, rate):
        self.rate = rate
        self.t0: float | None = None

    async def until_due(self, n: int) -> None:
        self.t0 = time.monotonic() if self.t0 is None else self.t0
        delay = self.t0 + n / self.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class UserVoice(MediaStreamTrack):
    """The user's microphone: silence, except the parts of user.mp4 the test asks for, in real time."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self.audio = load_audio(MEDIA_DIR / "user.mp4", RATE)
        self.pending = np.zeros(0, np.float32)
        self.stopped_at: float | None = None  # when the last sample of the latest speech was sent
        self.step = RATE // 50
        self.sent = 0
        self.clock = RealTime(RATE)

    def speak(self, start_s: float, seconds: float) -> None:
        self.pending = self.audio[int(start_s * RATE): int((start_s + seconds) * RATE)]
        self.stopped_at = None

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        await self.clock.until_due(self.sent)
        chunk = np.zeros(self.step, np.float32)
        if len(self.pending):
            part, self.pending = self.pending[:self.step], self.pending[self.step:]
            chunk[:len(part)] = part
            if not len(self.pending):
                self.stopped_at = time.monotonic()
        frame = av.AudioFrame.from_ndarray((chunk * 32767).astype(np.int16)[None, :], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.sent, fractions.Fraction(1, RATE)
        self.sent += self.step
        return frame


class UserCamera(MediaStreamTrack):
    """The user's camera: user.mp4's pictures, decoded once at SIDE px, looped in real time at its rate."""

    kind = "video"
    SIDE = 128

    def __init__(self):
        super().__init__()
        with av.open(str(MEDIA_DIR / "user.mp4")) as container:
            stream = container.streams.video[0]
            self.rate = stream.average_rate
            self.frames = [frame.reformat(width=self.SIDE, height=self.SIDE, format="yuv420p")
                           for frame in container.decode(stream)]
        self.sent = 0
        self.clock = RealTime(self.rate)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        await self.clock.until_due(self.sent)
        frame = self.frames[self.sent % len(self.frames)]
        frame.pts, frame.time_base = self.sent, 1 / self.rate
        self.sent += 1
        return frame


class Browser:
    """What the peer received: the avatar's voice (RMS per frame) and pictures, with arrival times."""

    def __init__(self):
        self.audio: list[tuple[float, float]] = []
        self.video: list[float] = []
        self.fresh: list[float] = []  # frames whose picture changed
        self.size: tuple[int, int] | None = None
        self._previous = None

    async def receive(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            if track.kind == "audio":
                samples = frame_to_mono(frame)
                self.audio.append((now, float(np.sqrt(np.mean(samples ** 2))) if len(samples) else 0.0))
                continue
            self.video.append(now)
            self.size = (frame.width, frame.height)
            small = frame.to_ndarray(format="gray")[::4, ::4].astype(np.int16)
            if self._previous is None or np.abs(small - self._previous).mean() > 1.0:
                self.fresh.append(now)
            self._previous = small

    def heard(self, start: float, end: float = float("inf")) -> list[float]:
        return [t for t, rms in self.audio if start <= t < end and rms > LOUD]


async def wait_for(predicate, within_s: float, what: str):
    deadline = time.monotonic() + within_s
    while not (result := predicate()):  # noqa: ASYNC110 (polls what the peer and the agent produced)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return result


def test_voice_agent_answers_a_turn_and_stops_when_the_user_barges_in(tmp_path):
    async def run():
        with running_server(tmp_path, max_sessions=1) as server:
            portrait = (MEDIA_DIR / "rumi.jpg").read_bytes()
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
                avatar_id = (await http.post("/v1/avatars", content=portrait, headers={
                    "content-type": "application/octet-stream"})).json()["avatar_id"]
            agents = []
            app = create_app(server_url=server.base_url, avatar_id=avatar_id, video_size=(128, 128),
                             on_agent=lambda task, avatar: agents.append((task, avatar)))
            voice, browser = UserVoice(), Browser()
            camera = UserCamera()
            pc = RTCPeerConnection()
            pc.addTrack(voice)  # audio first, then video: the order the SmallWebRTC transport expects
            pc.addTrack(camera)
            receivers = []
            pc.on("track", lambda track: receivers.append(asyncio.ensure_future(browser.receive(track))))
            await pc.setLocalDescription(await pc.createOffer())
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent") as http:
                assert "RTCPeerConnection" in (await http.get("/")).text
                answer = (await http.post("/api/offer", json={"sdp": pc.localDescription.sdp,
                                                              "type": pc.localDescription.type})).json()
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
            task, service = agents[0]
            remote = service.avatar
            sent_interrupts: list[float] = []
            interrupt = remote.interrupt

            async def timed_interrupt():
                sent_interrupts.append(time.monotonic())
                await interrupt()

            remote.interrupt = timed_interrupt
            # The avatar's voice as it comes out of the server, before Pipecat's output transport.
            served: list[tuple[float, float]] = []
            await wait_for(lambda: remote.on_audio is not None, 30, "the avatar service to start")
            deliver = remote.on_audio

            async def tap(frame):
                samples = frame_to_mono(frame)
                served.append((time.monotonic(), float(np.sqrt(np.mean(samples ** 2))) if len(samples) else 0.0))
                await deliver(frame)

            remote.on_audio = tap
            events = remote.events
            try:
                await wait_for(lambda: len(browser.video) > 50, 90, "two seconds of the avatar's video")
                # Turn 1: the user speaks, stops; the avatar answers, and finishes.
                voice.speak(*FIRST_TURN)
                t_stop = await wait_for(lambda: voice.stopped_at, 10, "the user's first turn")
                first = await wait_for(lambda: browser.heard(t_stop), 15, "the avatar's reply")
                finished = await wait_for(lambda: [e for e in events if e["type"] == "playback_finished"], 20,
                                          "the reply's playback_finished")
                await asyncio.sleep(0.5)  # the reply's last frames still on their way to the browser
                # Video rate over the whole first turn (reply made, spoken and finished), not a short window a
                # stall of this 2-core machine can fill: the video must keep flowing while the agent works.
                now = time.monotonic()
                span = now - t_stop
                fps = sum(1 for t in browser.video if t > t_stop) / span
                fresh_fps = sum(1 for t in browser.fresh if t > t_stop) / span
                # Turn 2: the user speaks; while the avatar answers, the user speaks again.
                voice.speak(*SECOND_TURN)
                await wait_for(lambda: sum(e["type"] == "playback_started" for e in events) == 2, 15, "reply 2")
                await asyncio.sleep(1.0)
                t_barge = time.monotonic()
                voice.speak(*BARGE_IN)
                await wait_for(lambda: any(e.get("interrupted") for e in events), 5, "the interrupted finish")
                await asyncio.sleep(1.2)  # the user is still talking: no new reply yet
            finally:
                await task.cancel()
                for track in (voice, camera):
                    track.stop()
                for receiver in receivers:
                    receiver.cancel()
                await pc.close()
        return t_stop, first, finished[0], fps, fresh_fps, events, t_barge, sent_interrupts, served, browser

    t_stop, first, finished, fps, fresh_fps, events, t_barge, sent, served, browser = asyncio.run(run())
    t_finished, t_sent = finished["received_at"], sent[-1]

    def loud(frames, start, end):
        return [t for t, rms in frames if start <= t < end and rms > LOUD]

    served_reply, heard_reply = loud(served, t_stop, t_finished + 0.5), browser.heard(t_stop, t_finished + 0.5)
    # The peer hears the server's output later by the path through Pipecat's transport and WebRTC (its delay
    # at each reply's start, measured): after an interrupt it must go silent no later than that behind the
    # server's last sound, give or take JITTER (the delay within a reply varies by a few 20 ms frames).
    t_second = [e["received_at"] for e in events if e["type"] == "playback_started"][1]
    served_second, heard_second = loud(served, t_second, t_sent), browser.heard(t_second, t_sent)
    second_delay = heard_second[0] - served_second[0] if served_second and heard_second else 0.0
    path_delay = min(max(first[0] - served_reply[0], second_delay), 0.5)
    served_after = loud(served, t_sent + 0.15, t_sent + 1.2)
    server_silent = max(loud(served, t_sent, t_sent + 1.2), default=t_sent)
    heard_after = browser.heard(server_silent + path_delay + JITTER, t_sent + 1.2)
    turn = [(round(e["received_at"] - t_stop, 3), e["type"], e.get("position_s"), e.get("interrupted"))
            for e in events if t_stop <= e["received_at"] <= t_finished and e["type"] != "queued"]
    queued = [e["received_at"] - t_stop for e in events if t_stop <= e["received_at"] <= t_finished
              and e["type"] == "queued"]
    turn.insert(0, (round(queued[0], 3), f"queued x{len(queued)} (TTS chunks) until {queued[-1]:.3f}"))
    print(f"\nturn 1 (s after the user stopped speaking): avatar voice out of the server "
          f"{served_reply[0] - t_stop:.3f}, "
          f"heard at the peer {first[0] - t_stop:.3f}; last sound out of the server {served_reply[-1] - t_stop:.3f}, "
          f"at the peer {heard_reply[-1] - t_stop:.3f}; server events {turn}")
    print(f"reply latency (user stops speaking -> avatar audio heard at the peer): {first[0] - t_stop:.3f} s")
    last_served = max(loud(served, t_barge, t_sent + 1.2), default=float("nan"))
    last_heard = max(browser.heard(t_barge, t_sent + 1.2), default=float("nan"))
    print(f"interruption: user speech starts 0; interrupt sent {t_sent - t_barge:.3f} s; last avatar sound out of "
          f"the server {last_served - t_sent:+.3f} s and at the peer {last_heard - t_sent:+.3f} s after it was sent")
    print(f"path delay server -> peer at the replies' starts {first[0] - served_reply[0]:.3f} s and "
          f"{second_delay:.3f} s; video at the peer: {fps:.1f} fps, "
          f"{fresh_fps:.1f} changing, {browser.size}")
    assert first[0] - t_stop < 5.0, "the avatar took over 5 s to answer"
    assert fps >= 21, f"video at {fps:.1f} fps over the first turn"
    assert fresh_fps >= 10, f"only {fresh_fps:.1f} changing pictures per second"
    assert finished["interrupted"] is False and finished["position_s"] > 1.0, finished
    assert t_finished >= served_reply[-1] - 0.25, "playback_finished came before the reply was played"
    assert len(sent) == 1, f"{len(sent)} interrupts for one barge-in"
    kinds = [e["type"] for e in events if e["received_at"] >= t_sent]
    assert kinds[:2] == ["interrupted", "playback_finished"], kinds
    assert next(e for e in events if e["received_at"] >= t_sent and e["type"] == "playback_finished")["interrupted"]
    assert not served_after, f"avatar speech {served_after[-1] - t_sent:.2f} s after the interrupt was sent"
    assert not heard_after, (f"the peer heard the avatar {heard_after[-1] - t_sent:.2f} s after the interrupt was sent "
                             f"(the server's last sound {server_silent - t_sent:.2f} s, path delay {path_delay:.2f} s)")
