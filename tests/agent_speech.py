"""Speech for the voice-agent tests: avatar.wav with its pauses cut out.

avatar.wav has long pauses (its last 4 s are 40 % near-silence, the loud part at the end): a "reply" cut from
it by fixed offsets can be almost silent, and whether the peer hears any of it then depends on timing.
Keeping only its voiced 100 ms windows gives speech that is loud throughout.
"""

from __future__ import annotations

import numpy as np
from golden_data import MEDIA_DIR

from avatar_forcing.model.media.audio import load_audio

VOICED_RMS = 0.03  # a 100 ms window louder than this is speech (the test's "heard" threshold is 0.02)


def dense_speech(seconds: float, rate: int = 24000) -> np.ndarray:
    """`seconds` of avatar.wav's voiced windows, in order, repeated as needed; float32 mono at `rate`."""
    audio = load_audio(MEDIA_DIR / "avatar.wav", rate)
    step = rate // 10
    windows = [audio[i:i + step] for i in range(0, len(audio) - step + 1, step)]
    voiced = np.concatenate([w for w in windows if float(np.sqrt(np.mean(w ** 2))) > VOICED_RMS])
    repeats = int(np.ceil(seconds * rate / len(voiced)))
    return np.tile(voiced, repeats)[: int(seconds * rate)].astype(np.float32)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
