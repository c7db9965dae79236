"""The Pipecat service in a real Pipecat pipeline against the real server (small model, real aiortc WebRTC):
TTS audio in, the avatar's pictures and voice out, playback events, and barge-in by a user-speech frame."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from agent_speech import dense_speech, pcm16
from golden_data import MEDIA_DIR
from server_harness import needs_golden, needs_media, needs_rtc_host, running_server

pytest.importorskip("pipecat", reason="needs the pipecat extra: pip install -e '.[pipecat]'")

from pipecat.frames.frames import (  # noqa: E402
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from avatar_forcing.integrations.pipecat import AvatarForcingVideoService  # noqa: E402

pytestmark = [pytest.mark.slow, needs_rtc_host, needs_golden, needs_media]


class Collector(FrameProcessor):
    """The pipeline's end: records the avatar's frames with their arrival times."""

    def __init__(self):
        super().__init__()
        self.images: list[tuple[float, bytes]] = []
        self.audio: list[tuple[float, np.ndarray]] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        now = time.monotonic()
        if isinstance(frame, OutputImageRawFrame):
            self.images.append((now, frame.image))
        elif isinstance(frame, OutputAudioRawFrame) and not isinstance(frame, TTSAudioRawFrame):
            self.audio.append((now, np.frombuffer(frame.audio, "<i2").astype(np.float32) / 32768))
        await self.push_frame(frame, direction)

    def loud_after(self, t0: float) -> list[float]:
        return [t for t, a in self.audio if t >= t0 and len(a) and float(np.sqrt(np.mean(a ** 2))) > 0.02]


def tts_frames(seconds: float, rate: int = 24000) -> list[TTSAudioRawFrame]:
    # Speech without pauses: a cut of avatar.wav by fixed offsets was nearly silent, and whether the sink
    # "heard" it depended on timing (the cause of this test's earlier intermittent failure).
    data = pcm16(dense_speech(seconds, rate))
    step = 2 * rate // 10
    return [TTSAudioRawFrame(data[i:i + step], rate, 1) for i in range(0, len(data), step)]


async def wait_for(predicate, within_s: float, what: str):
    deadline = time.monotonic() + within_s
    while not (result := predicate()):  # noqa: ASYNC110 (polls what the pipeline produced)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return result


def test_pipecat_service_speaks_in_sync_reports_playback_and_stops_on_barge_in(tmp_path):
    async def run():
        with running_server(tmp_path, max_sessions=1) as server:
            service = AvatarForcingVideoService(url=server.base_url, portrait=(MEDIA_DIR / "rumi.jpg").read_bytes())
            events: list[tuple[float, dict]] = []
            for name in ("on_playback_started", "on_playback_finished", "on_interrupted"):
                service.event_handler(name)(lambda _svc, event: events.append((time.monotonic(), event)))
            sink = Collector()
            task = PipelineWorker(Pipeline([service, sink]), enable_rtvi=False)
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(task)
            running = asyncio.ensure_future(runner.run())
            try:
                await wait_for(lambda: len(sink.images) > 25, 90, "the avatar's first second of video")
                # A reply: one TTS turn.
                t_reply = time.monotonic()
                await task.queue_frames([TTSStartedFrame(), *tts_frames(1.5), TTSStoppedFrame()])
                await wait_for(lambda: any(e["type"] == "playback_finished" for _, e in events), 20, "the finish")
                # What the sink received of the reply, read once even a late frame had time to arrive: the
                # check below (finished not reported before the reply was heard) needs every frame of it.
                await asyncio.sleep(1.0)
                heard = sink.loud_after(t_reply)
                fps_window = [t for t, _ in sink.images if t > time.monotonic() - 4]
                fresh = len({img for _, img in sink.images[-100:]})
                # A long reply, cut by the user starting to speak.
                await task.queue_frames([TTSStartedFrame(), *tts_frames(6.0), TTSStoppedFrame()])
                await wait_for(lambda: sum(e["type"] == "playback_started" for _, e in events) == 2, 20, "start")
                await asyncio.sleep(1.0)
                t_barge = time.monotonic()
                await task.queue_frame(UserStartedSpeakingFrame())
                await wait_for(lambda: any(e.get("interrupted") for _, e in events), 5, "the interrupted finish")
                await asyncio.sleep(1.5)
                after = sink.loud_after(t_barge + 0.15)
                peaks = [float(np.abs(a).max()) for _, a in sink.audio if len(a)]
                audio_info = (len(sink.audio), max(peaks, default=0.0))
            finally:
                await task.cancel()
                await asyncio.wait_for(running, 30)
        return t_reply, heard, fps_window, fresh, events, t_barge, after, audio_info

    t_reply, heard, fps_window, fresh, events, t_barge, after, audio_info = asyncio.run(run())
    timeline = [(round(t - t_reply, 3), e["type"], e.get("position_s")) for t, e in events]
    print(f"\npipecat turn timeline (s after the TTS audio was queued): {timeline}")
    assert heard, f"no avatar speech came out of the pipeline ({audio_info})"
    print(f"first sound {heard[0] - t_reply:.3f} s after the TTS audio was queued; barge-in to `interrupted` "
          f"{next(t for t, e in events if e['type'] == 'interrupted') - t_barge:.3f} s")
    assert len(fps_window) / 4 >= 23, f"video at {len(fps_window) / 4:.1f} fps"
    assert fresh > 50, f"only {fresh} distinct pictures in the last 100 frames"
    finished = next(e for _, e in events if e["type"] == "playback_finished")
    t_finished = next(t for t, e in events if e["type"] == "playback_finished")
    assert finished["interrupted"] is False and finished["position_s"] == pytest.approx(1.5, abs=0.05)
    assert t_finished >= heard[-1] - 0.25, "finished reported before the reply was heard"
    kinds = [e["type"] for t, e in events if t >= t_barge]
    assert kinds[:2] == ["interrupted", "playback_finished"], kinds
    assert not after, f"avatar speech {after[-1] - t_barge:.2f} s after the user started speaking"
