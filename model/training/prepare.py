"""From a manifest of dyadic clips to training shards (`avatar-forcing data prepare`).

A manifest is a JSON list (or JSON lines) of clips, paths relative to the manifest's folder:

    {"name": "conv01-a", "avatar_video": "conv01/a.mp4", "user_video": "conv01/b.mp4",
     "avatar_audio": "conv01/a.wav", "user_audio": "conv01/b.wav"}

The audio entries are optional: a video's own audio track is used when they are absent. Per clip, at
25 fps / 16 kHz after resampling:
  * face crops of both videos through the project's detector, one fixed square per clip (the reference's
    offline crop, `media.face.fixed_crop_box`): a fixed crop keeps head motion in the motion latents
    instead of cancelling it, which a per-frame tracker would do;
  * motion latents of both sides from the frozen motion encoder, and the reference frame's code
    (the avatar's first frame); the user's side made as the server makes a webcam's (`offline.motion_latents`:
    with `relative_user_motion` relative to the user's running reference, with `user_expression` read by the
    face mesh), so the transformer trains on what it is served;
  * both audio tracks as the frozen wav2vec2's stacked layer outputs (what `load_shards` reads; why cached
    features and not raw audio: docs/training.md).
The clip is cut to the shortest of the four streams.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar_forcing.errors import MediaError

from ..audio_encoder import normalize_utterance
from ..avatar_forcing import AvatarForcing
from ..media.audio import load_audio
from ..media.face import FaceDetector, default_detector, fixed_crop_box
from ..media.image import resize_square, to_model_input
from ..media.video import iter_video_frames, probe_video
from ..offline import motion_latents
from .data import Clip, ShardWriter

MANIFEST_KEYS = {"name", "avatar_video", "user_video", "avatar_audio", "user_audio"}


class ClipError(ValueError):
    """A clip that cannot become training data (no face, no audio, too short): the message names it."""


@dataclass(frozen=True)
class ManifestClip:
    name: str
    avatar_video: Path
    user_video: Path
    avatar_audio: Path | None = None
    user_audio: Path | None = None


def read_manifest(path: str | Path) -> list[ManifestClip]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {path}: no such file") from None
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines()
                                                                       if x.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"manifest {path}: not JSON or JSON lines ({exc})") from None
    clips, names = [], set()
    for n, row in enumerate(rows):
        where = f"manifest {path}, clip {n}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with name, avatar_video, user_video")
        unknown = set(row) - MANIFEST_KEYS
        missing = {"name", "avatar_video", "user_video"} - set(row)
        if unknown or missing:
            raise ValueError(f"{where}: " + "; ".join(
                ([f"unknown keys {sorted(unknown)}"] if unknown else []) + ([f"missing {sorted(missing)}"] if missing
                                                                            else [])))
        name = str(row["name"])
        if not name or "/" in name or name in names:
            raise ValueError(f"{where}: the name {name!r} is empty, has a '/' or is used twice")
        names.add(name)
        paths = {key: path.parent / row[key] for key in MANIFEST_KEYS - {"name"} if row.get(key) is not None}
        clips.append(ManifestClip(name, paths["avatar_video"], paths["user_video"], paths.get("avatar_audio"),
                                  paths.get("user_audio")))
    return clips


def _audio(clip: ManifestClip, side: str, rate: int) -> np.ndarray:
    video: Path = getattr(clip, f"{side}_video")
    audio: Path | None = getattr(clip, f"{side}_audio")
    source = audio or video
    if audio is None and not probe_video(video).has_audio:
        raise ClipError(f"clip {clip.name}: no {side} audio: {video} has no audio track and the manifest gives no "
                        f"{side}_audio")
    try:
        pcm = load_audio(source, rate)
    except MediaError as exc:
        raise ClipError(f"clip {clip.name}: {side} audio: {exc}") from None
    if not np.any(pcm):
        raise ClipError(f"clip {clip.name}: the {side} audio {source} is silent throughout")
    return pcm


def _crops(clip: ManifestClip, side: str, size: int, frames: int, detector: FaceDetector | None
           ) -> Iterator[np.ndarray]:
    """The clip's face crops; with no detector the videos are crops already and every frame is used whole."""
    video: Path = getattr(clip, f"{side}_video")
    limited = lambda: (f for i, f in zip(range(frames), iter_video_frames(video), strict=False))
    if detector is None:
        yield from (resize_square(frame, size) for frame in limited())
        return
    try:
        x0, y0, x1, y1 = fixed_crop_box(limited(), detector, detect_stride=5)
    except MediaError as exc:  # NoFaceError included
        raise ClipError(f"clip {clip.name}: {side} video {video}: {exc}") from None
    for frame in limited():
        yield resize_square(frame[y0:y1, x0:x1], size)


@torch.inference_mode()
def _latents(model: AvatarForcing, crops: Iterator[np.ndarray], chunk: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(motion latents [N, dim_w], the first crop's reference code r_s [dim_w])."""
    mae = model.motion_autoencoder
    param = next(model.parameters())
    out, batch, r_s = [], [], None
    for crop in crops:
        batch.append(crop)
        if len(batch) == chunk:
            out.append(mae.encode_motion(to_model_input(np.stack(batch)).to(param.device, param.dtype)))
            batch = []
        if r_s is None:
            r_s = mae.encode_portrait(to_model_input(crop).to(param.device, param.dtype)).r_s[0]
    if batch:
        out.append(mae.encode_motion(to_model_input(np.stack(batch)).to(param.device, param.dtype)))
    if r_s is None:
        raise ClipError("the video has no frames")
    return torch.cat(out).float().cpu(), r_s.float().cpu()


@torch.inference_mode()
def stacked_audio(model: AvatarForcing, pcm: np.ndarray, frames: int, window: int = 1500, context: int = 100
                  ) -> torch.Tensor:
    """Whole-utterance wav2vec2 stacked features [frames, layers * hidden] (before `audio_projection`), encoded
    in windows of `window` frames with `context` frames either side past window + 2 context frames, as
    `AudioEncoder.encode_long` does for the projected features."""
    enc = model.audio_encoder
    param = next(model.parameters())
    spf = enc.config.samples_per_frame
    wave = enc.pad_waveform(normalize_utterance(pcm)[None].to(param.device, param.dtype), frames)
    if frames <= window + 2 * context:
        return enc.stacked_features(wave[:, :frames * spf], frames)[0].float().cpu()
    pieces = []
    for start in range(0, frames, window):
        stop = min(start + window, frames)
        lo, hi = max(0, start - context), min(frames, stop + context)
        pieces.append(enc.stacked_features(wave[:, lo * spf:hi * spf], hi - lo)[0, start - lo:stop - lo])
    return torch.cat(pieces).float().cpu()


def prepare_clip(model: AvatarForcing, clip: ManifestClip, detector: FaceDetector | None = None,
                 max_frames: int | None = None, whole_frames: bool = False) -> Clip:
    """One manifest clip -> a training `Clip`; raises ClipError naming the clip for no face / no audio / too short.
    `whole_frames`: the videos are face crops already (`data conversations` makes such), so no detection."""
    for side in ("avatar", "user"):
        for kind in ("video", "audio"):
            path = getattr(clip, f"{side}_{kind}")
            if path is not None and not path.is_file():
                raise ClipError(f"clip {clip.name}: {side} {kind} {path}: no such file")
    cfg = model.config
    detector = None if whole_frames else detector or default_detector()
    rate, spf, size = cfg.sampling_rate, cfg.audio.samples_per_frame, cfg.motion.input_size
    pcm = {side: _audio(clip, side, rate) for side in ("avatar", "user")}
    video_frames = [probe_video(getattr(clip, f"{s}_video")).num_frames_estimate for s in ("avatar", "user")]
    frames = min(*video_frames, *(len(p) // spf for p in pcm.values()))
    if max_frames is not None:
        frames = min(frames, max_frames)
    need = cfg.transformer.clip_frames
    if frames < need:
        raise ClipError(f"clip {clip.name}: {frames} frames ({frames / cfg.fps:.1f} s) is shorter than a training "
                        f"window of {need} frames")
    motion, r_s = _latents(model, _crops(clip, "avatar", size, frames, detector))
    user_motion = motion_latents(model, _crops(clip, "user", size, frames, detector), frames).float().cpu()
    frames = min(frames, len(motion), len(user_motion))  # the container's frame estimate may be high
    return Clip(clip.name, motion[:frames], r_s, stacked_audio(model, pcm["avatar"], frames),
                stacked_audio(model, pcm["user"], frames), user_motion[:frames])


Progress = Callable[[str], None]


def prepare_shards(model: AvatarForcing, manifest: list[ManifestClip], out: str | Path, clips_per_shard: int = 64,
                   skip_bad: bool = False, max_frames: int | None = None, detector: FaceDetector | None = None,
                   progress: Progress | None = None, whole_frames: bool = False) -> ShardWriter:
    """Every manifest clip not yet in `out` -> shards. A bad clip raises ClipError, or with `skip_bad` is
    recorded in the index's "rejected" with the reason. Rerunning continues where a run stopped."""
    writer = ShardWriter(out, clips_per_shard)
    done = writer.done
    for clip in manifest:
        if clip.name in done:
            if progress:
                progress(clip.name)
            continue
        try:
            writer.add(prepare_clip(model, clip, detector, max_frames, whole_frames))
        except ClipError as exc:
            if not skip_bad:
                writer.flush()  # keep what is finished
                raise
            writer.reject(clip.name, str(exc))
        if progress:
            progress(clip.name)
    writer.flush()
    return writer
