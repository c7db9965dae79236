"""Video encoding in media processes (server/media_process.py) and the encoder choice (server/video_codecs.py):
frames go through a real child process and come back as RTP payloads that aiortc's own decoders turn into
the same picture; a child that dies or hangs is replaced without the sender losing its video."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.codecs.h264 import H264Decoder, h264_depayload
from aiortc.codecs.vpx import Vp8Decoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame

from avatar_forcing.server import media_process, video_codecs
from avatar_forcing.server.media_process import MediaPool

SIZE = 128


def moving_frames(count: int, size: int = SIZE) -> list[np.ndarray]:
    """A bright disc moving over a gradient: every frame differs, and a codec can keep it (PSNR > 30 dB)."""
    yy, xx = np.mgrid[0:size, 0:size]
    frames = []
    for i in range(count):
        cx, cy = size / 2 + size / 4 * np.cos(i / 5), size / 2 + size / 4 * np.sin(i / 5)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < (size / 6) ** 2) * 160
        rgb = np.stack([xx * 200 / size, yy * 200 / size, np.full_like(xx, 80)], -1) + disc[..., None]
        frames.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return frames


def video_frame(rgb: np.ndarray, index: int) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    frame.pts, frame.time_base = index * 3600, Fraction(1, 90000)
    return frame


class Receiver:
    """What a WebRTC peer does with the payloads: depacketise with aiortc and decode."""

    def __init__(self, mime: str):
        self.mime = mime
        self.decoder = H264Decoder() if mime == "video/h264" else Vp8Decoder()

    def decode(self, payloads: list[bytes], timestamp: int) -> list[np.ndarray]:
        depayload = h264_depayload if self.mime == "video/h264" else vp8_depayload
        data = b"".join(depayload(p) for p in payloads)
        frames = self.decoder.decode(JitterFrame(data=data, timestamp=timestamp))
        return [f.to_ndarray(format="rgb24") for f in frames]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-9))


@pytest.fixture
def pool():
    observed: list[tuple[float, float]] = []
    p = MediaPool(1, "libx264", observe=lambda enc, rt: observed.append((enc, rt)))
    p.observed = observed
    p.start()
    yield p
    p.stop()


@pytest.mark.parametrize("mime", ["video/vp8", "video/h264"])
def test_frames_encoded_in_a_media_process_decode_to_the_same_pictures(pool, mime):
    encoder = pool.encoder(mime)
    receiver = Receiver(mime)
    decoded = []
    frames = moving_frames(30)
    for i, rgb in enumerate(frames):
        payloads, timestamp = encoder.encode(video_frame(rgb, i), force_keyframe=(i == 0))
        assert payloads and all(len(p) <= 1300 for p in payloads), "RTP-sized payloads"
        assert timestamp == i * 3600
        decoded += receiver.decode(payloads, timestamp)
    assert len(decoded) >= 28, f"only {len(decoded)} of 30 frames decoded"
    quality = [psnr(d, f) for d, f in zip(decoded[-20:], frames[-20:], strict=True)]
    assert min(quality) > 28, f"decoded frames do not match what was sent: PSNR {min(quality):.1f} dB"
    assert np.abs(decoded[-1].astype(int) - decoded[-2].astype(int)).mean() > 1, "fresh frames, not repeats"
    # The pool reported each frame's encode time in the child and its round trip.
    assert len(pool.observed) == 30
    assert all(0 < enc <= rt for enc, rt in pool.observed)


def test_a_media_process_that_dies_is_replaced_and_the_sender_keeps_its_video(pool):
    encoder = pool.encoder("video/vp8")
    receiver = Receiver("video/vp8")
    frames = moving_frames(20)
    for i in range(10):
        receiver.decode(*encoder.encode(video_frame(frames[i], i)))
    first = pool.children[0].process
    os.kill(first.pid, signal.SIGKILL)
    first.join(5)
    decoded = []
    for i in range(10, 20):
        decoded += receiver.decode(*encoder.encode(video_frame(frames[i], i)))
    assert len(decoded) == 10, "every frame after the crash decodes (the new process starts with a keyframe)"
    assert psnr(decoded[-1], frames[-1]) > 28
    assert pool.replaced == 1 and pool.alive() == 1
    assert pool.children[0].process.pid != first.pid


def test_a_hung_media_process_is_killed_within_the_reply_timeout(pool, monkeypatch):
    monkeypatch.setattr(media_process, "REPLY_TIMEOUT_S", 0.5)
    encoder = pool.encoder("video/vp8")
    receiver = Receiver("video/vp8")
    frames = moving_frames(4)
    receiver.decode(*encoder.encode(video_frame(frames[0], 0)))
    hung = pool.children[0].process
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        decoded = receiver.decode(*encoder.encode(video_frame(frames[1], 1)))
        waited = time.monotonic() - t0
    finally:
        if hung.is_alive():
            os.kill(hung.pid, signal.SIGCONT)
    assert len(decoded) == 1 and psnr(decoded[0], frames[1]) > 28
    assert not hung.is_alive(), "the hung process was killed"
    assert waited < 0.5 + 30, f"the sender waited {waited:.1f} s"


def test_a_freed_encoder_frees_its_shared_memory(pool):
    encoder = pool.encoder("video/vp8")
    encoder.encode(video_frame(moving_frames(1)[0], 0))
    name = encoder._slot.memory.name
    assert os.path.exists(f"/dev/shm/{name}")
    assert pool.children[0].senders == 1
    del encoder
    gc.collect()
    assert not os.path.exists(f"/dev/shm/{name}"), "the segment is unlinked with its encoder"
    assert pool.children[0].senders == 0
    # The child is told at its next request, and still encodes for others.
    other = pool.encoder("video/vp8")
    assert other.encode(video_frame(moving_frames(1)[0], 0))[0]


def test_a_stopped_pool_leaves_its_senders_encoding_in_process():
    pool = MediaPool(1, "libx264")
    pool.start()
    encoder = pool.encoder("video/vp8")
    receiver = Receiver("video/vp8")
    frames = moving_frames(3)
    receiver.decode(*encoder.encode(video_frame(frames[0], 0)))
    pool.stop()
    decoded = receiver.decode(*encoder.encode(video_frame(frames[1], 1)))
    assert len(decoded) == 1 and psnr(decoded[0], frames[1]) > 28


def test_h264_backend_follows_what_nvenc_can_do_here():
    works, why = video_codecs.nvenc_status()
    assert video_codecs.h264_backend("cpu") == "libx264"
    assert video_codecs.h264_backend("auto") == ("nvenc" if works else "libx264")
    if works:
        assert video_codecs.h264_backend("nvenc") == "nvenc"
    else:
        with pytest.raises(RuntimeError, match="NVENC was asked for .* cannot encode here"):
            video_codecs.h264_backend("nvenc")
        assert why  # the reason is kept for the message
    with pytest.raises(ValueError, match="expected one of auto, cpu, nvenc"):
        video_codecs.h264_backend("gpu")


@pytest.mark.skipif(not video_codecs.nvenc_status()[0], reason="NVENC needs an NVIDIA GPU and its driver")
def test_nvenc_frames_decode_to_the_same_pictures():
    encoder = video_codecs.local_encoder("video/h264", "nvenc")
    receiver = Receiver("video/h264")
    decoded = []
    frames = moving_frames(10, size=256)
    for i, rgb in enumerate(frames):
        decoded += receiver.decode(*encoder.encode(video_frame(rgb, i), force_keyframe=(i == 0)))
    assert len(decoded) >= 9 and psnr(decoded[-1], frames[-1]) > 28


async def offer_with_both_codecs() -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def video_formats(sdp: str) -> list[str]:
    """The video codecs in the m-line's order, and in the rtpmap lines' order (which aiortc answers in)."""
    line = next(x for x in sdp.splitlines() if x.startswith("m=video "))
    rtpmaps = [x for x in sdp.splitlines() if x.startswith("a=rtpmap:")]
    names = {x.split(":", 1)[1].split()[0]: x.split()[1].split("/")[0] for x in rtpmaps}
    by_mline = [names[f] for f in line.split()[3:]]
    assert by_mline == [x.split()[1].split("/")[0] for x in rtpmaps], "m-line and rtpmap lines agree"
    return by_mline


def test_prefer_codec_puts_the_codec_first_and_leaves_other_offers_alone():
    sdp = asyncio.run(offer_with_both_codecs())
    assert video_formats(sdp)[0] == "VP8"  # aiortc's own order
    preferred = video_codecs.prefer_codec(sdp, "H264")
    assert video_formats(preferred)[0] == "H264"
    assert sorted(video_formats(preferred)) == sorted(video_formats(sdp)), "nothing lost, nothing added"
    assert video_codecs.prefer_codec(sdp, "AV1") == sdp  # not offered: unchanged
    # The answer picks it: aiortc itself answers the reordered offer with H.264 first.
    answer = asyncio.run(answer_to(preferred))
    assert video_formats(answer)[0] == "H264"
    assert video_formats(asyncio.run(answer_to(sdp)))[0] == "VP8"


async def answer_to(offer: str) -> str:
    from aiortc import RTCSessionDescription, VideoStreamTrack

    pc = RTCPeerConnection()
    await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
    pc.addTrack(VideoStreamTrack())
    await pc.setLocalDescription(await pc.createAnswer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def test_media_processes_that_cannot_start_leave_video_to_the_codec_threads(monkeypatch):
    from aiortc import rtcrtpsender
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    from avatar_forcing.server.config import ServerSettings
    from avatar_forcing.server.metrics import ServerMetrics
    from avatar_forcing.server.video import VideoEncoding

    def refuse(self):
        raise RuntimeError("media process 1 did not start within 60 s")

    monkeypatch.setattr(MediaPool, "start", refuse)
    video = VideoEncoding(ServerSettings(media_processes=1, video_encoder="cpu"), ServerMetrics(2))
    try:
        video.start()
        assert video.processes == 0 and video.pool is None
        encoder = rtcrtpsender.get_encoder(RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000,
                                                                  payloadType=96))
        assert isinstance(encoder, video_codecs.TimedEncoder)
        payloads, _ = encoder.encode(video_frame(moving_frames(1)[0], 0))
        assert payloads
    finally:
        video.stop()
    assert rtcrtpsender.get_encoder is video_codecs.aiortc_encoder, "aiortc's own encoders are back after stop"
