"""Dyadic conversations made here, from material we may ship: two rigged portraits (rig.py), espeak-ng voices and
our own sentences, and the behaviour of a speaker and a listener written as rules. Training data for the
built-in model; never made from the sample media or the official weights.

A script alternates turns (each a few sentences spoken in that side's voice), with pauses between them and
short overlaps of silence. Per frame (25 fps) each side's face follows:
- speaking: the jaw follows the speech envelope and the lips round on dark (low-centroid) voiced sounds, the
  mouth shapes come from the audio itself; the head moves a little with the emphasis;
- listening: nods while the other speaks and a larger one at the short pauses inside their turn (a
  back-channel), a smile that mirrors the other's about half a second later, a slight attentive tilt;
- always: blinks every 2-6 s, a slow sway of the head, and smiles now and then.
Everything random comes from one seed: the same seed makes the same conversation.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..media.audio import read_wav_bytes, resample
from .rig import Expression, FaceRig

SAMPLE_RATE = 16000
FPS = 25
HOP = SAMPLE_RATE // FPS

SENTENCES = (
    "Good morning, it is nice to see you again.",
    "I was reading about how bees find their way home.",
    "They remember the shape of the hills and the position of the sun.",
    "Would you like to hear what I found most surprising?",
    "The weather has been strange this week, warm and then cold.",
    "I think a short walk after lunch helps me think.",
    "My favourite part of the day is the quiet hour before dinner.",
    "Tell me more about the project you mentioned.",
    "That sounds like a lot of work, but a good kind of work.",
    "Some people learn best by drawing what they hear.",
    "We could try a different approach tomorrow.",
    "I agree, that would make the whole thing simpler.",
    "Oh, really? I did not know that at all.",
    "The library downtown has a wonderful old map room.",
    "Music in the background helps some people focus.",
    "Let us take it one step at a time.",
)
VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb+f2", "en-gb-x-rp", "en-us+m3", "en-gb-scotland+f4")


@functools.lru_cache(maxsize=512)
def speak(text: str, voice: str, words_per_minute: int = 150) -> np.ndarray:
    """espeak-ng's speech of `text` at 16 kHz (float32 mono)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("making conversations needs espeak-ng (the Debian package; `make serve` installs it)")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "-w", str(path), text], capture_output=True,
                       timeout=30, check=True)
        pcm, rate = read_wav_bytes(path.read_bytes())
    return resample(pcm, rate, SAMPLE_RATE).astype(np.float32)


# -- per-frame signals -----------------------------------------------------------------------------------------


def envelope(pcm: np.ndarray, frames: int) -> np.ndarray:
    """RMS per frame (40 ms)."""
    pcm = np.pad(pcm, (0, max(0, frames * HOP - len(pcm))))[: frames * HOP]
    return np.sqrt((pcm.reshape(frames, HOP).astype(np.float64) ** 2).mean(1))


def centroid(pcm: np.ndarray, frames: int) -> np.ndarray:
    """Spectral centroid per frame (Hz)."""
    pcm = np.pad(pcm, (0, max(0, frames * HOP - len(pcm))))[: frames * HOP].reshape(frames, HOP)
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(HOP), axis=1))
    freqs = np.fft.rfftfreq(HOP, 1 / SAMPLE_RATE)
    return (spectrum * freqs).sum(1) / np.maximum(spectrum.sum(1), 1e-9)


NOD_DEGREES = 6.0  # peak to peak of a steady nod; nods dip and rise about the pose, so they add no offset
NOD_REACTION = 4  # frames: how far a listener's nods trail the speaker's stresses


def smooth(x: np.ndarray, width: int) -> np.ndarray:
    kernel = np.hanning(width + 2)[1:-1]
    return np.convolve(x, kernel / kernel.sum(), mode="same")


def bump(frames: int, start: float, length: float) -> np.ndarray:
    """A raised-cosine pulse [frames] from frame `start`, `length` frames long, peak 1."""
    t = (np.arange(frames) - start) / max(length, 1e-6)
    return np.where((t >= 0) & (t <= 1), 0.5 - 0.5 * np.cos(2 * np.pi * t), 0.0)


def delayed(x: np.ndarray, frames: int) -> np.ndarray:
    """x shifted `frames` later, zeros in front, the same length: a reaction that follows its cause."""
    if frames <= 0:
        return x.copy()
    return np.concatenate([np.zeros(frames, x.dtype), x[:-frames]])


@dataclass
class Side:
    """One participant's tracks: speech [samples] and per-frame expression columns."""

    pcm: np.ndarray
    speaking: np.ndarray  # [T] bool: this side's turn has speech now
    expression: np.ndarray  # [T, len(Expression fields)]


EXPRESSION_FIELDS = [f.name for f in fields(Expression)]


def _column(name: str) -> int:
    return EXPRESSION_FIELDS.index(name)


@dataclass
class Conversation:
    avatar: Side
    user: Side

    @property
    def frames(self) -> int:
        return len(self.avatar.speaking)

    def expressions(self, side: str) -> list[Expression]:
        track = getattr(self, side).expression
        return [Expression(**dict(zip(EXPRESSION_FIELDS, map(float, row), strict=True))) for row in track]


def script(seconds: float, voices: tuple[str, str], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' speech for `seconds`: turns of 1-2 sentences, alternating, with 0.4-1.5 s pauses."""
    total = int(seconds * SAMPLE_RATE)
    tracks = [np.zeros(total, np.float32), np.zeros(total, np.float32)]
    at, who = int(rng.uniform(0.3, 1.0) * SAMPLE_RATE), int(rng.integers(2))
    while at < total:
        turn = [speak(SENTENCES[i], voices[who]) for i in rng.choice(len(SENTENCES), int(rng.integers(1, 3)))]
        for speech in turn:
            if at >= total:
                break
            stop = min(total, at + len(speech))
            tracks[who][at:stop] = speech[: stop - at]
            at = stop + int(rng.uniform(0.15, 0.4) * SAMPLE_RATE)
        at += int(rng.uniform(0.4, 1.5) * SAMPLE_RATE)
        who = 1 - who
    return tracks[0], tracks[1]


def voice_activity(env: np.ndarray) -> tuple[float, np.ndarray]:
    """(a speaker's loud level: the 95th percentile of its non-silent envelope, [T] bool: speaking, with the
    gaps between words bridged)."""
    sounding = env > 1e-4
    level = max(float(np.quantile(env[sounding], 0.95)) if sounding.any() else 1.0, 1e-6)
    return level, smooth((env > 0.05 * level).astype(float), 9) > 0.2


def behave(own: np.ndarray, other: np.ndarray, other_smile: np.ndarray | None, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """(expression [T, fields], voice activity [T]) of one side, from its own speech and the other's."""
    frames = len(envelope(own, len(own) // HOP))
    env_own, env_other = envelope(own, frames), envelope(other, frames)
    level, talking = voice_activity(env_own)
    other_level, listening = voice_activity(env_other)
    e = np.zeros((frames, len(EXPRESSION_FIELDS)))
    t = np.arange(frames) / FPS

    # Speaking: mouth from the audio.
    jaw = np.clip((smooth(env_own, 3) / level) ** 0.6, 0, 1) * 0.7
    voiced = env_own > 0.1 * level
    dark = np.clip((1400 - centroid(own, frames)) / 800, 0, 1) * voiced
    e[:, _column("jaw")] = jaw
    e[:, _column("rounding")] = 0.5 * smooth(dark, 3) * (jaw > 0.1)
    emphasis = smooth(np.abs(np.diff(smooth(env_own, 5) / level, prepend=0)), 7)
    talking_soft = smooth(talking.astype(float), 7)
    e[:, _column("pitch")] += 12 * emphasis * talking_soft
    e[:, _column("yaw")] += 3 * np.sin(2 * np.pi * t / rng.uniform(2.5, 4.0) + rng.uniform(0, 6)) * talking_soft

    # Listening: nods that keep time with the other's speech (the band of its loudness around 0.5-2.5 Hz, a
    # reaction time behind: a listener's head follows the speaker's stresses, and a model can learn what it
    # hears, where a nod of its own rhythm and phase could only be averaged away), a larger back-channel nod
    # at the short pauses inside their turn (between their sentences), and a slight attentive tilt.
    heard = env_other > 0.05 * other_level
    attending = listening & ~talking
    attending_soft = smooth(attending.astype(float), 7)
    loudness = env_other / other_level
    rhythm = smooth(loudness, 5) - smooth(loudness, 25)
    rhythm = delayed(rhythm, NOD_REACTION)
    spread = float(np.sqrt(np.mean(rhythm[attending] ** 2))) if attending.any() else 1.0
    nods = NOD_DEGREES / (2 * np.sqrt(2)) * rhythm / max(spread, 1e-6) * attending_soft
    for start in np.flatnonzero(heard[:-1] & ~heard[1:] & attending[1:]):  # they paused, their turn goes on
        if rng.random() < 0.8:
            nod = bump(frames, float(start + rng.integers(1, 4)), rng.uniform(8, 12))
            nods += 1.5 * NOD_DEGREES * nod * attending_soft
    e[:, _column("pitch")] += nods
    e[:, _column("roll")] += 3.0 * smooth(attending.astype(float), 25) * rng.choice([-1.0, 1.0])

    # Smiles: its own now and then, and the other's mirrored about half a second later.
    smile = np.zeros(frames)
    for start in np.flatnonzero(rng.random(frames) < 1 / (FPS * 6)):
        smile += rng.uniform(0.4, 0.9) * bump(frames, float(start), rng.uniform(40, 80))
    if other_smile is not None:
        lag = int(0.5 * FPS)
        smile += 0.8 * delayed(other_smile, lag)[:frames]
    e[:, _column("smile")] = np.clip(smile, 0, 1)

    # Always: blinks and a slow sway.
    at = rng.uniform(0.5, 3.0)
    while at < t[-1]:
        e[:, _column("blink")] += bump(frames, at * FPS, 4)
        at += rng.uniform(2.0, 6.0)
    for name, amplitude in (("yaw", 2.0), ("pitch", 1.0), ("roll", 1.0)):
        e[:, _column(name)] += amplitude * np.sin(2 * np.pi * t / rng.uniform(5, 9) + rng.uniform(0, 6))
    e[:, _column("blink")] = np.clip(e[:, _column("blink")], 0, 1)
    return e, talking


def make_conversation(seconds: float, seed: int, voices: tuple[str, str] | None = None) -> Conversation:
    """The speech and per-frame expressions of both sides (rendering is separate: `render`)."""
    rng = np.random.default_rng(seed)
    if voices is None:
        picked = rng.choice(len(VOICES), 2, replace=False)
        voices = (VOICES[picked[0]], VOICES[picked[1]])
    avatar_pcm, user_pcm = script(seconds, voices, rng)
    user_expr, user_talking = behave(user_pcm, avatar_pcm, None, rng)
    avatar_expr, avatar_talking = behave(avatar_pcm, user_pcm, user_expr[:, _column("smile")], rng)
    return Conversation(Side(avatar_pcm, avatar_talking, avatar_expr), Side(user_pcm, user_talking, user_expr))


def render(rig: FaceRig, expressions: Sequence[Expression]) -> np.ndarray:
    """Frames [T, H, W, 3] of a rigged portrait making these expressions."""
    return np.stack([rig.render(e) for e in expressions])


# -- identities and files ----------------------------------------------------------------------------------------


def packaged_portraits() -> dict[str, Path]:
    """Public-domain portraits that ship inside installed packages (nothing is downloaded): matplotlib's sample of
    Grace Hopper (a U.S. Navy photograph)."""
    found = {}
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if path.is_file():
            found["grace_hopper"] = path
    except ImportError:
        pass
    return found


def augmented(portrait: np.ndarray, seed: int) -> np.ndarray:
    """Another look of a portrait, for more identities from few: mirrored or not, hue, saturation, brightness
    and contrast shifted, slightly zoomed. Seed 0 is the portrait itself."""
    if seed == 0:
        return portrait
    import cv2

    rng = np.random.default_rng(seed)
    image = portrait[:, ::-1] if rng.random() < 0.5 else portrait
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-12, 12)) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.7, 1.3), 0, 255)
    image = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    image = np.clip((image - 128) * rng.uniform(0.85, 1.15) + 128 + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
    h, w = image.shape[:2]
    zoom = rng.uniform(1.0, 1.1)
    m = cv2.getRotationMatrix2D((w / 2 + rng.uniform(-0.03, 0.03) * w, h / 2), 0.0, zoom)
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def write_conversation(conversation: Conversation, avatar: FaceRig, user: FaceRig, folder: Path, name: str) -> dict:
    """NAME.avatar.mp4 and NAME.user.mp4 (each side's video with its own speech) in `folder`; returns the
    manifest row `avatar-forcing data prepare` reads."""
    from ..media.video import Mp4Writer

    row = {"name": name}
    for side, rig in (("avatar", avatar), ("user", user)):
        frames = render(rig, conversation.expressions(side))
        path = folder / f"{name}.{side}.mp4"
        with Mp4Writer(path, FPS, frames.shape[2], frames.shape[1], audio_rate=SAMPLE_RATE, crf=16) as writer:
            writer.write_frames(frames)
            writer.write_audio(getattr(conversation, side).pcm)
        row[f"{side}_video"] = path.name
    return row
