"""`avatar-forcing data prepare`: a tiny manifest built here from ../shared/media -> shards the transformer trainer
reads; resume; clear errors for a clip without a face or without audio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from golden_data import MEDIA_DIR
from test_training import FOLDER, quick

from avatar_forcing.model.avatar_forcing import build_model
from avatar_forcing.model.config import from_golden_dir
from avatar_forcing.model.media.image import resize_square, to_model_input
from avatar_forcing.model.media.video import Mp4Writer, iter_video_frames
from avatar_forcing.model.training.data import load_shards
from avatar_forcing.model.training.prepare import ClipError, prepare_shards, read_manifest
from avatar_forcing.model.training.transformer import transformer_trainer

USER_VIDEO, AVATAR_WAV = MEDIA_DIR / "user.mp4", MEDIA_DIR / "avatar.wav"
pytestmark = [pytest.mark.skipif(FOLDER is None, reason="needs a golden folder for the small configuration"),
              pytest.mark.skipif(not USER_VIDEO.exists(), reason="needs ../shared/media")]
SECONDS = 2.4  # 60 frames: one training window and a bit


def faceless_video(path, frames=70):
    rng = np.random.default_rng(0)
    with Mp4Writer(str(path), fps=25, width=64, height=64) as w:
        w.write_frames(rng.integers(0, 255, (frames, 64, 64, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(from_golden_dir(FOLDER)).eval()


def write_manifest(tmp_path, rows):
    path = tmp_path / "clips.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return read_manifest(path)


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        write_manifest(tmp_path, [{"name": "a", "avatar_video": "x.mp4"}])
    with pytest.raises(ValueError, match="unknown keys"):
        write_manifest(tmp_path, [{"name": "a", "avatar_video": "x", "user_video": "y", "avatar_wav": "z"}])
    with pytest.raises(ValueError, match="used twice"):
        write_manifest(tmp_path, [{"name": "a", "avatar_video": "x", "user_video": "y"}] * 2)


def test_prepare_writes_shards_the_trainer_reads_and_resumes(tmp_path, model):
    # avatar side: the sample video with its own audio; user side: the same video heard with avatar.wav
    clips = write_manifest(tmp_path, [
        {"name": "one", "avatar_video": str(USER_VIDEO), "user_video": str(USER_VIDEO), "user_audio": str(AVATAR_WAV)},
    ])
    cfg = model.config
    frames = int(SECONDS * cfg.fps)
    writer = prepare_shards(model, clips, tmp_path / "shards", max_frames=frames)
    assert list(writer.entries) == ["one"]
    (clip,) = load_shards(tmp_path / "shards")
    features = cfg.audio.projection_in_features()
    clip.check(cfg.transformer.dim_w, features)  # shapes from the configuration
    assert clip.num_frames == frames
    # Same video on both sides, same crop: identical motion latents; different audio tracks.
    torch.testing.assert_close(clip.motion, clip.user_motion)
    assert not torch.allclose(clip.audio, clip.user_audio)
    assert clip.motion.std(0).mean() > 0  # the face moves
    # The reference code is the first frame's r_s, i.e. its motion latent.
    torch.testing.assert_close(clip.r_s, clip.motion[0], atol=1e-5, rtol=1e-5)
    # The transformer trainer reads these shards.
    run = transformer_trainer(model, [clip], quick(1, micro_batch=1), tmp_path / "run")
    assert run.run()[-1]["loss"] > 0
    # Resume: a rerun with one more clip only prepares the new one.
    more = clips + write_manifest(tmp_path, [{"name": "two", "avatar_video": str(USER_VIDEO),
                                              "user_video": str(USER_VIDEO)}])
    seen = []
    writer = prepare_shards(model, more, tmp_path / "shards", max_frames=frames, progress=seen.append)
    assert seen == ["one", "two"] and sorted(writer.entries) == ["one", "two"]
    assert writer.entries["one"]["shard"] != writer.entries["two"]["shard"]  # the first shard was kept
    assert [c.name for c in load_shards(tmp_path / "shards")] == ["one", "two"]


def test_clips_without_face_or_audio_fail_clearly_or_are_skipped(tmp_path, model):
    silent_faceless = faceless_video(tmp_path / "noise.mp4")
    no_face = {"name": "noface", "avatar_video": str(silent_faceless), "avatar_audio": str(AVATAR_WAV),
               "user_video": str(USER_VIDEO)}
    no_audio = {"name": "noaudio", "avatar_video": str(USER_VIDEO), "user_video": str(silent_faceless)}
    missing = {"name": "missing", "avatar_video": str(tmp_path / "nope.mp4"), "user_video": str(USER_VIDEO)}
    for row, message in ((no_face, "noface: avatar video .*no face"), (no_audio, "noaudio: no user audio"),
                         (missing, "missing: avatar video .*no such file")):
        with pytest.raises(ClipError, match=message):
            prepare_shards(model, write_manifest(tmp_path, [row]), tmp_path / row["name"], max_frames=60)
    writer = prepare_shards(model, write_manifest(tmp_path, [no_face, no_audio]), tmp_path / "skip",
                            skip_bad=True, max_frames=60)
    assert writer.entries == {} and set(writer.rejected) == {"noface", "noaudio"}
    index = json.loads((tmp_path / "skip" / "index.json").read_text())
    assert "no face" in index["rejected"]["noface"]


def test_whole_frames_skip_detection_and_encode_every_frame_as_it_is(tmp_path, model):
    # Noise has no face: with detection it is rejected (above); as videos that are crops already it is encoded whole.
    video = faceless_video(tmp_path / "crops.mp4")
    clips = write_manifest(tmp_path, [{"name": "crops", "avatar_video": str(video), "avatar_audio": str(AVATAR_WAV),
                                       "user_video": str(video), "user_audio": str(AVATAR_WAV)}])
    writer = prepare_shards(model, clips, tmp_path / "shards", max_frames=60, whole_frames=True)
    assert list(writer.entries) == ["crops"]
    (clip,) = load_shards(tmp_path / "shards")
    size = model.config.motion.input_size
    frames = np.stack([resize_square(f, size) for f, _ in zip(iter_video_frames(video), range(60), strict=False)])
    with torch.inference_mode():
        expected = model.motion_autoencoder.encode_motion(to_model_input(frames))
    torch.testing.assert_close(clip.motion, expected, atol=1e-5, rtol=1e-5)
