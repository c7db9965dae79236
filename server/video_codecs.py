"""The video encoders our WebRTC senders use: NVENC for H.264 where the GPU has it, libvpx / libx264 otherwise,
each timed for the metrics.

aiortc makes one encoder per sender from the negotiated codec (`aiortc.rtcrtpsender.get_encoder`). The server
swaps that factory once, at start-up, for `install(factory)`: video senders then get our encoders (in this
process, or proxies to a media process, see media_process.py) while audio keeps aiortc's own. Packetisation
(RTP payloads for VP8 and H.264) stays aiortc's: only the compression itself is ours to place.

This module imports no torch: the media processes load it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np
from aiortc import rtcrtpsender
from aiortc.codecs import get_encoder as aiortc_encoder
from aiortc.codecs.base import Encoder
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder

log = logging.getLogger("avatar_forcing.server.video")

VIDEO_MIMES = ("video/vp8", "video/h264")
H264_BACKENDS = ("libx264", "nvenc")
ENCODER_SETTINGS = ("auto", "cpu", "nvenc")


class NvencH264Encoder(H264Encoder):
    """H.264 compressed by the GPU's video engine (FFmpeg's h264_nvenc), packetised by aiortc.

    Tuned as WebRTC needs it: constrained baseline, no B-frames, no look-ahead, one frame in, one out, and a
    constant bit rate that follows the sender's target (aiortc sets `target_bitrate` from the receiver's REMB).
    """

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool):
        codec = self.codec
        opened_at = (codec.bit_rate or 0) if codec is not None else 0
        if codec is not None and ((frame.width, frame.height) != (codec.width, codec.height)
                                  or abs(self.target_bitrate - opened_at) > 0.1 * opened_at):
            self.codec = codec = None  # a new size or a bit rate >10 % off: reopen (the next frame is a keyframe)
        frame.pict_type = av.video.frame.PictureType.I if force_keyframe else av.video.frame.PictureType.NONE
        if codec is None:
            self.codec = codec = open_nvenc(frame.width, frame.height, self.target_bitrate)
        data = b"".join(bytes(packet) for packet in codec.encode(frame))
        if data:
            yield from self._split_bitstream(data)


def open_nvenc(width: int, height: int, bit_rate: int):
    codec = av.CodecContext.create("h264_nvenc", "w")
    codec.width, codec.height = width, height
    codec.bit_rate = bit_rate
    codec.pix_fmt = "yuv420p"
    codec.framerate = Fraction(30, 1)
    codec.time_base = Fraction(1, 30)
    codec.gop_size = 3000  # keyframes on request (PLI / FIR), not on a timer
    codec.max_b_frames = 0
    codec.profile = "baseline"
    codec.options = {"preset": "p1", "tune": "ull", "rc": "cbr", "zerolatency": "1", "delay": "0",
                     "level": "3.1"}
    codec.open()
    return codec


_nvenc_probe: tuple[bool, str] | None = None


def nvenc_status() -> tuple[bool, str]:
    """Whether NVENC can encode here, and why not: FFmpeg has the encoder built in, but it needs an NVIDIA GPU
    and its driver's encode library, which only opening it tells. Probed once per process."""
    global _nvenc_probe
    if _nvenc_probe is None:
        try:
            codec = open_nvenc(256, 256, 1_000_000)
            frame = av.VideoFrame.from_ndarray(np.zeros((256, 256, 3), np.uint8), format="rgb24")
            frame.pts, frame.time_base = 0, Fraction(1, 30)
            list(codec.encode(frame))
            _nvenc_probe = (True, "h264_nvenc opened")
        except Exception as exc:  # no GPU, no driver, an old driver, too many NVENC sessions: all mean "no"
            _nvenc_probe = (False, f"{type(exc).__name__}: {exc}")
    return _nvenc_probe


def h264_backend(setting: str) -> str:
    """The H.264 encoder for the `video_encoder` setting: 'nvenc' must work (or start-up stops, with the reason),
    'auto' takes it when it works, 'cpu' never tries."""
    if setting not in ENCODER_SETTINGS:
        raise ValueError(f"video encoder {setting!r}: expected one of {', '.join(ENCODER_SETTINGS)}")
    if setting == "cpu":
        return "libx264"
    works, why = nvenc_status()
    if works:
        return "nvenc"
    if setting == "nvenc":
        raise RuntimeError(f"NVENC was asked for (AVATAR_FORCING_VIDEO_ENCODER=nvenc) but cannot encode here: "
                           f"{why}. It needs an NVIDIA GPU with its driver (libnvidia-encode); use 'auto' or 'cpu'")
    return "libx264"


def local_encoder(mime: str, backend: str) -> Encoder:
    """A new encoder for one sender, working in this process."""
    if mime == "video/h264":
        return NvencH264Encoder() if backend == "nvenc" else H264Encoder()
    if mime == "video/vp8":
        return Vp8Encoder()
    raise ValueError(f"no video encoder for {mime!r}")


class TimedEncoder(Encoder):
    """An encoder whose every frame's encoding time is reported (it runs in one of aiortc's codec threads)."""

    def __init__(self, inner: Encoder, observe: Callable[[float], None]):
        self.inner = inner
        self._observe = observe

    def encode(self, frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        t0 = time.perf_counter()
        result = self.inner.encode(frame, force_keyframe)
        self._observe(time.perf_counter() - t0)
        return result

    def pack(self, packet) -> tuple[list[bytes], int]:
        return self.inner.pack(packet)

    @property
    def target_bitrate(self) -> int:
        return self.inner.target_bitrate  # type: ignore[attr-defined]

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self.inner.target_bitrate = bitrate  # type: ignore[attr-defined]


VideoEncoderFactory = Callable[[str], Encoder]
_factory: VideoEncoderFactory | None = None


def _get_encoder(codec) -> Encoder:
    mime = codec.mimeType.lower()
    if _factory is not None and mime in VIDEO_MIMES:
        return _factory(mime)
    return aiortc_encoder(codec)


def install(factory: VideoEncoderFactory | None) -> None:
    """Video senders created from now on get `factory(mime)`; None restores aiortc's own encoders."""
    global _factory
    _factory = factory
    rtcrtpsender.get_encoder = _get_encoder if factory is not None else aiortc_encoder


def prefer_codec(sdp: str, codec: str) -> str:
    """The offer with `codec` (e.g. 'H264', 'VP8') listed first in its video section, so that our answer picks
    it where the client offers it at all; otherwise the offer comes back unchanged. aiortc answers in the
    order of the offer's rtpmap lines, so those move (with the codec's retransmission formats), and the
    m-line's format list follows."""
    newline = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(newline)
    start = next((i for i, line in enumerate(lines) if line.startswith("m=video ")), None)
    if start is None:
        return sdp
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    section = lines[start:stop]
    wanted = {line.split(":", 1)[1].split()[0] for line in section
              if line.startswith("a=rtpmap:") and line.split()[1].lower().startswith(codec.lower() + "/")}
    if not wanted:
        return sdp
    # Retransmission (RTX) formats of a wanted one go with it: "a=fmtp:<rtx> apt=<wanted>".
    wanted |= {line.split(":", 1)[1].split()[0] for line in section
               if line.startswith("a=fmtp:") and any(f"apt={pt}" in line.split()[1].split(";") for pt in wanted)}

    def first(formats: list[str]) -> list[str]:
        return [f for f in formats if f in wanted] + [f for f in formats if f not in wanted]

    at = [i for i, line in enumerate(section) if line.startswith("a=rtpmap:")]
    by_format = {section[i].split(":", 1)[1].split()[0]: section[i] for i in at}
    for i, fmt in zip(at, first(list(by_format)), strict=True):
        section[i] = by_format[fmt]
    head = section[0].split()
    section[0] = " ".join(head[:3] + first(head[3:]))
    return newline.join(lines[:start] + section + lines[stop:])
