"""`portrait_detail` (a motion auto-encoder option the built-in model uses): the fine detail a small decoder misses
is added back to every frame, moved by the frame's warp. The portrait's own motion gives the portrait back; a
warp that moves the face moves its detail the same way; several portraits decoded together each keep their own;
the option is read from a configuration file and refused where the decoder has no warp to move it by."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_training import FOLDER

from avatar_forcing.model.avatar_forcing import build_model
from avatar_forcing.model.config import config_from_name, from_config_file, from_golden_dir
from avatar_forcing.model.motion_autoencoder import DecodedFrames, identity_grid


def autoencoder(detail: bool):
    cfg = from_golden_dir(FOLDER)
    cfg = dataclasses.replace(cfg, motion=dataclasses.replace(cfg.motion, portrait_detail=detail))
    torch.manual_seed(0)
    return build_model(cfg, "cpu").motion_autoencoder.eval()


def images(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_the_portraits_own_motion_gives_the_portrait_back():
    plain, detailed = autoencoder(False), autoencoder(True)
    portrait = images(1, plain.config.input_size, 1)
    code = plain.encode_portrait(portrait)
    assert code.detail is None
    assert (plain.decode_frames(code, code.r_s) - portrait).abs().mean() > 0.1  # random weights: far from it
    code = detailed.encode_portrait(portrait)
    assert code.detail is not None and code.detail_grid is not None
    assert code.detail_grid.shape[1:] == (detailed.config.flow_resolution,) * 2 + (2,)
    # (float32 rounding of the sampling grid: 3e-5 at most here)
    assert torch.allclose(detailed.decode_frames(code, code.r_s), portrait, atol=1e-4)


@torch.no_grad()
def test_a_warp_that_moves_the_face_moves_its_detail_the_same_way():
    mae = autoencoder(True)
    size, flow = mae.config.input_size, mae.config.flow_resolution
    detail = torch.zeros(1, 3, size, size)
    detail[..., 60, 70] = 1.0
    own = identity_grid(flow)
    # The frame's warp samples the portrait 4 px further right (and 2 px lower) than the portrait's own did,
    # so its content, detail included, shows 4 px further left (and 2 px higher).
    step = 2 / (size - 1)
    moved = own + torch.tensor([4 * step, 2 * step])
    out = mae.with_detail(DecodedFrames(torch.zeros(1, 3, size, size), moved), detail, own)
    peak = divmod(int(out[0, 0].argmax()), size)
    assert peak == (58, 66) and float(out.max()) == pytest.approx(1.0, abs=1e-4)
    still = mae.with_detail(DecodedFrames(torch.zeros(1, 3, size, size), own), detail, own)
    assert torch.allclose(still, detail, atol=1e-6)


@torch.no_grad()
def test_portraits_decoded_together_each_keep_their_own_detail():
    mae = autoencoder(True)
    size = mae.config.input_size
    codes = [mae.encode_portrait(p[None]) for p in images(2, size, 3)]
    r_d = torch.stack([c.r_s.expand(3, -1) + 0.1 * torch.randn(3, c.r_s.shape[1]) for c in codes])
    together = mae.decode_batch(codes, r_d, chunk=10)  # both portraits' frames in one decoder call
    for i, code in enumerate(codes):  # (random weights' large warps amplify batch-size rounding to 3e-4)
        assert torch.allclose(together[i], mae.decode_frames(code, r_d[i]), atol=1e-3)
    assert not torch.allclose(together[0], together[1], atol=1e-2)


def test_the_option_comes_from_the_configuration_file_and_is_checked(tmp_path):
    assert config_from_name("builtin").motion.portrait_detail
    assert not config_from_name("official").motion.portrait_detail
    raw = json.loads((FOLDER / "small_config.json").read_text())
    raw["extensions"] = {"portrait_detail": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    assert from_config_file(path).motion.portrait_detail
    raw["extensions"] = {"portrait_detail": "yes"}
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="must be JSON"):
        from_config_file(path)
    motion = from_golden_dir(FOLDER).motion
    with pytest.raises(ValueError, match="flow_resolution"):
        dataclasses.replace(motion, portrait_detail=True, flow_resolution=motion.input_size * 2)
