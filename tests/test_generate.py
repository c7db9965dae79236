"""`avatar-forcing generate`: real media in, an mp4 out; bad input gives one line and a non-zero exit."""

from __future__ import annotations

import math
import subprocess
import sys

import av
import cv2
import numpy as np
import pytest
from golden_data import MEDIA_DIR, model_folders
from media_files import write_audio_only_mp4, write_video, write_wav

from avatar_forcing.cli import main
from avatar_forcing.model.config import from_golden_dir
from avatar_forcing.model.media.audio import load_audio
from avatar_forcing.model.media.video import iter_video_frames

pytestmark = pytest.mark.skipif(not (MEDIA_DIR / "rumi.jpg").exists(), reason=f"needs the sample media in {MEDIA_DIR}")
GOLDEN = None  # the golden folder under test: every one in AVATAR_FORCING_GOLDEN in turn (set by `golden` below)


@pytest.fixture(scope="module", params=model_folders(), autouse=True)
def golden(request):
    global GOLDEN
    GOLDEN = request.param
    return GOLDEN


@pytest.fixture(scope="module")
def short_media(tmp_path_factory):
    """2.5 s of the sample speech at 44.1 kHz stereo, and 2 s of the user video re-encoded at 30 fps."""
    folder = tmp_path_factory.mktemp("media")
    speech = load_audio(MEDIA_DIR / "avatar.wav", 44100)[44100 * 3: int(44100 * 5.5)]
    write_wav(folder / "speech_44k.wav", np.stack([speech, speech], axis=1), 44100)
    frames = []
    for i, frame in enumerate(iter_video_frames(MEDIA_DIR / "user.mp4", fps=30)):
        if i >= 60:
            break
        frames.append(frame)
    write_video(folder / "user_30fps.mp4", np.stack(frames), 30)
    user_audio = load_audio(MEDIA_DIR / "user.mp4", 48000)[: 48000 * 2]
    write_wav(folder / "user_48k.wav", user_audio, 48000)
    return folder


def run_cli(args: list[str]) -> int:
    return main(["generate", "--config", str(GOLDEN), "--weights", str(GOLDEN / "small_weights.safetensors"),
                 "--no-progress", *args])


def read_output(path):
    with av.open(str(path)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        frames = sum(1 for _ in c.decode(video=0))
        audio_seconds = float(audio.duration * audio.time_base)
        return frames, video.average_rate, (video.width, video.height), audio.rate, audio_seconds


def test_generate_resamples_inputs_and_writes_video_with_audio(short_media, tmp_path):
    out = tmp_path / "avatar.mp4"
    code = run_cli(["--avatar-image", str(MEDIA_DIR / "rumi.jpg"),
                    "--avatar-audio", str(short_media / "speech_44k.wav"),
                    "--user-video", str(short_media / "user_30fps.mp4"),
                    "--user-audio", str(short_media / "user_48k.wav"), "-o", str(out)])
    assert code == 0
    frames, rate, size, audio_rate, audio_seconds = read_output(out)
    cfg = from_golden_dir(GOLDEN)
    # The clip is as long as the longer audio track: 2.5 s of speech at the model's frame rate.
    expected = math.ceil(2.5 * cfg.fps)
    assert frames == expected
    assert rate == cfg.fps
    assert size == (cfg.motion.input_size, cfg.motion.input_size)
    assert audio_rate == cfg.sampling_rate
    assert abs(audio_seconds - expected / cfg.fps) < 0.05


def test_generate_is_seedable(short_media, tmp_path):
    common = ["--avatar-image", str(MEDIA_DIR / "rumi.jpg"), "--avatar-audio", str(short_media / "speech_44k.wav"),
              "--user-video", str(short_media / "user_30fps.mp4")]

    def frames_of(name, seed):
        assert run_cli([*common, "--seed", str(seed), "-o", str(tmp_path / name)]) == 0
        return np.stack(list(iter_video_frames(tmp_path / name)))

    a, b, c = frames_of("a.mp4", 1), frames_of("b.mp4", 1), frames_of("c.mp4", 2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "not_an_image.jpg").write_text("hello")
    (folder / "garbage.wav").write_bytes(b"RIFF\x00\x00")
    write_wav(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "noise.png"), rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
    write_audio_only_mp4(folder / "audio_only.mp4")
    return folder


BAD_CASES = {
    "missing image": ({"--avatar-image": "missing.jpg"}, "does not exist"),
    "not an image": ({"--avatar-image": "not_an_image.jpg"}, "not an image"),
    "no face": ({"--avatar-image": "noise.png"}, "no face"),
    "missing audio": ({"--avatar-audio": "missing.wav"}, "does not exist"),
    "unreadable audio": ({"--avatar-audio": "garbage.wav"}, "audio"),
    "empty audio": ({"--avatar-audio": "empty.wav"}, "no audio"),
    "video without frames": ({"--user-video": "audio_only.mp4"}, "video"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_and_nonzero(case, bad_files, tmp_path, capsys):
    overrides, expected = BAD_CASES[case]
    args = {"--avatar-image": str(MEDIA_DIR / "rumi.jpg"), "--avatar-audio": str(MEDIA_DIR / "avatar.wav"),
            "--user-video": str(MEDIA_DIR / "user.mp4")}
    args.update({k: str(bad_files / v) for k, v in overrides.items()})
    code = run_cli([*[x for kv in args.items() for x in kv], "-o", str(tmp_path / "out.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("avatar-forcing generate: error:")
    assert expected in err[0].lower(), err[0]
    assert not (tmp_path / "out.mp4").exists()


def test_console_script_reports_without_traceback(bad_files, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "avatar_forcing.cli", "generate", "--config", str(GOLDEN),
         "--weights", str(GOLDEN / "small_weights.safetensors"), "--avatar-image", str(bad_files / "noise.png"),
         "--avatar-audio", str(MEDIA_DIR / "avatar.wav"), "--user-video", str(MEDIA_DIR / "user.mp4"),
         "-o", str(tmp_path / "o.mp4")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "no face" in proc.stderr
