"""Offline generation (the reference's inference script) as a client of the streaming engine.

What differs from the reference, on purpose: any length (RoPE positions are rebased and long audio is
encoded in overlapping windows), any input sample / frame rate (resampled to the model's 16 kHz / 25 fps),
a face detector that ships in a package, and the user video streamed from disk twice (detect, then crop and
encode) so memory does not grow with its length. Audio features are whole-utterance features, normalised
over the whole clip, as upstream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar_forcing.errors import MediaError

from .audio_encoder import normalize_utterance
from .avatar_forcing import AvatarForcing
from .canonical import UserReference
from .engine import BlockOutput, EngineSettings, FrameMarker, PrecomputedInputs, StreamingEngine
from .media.audio import load_audio
from .media.face import FaceDetector, crop_portrait, default_detector, fixed_crop_box
from .media.image import load_image, resize_square, to_model_input
from .media.video import iter_video_frames, probe_video
from .user_expression import UserExpressionReader

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class OfflineJob:
    """The files of one offline generation: portrait, the avatar's speech, the user's video and audio."""

    avatar_image: Path
    avatar_audio: Path
    user_video: Path
    user_audio: Path | None = None  # default: the user video's own audio track
    crop_portrait: bool = True
    seed: int = 20  # the reference's default


def check_files(job: OfflineJob) -> None:
    for what, path in (("avatar image", job.avatar_image), ("avatar audio", job.avatar_audio),
                       ("user video", job.user_video), ("user audio", job.user_audio)):
        if path is not None and not Path(path).is_file():
            raise MediaError(f"{what} {path} does not exist: check the path")


def portrait_crop(path: Path, size: int, crop: bool, detector: FaceDetector | None = None) -> np.ndarray:
    image = load_image(path)
    if crop:
        return crop_portrait(image, size=size, detector=detector)
    return resize_square(image, size)


def clip_frames(avatar_pcm: np.ndarray, user_pcm: np.ndarray, samples_per_frame: int) -> int:
    """The reference's clip length: the longer of the two audio tracks, in frames."""
    return math.ceil(max(len(avatar_pcm), len(user_pcm)) / samples_per_frame)


def user_video_crops(path: Path, size: int, num_frames: int, detector: FaceDetector) -> Iterator[np.ndarray]:
    """The user video's frames (at most num_frames) cut by the reference's one fixed face crop, size x size.
    The video is read twice (find the face, then crop), so memory does not grow with its length."""
    x0, y0, x1, y1 = fixed_crop_box(iter_video_frames(path), detector, detect_stride=5)
    for i, frame in enumerate(iter_video_frames(path)):
        if i >= num_frames:
            return
        yield resize_square(frame[y0:y1, x0:x1], size)


@torch.inference_mode()
def motion_latents(model: AvatarForcing, crops: Iterable[np.ndarray], num_frames: int, chunk: int = 50,
                   progress: Progress | None = None) -> torch.Tensor:
    """The user's face crops -> motion latents [num_frames, dim_w], `chunk` at a time; fewer crops than frames
    hold the last one. As the live engine makes them: encoded, and with `relative_user_motion` taken relative to
    the user's running reference; or with `user_expression` read by the face mesh."""
    mae = model.motion_autoencoder
    param = next(model.parameters())
    reference = mae.user_reference(model.config.fps)
    latents: list[torch.Tensor] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if isinstance(reference, UserExpressionReader):
            latents.append(reference.latents(batch).to(param.device, param.dtype))
        else:
            latents.append(mae.encode_motion(to_model_input(np.stack(batch)).to(param.device, param.dtype)))
        batch.clear()
        if progress:
            progress("user motion", sum(len(x) for x in latents), num_frames)

    for crop in crops:
        batch.append(crop)
        if len(batch) == chunk:
            flush()
    if batch:
        flush()
    out = torch.cat(latents)
    if out.shape[0] < num_frames:
        out = torch.cat([out, out[-1:].expand(num_frames - out.shape[0], -1)])
    return reference.relative(out) if isinstance(reference, UserReference) else out


@torch.inference_mode()
def audio_features(model: AvatarForcing, pcm: np.ndarray, num_frames: int) -> torch.Tensor:
    """Whole-utterance wav2vec2 features [num_frames, dim_a] (windowed past a few minutes)."""
    param = next(model.parameters())
    wave = normalize_utterance(pcm)[None].to(param.device, param.dtype)
    return model.audio_encoder.encode_long(wave, num_frames)[0]


@dataclass
class PreparedJob:
    """A job ready for the engine: the portrait's code and the clip's precomputed conditions."""

    portrait: np.ndarray  # the face crop, model-sized
    inputs: PrecomputedInputs

    @property
    def num_frames(self) -> int:
        return self.inputs.total_frames


def prepare(model: AvatarForcing, job: OfflineJob, detector: FaceDetector | None = None,
            progress: Progress | None = None) -> PreparedJob:
    check_files(job)
    cfg = model.config
    sr, spf = cfg.sampling_rate, cfg.audio.samples_per_frame
    detector = detector or default_detector()
    portrait = portrait_crop(job.avatar_image, cfg.motion.input_size, job.crop_portrait, detector)
    avatar_pcm = load_audio(job.avatar_audio, sr)
    info = probe_video(job.user_video)
    if job.user_audio is not None:
        user_pcm = load_audio(job.user_audio, sr)
    elif info.has_audio:
        user_pcm = load_audio(job.user_video, sr)
    else:  # a silent webcam recording: the user says nothing
        user_pcm = np.zeros(int(round(info.duration_s * sr)), dtype=np.float32)
    num_frames = clip_frames(avatar_pcm, user_pcm, spf)
    crops = user_video_crops(job.user_video, cfg.motion.input_size, num_frames, detector)
    motion = motion_latents(model, crops, num_frames, progress=progress)
    if progress:
        progress("audio features", 0, 2)
    wa = audio_features(model, avatar_pcm, num_frames)
    wa_user = audio_features(model, user_pcm, num_frames)
    if progress:
        progress("audio features", 2, 2)
    inputs = PrecomputedInputs(wa, wa_user, motion, avatar_pcm=avatar_pcm, samples_per_frame=spf)
    return PreparedJob(portrait, inputs)


def generate_blocks(model: AvatarForcing, prepared: PreparedJob, seed: int, decode: bool = True,
                    frame_marker: FrameMarker | None = None, session_id: str | None = None) -> Iterator[BlockOutput]:
    """Run the prepared clip through a one-session engine; yields its blocks in order. `frame_marker` marks
    the decoded frames on the model's device (it sees `session_id`)."""
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=decode, frame_marker=frame_marker))
    session = engine.open_session(prepared.portrait, inputs=prepared.inputs, seed=seed, session_id=session_id)
    try:
        while not session.finished:
            yield from engine.step()
    finally:
        engine.close_session(session.id)
