"""Real-time promises of the running server (issue 10) with real aiortc peers: barge-in silences the avatar
within 150 ms, and admission keeps an admitted session in real time when the worker is slow.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import websockets
from golden_data import MEDIA_DIR
from server_harness import needs_golden, needs_media, needs_rtc_host, running_server

from avatar_forcing.model.media.audio import load_audio
from avatar_forcing.server.client import ApiError, AvatarClient

pytestmark = [needs_rtc_host, needs_golden, needs_media]

TRIALS = 20
BARGE_IN_S = 0.15
SPEECH_RMS = 0.02  # a 20 ms frame louder than this is avatar speech (silence decodes to ~0)


def speech_wav(seconds: float) -> bytes:
    """avatar.wav's words (its last 4 s), repeated, as a 16 kHz WAV."""
    import io
    import wave

    words = load_audio(MEDIA_DIR / "avatar.wav", 16000)[16000 * 12:]
    pcm = np.tile(words, int(np.ceil(seconds * 16000 / len(words))))[: int(seconds * 16000)]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def loud_times(client: AvatarClient, since: float) -> list[float]:
    r = client.received
    return [t for t, a in zip(r.audio_times, r.audio, strict=True)
            if t >= since and len(a) and float(np.sqrt(np.mean(a ** 2))) > SPEECH_RMS]


async def wait_for(predicate, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():  # noqa: ASYNC110 (polls what the peer received)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_barge_in_silences_the_avatar_within_150_ms_in_every_trial(tmp_path):
    wav = speech_wav(4.0)

    async def run() -> list[float]:
        with running_server(tmp_path, max_sessions=1) as server:
            async with AvatarClient(server.base_url) as c:
                await c.start(await c.upload_avatar((MEDIA_DIR / "rumi.jpg").read_bytes()),
                              media=MEDIA_DIR / "user.mp4")
                await wait_for(lambda: c.received.video_times, 60, "the first frame")
                url = c.base_url.replace("http", "ws", 1) + f"/v1/sessions/{c.session_id}/speech?sample_rate=16000"
                rng = np.random.default_rng(1)
                results = []
                async with websockets.connect(url) as ws:
                    assert json.loads(await ws.recv())["type"] == "ready"
                    for trial in range(TRIALS):
                        pushed = time.monotonic()
                        await c.say_wav(wav)
                        await wait_for(lambda since=pushed: loud_times(c, since), 15, "the avatar's speech")
                        await asyncio.sleep(float(rng.uniform(0.05, 1.0)))  # anywhere in a block
                        sent = time.monotonic()  # the interrupt reaches the server after this
                        if trial % 2:
                            await ws.send(json.dumps({"type": "interrupt"}))
                            assert json.loads(await ws.recv())["type"] == "interrupted"
                        else:
                            await c.interrupt()
                        await asyncio.sleep(2.0)  # longer than a block in flight plus the playout delay
                        last = max(loud_times(c, sent), default=sent)
                        results.append(last - sent)
                await c.stop()
        return results

    results = asyncio.run(run())
    print(f"\nbarge-in over {len(results)} trials: speech heard up to {1000 * max(results):.0f} ms after the "
          f"interrupt (median {1000 * float(np.median(results)):.0f} ms)")
    assert max(results) <= BARGE_IN_S, [round(r, 3) for r in results]


def test_admission_under_a_slow_worker_keeps_the_admitted_session_in_real_time(tmp_path, user_video_128px):
    """Each step padded to half a block per session: one session fits, a second would not."""
    # The peer's camera at 128 px: encoding user.mp4's 512 px in the test process, beside the server on a
    # 2-core machine, made padded steps overrun.
    camera = user_video_128px

    async def run():
        with running_server(tmp_path, max_sessions=3, overload_admission="predict",
                            test_step_blocks=0.5) as server:
            async with AvatarClient(server.base_url) as first, AvatarClient(server.base_url) as second:
                avatar = await first.upload_avatar((MEDIA_DIR / "rumi.jpg").read_bytes())
                await first.start(avatar, media=camera)
                await wait_for(lambda: first.received.video_times, 60, "the first frame")
                await asyncio.sleep(6)  # utilisation and the live cost settle
                with pytest.raises(ApiError) as refused:
                    await second.start(avatar, media=camera)
                t0 = time.monotonic()
                before = (await first.info())["stats"]
                await asyncio.sleep(6)
                fresh = first.received.fresh_fps(time.monotonic() - t0)
                info = await first.info()
                await first.stop()
            return refused.value, fresh, before, info

    refused, fresh, before, info = asyncio.run(run())
    stats, p99 = info["stats"], info["timings"]["block_latency_p99_ms"]
    late = stats["late_blocks"] - before["late_blocks"]
    skipped = stats["engine_skip_aheads"] - before["engine_skip_aheads"]
    print(f"\nslow worker (0.5 block per session): second session {refused.status} {refused.error['code']}; "
          f"the admitted one ran at {fresh:.1f} fresh frames/s, block latency p99 {p99} ms, {skipped} skip-aheads, "
          f"{late} blocks later than the playout delay in 6 s")
    assert refused.status == 503 and refused.error["code"] == "overloaded"
    # In real time: it keeps up with its input (catch-up would skip ahead) and its frames are fresh. Had the
    # second session been admitted (admission off, measured here): 6 skip-aheads in 6 s and 9.8 fresh frames/s.
    # Alone it has none, except when the CI machine's 2 cores stall (seen in CI runs: 1 skip-ahead and 22.9 fresh
    # frames/s; 2 and 19.6). The bounds sit between the two cases: at most 3 skip-aheads, at least 15 frames/s.
    # Block latency includes the wait for the microphone's packets and a block may miss the playout delay's
    # margin (the delay absorbs it): neither is asserted.
    assert skipped <= 3, f"{skipped} skip-aheads in 6 s: the session fell behind its input"
    assert fresh >= 15, f"the admitted session ran at {fresh:.1f} fresh frames/s"


def test_a_worker_slower_than_real_time_skips_ahead_instead_of_queueing(tmp_path):
    """Each step padded to 1.5 blocks per session: the idle server still admits one session (and only one),
    and the engine skips stale input and generates from the newest, so block latency stays bounded and the
    frames shown are fresh; without catch-up latency grew by 0.2 s every step (1.3-3.5 s p50 within seconds)."""
    async def run():
        with running_server(tmp_path, max_sessions=2, overload_admission="predict",
                            test_step_blocks=1.5) as server:
            async with AvatarClient(server.base_url) as c, AvatarClient(server.base_url) as second:
                ready = (await c.http.get("/readyz")).json()
                avatar = await c.upload_avatar((MEDIA_DIR / "rumi.jpg").read_bytes())
                await c.start(avatar, media=MEDIA_DIR / "user.mp4")
                await wait_for(lambda: c.received.video_times, 60, "the first frame")
                with pytest.raises(ApiError) as refused:
                    await second.start(avatar)
                await asyncio.sleep(2)
                t0 = time.monotonic()
                await asyncio.sleep(10)
                fresh = c.received.fresh_fps(time.monotonic() - t0)
                info = await c.info()
                await c.stop()
        return ready, refused.value, fresh, info

    ready, refused, fresh, info = asyncio.run(run())
    # A session alone costs over 150 % of real time here: the server says it fits one, admits it, refuses more.
    assert ready["status"] == "ready" and ready["capacity_measured"] == 1, ready
    assert refused.status == 503 and refused.error["code"] == "overloaded"
    stats, timings = info["stats"], info["timings"]
    print(f"\nworker at 1.5x a block per step: block latency p50 {timings['block_latency_p50_ms']} ms, "
          f"p99 {timings['block_latency_p99_ms']} ms; {fresh:.1f} fresh frames/s; "
          f"{stats['engine_skip_aheads']} skip-aheads over {stats['engine_skipped_frames']} frames; "
          f"playout delay {stats['playout_delay_seconds']} s")
    assert stats["engine_skip_aheads"] > 0, "the engine never skipped ahead"
    assert timings["block_latency_p99_ms"] < 2000, "block latency grows: stale blocks are being queued"
    assert stats["playout_delay_seconds"] <= 1.5 + 1e-6
    # At most 10 new frames per 0.6 s step can be shown (16.7/s); most of them must reach the peer.
    assert fresh >= 10, f"only {fresh:.1f} fresh frames/s"
