"""The dual motion encoder's condition when the avatar's audio is null, as in the user-only guidance branch:
the reference architecture loses the user's timing there; `user_residual` keeps it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from golden_data import golden_folders

from avatar_forcing.errors import WeightsError
from avatar_forcing.model.config import FlowTransformerConfig, from_config_file
from avatar_forcing.model.dual_motion_encoder import EXTENSION_LAYERS, DualMotionEncoder
from avatar_forcing.weights.loading import load_model

FRAMES = 50


def encoder(user_residual: bool) -> DualMotionEncoder:
    torch.manual_seed(0)
    cfg = FlowTransformerConfig(dim_w=16, dim_a=16, dim_h=32, depth=1, num_heads=2, user_residual=user_residual)
    return DualMotionEncoder(cfg).eval()


def condition_without_avatar_audio(dme: DualMotionEncoder, motion: torch.Tensor, user_audio: torch.Tensor):
    with torch.no_grad():
        return dme(user_audio, motion, torch.zeros_like(user_audio))[0]


def user_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, FRAMES, 16, generator=gen), torch.randn(1, FRAMES, 16, generator=gen)


def test_reference_encoder_gives_every_frame_the_same_condition_without_avatar_audio():
    motion, user_audio = user_inputs()
    cond = condition_without_avatar_audio(encoder(False), motion, user_audio)
    assert (cond - cond[:1]).abs().max() < 1e-5, "the reference's null-audio queries should all be equal"


def test_user_residual_starts_as_the_reference():
    reference, extended = encoder(False), encoder(True)
    missing = extended.load_state_dict(reference.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["user_to_avatar.bias", "user_to_avatar.weight"]
    motion, user_audio = user_inputs()
    wa = torch.randn_like(user_audio)
    with torch.no_grad():
        torch.testing.assert_close(extended(user_audio, motion, wa), reference(user_audio, motion, wa))


def test_user_residual_carries_each_frames_user_signal_without_avatar_audio():
    dme = encoder(True)
    with torch.no_grad():
        dme.user_to_avatar.weight.copy_(torch.eye(16))  # as training may set it
    motion, user_audio = user_inputs()
    cond = condition_without_avatar_audio(dme, motion, user_audio)
    assert (cond - cond.mean(0)).abs().mean() > 0.05, "frames still share one condition"
    # The user moving at one frame changes that frame's condition most.
    moved = motion.clone()
    moved[0, 20] += 3.0
    change = (condition_without_avatar_audio(dme, moved, user_audio) - cond).abs().mean(-1)
    assert int(change.argmax()) == 20 and change[20] > 5 * change[torch.arange(FRAMES) != 20].max(), change


def test_reference_configs_keep_user_residual_off_and_extensions_are_checked(tmp_path):
    golden = golden_folders()[0] / "small_config.json"
    if not golden.is_file():
        pytest.skip(f"needs the golden small configuration ({golden})")
    assert from_config_file(golden).transformer.user_residual is False
    raw = json.loads(golden.read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw | {"extensions": {"user_residual": True}}))
    assert from_config_file(path).transformer == replace(from_config_file(golden).transformer, user_residual=True)
    path.write_text(json.dumps(raw | {"extensions": {"user_residul": True}}))
    with pytest.raises(ValueError, match="unknown extensions"):
        from_config_file(path)
    path.write_text(json.dumps(raw | {"extensions": {"user_residual": "false"}}))
    with pytest.raises(ValueError, match="must be JSON"):
        from_config_file(path)


def test_a_checkpoint_made_without_the_extension_trains_with_it_starting_as_the_reference():
    """The built-in recipe's encoder checkpoint predates `user_residual`: training may start from it with the
    projection at zero (the reference's condition); inference still refuses a file that lacks it."""
    folder = golden_folders()[0]
    weights = folder / "small_weights.safetensors"
    if not weights.is_file():
        pytest.skip(f"needs the golden small weights ({weights})")
    cfg = from_config_file(folder / "small_config.json")
    extended = replace(cfg, transformer=replace(cfg.transformer, user_residual=True))
    with pytest.raises(WeightsError, match="user_to_avatar"):
        load_model(extended, weights)
    model = load_model(extended, weights, start_fresh=EXTENSION_LAYERS)
    projection = model.flow_transformer.c_embedder.user_to_avatar
    assert projection is not None
    assert not projection.weight.any() and not projection.bias.any()
    state = model.state_dict()
    for name, value in load_model(cfg, weights).state_dict().items():
        assert torch.equal(state[name], value), f"{name} was not loaded from the file"
