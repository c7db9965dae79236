"""Whole sessions against the real server with real aiortc peers (random small weights: transport tests).

The client plays ../shared/media/user.mp4 as its webcam and microphone; the avatar comes back over WebRTC.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from golden_data import MEDIA_DIR
from server_harness import needs_golden, needs_media, needs_rtc_host, running_server

from avatar_forcing.model.media.audio import load_audio
from avatar_forcing.server.client import ApiError, AvatarClient

pytestmark = [needs_rtc_host, needs_golden, needs_media]

IDLE_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("rtc"), max_sessions=3, idle_timeout_s=IDLE_TIMEOUT_S) as s:
        yield s


@pytest.fixture(scope="module")
def avatar_id(server):
    async def upload():
        async with AvatarClient(server.base_url) as c:
            return await c.upload_avatar((MEDIA_DIR / "rumi.jpg").read_bytes())

    return asyncio.run(upload())


def spoken(seconds: float) -> np.ndarray:
    """avatar.wav's speech (it sits in the last 4 s of the file; the rest is near silence), repeated."""
    words = load_audio(MEDIA_DIR / "avatar.wav", 16000)[16000 * 12:]
    return np.tile(words, int(np.ceil(seconds * 16000 / len(words))))[: int(seconds * 16000)]


def envelope(pcm: np.ndarray, rate: int, hop_s: float = 0.02) -> np.ndarray:
    hop = int(hop_s * rate)
    n = len(pcm) // hop
    return np.sqrt((pcm[: n * hop].reshape(n, hop) ** 2).mean(axis=1))


WAIT_LIVE_S = 15.0


async def wait_live(client: AvatarClient) -> dict:
    """Poll the session's state on the server until it is live and video arrives; at most WAIT_LIVE_S."""
    info: dict = {}
    try:
        async with asyncio.timeout(WAIT_LIVE_S):
            while True:
                info = await client.info()
                if info["state"] == "live" and client.received.video_times:
                    return info
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"session not live after {WAIT_LIVE_S} s: {info}") from None


def test_random_weights_session_streams_video_and_audio_at_full_rate(server, avatar_id):
    async def run():
        async with AvatarClient(server.base_url) as c:
            await c.start(avatar_id, media=MEDIA_DIR / "user.mp4")
            await wait_live(c)
            await asyncio.sleep(5)
            fps = c.received.fps(4.0)
            audio_frames = sum(1 for t in c.received.audio_times if t > time.monotonic() - 4) / 4
            info = await c.info()
            size = c.received.video_size
            await c.stop()
            return fps, audio_frames, info, size

    fps, audio_frames, info, size = asyncio.run(run())
    assert 23.0 <= fps <= 27.0, f"video at {fps:.1f} fps"
    assert audio_frames >= 45, f"{audio_frames:.1f} audio frames/s"
    assert size == (128, 128)
    stats = info["stats"]
    assert stats["blocks_generated"] >= 5
    assert stats["user_audio_seconds_received"] > 3, stats  # the client's microphone reaches the engine
    assert stats["user_video_frames_received"] > 50, stats  # and its webcam


def test_random_weights_speech_pushed_over_websocket_comes_back_in_the_audio(server, avatar_id):
    speech = spoken(3.8)

    async def run():
        async with AvatarClient(server.base_url) as c:
            await c.start(avatar_id)  # receive only: the returned audio is the avatar's alone
            await wait_live(c)
            await asyncio.sleep(1.0)
            t_push = time.monotonic()
            queued = await c.stream_speech(speech, 16000)
            await asyncio.sleep(5.5)
            received = c.received.audio_since(t_push - 0.5)
            rate = c.received.audio_rate
            await c.stop()
            return queued, received, rate

    queued, received, rate = asyncio.run(run())
    assert queued["type"] == "queued" and queued["queued_seconds"] > 3
    sent_env, got_env = envelope(speech, 16000), envelope(received, rate)
    assert got_env.max() > 0.02, "no speech came back"
    # The returned audio follows the pushed speech's loudness contour, at some delay.
    best = max(np.corrcoef(sent_env, got_env[lag:lag + len(sent_env)])[0, 1]
               for lag in range(0, len(got_env) - len(sent_env)))
    # Alone this is 0.9+; a full CI run on 2 cores once measured 0.79 (some late audio dropped under load).
    assert best > 0.7, f"returned audio does not follow the pushed speech (best correlation {best:.2f})"


def test_random_weights_interrupt_empties_queued_speech(server, avatar_id):
    speech = spoken(10.0)

    async def run():
        async with AvatarClient(server.base_url) as c:
            await c.start(avatar_id)
            await wait_live(c)
            await c.stream_speech(speech, 16000)
            await asyncio.sleep(2.5)
            speaking = envelope(c.received.audio_since(time.monotonic() - 1.0), c.received.audio_rate)
            result = await c.interrupt()
            t_interrupt = time.monotonic()
            queued_after = (await c.info())["stats"]["queued_speech_seconds"]
            await asyncio.sleep(2.5)
            after = envelope(c.received.audio_since(t_interrupt + 1.5), c.received.audio_rate)
            await c.stop()
            return speaking, result, queued_after, after

    speaking, result, queued_after, after = asyncio.run(run())
    assert speaking.max() > 0.02, "the avatar was not speaking before the interrupt"
    assert result["dropped_seconds"] > 5
    assert queued_after == 0
    assert after.max() < 0.1 * speaking.max(), "speech continued after the interrupt"


def test_random_weights_concurrent_sessions_all_keep_their_rate(server, avatar_id, user_video_128px):
    # Three peers encoding user.mp4's 512 px camera in the test process left the server beside them at
    # 21-24 fps in 3 of 4 runs on a 2-core machine; at 128 px the same video kept all three at rate (4 of 4).
    camera = user_video_128px

    async def run():
        clients = [AvatarClient(server.base_url) for _ in range(3)]
        try:
            for c in clients:
                await c.start(avatar_id, media=camera)
            for c in clients:
                await wait_live(c)
            await asyncio.sleep(5)
            return [c.received.fps(4.0) for c in clients]
        finally:
            for c in clients:
                await c.stop()
                await c.close()

    rates = asyncio.run(run())
    # A busy CI machine's 2 cores once left all three at 22.0-23.5 (a fresh-clone run, 2026-12-02): the lower
    # bound allows that, well above what a session that fell out of real time delivers (the admission test: 9.8).
    assert all(21.0 <= r <= 27.0 for r in rates), rates


def test_random_weights_over_capacity_is_503_and_others_keep_running(server, avatar_id):
    async def run():
        clients = [AvatarClient(server.base_url) for _ in range(3)]
        extra = AvatarClient(server.base_url)
        try:
            for c in clients:
                await c.start(avatar_id)
            for c in clients:
                await wait_live(c)
            with pytest.raises(ApiError) as refused:
                await extra.start(avatar_id)
            offer = {"sdp": extra.pc.localDescription.sdp, "type": "offer", "avatar_id": avatar_id}
            retry_after = (await extra.http.post("/v1/sessions", json=offer)).headers.get("retry-after")
            await asyncio.sleep(3)
            return refused.value, retry_after, [c.received.fps(2.5) for c in clients]
        finally:
            await extra.close()
            for c in clients:
                await c.stop()
                await c.close()

    refused, retry_after, rates = asyncio.run(run())
    assert refused.status == 503 and refused.error["code"] == "at_capacity"
    assert retry_after is not None and int(retry_after) > 0
    assert all(r >= 23.0 for r in rates), rates


CRASHING_CLIENT = textwrap.dedent("""
    import asyncio, sys
    from avatar_forcing.server.client import AvatarClient

    async def main():
        c = AvatarClient(sys.argv[1])
        await c.start(sys.argv[2], media=sys.argv[3])
        while not c.received.video_times:
            await asyncio.sleep(0.1)
        print(c.session_id, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def test_random_weights_vanishing_client_is_cleaned_up_and_others_continue(server, avatar_id):
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_CLIENT, server.base_url, avatar_id,
                             str(MEDIA_DIR / "user.mp4")], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ))

    async def run():
        async with AvatarClient(server.base_url) as survivor:
            await survivor.start(avatar_id, media=MEDIA_DIR / "user.mp4")
            await wait_live(survivor)
            crashed_id = proc.stdout.readline().strip()
            assert crashed_id.startswith("s_"), "the crashing client did not connect"
            proc.send_signal(signal.SIGKILL)  # mid-block, no goodbye of any kind
            proc.wait()
            t_kill = time.monotonic()
            gone_after = None
            while time.monotonic() - t_kill < IDLE_TIMEOUT_S + 10:
                r = await survivor.http.get(f"/v1/sessions/{crashed_id}")
                if r.status_code == 404 or r.json()["state"] == "closed":
                    gone_after = time.monotonic() - t_kill
                    break
                await asyncio.sleep(0.5)
            fps = survivor.received.fps(4.0)
            await survivor.stop()
            return gone_after, fps

    try:
        gone_after, fps = asyncio.run(run())
    finally:
        if proc.poll() is None:
            proc.kill()
    assert gone_after is not None, "the vanished client's session was never cleaned up"
    assert fps >= 23.0, f"the other session dropped to {fps:.1f} fps"
    assert server.metric("avatar_sessions_ended_total", 'reason="idle"') >= 1
