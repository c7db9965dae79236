"""Video decoding at a constant frame rate, probing, and MP4 (H.264 + AAC) writing."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from avatar_forcing.errors import MediaError
from avatar_forcing.model.media._open import open_input


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    duration_s: float
    num_frames_estimate: int
    has_audio: bool


def _video_stream(container: av.container.InputContainer, path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise MediaError(f"{path} has no video stream: give a video file (mp4, webm, mov)")
    return container.streams.video[0]


def _stream_fps(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read the header of a video file (no decoding). width/height are the coded size, before any
    display rotation a phone may have recorded."""
    container = open_input(path, "video")
    try:
        stream = _video_stream(container, path)
        fps = _stream_fps(stream) or 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        frames = stream.frames if stream.frames > 0 else round(duration * fps)
        return VideoInfo(
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=fps,
            duration_s=duration,
            num_frames_estimate=int(frames),
            has_audio=bool(container.streams.audio),
        )
    finally:
        container.close()


def iter_video_frames(path: str | os.PathLike, fps: float = 25.0) -> Iterator[np.ndarray]:
    """Decode the first video stream as RGB uint8 [H, W, 3] frames at a constant `fps`.

    Like FFmpeg's fps filter: each source frame is placed in the output slot nearest to its
    presentation time (relative to the first frame); a slot with no source frame repeats the previous
    one, and of several frames landing in one slot the last wins. Rounding to slots (rather than
    comparing raw times) keeps a same-rate input with jittery timestamps one-to-one.
    A missing or non-video file raises here, at the call; decoding errors raise while iterating.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    container = open_input(path, "video")
    try:
        stream = _video_stream(container, path)
    except BaseException:
        container.close()
        raise
    return _constant_rate_frames(container, stream, Fraction(fps).limit_denominator(1000), path)


def _upright_rgb(frame: av.VideoFrame) -> np.ndarray:
    """RGB pixels as they should be shown: phone videos store a display rotation beside the pixels."""
    rgb: np.ndarray = frame.to_ndarray(format="rgb24")
    quarter_turns = round(frame.rotation / 90) % 4  # counter-clockwise, like np.rot90
    if quarter_turns:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=quarter_turns))
    return rgb


def _constant_rate_frames(container, stream, rate: Fraction, path) -> Iterator[np.ndarray]:
    try:
        stream.thread_type = "AUTO"  # frame threads: decoding is the cost here
        src_fps = _stream_fps(stream)
        default_step = Fraction(1) / Fraction(src_fps).limit_denominator(1000) if src_fps else 1 / rate

        t0: Fraction | None = None  # time of the first frame
        last_t: Fraction | None = None
        last_duration = default_step
        current: av.VideoFrame | None = None  # the frame that fills the slots from `next_slot` on
        current_rgb: np.ndarray | None = None  # its pixels, once converted
        next_slot = 0

        def emit_current(frame: av.VideoFrame) -> np.ndarray:
            nonlocal current_rgb
            if current_rgb is None:
                current_rgb = _upright_rgb(frame)
                return current_rgb
            return current_rgb.copy()  # a repeated frame: give each caller its own array

        try:
            for frame in container.decode(stream):
                if frame.pts is not None and frame.time_base is not None:
                    t = Fraction(frame.pts) * frame.time_base
                else:  # no timestamp: assume it follows the previous frame
                    t = (last_t + last_duration) if last_t is not None else Fraction(0)
                if t0 is None:
                    t0 = t
                if last_t is not None and t > last_t:
                    last_duration = t - last_t
                last_t = t
                slot = round((t - t0) * rate)
                while current is not None and next_slot < slot:
                    yield emit_current(current)
                    next_slot += 1
                current, current_rgb = frame, None
        except av.FFmpegError as e:
            raise MediaError(
                f"could not decode the video of {path} ({e}): the file is damaged; re-export it"
            ) from e

        if current is None or last_t is None or t0 is None:  # a decoded frame sets all three
            raise MediaError(f"{path} contains no video frames: record or export a non-empty video")
        # The last frame lasts as long as the gap before it; the clip ends there.
        end_slot = max(round((last_t - t0 + last_duration) * rate), next_slot + 1)
        while next_slot < end_slot:
            yield emit_current(current)
            next_slot += 1
    finally:
        container.close()


def read_video_frames(path: str | os.PathLike, fps: float = 25.0) -> np.ndarray:
    """All frames at a constant `fps` -> uint8 [N, H, W, 3]."""
    return np.stack(list(iter_video_frames(path, fps)))


class Mp4Writer:
    """Write an MP4 with an H.264 video track (yuv420p, exactly `fps`) and an optional AAC audio track.

    Frames and audio may be written in any order and amounts; encoded packets are queued per track and
    muxed in timestamp order, so the file is interleaved even when all video is written before the audio.
    Pass audio_rate=None for a video-only file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float = 25,
        width: int = 512,
        height: int = 512,
        audio_rate: int | None = 16000,
        *,
        crf: int = 20,
        preset: str = "veryfast",
    ):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs a positive even frame size, got {width}x{height}")
        self.width, self.height = int(width), int(height)
        self._rate = Fraction(fps).limit_denominator(1000)
        folder = Path(path).resolve().parent
        # PyAV opens the file only when the first packet is written: check the folder up front.
        if not folder.is_dir():
            raise MediaError(f"cannot create the video file {path}: folder {folder} does not exist")
        try:
            self._container = av.open(str(path), mode="w", format="mp4")
        except (av.FFmpegError, OSError) as e:
            raise MediaError(
                f"cannot create the video file {path} ({e}): check the folder exists and is writable"
            ) from e
        try:
            self._add_streams(crf, preset, audio_rate)
        except BaseException:
            self._container.close()
            raise
        self._frames_written = 0
        self._samples_written = 0
        self._video_queue: deque[av.Packet] = deque()
        self._audio_queue: deque[av.Packet] = deque()
        self._closed = False

    def _add_streams(self, crf: int, preset: str, audio_rate: int | None) -> None:
        # libx264 with pts counted in frames (time base 1/fps): the frame rate is exact by construction.
        self._video = self._container.add_stream("libx264", rate=self._rate)
        self._video.width, self._video.height = self.width, self.height
        self._video.pix_fmt = "yuv420p"
        self._video.time_base = 1 / self._rate
        self._video.codec_context.time_base = 1 / self._rate
        self._video.options = {"crf": str(crf), "preset": preset}
        self._audio = None
        self.audio_rate = audio_rate
        if audio_rate is not None:
            self._audio = self._container.add_stream("aac", rate=int(audio_rate))
            self._audio.layout = "mono"
            self._audio.time_base = Fraction(1, int(audio_rate))

    @property
    def frames_written(self) -> int:
        return self._frames_written

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this Mp4Writer is closed")

    def write_frames(self, frames: np.ndarray) -> None:
        """Append RGB uint8 frames [N, H, W, 3] (or one [H, W, 3])."""
        self._check_open()
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 frames [N, {self.height}, {self.width}, 3], got {frames.dtype} {frames.shape}"
            )
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self._frames_written
            frame.time_base = self._video.codec_context.time_base
            self._video_queue.extend(self._video.encode(frame))
            self._frames_written += 1
        self._mux_ready()

    def write_audio(self, pcm: np.ndarray) -> None:
        """Append float32 mono samples at `audio_rate`."""
        self._check_open()
        if self._audio is None or self.audio_rate is None:  # both are set together, in _add_streams
            raise ValueError("this Mp4Writer was opened without an audio track (audio_rate=None)")
        x = np.clip(np.nan_to_num(np.asarray(pcm, dtype=np.float32).reshape(-1)), -1.0, 1.0)
        if x.size == 0:
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, :]), format="fltp", layout="mono")
        frame.sample_rate = self.audio_rate
        frame.pts = self._samples_written
        frame.time_base = Fraction(1, self.audio_rate)
        # PyAV re-chunks to the AAC frame size (1024) itself.
        self._audio_queue.extend(self._audio.encode(frame))
        self._samples_written += x.size
        self._mux_ready()

    @staticmethod
    def _time(packet: av.Packet) -> Fraction:
        ts = packet.dts if packet.dts is not None else packet.pts
        return Fraction(ts or 0) * packet.time_base

    def _mux_ready(self, final: bool = False) -> None:
        """Merge the two packet queues by time; keep the tail until the other track has caught up."""
        vq, aq = self._video_queue, self._audio_queue
        if self._audio is None:
            final = True  # one track: nothing to wait for
        while vq or aq:
            if vq and aq:
                queue = vq if self._time(vq[0]) <= self._time(aq[0]) else aq
            elif final:
                queue = vq or aq
            else:
                break
            self._container.mux(queue.popleft())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._video_queue.extend(self._video.encode(None))
            if self._audio is not None:
                self._audio_queue.extend(self._audio.encode(None))
            self._mux_ready(final=True)
        finally:
            self._container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
