"""The AI-generated watermark, its detector, the visible label, C2PA signing and the `provenance` command.

The WebRTC round trip through the real server is in test_provenance_rtc.py.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from golden_data import MEDIA_DIR, golden_folders, small_model

from avatar_forcing.cli import main
from avatar_forcing.errors import UserError
from avatar_forcing.model.media.image import load_image, resize_square
from avatar_forcing.model.media.video import Mp4Writer, read_video_frames
from avatar_forcing.provenance.check import check_frames, check_source
from avatar_forcing.provenance.disclosure import watermark_payload
from avatar_forcing.provenance.marker import FrameMarker, label_alpha
from avatar_forcing.provenance.transcode import rescale, transcode
from avatar_forcing.provenance.watermark import (
    TARGET_FPR,
    Detector,
    Payload,
    crc8,
    detect_frames,
    grid_for,
    session_hash,
)
from avatar_forcing.server.config import ServerSettings

FOLDER = next((f for f in golden_folders() if (f / "small_config.json").exists()), None)
needs_media = pytest.mark.skipif(not (MEDIA_DIR / "user.mp4").exists(), reason=f"needs the sample media in {MEDIA_DIR}")
needs_golden = pytest.mark.skipif(FOLDER is None, reason="needs a golden folder for the small configuration")
DEPLOYMENT = 4242


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


def mark(frames: np.ndarray, session_id: str, marker: FrameMarker | None = None) -> np.ndarray:
    marker = marker or FrameMarker(DEPLOYMENT)
    return marker([session_id], torch.from_numpy(frames)[None])[0].numpy()


def windows(frames: np.ndarray, fps: int = 25) -> list:
    return check_frames(iter(frames), fps).windows


@pytest.fixture(scope="module")
def talking_head() -> np.ndarray:
    """4 s of a real talking head (the reference release's output), 512 x 512: what the official model makes."""
    path = MEDIA_DIR / "official_output.mp4"
    if not path.exists():
        pytest.skip(f"needs {path}")
    return read_video_frames(path)[:100]


@pytest.fixture(scope="module")
def model_frames():
    """The small model's frames for two sessions, unmarked and marked by the engine's frame_marker hook."""
    if FOLDER is None or not (MEDIA_DIR / "rumi.jpg").exists():
        pytest.skip("needs the golden small configuration and the sample media")
    from avatar_forcing.model.engine import EngineSettings, StreamingEngine

    model = small_model(FOLDER)
    size = model.config.motion.input_size
    face = resize_square(load_image(MEDIA_DIR / "rumi.jpg"), size)
    marker = FrameMarker(DEPLOYMENT)

    def run(frame_marker):
        engine = StreamingEngine(model, EngineSettings(max_sessions=2, frame_marker=frame_marker))
        frames: dict[str, list[np.ndarray]] = {"alice": [], "bob": []}
        for seed, sid in enumerate(frames):
            session = engine.open_session(face, seed=seed, session_id=sid, now=0.0)
            session.inputs.push_speech(np.zeros(16000 * 5, np.float32))
            session.inputs.push_user_audio(np.zeros(16000 * 5, np.float32), 0.0)
        while sum(map(len, frames["alice"])) < 60:  # the priming block (50 frames) and one more
            for out in engine.step(now=1e6):
                frames[out.session_id].append(out.frames)
        return {sid: np.concatenate(f)[:60] for sid, f in frames.items()}

    return run(None), run(marker)


# -- the payload -----------------------------------------------------------------------------------------


def test_payload_round_trips_and_its_crc_catches_a_flipped_bit():
    p = Payload(DEPLOYMENT, session_hash("s-123"))
    bits = p.coded_bits()
    assert len(bits) == 56
    assert Payload.from_coded_bits(bits) == (p, True)
    bits[5] ^= 1
    assert Payload.from_coded_bits(bits)[1] is False
    assert crc8(np.zeros(48, np.uint8)) == 0 and crc8(np.ones(8, np.uint8)) != 0
    with pytest.raises(ValueError, match="deployment id"):
        Payload(70000, 0)


def test_the_grid_follows_the_frame_size():
    assert grid_for(512, 512) == 128 and grid_for(128, 128) == 64 and grid_for(100, 160) == 32
    with pytest.raises(ValueError, match="too small"):
        grid_for(40, 40)


# -- embedding and detection on real pictures ------------------------------------------------------------


def test_marked_talking_head_keeps_psnr_above_40_db_and_is_found_with_its_payload(talking_head):
    for size in (512, 128):
        frames = rescale(talking_head, size / talking_head.shape[1])
        marked = mark(frames, "session-a")
        assert psnr(marked, frames) >= 40.0, size
        found = detect_frames(marked[:50])
        assert found.present and found.false_positive_rate < 1e-12, (size, found)
        assert found.payload == Payload(DEPLOYMENT, session_hash("session-a")) and found.payload_valid
        assert not detect_frames(frames[:50]).present


def test_mark_survives_halving_and_low_bitrate_reencoding(talking_head):
    """Every 2-second window is found after a recording is halved and re-encoded at low quality."""
    marked = mark(talking_head, "session-b")
    expected = Payload(DEPLOYMENT, session_hash("session-b"))
    for codec, bitrate in (("vp8", 150_000), ("h264", 150_000)):
        received = transcode(rescale(marked, 0.5), codec, bitrate)
        assert received.shape[1:3] == (256, 256)
        found = windows(received)
        assert len(found) == 2 and all(w.present for w in found), (codec, [w.z for w in found])
        total = check_frames(iter(received), 25).total
        assert total.payload == expected and total.payload_valid, codec
    # The small model's size, over WebRTC-like VP8 and then halved by a recorder.
    small = mark(rescale(talking_head, 0.25), "session-b")
    received = rescale(transcode(small, "vp8", 300_000), 0.5)
    assert all(w.present for w in windows(received))


@needs_media
def test_no_mark_in_real_camera_video_and_the_false_positive_rate_is_bounded():
    result = check_source(str(MEDIA_DIR / "user.mp4"))
    assert len(result.windows) == 7
    assert not any(w.present for w in result.windows)
    assert not result.total.present
    # On unmarked video the statistic is a sum of random signs: |z| stays small, its bound near 1.
    assert all(abs(w.z) < 4 for w in result.windows), [w.z for w in result.windows]
    assert all(w.false_positive_rate > TARGET_FPR for w in result.windows)


def test_statistic_on_unmarked_video_is_a_standard_score(talking_head):
    """Under other keys (i.e. unmarked for that key) the pilot z of one frame has mean ~0 and spread ~1:
    the false-positive bound exp(-z^2/2) rests on that."""
    frames = rescale(talking_head[:1], 0.25)
    zs = []
    for k in range(60):
        detector = Detector(key=f"unrelated-key-{k}")
        detector.add(frames)
        zs.append(detector.total().z)
    # max over grids of z is taken, so the mean sits a little above 0
    assert -0.5 < np.mean(zs) < 1.5 and np.std(zs) < 1.5 and max(zs) < 5, (np.mean(zs), np.std(zs))


@pytest.mark.slow
def test_engine_hook_marks_each_session_with_its_own_payload(model_frames):
    plain, marked = model_frames
    for sid in ("alice", "bob"):
        assert marked[sid].shape == plain[sid].shape == (60, 128, 128, 3)
        assert psnr(marked[sid], plain[sid]) >= 40.0
        assert not any(w.present for w in windows(plain[sid])), sid
        found = windows(marked[sid])
        assert all(w.present for w in found), (sid, [w.z for w in found])
        total = check_frames(iter(marked[sid]), 25).total
        assert total.payload == Payload(DEPLOYMENT, session_hash(sid)) and total.payload_valid, sid


def test_marker_rejects_frames_of_the_wrong_shape_and_logs_when_off(caplog):
    marker = FrameMarker(1)
    with pytest.raises(ValueError, match="uint8 frames"):
        marker(["a"], torch.zeros(1, 2, 64, 64, 3))
    with pytest.raises(ValueError, match="2 session ids for 1 rows"):
        marker(["a", "b"], torch.zeros(1, 2, 64, 64, 3, dtype=torch.uint8))
    with caplog.at_level(logging.WARNING):
        off = FrameMarker(1, watermark=False)
    assert "watermark is OFF" in caplog.text
    frames = torch.full((1, 2, 64, 64, 3), 100, dtype=torch.uint8)
    assert torch.equal(off(["a"], frames), frames)


def test_visible_label_is_burned_in_a_corner_and_the_mark_still_reads(talking_head):
    frames = rescale(talking_head[:50], 0.25)
    labelled = mark(frames, "s", FrameMarker(DEPLOYMENT, visible_label=True))
    alpha = label_alpha(128, 128)
    assert alpha[-20:, :64].max() == 1.0 and alpha[:64].max() == 0.0  # bottom-left only
    text = alpha >= 1
    assert (labelled[:, text] > 240).all()  # white text
    assert detect_frames(labelled).present


# -- settings and disclosure -----------------------------------------------------------------------------


def test_server_settings_and_the_disclosed_payload_match_the_watermark():
    settings = ServerSettings.from_env({"AVATAR_FORCING_DEPLOYMENT_ID": "77", "AVATAR_FORCING_VISIBLE_LABEL": "1"})
    assert settings.deployment_id == 77 and settings.visible_label and settings.watermark
    assert watermark_payload(settings, "abc") == Payload(77, session_hash("abc")).to_json()
    assert watermark_payload(ServerSettings.from_env({"AVATAR_FORCING_WATERMARK": "off"}), "abc") is None
    with pytest.raises(UserError, match="0-65535"):
        ServerSettings.from_env({"AVATAR_FORCING_DEPLOYMENT_ID": "70000"})


# -- C2PA and the command --------------------------------------------------------------------------------


def write_mp4(path, frames: np.ndarray) -> None:
    with Mp4Writer(path, width=frames.shape[2], height=frames.shape[1], audio_rate=16000) as w:
        w.write_frames(frames)
        w.write_audio(np.zeros(640 * len(frames), np.float32))


@pytest.fixture(scope="module")
def signed_mp4(tmp_path_factory, talking_head):
    pytest.importorskip("c2pa")
    import argparse

    from avatar_forcing.provenance.offline import OfflineProvenance

    tmp = tmp_path_factory.mktemp("c2pa")
    args = argparse.Namespace(deployment_id=DEPLOYMENT, no_watermark=False, visible_label=False, no_c2pa=False,
                              c2pa_cert=None, c2pa_key=None, seed=7)
    import avatar_forcing.provenance.credentials as credentials

    folder = tmp / "credentials"
    original = credentials.default_folder
    credentials.default_folder = lambda: folder  # not the user's home
    try:
        provenance = OfflineProvenance(args, "small")
    finally:
        credentials.default_folder = original
    path = tmp / "generated.mp4"
    frames = torch.from_numpy(np.ascontiguousarray(rescale(talking_head, 0.25)))[None]
    write_mp4(path, provenance.marker([provenance.run_id], frames)[0].numpy())
    provenance.sign(path)
    return path, folder / "ca.pem", provenance


def test_generated_mp4_carries_a_c2pa_manifest_that_validates(signed_mp4):
    from avatar_forcing.provenance.manifest import read_manifest

    path, ca, provenance = signed_mp4
    info = read_manifest(path, ca.read_bytes())
    assert info["validation_state"] == "Trusted" and info["failures"] == [], info
    assert info["ai_generated"] and info["software_agent"]["name"] == "avatar-forcing/small"
    assert info["watermark"]["run_id"] == provenance.run_id
    assert read_manifest(path)["validation_state"] == "Valid"  # intact, signer not in any trust list
    tampered = path.with_name("tampered.mp4")
    data = bytearray(path.read_bytes())
    data[-3000] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert read_manifest(tampered, ca.read_bytes())["validation_state"] == "Invalid"


def test_check_command_reports_mark_payload_and_manifest(signed_mp4, capsys):
    path, ca, provenance = signed_mp4
    assert main(["provenance", "check", str(path), "--trust", str(ca), "--json",
                 "--session-id", provenance.run_id]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["watermark"]["present"] and report["watermark"]["payload_valid"]
    assert report["watermark"]["payload"]["deployment_id"] == DEPLOYMENT
    assert report["session_matches"] is True
    assert report["windows_marked"] == report["windows"] == 2
    assert report["c2pa"]["validation_state"] == "Trusted"


@needs_media
def test_check_command_on_unmarked_and_bad_input(tmp_path, capsys):
    assert main(["provenance", "check", str(MEDIA_DIR / "user.mp4")]) == 1
    out = capsys.readouterr().out
    assert "watermark not found" in out and "windows marked: 0 of 7" in out
    assert main(["provenance", "check", str(tmp_path / "missing.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    assert main(["provenance", "check", str(tmp_path / "junk.mp4")]) == 2
    assert "cannot open" in capsys.readouterr().err
