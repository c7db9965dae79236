"""A voice agent that runs on one machine with nothing from the cloud: the parts of examples/voice_agent.py.

    browser ─SmallWebRTC─▶ transport.input() ─▶ VAD (Silero) ─▶ CannedReplies ─▶ EspeakTTS ─▶ avatar ─▶ output()

- `EspeakTTSService`: Pipecat TTS around the `espeak-ng` program (Debian package `espeak-ng`): robotic, but
  local and instant.
- `CannedReplies`: the "brain". There is no offline speech recognition here, so it does not know what the
  user said: it answers every user turn that the VAD detected (speech, then `stop_secs` of quiet) with the
  next of a few fixed replies, and interrupts the avatar when the user speaks while a reply is pending or
  playing. A real agent puts speech recognition and an LLM in its place (docs/integrations.md).
- `agent_pipeline`: the pipeline for one browser connection; `create_app`: the page and its offer endpoint.

Silero's VAD model ships inside the pipecat-ai wheel and runs on onnxruntime (the `silero` extra): no download.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import AsyncGenerator, Callable

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.transports.base_transport import TransportParams, VideoInSourceParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

from .pipecat import AvatarForcingVideoService

log = logging.getLogger("avatar_forcing.integrations")

Brain = Callable[[AvatarForcingVideoService], list[FrameProcessor]]
ESPEAK_RATE = 22050  # espeak-ng's output rate (its voices are all 22.05 kHz)
AVATAR_AUDIO_RATE = 48000  # the avatar's voice comes out of the server's WebRTC track at 48 kHz

REPLIES = (
    "Hello! I heard you. I am a local demo, so I cannot understand words yet, but I am listening.",
    "Thanks. Keep talking, and watch my face while you do.",
    "Interrupt me whenever you like: I stop talking as soon as you start.",
    "That is all I can say without a language model. Connect one, and I will have real answers.",
)


class EspeakTTSService(TTSService):
    """Text to speech with the local `espeak-ng` program: one process per sentence, PCM16 mono at 22.05 kHz."""

    def __init__(self, *, voice: str = "en-us", words_per_minute: int = 165, chunk_s: float = 0.2, **kwargs):
        # The base class opens the audio context and ends it with TTSStoppedFrame once the turn's text is
        # done (what our avatar service takes as the end of an utterance).
        super().__init__(push_start_frame=True, push_stop_frames=True, sample_rate=ESPEAK_RATE,
                         settings=TTSSettings(model="espeak-ng", voice=voice, language=None), **kwargs)
        self.voice, self.words_per_minute, self.chunk_s = voice, words_per_minute, chunk_s

    def can_generate_metrics(self) -> bool:
        return True

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        await self.start_ttfb_metrics()
        try:
            pcm = await espeak(text, self.voice, self.words_per_minute)
        except (OSError, RuntimeError) as exc:
            yield ErrorFrame(error=f"espeak-ng failed: {exc}")
            return
        finally:
            await self.stop_ttfb_metrics()
        # Chunks rather than one frame: downstream (and the avatar server) start on the first one.
        step = 2 * int(self.chunk_s * ESPEAK_RATE)
        for i in range(0, len(pcm), step):
            yield TTSAudioRawFrame(pcm[i:i + step], ESPEAK_RATE, 1, context_id=context_id)


async def espeak(text: str, voice: str = "en-us", words_per_minute: int = 165) -> bytes:
    """`text` spoken by espeak-ng: PCM16 mono at ESPEAK_RATE (its WAV header is stripped)."""
    proc = await asyncio.create_subprocess_exec(
        "espeak-ng", "--stdout", "-v", voice, "-s", str(words_per_minute), "--", text,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    wav, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err.decode(errors="replace").strip() or f"exit status {proc.returncode}")
    return wav_pcm16(wav)


def wav_pcm16(wav: bytes) -> bytes:
    """The samples of a PCM16 mono WAV at ESPEAK_RATE. Written to a pipe, espeak-ng cannot seek back to
    fill in the sizes (they read 0x7ffff000), so the data chunk is taken as everything after its header."""
    if wav[:4] != b"RIFF" or wav[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not write a WAV file")
    pos = 12
    while pos + 8 <= len(wav):
        kind, size = wav[pos:pos + 4], struct.unpack("<I", wav[pos + 4:pos + 8])[0]
        if kind == b"fmt ":
            fmt, channels, rate, _, _, bits = struct.unpack("<HHIIHH", wav[pos + 8:pos + 24])
            if (fmt, channels, rate, bits) != (1, 1, ESPEAK_RATE, 16):
                raise RuntimeError(f"espeak-ng wrote {channels} channel(s) of {bits}-bit audio at {rate} Hz")
        elif kind == b"data":
            data = wav[pos + 8:]
            return data[: len(data) - len(data) % 2]
        pos += 8 + size
    raise RuntimeError("espeak-ng's WAV has no data")


class CannedReplies(FrameProcessor):
    """The stand-in for speech recognition + LLM: after each user turn (VAD: speech, then quiet) it says the
    next of `replies`; when the user starts speaking while a reply is pending or playing, it interrupts
    (InterruptionFrame: the TTS drops its queue and the avatar service tells the server to go silent)."""

    def __init__(self, avatar: AvatarForcingVideoService, replies: tuple[str, ...] = REPLIES, **kwargs):
        super().__init__(**kwargs)
        self._replies = itertools.cycle(replies)
        self._replying = False  # a reply was sent to the TTS and the avatar has not finished it
        avatar.event_handler("on_playback_finished")(self._finished)

    async def _finished(self, _service, _event) -> None:
        self._replying = False

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame) and self._replying:
            self._replying = False
            await self.broadcast_interruption()
        await self.push_frame(frame, direction)
        if isinstance(frame, VADUserStoppedSpeakingFrame):
            self._replying = True
            await self.push_frame(TTSSpeakFrame(next(self._replies)))


def agent_pipeline(connection: SmallWebRTCConnection, *, server_url: str, avatar_id: str,
                   video_size: tuple[int, int] = (512, 512), brain: Brain | None = None,
                   vad_stop_s: float = 0.5,
                   token: str | None = None) -> tuple[PipelineWorker, AvatarForcingVideoService]:
    """The agent for one browser connection. `brain(avatar)` returns what turns the user's turns into text
    for the TTS (default: CannedReplies); a real agent returns speech recognition, the LLM and its context
    aggregators instead (docs/integrations.md)."""
    transport = SmallWebRTCTransport(connection, TransportParams(
        audio_in_enabled=True, audio_out_enabled=True, audio_out_sample_rate=AVATAR_AUDIO_RATE,
        # The avatar's voice arrives paced in real time, silence included; the default auto-silence would
        # fill every late write with 10 ms of silence, so the voice would fall behind its pictures for good.
        audio_out_auto_silence=False,
        video_in_enabled=True, video_in_sources={"camera": VideoInSourceParams(framerate=25)},
        video_out_enabled=True, video_out_is_live=True, video_out_framerate=25,
        video_out_width=video_size[0], video_out_height=video_size[1]))
    avatar = AvatarForcingVideoService(url=server_url, avatar_id=avatar_id, token=token)
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=vad_stop_s)))
    thinking = brain(avatar) if brain is not None else [CannedReplies(avatar)]
    pipeline = Pipeline([transport.input(), vad, *thinking, EspeakTTSService(), avatar, transport.output()])
    task = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=16000,
                                                        audio_out_sample_rate=AVATAR_AUDIO_RATE),
                        enable_rtvi=False)

    @transport.event_handler("on_client_disconnected")
    async def _left(_transport, _client):
        await task.cancel()

    return task, avatar


# The page: camera and microphone up, the avatar down, one POST for the offer (ICE gathered first, so no
# trickle). Transceivers in the order the SmallWebRTC transport expects: audio first, then video.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Talk to the avatar</title>
<style>body{font-family:sans-serif;max-width:560px;margin:2em auto}video{width:100%;background:#222}</style>
</head><body>
<h1>Talk to the avatar</h1>
<video id="avatar" autoplay playsinline></video>
<p><button id="start">Start</button> <button id="stop" disabled>Stop</button> <span id="status"></span></p>
<p>Allow the camera and microphone, then speak; pause, and the avatar answers. Speak while it talks to
interrupt it. Use headphones if your browser's echo cancellation lets the avatar hear itself.</p>
<script>
const status = (text) => { document.getElementById("status").textContent = text; };
let pc = null;
async function start() {
  document.getElementById("start").disabled = true;
  status("asking for the camera and microphone...");
  const media = await navigator.mediaDevices.getUserMedia({
    audio: {echoCancellation: true, noiseSuppression: true}, video: {width: 640, height: 480}});
  pc = new RTCPeerConnection();
  pc.addTransceiver(media.getAudioTracks()[0], {direction: "sendrecv"});
  pc.addTransceiver(media.getVideoTracks()[0], {direction: "sendrecv"});
  const stream = new MediaStream();
  pc.ontrack = (event) => { stream.addTrack(event.track); document.getElementById("avatar").srcObject = stream; };
  pc.onconnectionstatechange = () => status(pc.connectionState);
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
  });
  status("connecting...");
  const reply = await fetch("api/offer", {method: "POST", headers: {"content-type": "application/json"},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
  if (!reply.ok) { status("the agent refused: " + await reply.text()); return; }
  await pc.setRemoteDescription(await reply.json());
  document.getElementById("stop").disabled = false;
}
function stop() {
  pc && pc.getSenders().forEach((s) => s.track && s.track.stop());
  pc && pc.close(); pc = null; status("stopped");
  document.getElementById("start").disabled = false; document.getElementById("stop").disabled = true;
}
document.getElementById("start").onclick = () => start().catch((e) => status("failed: " + e));
document.getElementById("stop").onclick = stop;
</script></body></html>
"""


def create_app(*, server_url: str, avatar_id: str, video_size: tuple[int, int] = (512, 512),
               token: str | None = None, brain: Brain | None = None,
               on_agent: Callable[[PipelineWorker, AvatarForcingVideoService], None] | None = None):
    """The example's web app: GET / is the page; POST /api/offer takes the page's WebRTC offer, starts an
    agent (agent_pipeline) for that connection and answers. `on_agent(task, avatar)` is called for each
    agent started (the tests watch it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse
    from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest, SmallWebRTCRequestHandler
    from pipecat.workers.runner import WorkerRunner

    handler = SmallWebRTCRequestHandler()
    running: dict[PipelineWorker, asyncio.Task] = {}

    async def run_alone(task: PipelineWorker) -> None:
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(task)
        await runner.run()  # ends when the agent's pipeline does

    async def start_agent(connection: SmallWebRTCConnection) -> None:
        task, avatar = agent_pipeline(connection, server_url=server_url, avatar_id=avatar_id,
                                      video_size=video_size, token=token, brain=brain)
        if on_agent is not None:
            on_agent(task, avatar)
        runner = asyncio.create_task(run_alone(task))
        running[task] = runner
        runner.add_done_callback(lambda _: running.pop(task, None))

    @asynccontextmanager
    async def lifespan(_app):
        yield
        for task in list(running):
            await task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        await handler.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.post("/api/offer")
    async def offer(body: dict) -> dict:
        return await handler.handle_web_request(SmallWebRTCRequest.from_dict(body), start_agent) or {}

    return app
