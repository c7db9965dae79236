"""Conversations made here for the built-in model (model/training/conversations.py), rendered with the face rig
on matplotlib's public-domain Grace Hopper sample: measured on the frames with the face mesh, the avatar's
mouth follows its own speech, its head moves more while the user speaks than in mutual silence, and it
smiles back after the user smiles. These are the built-in model's targets: its training data must meet them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from avatar_forcing.model.media.face import crop_portrait
from avatar_forcing.model.media.face_mesh import FaceMesh, normalised
from avatar_forcing.model.media.image import load_image
from avatar_forcing.model.training.conversations import EXPRESSION_FIELDS, FPS, envelope, make_conversation, render
from avatar_forcing.model.training.landmarks import face_parameters, head_motion_energy, mouth_opening, smile
from avatar_forcing.model.training.metrics import lip_sync
from avatar_forcing.model.training.rig import FaceRig

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs the Debian package espeak-ng")
SECONDS, SEED = 30, 3


@pytest.fixture(scope="module")
def measured():
    import matplotlib

    portrait = crop_portrait(load_image(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"), 256)
    conversation = make_conversation(SECONDS, seed=SEED)
    frames = render(FaceRig(portrait), conversation.expressions("avatar"))
    points = FaceMesh().video(frames)
    assert not np.isnan(points).any(), "a face in every rendered frame"
    reference = normalised(points[0])
    pose = np.array([face_parameters(p[None], reference).pose[0] for p in points])
    return conversation, frames, points, pose


def test_the_same_seed_makes_the_same_conversation():
    a, b = make_conversation(8, seed=11), make_conversation(8, seed=11)
    np.testing.assert_array_equal(a.avatar.pcm, b.avatar.pcm)
    np.testing.assert_array_equal(a.avatar.expression, b.avatar.expression)
    assert not np.array_equal(a.avatar.expression, make_conversation(8, seed=12).avatar.expression)


def test_both_sides_take_turns(measured):
    conversation, frames, _, _ = measured
    assert frames.shape == (SECONDS * FPS, 256, 256, 3)
    avatar, user = conversation.avatar.speaking, conversation.user.speaking
    assert 0.2 < avatar.mean() < 0.7 and 0.2 < user.mean() < 0.7, (avatar.mean(), user.mean())
    assert (avatar & user).mean() < 0.05, "turns, not talking over each other"
    assert (~avatar & ~user).mean() > 0.1, "pauses between turns"


def test_the_avatars_mouth_follows_its_speech(measured):
    """The issue's lip-sync target for the model (r >= 0.6 at the best lag, within +-80 ms), on its data."""
    conversation, _, points, _ = measured
    r, lag = lip_sync(mouth_opening(points), envelope(conversation.avatar.pcm, conversation.frames))
    assert r >= 0.6 and abs(lag) <= 2, (r, lag)


def test_the_avatar_moves_its_head_more_while_the_user_speaks(measured):
    """The issue's listening target: head-motion energy while the user speaks >= 2x that in mutual silence."""
    conversation, _, _, pose = measured
    user_speaks = conversation.user.speaking & ~conversation.avatar.speaking
    silence = ~conversation.user.speaking & ~conversation.avatar.speaking
    listening, quiet = head_motion_energy(pose, user_speaks), head_motion_energy(pose, silence)
    assert listening >= 2 * quiet, (listening, quiet)


def test_every_conversation_listens_visibly_in_its_script():
    """The same target on the scripted head pose of many conversations (no rendering): nods that sat on an
    offset (a head held down while listening) leaked into the neighbouring silences through the measure's
    slow-drift removal, and one conversation in eight fell to 1.4x."""
    pose_columns = [EXPRESSION_FIELDS.index(name) for name in ("yaw", "pitch", "roll")]
    for seed in range(8):
        conversation = make_conversation(20, seed=90_000 + seed)
        avatar, user = conversation.avatar.speaking, conversation.user.speaking
        pose = conversation.avatar.expression[:, pose_columns]
        listening, quiet = head_motion_energy(pose, user & ~avatar), head_motion_energy(pose, ~user & ~avatar)
        assert listening >= 3 * quiet, (seed, listening, quiet)


def test_the_avatar_smiles_back(measured):
    """After most of the user's smiles (onsets in the script), the avatar's measured smile rises within 1 s."""
    conversation, _, points, _ = measured
    user_smile = conversation.user.expression[:, EXPRESSION_FIELDS.index("smile")]
    onsets = np.flatnonzero((user_smile[1:] >= 0.3) & (user_smile[:-1] < 0.3)) + 1
    onsets = onsets[(onsets > FPS // 2) & (onsets < len(user_smile) - FPS)]
    assert len(onsets) >= 3, "the user smiles a few times in 30 s"
    width = smile(points)
    rises = [width[o + FPS // 4:o + FPS].mean() > width[o - FPS // 2:o].mean() + 0.01 for o in onsets]
    assert np.mean(rises) >= 0.6, rises


def test_the_command_writes_clips_that_data_prepare_reads(tmp_path):
    from avatar_forcing.cli import main
    from avatar_forcing.model.media.audio import load_audio
    from avatar_forcing.model.media.video import read_video_frames
    from avatar_forcing.model.training.prepare import read_manifest

    out = tmp_path / "convs"
    assert main(["data", "conversations", "--out", str(out), "--count", "1", "--seconds", "6", "--size", "128"]) == 0
    clips = read_manifest(out / "manifest.jsonl")
    assert [c.name for c in clips] == ["conv000-0000"]
    avatar, user = read_video_frames(clips[0].avatar_video), read_video_frames(clips[0].user_video)
    assert avatar.shape == user.shape == (6 * FPS, 128, 128, 3)
    assert np.abs(avatar.astype(int) - user).mean() > 5, "two different looks"
    speech = load_audio(clips[0].avatar_video, 16000)
    assert abs(len(speech) / 16000 - 6) < 0.1 and np.abs(speech).max() > 0.05
    assert main(["data", "conversations", "--out", str(out), "--portrait", str(tmp_path / "none.jpg")]) == 2
