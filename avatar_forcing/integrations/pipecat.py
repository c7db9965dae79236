"""The avatar as a Pipecat service: put it between the TTS and the transport output.

    pipeline = Pipeline([transport.input(), stt, llm, tts,
                         AvatarForcingVideoService(url="http://gpu-host:8080", portrait=image_bytes),
                         transport.output()])

It sends the TTS audio to the avatar server (one utterance per TTS turn), clears it when the user starts
speaking or the pipeline is interrupted, and forwards the user's microphone audio and camera frames so the
avatar listens; downstream it emits the avatar's pictures (OutputImageRawFrame, 25 fps) and voice
(OutputAudioRawFrame, 48 kHz), which the server paced out of one clock. The TTS audio itself goes no
further: what the user hears is the avatar's voice. Give the output transport `audio_out_auto_silence=False`:
that voice is continuous and real-time paced, and auto-silence would put it further behind the pictures at
every late write. Needs `pip install avatar-forcing-server[pipecat]`.
"""

from __future__ import annotations

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputImageRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService

from .remote import RemoteAvatar


class AvatarForcingVideoService(AIService):
    """Event handlers: `on_playback_started`, `on_playback_finished`, `on_interrupted` (service, event),
    with the server's playback events (docs/api.md)."""

    def __init__(self, *, url: str, portrait: bytes | None = None, avatar_id: str | None = None,
                 token: str | None = None, seed: int | None = None, listen: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.avatar = RemoteAvatar(url, portrait=portrait, avatar_id=avatar_id, token=token, seed=seed)
        self.listen = listen  # forward the user's microphone and camera to the avatar
        self._speaking = False  # a TTS turn is open on the server (flushed at TTSStoppedFrame)
        for name in ("on_playback_started", "on_playback_finished", "on_interrupted"):
            self._register_event_handler(name)

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        self.avatar.on_video = self._avatar_video
        self.avatar.on_audio = self._avatar_audio
        self.avatar.on_event = self._avatar_event
        await self.avatar.start()

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self.avatar.close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self.avatar.close()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self._speaking = True
            await self.avatar.say(_mono(frame.audio, frame.num_channels), frame.sample_rate)
            return  # the user hears the avatar's voice, not the TTS's
        if isinstance(frame, TTSStoppedFrame) and self._speaking:
            self._speaking = False
            await self.avatar.flush()
        elif isinstance(frame, (InterruptionFrame, UserStartedSpeakingFrame)):
            self._speaking = False
            await self.avatar.interrupt()
        elif self.listen and isinstance(frame, InputAudioRawFrame):
            self.avatar.microphone.put_audio(frame.audio, frame.sample_rate, frame.num_channels)
        elif self.listen and isinstance(frame, InputImageRawFrame) and frame.format in (None, "RGB"):
            self.avatar.camera.put_image(frame.image, frame.size)
        elif isinstance(frame, TTSStartedFrame):
            self._speaking = True
        await self.push_frame(frame, direction)

    async def _avatar_video(self, frame) -> None:
        image = frame.to_ndarray(format="rgb24")
        await self.push_frame(OutputImageRawFrame(image=image.tobytes(), size=(frame.width, frame.height),
                                                  format="RGB"))

    async def _avatar_audio(self, frame) -> None:
        pcm = frame.to_ndarray()  # s16, interleaved when stereo (Opus decodes to stereo)
        channels = len(frame.layout.channels)
        await self.push_frame(OutputAudioRawFrame(audio=_mono(pcm.tobytes(), channels),
                                                  sample_rate=frame.sample_rate, num_channels=1))

    async def _avatar_event(self, event: dict) -> None:
        name = {"playback_started": "on_playback_started", "playback_finished": "on_playback_finished",
                "interrupted": "on_interrupted"}.get(event.get("type", ""))
        if name is not None:
            await self._call_event_handler(name, event)


def _mono(pcm: bytes, channels: int) -> bytes:
    if channels == 1:
        return pcm
    import numpy as np

    samples = np.frombuffer(pcm, dtype="<i2").reshape(-1, channels)
    return samples.mean(axis=1).astype("<i2").tobytes()
