"""Playback events on the speech WebSocket (LiveKit's avatar protocol semantics) and the avatar's speech at
its own rate: the bookkeeping alone, then whole sessions against the real server with a real aiortc peer."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import websockets
from golden_data import MEDIA_DIR
from server_harness import needs_golden, needs_media, needs_rtc_host, running_server

from avatar_forcing.model.engine.inputs import LiveSettings
from avatar_forcing.model.media.audio import load_audio
from avatar_forcing.server.client import AvatarClient
from avatar_forcing.server.playback import PlaybackTracker
from avatar_forcing.server.speech import PLAYBACK_RATE, SpeechInputs

SPEECH_RMS = 0.02


# -- the bookkeeping ---------------------------------------------------------------------------------------


def test_tracker_reports_an_utterance_when_its_last_sample_is_played_not_when_it_is_queued():
    tracker = PlaybackTracker(1000, clock=lambda: 0.0)
    first = tracker.add(100, 600)
    assert tracker.add(600, 900) == first  # contiguous chunks: the same utterance
    assert tracker.poll(100) == []  # nothing played yet
    assert [e["type"] for e in tracker.poll(101)] == ["playback_started"]
    assert tracker.poll(900) == []  # all played, but its end is not marked: more may come
    assert tracker.end() == first
    assert tracker.poll(899) == []
    (finished,) = tracker.poll(900)
    assert finished == {"type": "playback_finished", "utterance_id": first, "position_s": 0.8,
                        "interrupted": False, "at": 0.0}
    second = tracker.add(2000, 2500)
    assert second != first and tracker.poll(3000)[0]["type"] == "playback_started"


def test_tracker_interrupt_is_followed_by_an_interrupted_finish_with_what_was_heard():
    tracker = PlaybackTracker(1000, clock=lambda: 0.0)
    a = tracker.add(0, 1000)
    tracker.end()
    b = tracker.add(1000, 3000)  # queued after a, never started
    tracker.poll(400)
    tracker.truncate(1200)  # barge-in: speech from 1200 on is dropped
    events = tracker.interrupt(400, dropped_s=2.0)
    assert [e["type"] for e in events] == ["interrupted", "playback_finished", "playback_finished"]
    assert events[0]["dropped_seconds"] == 2.0
    assert (events[1]["utterance_id"], events[1]["position_s"], events[1]["interrupted"]) == (a, 0.4, True)
    assert (events[2]["utterance_id"], events[2]["position_s"], events[2]["interrupted"]) == (b, 0.0, True)
    assert tracker.poll(5000) == [] and tracker.unfinished() == 0
    assert tracker.add(5000, 5100) not in (a, b)  # speech after an interrupt is a new utterance


def test_tracker_follows_speech_that_catch_up_moved_later():
    tracker = PlaybackTracker(1000, clock=lambda: 0.0)
    tracker.add(0, 1000)
    tracker.end()
    tracker.shift(600, 200)  # frames from 600 skipped: the rest of the speech plays 200 later
    assert [e["type"] for e in tracker.poll(1000)] == ["playback_started"]
    (finished,) = tracker.poll(1200)
    assert finished["position_s"] == 1.0


def test_speech_plays_at_its_own_rate_and_the_model_gets_its_own_16k_copy():
    settings = LiveSettings(lead_in_frames=5)
    inputs = SpeechInputs(settings)
    rate = 24000
    t = np.arange(rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 9000 * t)).astype(np.float32)  # above 8 kHz: lost at 16 kHz
    click = np.zeros(rate, np.float32)
    click[12000] = 0.9  # half a second in
    for chunk in np.array_split(tone + click, 7):  # streamed in uneven chunks, as a TTS does
        inputs.push_speech(chunk, rate)
    assert inputs.end_utterance() == 1
    origin, frames = settings.lead_in_frames, 25
    played = inputs.avatar_audio(origin, origin + frames + 2)  # what a block carries to the pacer
    assert len(played) == (frames + 2) * PLAYBACK_RATE // 25
    spectrum = np.abs(np.fft.rfft(played[:PLAYBACK_RATE]))
    freqs = np.fft.rfftfreq(PLAYBACK_RATE, 1 / PLAYBACK_RATE)
    band = spectrum[(freqs > 8800) & (freqs < 9200)].max()
    assert band > 0.2 * spectrum.max(), "the 9 kHz tone did not survive: the speech was band-limited"
    model = inputs.avatar.read(origin * inputs.spf, (origin + frames + 2) * inputs.spf)
    # The click lands at the same time in both copies (within a millisecond).
    at_played = (np.argmax(np.abs(np.diff(played))) + 1) / PLAYBACK_RATE
    high = model - np.convolve(model, np.ones(8) / 8, mode="same")  # the tone is gone at 16 kHz; the click is not
    at_model = np.argmax(np.abs(high)) / settings.sample_rate
    assert abs(at_played - 0.5) < 0.002 and abs(at_model - 0.5) < 0.002, (at_played, at_model)
    # The whole utterance, resampler tails included, is on the tracker in playback samples.
    events = inputs.utterances.poll(10**9)
    assert [e["type"] for e in events] == ["playback_started", "playback_finished"]
    assert events[1]["position_s"] == pytest.approx(1.0, abs=0.01)


def test_interrupt_drops_both_copies_and_a_skip_moves_both():
    settings = LiveSettings(lead_in_frames=0)
    inputs = SpeechInputs(settings)
    inputs.queue_speech(np.full(16000, 0.5, np.float32), 16000, end=True)  # one second, frames 0-24
    inputs.skip(5, 10)  # catch-up jumped over frames 5-14: that speech is said after them
    assert np.all(inputs.avatar_audio(5, 15) == 0)
    assert np.allclose(inputs.avatar_audio(16, 34), 0.5, atol=1e-3)  # resampled to 48 kHz: not bit-exact
    assert np.all(inputs.avatar.read(15 * 640, 35 * 640) == 0.5)
    assert np.all(inputs.avatar_audio(36, 40) == 0) and np.all(inputs.avatar.read(35 * 640, 40 * 640) == 0)
    inputs.next_frame = 20  # a block claimed frames up to 20
    inputs.interrupt()
    assert np.all(inputs.avatar_audio(20, 40) == 0) and np.all(inputs.avatar.read(20 * 640, 40 * 640) == 0)
    assert np.allclose(inputs.avatar_audio(16, 20), 0.5, atol=1e-3)
    assert inputs.queued_speech_frames() == 0


# -- whole sessions ----------------------------------------------------------------------------------------


def spoken(seconds: float, rate: int = 24000) -> np.ndarray:
    """avatar.wav's speech (its last 4 s), repeated to `seconds`, at `rate`."""
    words = load_audio(MEDIA_DIR / "avatar.wav", rate)[-4 * rate:]
    return np.tile(words, int(np.ceil(seconds * rate / len(words))))[: int(seconds * rate)]


def loud_times(client: AvatarClient, since: float) -> list[float]:
    r = client.received
    return [t for t, a in zip(r.audio_times, r.audio, strict=True)
            if t >= since and len(a) and float(np.sqrt(np.mean(a ** 2))) > SPEECH_RMS]


async def wait_for(predicate, within_s: float, what: str):
    deadline = time.monotonic() + within_s
    while not (result := predicate()):  # noqa: ASYNC110 (polls what the peer received)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return result


class EventSocket:
    """The speech WebSocket with playback events, recording each message with its arrival time."""

    def __init__(self, ws):
        self.ws = ws
        self.messages: list[tuple[float, dict]] = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self):
        async for raw in self.ws:
            self.messages.append((time.monotonic(), json.loads(raw)))

    def of(self, kind: str) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in self.messages if m["type"] == kind]

    async def send_pcm(self, pcm: np.ndarray, rate: int, chunk_s: float = 0.1) -> None:
        step = int(chunk_s * rate)
        for i in range(0, len(pcm), step):
            await self.ws.send((np.clip(pcm[i:i + step], -1, 1) * 32767).astype("<i2").tobytes())


@pytest.mark.slow
@needs_rtc_host
@needs_golden
@needs_media
def test_playback_events_follow_what_the_peer_hears(tmp_path):
    rate = 24000
    first, second = spoken(1.6, rate), spoken(6.0, rate)
    # avatar.wav is 16 kHz speech: a quiet 10 kHz tone marks whether the band above 8 kHz reaches the peer.
    first = first + (0.05 * np.sin(2 * np.pi * 10000 * np.arange(len(first)) / rate)).astype(np.float32)

    async def run():
        with running_server(tmp_path, max_sessions=1) as server:
            async with AvatarClient(server.base_url) as c:
                await c.start(await c.upload_avatar((MEDIA_DIR / "rumi.jpg").read_bytes()))  # receive only
                await wait_for(lambda: c.received.video_times, 60, "the first frame")
                url = (c.base_url.replace("http", "ws", 1)
                       + f"/v1/sessions/{c.session_id}/speech?sample_rate={rate}&events=1")
                async with websockets.connect(url) as raw:
                    sock = EventSocket(raw)
                    await wait_for(lambda: sock.of("ready"), 10, "ready")
                    # One utterance, then its end.
                    t_push = time.monotonic()
                    await sock.send_pcm(first, rate)
                    await raw.send(json.dumps({"type": "flush"}))
                    (t_done, done), = await wait_for(lambda: sock.of("playback_finished"), 20, "playback_finished")
                    heard = loud_times(c, t_push)
                    started = sock.of("playback_started")
                    # A second, longer utterance, interrupted while it plays.
                    await sock.send_pcm(second, rate)
                    await raw.send(json.dumps({"type": "end_of_speech"}))
                    await wait_for(lambda: len(sock.of("playback_started")) == 2, 20, "the second start")
                    await asyncio.sleep(1.0)
                    t_interrupt = time.monotonic()
                    await raw.send(json.dumps({"type": "interrupt"}))
                    await wait_for(lambda: len(sock.of("playback_finished")) == 2, 5, "the interrupted finish")
                    await asyncio.sleep(1.5)
                    after = loud_times(c, t_interrupt + 0.15)
                    audio, audio_rate = c.received.audio_since(t_push), c.received.audio_rate
                    audio = audio[: int((t_done - t_push + 0.5) * audio_rate)]  # the first utterance
                    info = await c.info()
                    sock.reader.cancel()
                await c.stop()
        return sock, t_push, started, t_done, done, heard, t_interrupt, after, audio, audio_rate, info

    sock, t_push, started, t_done, done, heard, t_interrupt, after, audio, audio_rate, info = asyncio.run(run())
    timeline = [(round(t - t_push, 3), m["type"]) for t, m in sock.messages if m["type"] != "queued"]
    print(f"\nevent timeline (s after the first chunk was sent): {timeline}")
    assert started and started[0][1]["utterance_id"] == done["utterance_id"]
    assert done["interrupted"] is False and done["position_s"] == pytest.approx(1.6, abs=0.05)
    assert heard, "the peer heard nothing of the first utterance"
    # Reported when played out: not before the speech could have played, and not before the peer heard
    # most of it (the peer hears each 20 ms a network hop after the pacer sends it).
    assert t_done - t_push >= 1.6
    assert t_done >= heard[-1] - 0.25, f"finished {heard[-1] - t_done:.2f} s before the last sound was heard"
    kinds = [m["type"] for t, m in sock.messages if t > t_interrupt]
    assert kinds[:2] == ["interrupted", "playback_finished"], kinds
    interrupted = sock.of("playback_finished")[1][1]
    assert interrupted["interrupted"] is True and 0.5 < interrupted["position_s"] < 4.0, interrupted
    assert not after, f"speech heard {after[-1] - t_interrupt:.2f} s after the interrupt"
    assert audio_rate == 48000
    # The speech kept its band above 8 kHz (played at its own 24 kHz rate, not resampled through 16 kHz).
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / audio_rate)
    above = spectrum[(freqs > 9900) & (freqs < 10100)].sum() / spectrum[(freqs > 100) & (freqs < 12000)].sum()
    assert above > 1e-3, f"the 10 kHz part of the avatar's speech did not reach the peer ({above:.1e} of it)"
    assert [e["type"] for e in info["playback_events"]][-2:] == ["interrupted", "playback_finished"]
