"""Tests of model.media: audio/video/image decoding and encoding, and face detection and cropping.

Real sample media are read from ../shared/media (beside the repository); everything else is made in
temporary folders.
"""

from __future__ import annotations

from itertools import pairwise

import av
import numpy as np
import pytest
import torch
from golden_data import MEDIA_DIR as MEDIA
from media_files import numbered_frames, peak_frequency, sine, wav_bytes, write_audio_only_mp4, write_clip

from avatar_forcing.errors import MediaError, UserError
from avatar_forcing.model.media import (
    Box,
    FaceDetector,
    FaceTracker,
    Mp4Writer,
    StreamingResampler,
    crop_portrait,
    crop_video_fixed,
    float_to_pcm16,
    iter_video_frames,
    load_audio,
    load_image,
    pcm16_to_float,
    probe_video,
    read_video_frames,
    read_wav_bytes,
    resize_square,
    square_crop_box,
    to_model_input,
    to_uint8,
)
from avatar_forcing.model.media.face import BASELINE_CASCADE

needs_media = pytest.mark.skipif(
    not (MEDIA / "user.mp4").is_file(),
    reason=f"sample media not found at {MEDIA} (the shared folder beside the repository)",
)


@pytest.fixture(autouse=True)
def _private_home(tmp_path_factory, monkeypatch):
    # Nothing here should write caches, but if a library does, keep it out of the real home.
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))


# ---------------------------------------------------------------- helpers


class CountingDetector:
    """Wraps a detector, or returns scripted boxes, and counts the calls."""

    def __init__(self, inner=None, boxes=None):
        self.inner = inner
        self.boxes = boxes
        self.calls = 0

    def detect(self, rgb):
        self.calls += 1
        if self.inner is not None:
            return self.inner.detect(rgb)
        return list(self.boxes(self.calls) if callable(self.boxes) else self.boxes)


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


@pytest.fixture(scope="module")
def user_frames():
    if not (MEDIA / "user.mp4").is_file():
        pytest.skip(f"sample media not found at {MEDIA}")
    return read_video_frames(MEDIA / "user.mp4")


def noise(seed: int = 0, size: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- audio


@needs_media
def test_load_audio_sample_wav():
    x = load_audio(MEDIA / "avatar.wav")
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) / 16000 - 15.8) < 0.1
    assert np.abs(x).max() <= 1.0 and np.abs(x).max() > 0.05


@needs_media
def test_load_audio_track_of_mp4():
    x = load_audio(MEDIA / "user.mp4")
    assert abs(len(x) / 16000 - 15.84) < 0.05
    assert np.abs(x).max() > 0.01


def test_load_audio_resamples_and_downmixes_stereo_44k(tmp_path):
    left = sine(1000, 44100, 1.5, amp=0.6)
    stereo = np.stack([left, left], axis=1)
    path = tmp_path / "stereo.wav"
    path.write_bytes(wav_bytes(stereo, 44100))
    x = load_audio(path, sample_rate=16000)
    assert abs(len(x) - 24000) <= 2
    assert abs(peak_frequency(x, 16000) - 1000) < 2
    middle = x[2000:-2000]
    assert abs(np.abs(middle).max() - 0.6) < 0.02


def test_load_audio_float32_wav_and_mp3(tmp_path):
    tone = sine(440, 16000, 1.0, amp=0.4)
    wav = tmp_path / "f32.wav"
    wav.write_bytes(wav_bytes(tone, 16000, kind="float32"))
    x = load_audio(wav)
    np.testing.assert_allclose(x, tone, atol=1e-6)

    mp3 = tmp_path / "tone.mp3"
    with av.open(str(mp3), "w") as c:
        s = c.add_stream("libmp3lame", rate=22050)
        s.layout = "mono"
        f = av.AudioFrame.from_ndarray(sine(440, 22050, 1.0, amp=0.4)[None, :], format="fltp", layout="mono")
        f.sample_rate, f.pts = 22050, 0
        for p in list(s.encode(f)) + list(s.encode(None)):
            c.mux(p)
    y = load_audio(mp3)
    assert abs(len(y) / 16000 - 1.0) < 0.1
    assert abs(peak_frequency(y, 16000) - 440) < 3


def test_load_audio_bad_inputs(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(MediaError):
        load_audio(text)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(wav_bytes(np.zeros(0), 16000))
    with pytest.raises(MediaError, match="no audio samples"):
        load_audio(empty)
    silent_video = tmp_path / "video_only.mp4"
    write_clip(silent_video, 10, 25)
    with pytest.raises(MediaError, match="no audio stream"):
        load_audio(silent_video)


def test_streaming_resampler_chunks_match_whole():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(48000 * 2) * 0.1).astype(np.float32)
    whole = StreamingResampler(48000, 16000)
    ref = np.concatenate([whole.push(x), whole.flush()])
    chunked = StreamingResampler(48000, 16000)
    pieces, start = [], 0
    while start < len(x):
        n = int(rng.integers(1, 2000))
        pieces.append(chunked.push(x[start : start + n]))
        start += n
    pieces.append(chunked.flush())
    out = np.concatenate(pieces)
    assert len(out) == len(ref) and abs(len(out) - 32000) <= 2
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("in_rate", [48000, 44100, 8000])
def test_streaming_resampler_keeps_frequency_and_amplitude(in_rate):
    x = sine(440, in_rate, 1.0, amp=0.5)
    r = StreamingResampler(in_rate, 16000)
    y = np.concatenate([r.push(x[i : i + 480]) for i in range(0, len(x), 480)] + [r.flush()])
    assert abs(len(y) - 16000) <= 2
    assert abs(peak_frequency(y, 16000) - 440) < 1.5
    steady = y[1000:-1000]
    assert abs(np.sqrt(np.mean(steady**2)) - 0.5 / np.sqrt(2)) < 0.01


def test_streaming_resampler_int16_identity_and_reuse():
    pcm = float_to_pcm16(sine(300, 16000, 0.1))
    same = StreamingResampler(16000, 16000)
    np.testing.assert_array_equal(same.push(pcm), pcm16_to_float(pcm))
    assert same.flush().size == 0
    r = StreamingResampler(48000, 16000)
    first = np.concatenate([r.push(float_to_pcm16(sine(300, 48000, 0.5))), r.flush()])
    second = np.concatenate([r.push(float_to_pcm16(sine(300, 48000, 0.5))), r.flush()])
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_pcm16_conversions():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0, np.nan], dtype=np.float32)
    pcm = float_to_pcm16(x)
    assert pcm.dtype == np.int16
    assert pcm.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767, 0]
    back = pcm16_to_float(pcm.tobytes())
    np.testing.assert_allclose(back[:5], x[:5], atol=1e-4)
    np.testing.assert_array_equal(pcm16_to_float(pcm), back)
    with pytest.raises(MediaError, match="odd"):
        pcm16_to_float(b"\x00\x01\x02")


@pytest.mark.parametrize("kind", ["pcm16", "pcm24", "pcm32", "float32"])
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_read_wav_bytes_formats(kind, channels):
    tone = sine(440, 22050, 0.2, amp=0.5).astype(np.float64)
    data = np.stack([tone] * channels, axis=1)
    x, rate = read_wav_bytes(wav_bytes(data, 22050, kind=kind, extensible=channels > 2))
    assert rate == 22050 and x.dtype == np.float32 and x.shape == tone.shape
    np.testing.assert_allclose(x, tone, atol=1e-4)


def test_read_wav_bytes_bad_bodies():
    good = wav_bytes(sine(440, 16000, 0.1), 16000)
    with pytest.raises(MediaError, match="not a WAV"):
        read_wav_bytes(b"ID3 this is an mp3, not a wav")
    with pytest.raises(MediaError, match="truncated"):
        read_wav_bytes(good[:20])  # cut inside the fmt chunk
    with pytest.raises(MediaError, match="truncated"):
        read_wav_bytes(good[:-100])  # data shorter than its header says
    with pytest.raises(MediaError, match="zero audio samples"):
        read_wav_bytes(wav_bytes(np.zeros(0), 16000))
    with pytest.raises(MediaError, match="no 'data' chunk"):
        read_wav_bytes(good[:36])


# ---------------------------------------------------------------- video


@needs_media
def test_read_sample_video(user_frames):
    assert abs(len(user_frames) - 396) <= 1
    assert user_frames.shape[1:] == (512, 512, 3) and user_frames.dtype == np.uint8
    info = probe_video(MEDIA / "user.mp4")
    assert (info.width, info.height) == (512, 512)
    assert info.fps == pytest.approx(25.0)
    assert info.duration_s == pytest.approx(15.84, abs=0.05)
    assert abs(info.num_frames_estimate - 396) <= 1 and info.has_audio


def test_frame_rate_resampling_30fps(tmp_path):
    path = tmp_path / "30fps.mp4"
    write_clip(path, 60, 30)  # 2 s
    frames = read_video_frames(path, fps=25)
    assert len(frames) == 50
    levels = frames[:, 32, 32, 0].astype(int)
    assert np.all(np.diff(levels) >= 0)  # time only moves forward
    assert levels[0] < 25 and levels[-1] > 210  # first and last frames kept


def test_frame_rate_resampling_12_5fps_duplicates(tmp_path):
    path = tmp_path / "12fps.mp4"
    write_clip(path, 25, 12.5)  # 2 s
    frames = list(iter_video_frames(path, fps=25))
    assert len(frames) == 50
    levels = np.array([f[32, 32, 0] for f in frames]).astype(int)
    np.testing.assert_array_equal(levels[0::2], levels[1::2])  # each frame shown twice
    frames[0][:] = 0  # duplicates are separate arrays
    assert frames[1].max() > 0


def test_same_rate_is_one_to_one(tmp_path):
    path = tmp_path / "25fps.mp4"
    src = write_clip(path, 37, 25)
    frames = read_video_frames(path, fps=25)
    assert len(frames) == 37
    assert np.abs(frames[:, 32, 32, 0].astype(int) - src[:, 32, 32, 0]).max() <= 3


def test_video_bad_inputs(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        read_video_frames(tmp_path / "missing.mp4")
    with pytest.raises(MediaError, match="not found"):
        iter_video_frames(tmp_path / "missing.mp4")  # raises at the call, not at the first frame
    with pytest.raises(MediaError, match="cannot create"):
        Mp4Writer(tmp_path / "no_such_dir" / "out.mp4", width=64, height=64)
    text = tmp_path / "fake.mp4"
    text.write_text("hello " * 100)
    with pytest.raises(MediaError):
        probe_video(text)
    with pytest.raises(MediaError):
        read_video_frames(text)
    audio_only = tmp_path / "audio_only.mp4"
    write_audio_only_mp4(audio_only)
    with pytest.raises(MediaError, match="no video stream"):
        read_video_frames(audio_only)
    with pytest.raises(MediaError, match="no video stream"):
        probe_video(audio_only)
    # An mp4 drops an empty video track (-> "no video stream"); Matroska keeps it (-> "no video frames").
    empty_track = tmp_path / "empty_track.mp4"
    with Mp4Writer(empty_track, fps=25, width=64, height=64) as w:
        w.write_audio(sine(440, 16000, 0.5))
    with pytest.raises(MediaError, match="no video"):
        read_video_frames(empty_track)
    no_frames = tmp_path / "no_frames.mkv"
    with av.open(str(no_frames), "w") as c:
        v = c.add_stream("mpeg4", rate=25)
        v.width, v.height, v.pix_fmt = 64, 64, "yuv420p"
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        f = av.AudioFrame.from_ndarray(sine(440, 16000, 0.5)[None, :], format="fltp", layout="mono")
        f.sample_rate, f.pts = 16000, 0
        for p in list(a.encode(f)) + list(a.encode(None)) + list(v.encode(None)):
            c.mux(p)
    with pytest.raises(MediaError, match="no video frames"):
        read_video_frames(no_frames)


def test_mp4_writer_frames_rate_and_audio(tmp_path):
    path = tmp_path / "out.mp4"
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (53, 128, 160, 3), dtype=np.uint8)
    audio = sine(440, 16000, 2.12, amp=0.3)
    with Mp4Writer(path, fps=25, width=160, height=128, audio_rate=16000) as w:
        w.write_frames(frames[:20])
        w.write_audio(audio[:10000])
        w.write_frames(frames[20:])
        w.write_audio(audio[10000:])
        assert w.frames_written == 53
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert v.average_rate == 25
        assert v.codec_context.pix_fmt == "yuv420p"
        assert float(a.duration * a.time_base) == pytest.approx(2.12, abs=0.03)
        assert sum(1 for _ in c.decode(video=0)) == 53
    with av.open(str(path)) as c:
        order = "".join(p.stream.type[0] for p in c.demux() if p.size)
    # Interleaved: the audio does not all come after the video.
    assert order.index("a") < order.rindex("v")
    assert abs(len(load_audio(path)) / 16000 - 2.12) < 0.03
    with pytest.raises(ValueError):
        with Mp4Writer(tmp_path / "bad.mp4", width=64, height=64) as w:
            w.write_frames(np.zeros((1, 32, 32, 3), np.uint8))


def test_mp4_writer_video_only_and_unused_audio_track(tmp_path):
    for name, rate in (("video_only.mp4", None), ("no_audio_written.mp4", 16000)):
        path = tmp_path / name
        with Mp4Writer(path, fps=25, width=64, height=64, audio_rate=rate) as w:
            w.write_frames(numbered_frames(10))
        assert len(read_video_frames(path)) == 10
    with pytest.raises(ValueError, match="closed"):
        w.write_frames(numbered_frames(1))


# ---------------------------------------------------------------- image


@needs_media
def test_load_image_path_and_bytes():
    img = load_image(MEDIA / "rumi.jpg")
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(load_image((MEDIA / "rumi.jpg").read_bytes()), img)


def test_load_image_bad_inputs(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    fake = tmp_path / "fake.jpg"
    fake.write_text("not a picture")
    with pytest.raises(MediaError, match="not an image"):
        load_image(fake)
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")
    with pytest.raises(MediaError, match="not an image"):
        load_image(b"\xff\xd8\xff\xe0 broken jpeg")


def test_model_tensor_conversions():
    frames = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    t = to_model_input(frames)
    assert t.shape == (2, 3, 8, 6) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert to_model_input(frames[0]).shape == (1, 3, 8, 6)
    np.testing.assert_array_equal(to_uint8(t), frames)  # exact round trip
    out = to_uint8(torch.tensor([-5.0, -1.0, 0.0, 1.0, 7.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5))
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_resize_square_interpolation():
    import cv2

    big = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_square(big, 40), cv2.resize(big, (40, 40), interpolation=cv2.INTER_AREA))
    enlarged = cv2.resize(big, (160, 160), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(resize_square(big, 160), enlarged)
    assert resize_square(big, 100) is not big


# ---------------------------------------------------------------- faces


@needs_media
def test_detector_finds_portrait_face(detector):
    img = load_image(MEDIA / "rumi.jpg")
    boxes = detector.detect(img)
    assert boxes, "no face found in rumi.jpg"
    b = boxes[0]
    assert abs((b.x0 + b.x1) / 2 - 256) < 60 and abs((b.y0 + b.y1) / 2 - 256) < 60
    assert 120 < b.width < 400
    # Detection runs at height 360; boxes come back in original pixels.
    import cv2

    double = cv2.resize(img, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    b2 = detector.detect(double)[0]
    assert abs(b2.x0 - 2 * b.x0) < 12 and abs(b2.width - 2 * b.width) < 24


@needs_media
def test_baseline_cascade_still_works():
    baseline = FaceDetector(cascade=BASELINE_CASCADE)
    boxes = baseline.detect(load_image(MEDIA / "rumi.jpg"))
    assert boxes and abs((boxes[0].x0 + boxes[0].x1) / 2 - 256) < 60


@needs_media
def test_detector_finds_face_in_user_video(detector, user_frames):
    for i in (0, 130, 260, 390):  # 390: head tilted down
        boxes = detector.detect(user_frames[i])
        assert boxes, f"no face in frame {i}"
        b = boxes[0]
        assert abs((b.x0 + b.x1) / 2 - 256) < 100 and abs((b.y0 + b.y1) / 2 - 256) < 100


def test_detector_no_face_in_noise_and_missing_cascade(detector, tmp_path):
    assert detector.detect(noise()) == []
    with pytest.raises(UserError, match="cascade"):
        FaceDetector(cascade=tmp_path / "none.xml")


def test_square_crop_box_rule():
    # Face 100x80 centred at (250, 200) in 1000x800: half-side = 100/2 * 2 = 100.
    assert square_crop_box((200, 160, 300, 240, 1.0), 1000, 800) == (150, 100, 350, 300)
    assert square_crop_box((200, 160, 300, 240), 1000, 800, pad_ratio=0.5) == (175, 125, 325, 275)
    # Near the left edge: clamped, then squared around the same centre.
    x0, y0, x1, y1 = square_crop_box((10, 300, 110, 400), 1000, 800)
    assert (x0, x1 - x0, y1 - y0) == (0, 120, 120) and (y0 + y1) // 2 == 350


@needs_media
def test_crop_portrait(detector):
    img = load_image(MEDIA / "rumi.jpg")
    crop = crop_portrait(img, size=256, detector=detector)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    with pytest.raises(MediaError, match="no face found in the portrait"):
        crop_portrait(noise(), detector=detector)


def test_tracker_without_face_uses_centre_square(detector):
    counting = CountingDetector(detector)
    tracker = FaceTracker(detector=counting, size=64)
    frame = noise(size=200)
    wide = np.concatenate([frame, frame[:, :100]], axis=1)  # 300 wide, 200 high
    for _ in range(25):
        out = tracker.crop(wide)
    assert out.shape == (64, 64, 3)
    assert not tracker.face_seen
    assert tracker.crop_box == (50, 0, 250, 200)
    assert counting.calls == 3  # frames 0, 10, 20


def step(tracker: FaceTracker, img: np.ndarray) -> tuple[int, int, int, int]:
    """Crop one frame; return the crop box used."""
    tracker.crop(img)
    return tracker.crop_box


def test_tracker_schedule_hold_and_smoothing():
    face = Box(100, 100, 200, 200, 10.0)
    moved = Box(140, 100, 240, 200, 10.0)
    # Calls 1-2 see the face, call 3 sees it moved, then it is lost.
    script = {1: [face], 2: [face], 3: [moved]}
    counting = CountingDetector(boxes=lambda n: script.get(n, []))
    tracker = FaceTracker(detector=counting, size=32, redetect_every=50, lost_redetect_every=10, ema=0.25)
    img = np.zeros((480, 640, 3), np.uint8)
    boxes = [step(tracker, img) for _ in range(100)]
    assert counting.calls == 2  # frames 0 and 50 only
    assert tracker.face_seen and boxes[0] == (50, 50, 250, 250)
    assert len(set(boxes)) == 1
    for _ in range(3):
        tracker.crop(img)  # frames 100..102: detection 3 moves the face
    moving = [step(tracker, img)[0] for _ in range(30)]
    assert counting.calls == 3
    assert 50 < moving[0] < 90 and moving[-1] == 90  # eases over several frames, then settles
    assert all(b >= a for a, b in pairwise(moving))
    for _ in range(60):
        tracker.crop(img)  # the face is lost from call 4 on: redetect every 10 frames, hold the box
    assert not tracker.face_visible and tracker.face_seen
    assert tracker.crop_box == (90, 50, 290, 250)
    assert counting.calls == 8  # frame 150 (50 after 100), then every 10: 160, 170, 180, 190
    tracker.reset()
    assert not tracker.face_seen and tracker.crop_box is None


@needs_media
def test_tracker_is_stable_on_real_video(detector, user_frames):
    counting = CountingDetector(detector)
    tracker = FaceTracker(detector=counting, size=128, redetect_every=10)
    boxes = []
    for f in user_frames[:120]:
        assert tracker.crop(f).shape == (128, 128, 3)
        boxes.append(tracker.crop_box)
    boxes = np.array(boxes, dtype=float)
    assert tracker.face_seen and counting.calls == 12
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert np.all(np.abs(centres - 256) < 100)
    # Frame-to-frame movement of the crop stays small (smoothing, no jumps).
    assert np.abs(np.diff(boxes, axis=0)).max() <= 12
    assert boxes[:, 2].std() < 20


@needs_media
def test_crop_video_fixed(detector, user_frames):
    clip = user_frames[:60]
    out = crop_video_fixed(clip, size=128, detector=detector, detect_stride=6)
    assert out.shape == (60, 128, 128, 3) and out.dtype == np.uint8
    with pytest.raises(MediaError, match="no face found in any frame"):
        crop_video_fixed(np.stack([noise(i) for i in range(3)]), detector=detector)
