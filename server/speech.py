"""The avatar's speech as the API receives it: WAV bodies, PCM16 streams, and a built-in test phrase."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from avatar_forcing.errors import MediaError
from avatar_forcing.model.media.audio import read_wav_bytes

log = logging.getLogger("avatar_forcing.server.speech")

TEST_PHRASE = "Hello! I am your avatar. I can listen to you, and I can talk to you in real time."
MIN_RATE, MAX_RATE = 8000, 48000


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
    return read_wav_bytes(data)


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
