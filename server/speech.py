"""The avatar's speech as the API receives it: WAV bodies, PCM16 streams, and a built-in test phrase."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from avatar_forcing.errors import MediaError
from avatar_forcing.model.engine.inputs import LiveInputs, LiveSettings
from avatar_forcing.model.engine.timeline import AudioTrack
from avatar_forcing.model.media.audio import StreamingResampler, pcm16_to_float, read_wav_bytes

from .playback import PlaybackTracker

log = logging.getLogger("avatar_forcing.server.speech")

TEST_PHRASE = "Hello! I am your avatar. I can listen to you, and I can talk to you in real time."
MIN_RATE, MAX_RATE = 8000, 48000
MAX_WAV_CHUNKS = 64
# The avatar's speech plays out at Opus's own rate: the WebRTC encoder takes 48 kHz, so speech arriving at
# any rate up to 48 kHz keeps its whole band (the model's 16 kHz copy is for the model only).
PLAYBACK_RATE = 48000


def parse_sample_rate(raw: str | None) -> int:
    """The declared rate of a PCM stream; ValueError with the reason when missing or out of range."""
    if raw is None:
        raise ValueError("declare the PCM sample rate when connecting, e.g. ?sample_rate=24000")
    try:
        rate = int(raw)
    except ValueError:
        raise ValueError(f"sample_rate {raw!r} is not a whole number of Hz") from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"sample_rate {rate} is outside {MIN_RATE}-{MAX_RATE} Hz")
    return rate


def wav_body(data: bytes) -> tuple[np.ndarray, int]:
    """A WAV upload -> (mono float32, rate); MediaError for a bad header or no samples."""
    check_chunk_count(data)
    return read_wav_bytes(data)


def check_chunk_count(data: bytes, limit: int = MAX_WAV_CHUNKS) -> None:
    """Refuse a RIFF file of more than `limit` chunks before parsing it: walking a million tiny chunks
    holds the GIL for seconds (live sessions drop frames), and real WAV files have a handful."""
    pos, count = 12, 0
    while pos + 8 <= len(data):
        count += 1
        if count > limit:
            raise MediaError(f"the WAV file has more than {limit} chunks (real ones have a few): re-export it")
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        pos += 8 + size + (size & 1)


def test_phrase(text: str = TEST_PHRASE) -> tuple[np.ndarray, int]:
    """Spoken by espeak-ng when installed; otherwise a synthetic vowel sequence (still speech-like)."""
    exe = shutil.which("espeak-ng")
    if exe is not None:
        try:
            # A file, not --stdout: a piped WAV header cannot know its length and says "2 GB".
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "phrase.wav"
                subprocess.run([exe, "-w", str(path), "-s", "150", text], capture_output=True, timeout=20, check=True)
                return read_wav_bytes(path.read_bytes())
        except (subprocess.SubprocessError, MediaError, OSError) as exc:
            log.warning("espeak-ng failed (%s); using the synthetic test phrase", exc)
    return synthetic_phrase(), 16000


def synthetic_phrase(seconds: float = 3.0, rate: int = 16000) -> np.ndarray:
    """Glottal pulses through two formants per vowel, 4 syllables a second: a stand-in for speech."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
    source = np.sign(np.sin(2 * np.pi * np.cumsum(pitch) / rate))
    formants = [(730, 1090), (270, 2290), (300, 870), (530, 1840)]  # a, i, u, e
    syllable = (t * 4).astype(int) % len(formants)
    f1 = np.array([formants[s][0] for s in syllable])
    f2 = np.array([formants[s][1] for s in syllable])
    voiced = source * (np.sin(2 * np.pi * f1 * t) + 0.5 * np.sin(2 * np.pi * f2 * t))
    envelope = np.clip(np.sin(np.pi * (t * 4 % 1)), 0, None) ** 0.5
    return (0.2 * voiced * envelope).astype(np.float32)


class SpeechInputs(LiveInputs):
    """A live session's inputs that keep two copies of the avatar's speech at the same place in time: the
    model's 16 kHz copy (LiveInputs) and a playback copy at `playback_rate` that blocks carry to the pacer
    (`avatar_audio`), so the user hears the speech as it arrived, not band-limited to 8 kHz. Both copies are
    placed by the same rule and move together (interrupt, catch-up skips); `utterances` records which
    utterance each piece belongs to, in playback samples."""

    def __init__(self, settings: LiveSettings, playback_rate: int = PLAYBACK_RATE):
        super().__init__(settings)  # its speech lock is reentrant: skip() below holds it around LiveInputs.skip
        if playback_rate % settings.fps:
            raise ValueError(f"the playback rate {playback_rate} must hold a whole number of samples per frame")
        self.playback_rate = playback_rate
        self.playback_spf = playback_rate // settings.fps
        self.playback = AudioTrack()
        self.utterances = PlaybackTracker(playback_rate)
        self._arrival_rate: int | None = None
        self._to_playback: StreamingResampler | None = None

    def push_speech(self, pcm: np.ndarray, sample_rate: int | None = None) -> int:
        """Queue speech at `sample_rate` (None: the model's rate) in the open utterance; returns its first frame."""
        return self.queue_speech(pcm, sample_rate or self.s.sample_rate, end=False)[0]

    def queue_speech(self, pcm: np.ndarray, rate: int, end: bool) -> tuple[int, int]:
        """Queue speech, ending its utterance when `end`; returns (first frame, utterance id)."""
        if self._arrival_rate is not None and rate != self._arrival_rate:
            self._drain_resamplers()  # the previous stream's filter tail, before speech at another rate
        self._arrival_rate = rate
        if self._to_playback is None or self._to_playback.in_rate != rate:
            self._to_playback = StreamingResampler(rate, self.playback_rate)
        model = self._resampled(pcm, rate, "speech")
        played = self._to_playback.push(pcm16_to_float(pcm) if pcm.dtype == np.int16 else pcm)
        frame, at = self._place(model, played)
        utterance = self.utterances.add(at, at + len(played))
        if end:
            utterance = self.end_utterance()
        return frame, utterance

    def end_utterance(self) -> int:
        """The open utterance is complete: queue what the resamplers still hold of it, and mark its end."""
        self._drain_resamplers()
        return self.utterances.end()

    def _drain_resamplers(self) -> None:
        model = self._speech_resampler.flush() if self._speech_resampler is not None else np.zeros(0, np.float32)
        played = self._to_playback.flush() if self._to_playback is not None else np.zeros(0, np.float32)
        if len(model) or len(played):
            _, at = self._place(model, played)
            self.utterances.add(at, at + len(played))

    def _place(self, model: np.ndarray, played: np.ndarray) -> tuple[int, int]:
        """Write both copies after what is queued (never into frames already claimed by a block, nor into
        the silent lead-in); returns (first frame, playback sample position)."""
        with self._speech_lock:
            start = max(self.avatar.end, self.next_frame * self.spf, self.origin * self.spf)
            at = max(self.playback.end, self.next_frame * self.playback_spf, self.origin * self.playback_spf)
            self.avatar.write(start, model)
            self.playback.write(at, played)
        return start // self.spf, at

    def interrupt(self) -> None:
        with self._speech_lock:
            self.avatar.truncate(self.next_frame * self.spf)
            self.playback.truncate(self.next_frame * self.playback_spf)
            self.utterances.truncate(self.next_frame * self.playback_spf)
        # Their filters hold the tail of the dropped speech: the next utterance starts clean.
        self._speech_resampler = self._to_playback = None
        self._arrival_rate = None

    def skip(self, first: int, count: int) -> None:
        with self._speech_lock:
            super().skip(first, count)
            at, by = first * self.playback_spf, count * self.playback_spf
            self.playback.shift(at, by)
            self.utterances.shift(at, by)

    def avatar_audio(self, start: int, stop: int) -> np.ndarray:
        return self.playback.read(start * self.playback_spf, stop * self.playback_spf)

    def consumed(self, frame: int) -> None:
        super().consumed(frame)
        # Blocks copy their audio out: the playback copy of generated frames is never read again.
        self.playback.mark_consumed(frame * self.playback_spf, 0)
