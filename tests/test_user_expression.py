"""`user_expression` (model/user_expression.py, the built-in model's way to read the user's webcam): the face mesh's
landmarks, rotated back onto the user's resting shape, give the head pose and the expression; fitted maps turn
them into the rig's expression code and then into the motion latent the encoder gives a training face making it.

On a real person's face (a frame of ../shared/media/user.mp4, test-only) animated by the face rig, the reader
follows the jaw, the smile and the head, where the built-in motion encoder, which has seen one face, does not.
The live engine reads a webcam as the offline path does. `train user-expression` fits the maps; a model whose
maps were never set is refused with the command to run."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from golden_data import MEDIA_DIR
from test_training import FOLDER

from avatar_forcing.cli import main
from avatar_forcing.model.avatar_forcing import build_model
from avatar_forcing.model.config import MotionAutoencoderConfig, config_from_name, from_golden_dir
from avatar_forcing.model.engine import EngineSettings, StreamingEngine
from avatar_forcing.model.media.face import crop_portrait
from avatar_forcing.model.media.face_mesh import normalised
from avatar_forcing.model.media.image import load_image, to_model_input
from avatar_forcing.model.media.video import Mp4Writer, iter_video_frames
from avatar_forcing.model.offline import motion_latents
from avatar_forcing.model.training import rig_pairs
from avatar_forcing.model.training.conversations import augmented, packaged_portraits
from avatar_forcing.model.training.data import load_shards
from avatar_forcing.model.training.prepare import prepare_shards, read_manifest
from avatar_forcing.model.training.rig import FaceRig
from avatar_forcing.model.training.rig_pairs import expression_code, random_expression
from avatar_forcing.model.training.user_expression import r_squared
from avatar_forcing.model.user_expression import CODE_FIELDS, FEATURES, UserExpressionReader, landmark_features
from avatar_forcing.weights import builtin
from avatar_forcing.weights.loading import load_model


def test_the_code_is_the_rig_code():
    assert CODE_FIELDS == len(rig_pairs.CODE_FIELDS)


@pytest.mark.parametrize(("extensions", "expected"), [
    ({"user_expression": True}, "needs canonical_code"),
    ({"canonical_code": True, "relative_user_motion": True, "user_expression": True}, "turn one of them off"),
])
def test_the_option_needs_the_canonical_code_and_excludes_the_relative_motion(extensions, expected):
    with pytest.raises(ValueError, match=expected):
        MotionAutoencoderConfig(input_size=64, channels={r: 8 for r in (4, 8, 16, 32, 64)}, portrait_detail=True,
                                **extensions)


@pytest.mark.parametrize("pose", [(8.0, 0.0, 0.0), (0.0, -5.0, 0.0), (0.0, 0.0, 3.0)])
def test_a_turned_head_reads_as_its_pose_and_almost_no_expression(pose):
    """Pure geometry: a resting shape turned by a yaw, a pitch or a roll (the rig's rotations), scaled and moved
    gives that angle back. The expression part is zero for a roll and about 1 % of the shape for a turn out of
    the image plane (the eye distance the shape is scaled by is measured in the image, which a turn shortens)."""
    rng = np.random.default_rng(0)
    rest = rng.normal(size=(468, 3)) * [40, 50, 20] + [64, 64, 0]
    rest[33], rest[263] = [44, 50, 0], [84, 50, 0]  # the outer eye corners: what scales a shape
    y, p, r = (math.radians(a) for a in pose)
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    centre = rest.mean(0)
    turned = 1.3 * ((rest - centre) @ (rz @ rx @ ry).T) + centre + [10, -4, 0]
    features, upright = landmark_features(turned, normalised(rest))
    assert features.shape == (FEATURES,)
    np.testing.assert_allclose(features[-3:], pose, atol=1e-6)
    extent = np.abs(normalised(rest)).max()
    assert np.abs(features[:-3]).max() <= (1e-9 if pose[2] else 0.015 * extent)
    assert np.abs(upright - normalised(rest)).max() <= (1e-9 if pose[2] else 0.015 * extent)


def small_model(user_expression: bool = True):
    cfg = from_golden_dir(FOLDER)
    cfg = dataclasses.replace(cfg, motion=dataclasses.replace(cfg.motion, portrait_detail=True, canonical_code=True,
                                                              user_expression=user_expression))
    torch.manual_seed(0)
    return build_model(cfg, "cpu").eval()


@pytest.mark.skipif(FOLDER is None, reason="no golden folder with a small_config.json")
def test_maps_never_set_are_refused_with_the_command_that_sets_them():
    mae = small_model().motion_autoencoder
    mae.canonical.set_from(torch.ones(2, mae.config.style_dim), torch.ones(2, mae.config.style_dim))
    with pytest.raises(ValueError, match="train user-expression"):
        mae.user_reference(25)
    assert small_model(user_expression=False).motion_autoencoder.user_reference(25) is None


# -- the built-in model's maps, on a real person ------------------------------------------------------------------

needs_media = pytest.mark.skipif(not (MEDIA_DIR / "user.mp4").exists() or not builtin.available()
                                 or not packaged_portraits(),
                                 reason="needs the sample media, weights/builtin and matplotlib's sample portrait")


@pytest.fixture(scope="module")
def model():
    return load_model(config_from_name(builtin.NAME), builtin.NAME)


@pytest.fixture(scope="module")
def real_person(model) -> np.ndarray:
    """The first frame of the sample user video: a real person the model never saw, cropped as a webcam is."""
    return crop_portrait(next(iter(iter_video_frames(MEDIA_DIR / "user.mp4"))), model.config.motion.input_size)


def rendered(face: np.ndarray, count: int, seed: int):
    rig = FaceRig(face)
    rng = np.random.default_rng(seed)
    expressions = [random_expression(rng) for _ in range(count)]
    return expressions, [face] + [rig.render(e) for e in expressions]


@needs_media
@torch.no_grad()
def test_the_builtin_model_reads_a_real_persons_expressions(model, real_person):
    """80 random rig expressions on the real person's face, in one stream (the first frame is her at rest): the
    reader's code follows the rig's jaw, smile and head pose, and her latents match those the encoder gives a
    held-out look of the training face making the same expressions far better than the encoder's own latents
    of her frames do."""
    mae = model.motion_autoencoder
    expressions, frames = rendered(real_person, 80, seed=3)
    reader = mae.user_reference(model.config.fps)
    assert isinstance(reader, UserExpressionReader)
    reader.horizon = 10**9  # her rest stays the first frame: the expressions here are random, not a conversation
    features = torch.from_numpy(np.stack([reader.features(f) for f in frames])).float()
    codes = mae.user_expression.codes(features)[1:].numpy()
    truth = np.stack([expression_code(e) for e in expressions])
    for field in ("jaw", "smile", "yaw", "pitch", "roll"):
        k = rig_pairs.CODE_FIELDS.index(field)
        r = np.corrcoef(codes[:, k], truth[:, k])[0, 1]
        assert r >= (0.8 if field == "smile" else 0.85), f"{field}: r = {r:.2f}"

    grace = crop_portrait(load_image(packaged_portraits()["grace_hopper"]), model.config.motion.input_size)
    look = augmented(grace, 515151)  # a look the training never used
    target = mae.encode_motion(to_model_input(np.stack(rendered(look, 80, seed=3)[1])))
    target = (target[1:] - target[:1]).numpy()
    read = mae.user_expression.latents(torch.from_numpy(codes)).numpy()  # (relative to the rest, as `target` is)
    own = mae.encode_motion(to_model_input(np.stack(frames)))
    own = (own[1:] - own[:1]).numpy()
    print(f"R2 against the training face's latents: reader {r_squared(read, target):.2f}, "
          f"encoder {r_squared(own, target):.2f}")
    assert r_squared(read, target) >= 0.4
    assert r_squared(read, target) >= r_squared(own, target) + 0.3


@needs_media
@torch.no_grad()
def test_the_live_engine_reads_the_webcam_as_the_offline_path_does(model, real_person):
    """A live session fed the real person's rig-animated frames: every webcam latent the transformer gets is the
    one the offline path (`avatar-forcing generate`) makes of the same frame, and they move with her."""
    _, frames = rendered(real_person, 60, seed=5)
    offline = motion_latents(model, frames, len(frames))
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False, record_conditions=True))
    portrait = crop_portrait(load_image(packaged_portraits()["grace_hopper"]), model.config.motion.input_size)
    session = engine.open_session(portrait, seed=0, session_id="u", now=0.0)
    for j, frame in enumerate(frames):
        session.inputs.push_user_crop(frame, j / model.config.fps)
    rows = []
    for _ in range(4):
        rows += [out.conditions.motion_user[0] for out in engine.step(now=1e6)]
    seen = torch.cat(rows)
    seen = seen[seen.abs().sum(1) > 0]  # (the lead-in before the webcam: null motion, zeros)
    assert len(seen) >= 30
    nearest = torch.cdist(seen.float(), offline.float()).min(1).values
    assert nearest.max() < 1e-3 * offline.norm(dim=1).mean(), nearest.max()
    assert torch.unique(seen, dim=0).shape[0] >= 20  # (fresh readings, not one held latent)


@needs_media
def test_training_data_reads_the_user_as_the_server_does(tmp_path, model, real_person):
    """`data prepare` makes the user's side of a clip with the reader the server uses (so the transformer trains
    on the latents it is served), the avatar's side with the encoder."""
    _, frames = rendered(real_person, 59, seed=7)
    size = model.config.motion.input_size
    video = tmp_path / "user.mp4"
    with Mp4Writer(str(video), fps=model.config.fps, width=size, height=size) as writer:
        writer.write_frames(np.stack(frames))
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(json.dumps({"name": "c", "avatar_video": str(video), "user_video": str(video),
                                    "avatar_audio": str(MEDIA_DIR / "avatar.wav"),
                                    "user_audio": str(MEDIA_DIR / "avatar.wav")}))
    prepare_shards(model, read_manifest(manifest), tmp_path / "shards", whole_frames=True)
    (clip,) = load_shards(tmp_path / "shards")
    decoded = list(iter_video_frames(video))[:len(clip.user_motion)]  # (what the codec left of them)
    assert len(decoded) >= model.config.transformer.clip_frames
    torch.testing.assert_close(clip.user_motion, motion_latents(model, decoded, len(decoded)).float(),
                               atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        encoded = model.motion_autoencoder.encode_motion(to_model_input(np.stack(decoded)))
    torch.testing.assert_close(clip.motion, encoded, atol=1e-5, rtol=1e-5)
    assert (clip.user_motion - encoded).norm() > 0.5 * encoded.norm()  # (the two readings are far apart)


@needs_media
def test_train_user_expression_fits_the_maps_and_says_how_well(tmp_path, capsys, model):
    """The command on the built-in model with its maps cleared: it sets them again from rig renders of the
    training looks and prints the fit; a configuration without the option is refused with a message."""
    from avatar_forcing.weights.convert import save_safetensors

    state = {k: (torch.zeros_like(v) if ".user_expression." in k else v) for k, v in model.state_dict().items()}
    cleared = save_safetensors(state, tmp_path / "cleared.safetensors")
    out = tmp_path / "fitted.safetensors"
    code = main(["train", "user-expression", "--weights", str(cleared), "--config", builtin.NAME,
                 "--rig-looks", "2", "--renders", "30", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "user-expression maps set from" in printed.out and "R2" in printed.out
    fitted = load_model(config_from_name(builtin.NAME), str(out)).motion_autoencoder
    fitted.user_expression.require_set()
    smile = rig_pairs.CODE_FIELDS.index("smile")
    shipped = model.motion_autoencoder.user_expression.directions[smile]
    cosine = torch.nn.functional.cosine_similarity(fitted.user_expression.directions[smile], shipped, dim=0)
    assert cosine > 0.8, cosine  # a small fit finds the smile's direction the shipped one has

    code = main(["train", "user-expression", "--weights", str(cleared), "--config", "official",
                 "--rig-looks", "2", "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "no user_expression extension" in capsys.readouterr().err
