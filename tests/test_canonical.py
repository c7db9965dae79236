"""`canonical_code` (a motion auto-encoder option the built-in model uses, model/canonical.py): every portrait is
animated in the training faces' mean code, so the transformer gets the same reference motion whoever the portrait
shows and the decoder gets the code it was trained on, while the portrait's own feature maps and detail give its
face back; the user's webcam codes reach the transformer relative to the user's own running mean. A model whose
code was never set is refused; `train canonical-code` sets it; rescaling the latents keeps the animated frames."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from golden_data import MEDIA_DIR
from test_training import FOLDER

from avatar_forcing.cli import main
from avatar_forcing.model.avatar_forcing import build_model
from avatar_forcing.model.canonical import UserReference
from avatar_forcing.model.config import config_from_name, from_config_file, from_golden_dir
from avatar_forcing.model.engine import EngineSettings, StreamingEngine
from avatar_forcing.model.training.autoencoder import scale_motion_latents

pytestmark = pytest.mark.skipif(FOLDER is None, reason="no golden folder with a small_config.json")


def small_config(canonical: bool = True, relative_user: bool = True):
    cfg = from_golden_dir(FOLDER)
    return dataclasses.replace(cfg, motion=dataclasses.replace(cfg.motion, portrait_detail=True,
                                                               canonical_code=canonical,
                                                               relative_user_motion=canonical and relative_user))


def small_model(canonical: bool = True, seed: int = 0, relative_user: bool = True):
    torch.manual_seed(seed)
    return build_model(small_config(canonical, relative_user), "cpu").eval()


def images(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def set_from_training_faces(mae, seed: int = 5) -> None:
    """The canonical code of a few 'training faces': random weights read every noise image as nearly the same
    code, so theirs are moved away from it by a fixed offset (as an unseen face's code is far from the
    training faces')."""
    faces = images(3, mae.config.input_size, seed)
    codes = [mae.encode_portrait(face[None]) for face in faces]
    offset = torch.linspace(-1, 1, mae.config.style_dim)
    mae.canonical.set_from(torch.cat([c.s_r for c in codes]) + offset, torch.cat([c.r_s for c in codes]) - offset)


@torch.no_grad()
def test_every_portrait_is_animated_in_the_canonical_code_and_its_first_frame_is_itself():
    mae = small_model().motion_autoencoder
    set_from_training_faces(mae)
    size = mae.config.input_size
    a, b = images(2, size, 11)
    code_a, code_b = mae.animation_code(a[None]), mae.animation_code(b[None])
    for code in (code_a, code_b):  # the same reference motion and style for both faces ...
        assert torch.equal(code.r_s, mae.canonical.motion) and torch.equal(code.s_r, mae.canonical.appearance)
    own_a = mae.encode_portrait(a[None])
    assert (own_a.r_s - mae.canonical.motion).norm() > 0.5 * own_a.r_s.norm()  # (not its own code)
    # ... yet the canonical motion draws each portrait itself, and other motion moves it.
    assert torch.allclose(mae.decode_frames(code_a, code_a.r_s), a[None], atol=1e-4)
    assert torch.allclose(mae.decode_frames(code_b, code_b.r_s), b[None], atol=1e-4)
    moved = mae.decode_frames(code_a, code_a.r_s + 0.5 * mae.dec.direction.basis()[:, 0][None])
    assert (moved - a[None]).abs().mean() > 1e-3


@torch.no_grad()
def test_without_the_option_a_portrait_is_animated_in_its_own_code():
    mae = small_model(canonical=False).motion_autoencoder
    assert mae.canonical is None and mae.user_reference(25) is None
    face = images(1, mae.config.input_size, 3)
    own, animated = mae.encode_portrait(face), mae.animation_code(face)
    assert torch.equal(own.r_s, animated.r_s) and torch.equal(own.s_r, animated.s_r)


def test_a_code_never_set_is_refused_before_anything_is_served():
    model = small_model()
    face = images(1, model.config.motion.input_size, 3)
    with pytest.raises(ValueError, match="train canonical-code"):
        model.motion_autoencoder.animation_code(face)
    with pytest.raises(ValueError, match="train canonical-code"):
        StreamingEngine(model, EngineSettings(max_sessions=1))
    # A latents-only engine (DPO's rollouts from training shards) decodes nothing and needs no code.
    StreamingEngine(model, EngineSettings(max_sessions=1, decode=False))


def test_the_option_is_read_from_a_configuration_file_and_needs_the_portrait_detail(tmp_path):
    builtin = config_from_name("builtin").motion
    assert builtin.canonical_code and not builtin.relative_user_motion  # (measured: docs/training.md §6)
    raw = json.loads((FOLDER / "small_config.json").read_text())
    for extensions, expected in (({"portrait_detail": True, "canonical_code": True}, None),
                                 ({"canonical_code": True}, "needs portrait_detail"),
                                 ({"portrait_detail": True, "canonical_code": "true"}, "must be JSON"),
                                 ({"portrait_detail": True, "relative_user_motion": True}, "needs canonical_code")):
        path = tmp_path / "small_config.json"
        path.write_text(json.dumps({**raw, "extensions": extensions}))
        if expected is None:
            assert from_config_file(path).motion.canonical_code
        else:
            with pytest.raises(ValueError, match=expected):
                from_config_file(path)


def test_the_user_reference_keeps_what_the_user_does_and_drops_who_they_are():
    rng = np.random.default_rng(0)
    canonical = torch.tensor(rng.standard_normal(8), dtype=torch.float32)
    motion = torch.tensor(rng.standard_normal((60, 8)), dtype=torch.float32)  # what a user does
    faces = [torch.tensor(rng.standard_normal(8) * 10, dtype=torch.float32) for _ in range(2)]  # who they are
    seen = [UserReference(canonical, horizon=100).relative(face + motion) for face in faces]
    assert torch.allclose(seen[0], seen[1], atol=1e-4)  # two people doing the same thing look the same
    assert torch.allclose(seen[0][0], canonical)  # the first frame is the rest
    expected = motion - torch.cumsum(motion, 0) / torch.arange(1, 61)[:, None] + canonical
    assert torch.allclose(seen[0], expected, atol=1e-4)  # relative to the mean so far
    # Frames are taken in calls of any size with the same result (the live engine's come a few at a time).
    reference = UserReference(canonical, horizon=100)
    pieces = torch.cat([reference.relative(faces[0] + motion[i:i + 7]) for i in range(0, 60, 7)])
    assert torch.allclose(pieces, seen[0], atol=1e-5)
    # After the user settles somewhere else (sits back), the reference follows within a few horizons.
    reference = UserReference(canonical, horizon=20)
    reference.relative(faces[0].expand(50, 8))
    later = reference.relative((faces[0] + 3.0).expand(200, 8))
    assert (later[0] - canonical).norm() > 2.0 and (later[-1] - canonical).norm() < 1e-3
    with pytest.raises(ValueError, match="horizon"):
        UserReference(canonical, horizon=0)


@torch.no_grad()
def test_the_live_engine_gives_a_still_webcam_the_canonical_rest_whoever_is_in_it():
    """End to end through the engine's webcam path: two sessions whose users keep still, each a different
    face; with `relative_user_motion` the transformer gets the canonical motion for both. Without it (the
    canonical code alone, or neither) it gets each face's own code."""
    assert small_model(relative_user=False).motion_autoencoder.user_reference(25) is None
    results = {}
    for canonical in (True, False):
        model = small_model(canonical)
        mae = model.motion_autoencoder
        if canonical:
            set_from_training_faces(mae)
        size = mae.config.input_size
        engine = StreamingEngine(model, EngineSettings(max_sessions=2, decode=False, record_conditions=True))
        rng = np.random.default_rng(1)
        users = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(2)]
        for i, user in enumerate(users):
            session = engine.open_session(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), seed=i,
                                          session_id=f"u{i}", now=0.0)
            for j in range(100):
                session.inputs.push_user_crop(user, j / model.config.fps)
        seen: dict[str, list[torch.Tensor]] = {"u0": [], "u1": []}
        for _ in range(4):
            for out in engine.step(now=1e6):
                seen[out.session_id].append(out.conditions.motion_user[0])
        results[canonical] = {sid: torch.cat(rows) for sid, rows in seen.items()}
        if canonical:
            for rows in results[canonical].values():
                seen_frames = rows[rows.abs().sum(1) > 0]  # (the lead-in before the webcam: null motion, zeros)
                assert len(seen_frames) >= 20
                assert torch.allclose(seen_frames, mae.canonical.motion.expand_as(seen_frames), atol=1e-5)
    plain = results[False]
    assert (plain["u0"] - plain["u1"]).abs().max() > 1e-3  # (the two faces' own codes differ)


@torch.no_grad()
def test_rescaling_the_latents_keeps_the_animated_frames():
    model = small_model()
    mae = model.motion_autoencoder
    set_from_training_faces(mae)
    face = images(1, mae.config.input_size, 9)
    step = 0.3 * mae.dec.direction.basis()[:, :2].sum(1)[None]
    before = mae.decode_frames(mae.animation_code(face), mae.canonical.motion + step)
    scale_motion_latents(mae, 10.0)
    after = mae.decode_frames(mae.animation_code(face), mae.canonical.motion + 10.0 * step)
    assert torch.allclose(before, after, atol=5e-4)  # (float32 rounding: 1.4e-4 at most here)


def test_train_canonical_code_sets_the_mean_code_of_the_faces_given(tmp_path, capsys):
    from avatar_forcing.model.media.face import crop_portrait
    from avatar_forcing.model.media.image import load_image, to_model_input
    from avatar_forcing.weights.convert import save_safetensors
    from avatar_forcing.weights.loading import load_model

    if not (MEDIA_DIR / "rumi.jpg").exists():
        pytest.skip(f"needs {MEDIA_DIR / 'rumi.jpg'}")
    raw = json.loads((FOLDER / "small_config.json").read_text())
    with_option, without = tmp_path / "canonical", tmp_path / "plain"
    for folder, extensions in ((with_option, {"portrait_detail": True, "canonical_code": True}), (without, {})):
        folder.mkdir()
        (folder / "small_config.json").write_text(json.dumps({**raw, "extensions": extensions}))
    plain = small_model(canonical=False, seed=3)
    weights = save_safetensors(plain.state_dict(), tmp_path / "trained.safetensors")  # no canonical buffers
    face = crop_portrait(load_image(MEDIA_DIR / "rumi.jpg"), plain.config.motion.input_size)
    mirrored = tmp_path / "mirrored.png"
    import cv2
    cv2.imwrite(str(mirrored), cv2.cvtColor(np.ascontiguousarray(face[:, ::-1]), cv2.COLOR_RGB2BGR))
    out = tmp_path / "with_code.safetensors"
    code = main(["train", "canonical-code", "--weights", str(weights), "--config", str(with_option),
                 "--portraits", str(MEDIA_DIR / "rumi.jpg"), str(mirrored), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    loaded = load_model(from_config_file(with_option / "small_config.json"), str(out)).motion_autoencoder
    with torch.no_grad():
        faces = [crop_portrait(load_image(p), plain.config.motion.input_size) for p in (MEDIA_DIR / "rumi.jpg",
                                                                                         mirrored)]
        codes = [plain.motion_autoencoder.encode_portrait(to_model_input(f)) for f in faces]
    assert torch.allclose(loaded.canonical.motion, torch.cat([c.r_s for c in codes]).mean(0, keepdim=True), atol=1e-5)
    assert torch.allclose(loaded.canonical.appearance, torch.cat([c.s_r for c in codes]).mean(0, keepdim=True),
                          atol=1e-5)
    # A configuration without the option has no code to set: said, not a traceback.
    code = main(["train", "canonical-code", "--weights", str(weights), "--config", str(without),
                 "--portraits", str(mirrored), "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "no canonical_code extension" in capsys.readouterr().err
    code = main(["train", "canonical-code", "--weights", str(weights), "--config", str(with_option),
                 "--rig-looks", "-1", "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "--rig-looks must be at least 1, not -1" in capsys.readouterr().err
