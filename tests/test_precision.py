"""The bf16 path against the fp32 reference path, within the stated bf16 bounds.

Stated bounds (relative L2 over a whole rollout): motion latents < 2e-2, decoded uint8 frames < 5e-2. bf16
keeps 8 mantissa bits (~4e-3 per rounding); the latents pass 8 solver steps of 2+ layers, and the frames
add the decoder and the uint8 rounding. Measured on this CPU (small configuration, golden rollout):
latents 2.4e-3 / 8.3e-3 (main / strong), frames 2.3e-2 / 2.7e-2.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from golden_data import GoldenSet, golden_model, golden_sets, relative_l2

from avatar_forcing.model.audio_encoder import normalize_utterance
from avatar_forcing.model.avatar_forcing import build_model
from avatar_forcing.model.config import official
from avatar_forcing.model.engine import EngineSettings, PrecomputedInputs, StreamingEngine
from avatar_forcing.model.media.image import to_model_input
from avatar_forcing.model.motion_autoencoder import PortraitCode

LATENT_BOUND, FRAME_BOUND = 2e-2, 5e-2


def run(model, portrait, inputs_factory, noises, precision: str):
    engine = StreamingEngine(model, EngineSettings(precision=precision))
    it = iter(noises)
    session = engine.open_session(portrait, inputs=inputs_factory(), noise=lambda shape: next(it).to(
        engine.device))
    outs = []
    while not session.finished:
        outs.extend(engine.step())
    latents = torch.cat([o.latents.float().cpu() for o in outs])
    frames = torch.cat([torch.from_numpy(o.frames).float() for o in outs])
    return latents, frames


@pytest.mark.parametrize("gs", golden_sets())
def test_bf16_engine_matches_fp32_on_the_golden_rollout(gs: GoldenSet):
    model = golden_model(gs)
    case, enc = gs.case("sample"), gs.case("ae_encode")
    portrait = PortraitCode(enc["s_r"], [enc[f"feat_{i}"] for i in range(5)], case["r_s"])
    noises = [case[f"noise_{i}"] for i in range(5)]

    def inputs():
        return PrecomputedInputs(case["avatar_wa"][0], case["user_wa"][0], case["user_motion"][0])

    lat32, fr32 = run(model, portrait, inputs, noises, "float32")
    lat16, fr16 = run(model, portrait, inputs, noises, "bfloat16")
    assert relative_l2(lat16, lat32) < LATENT_BOUND
    assert relative_l2(fr16, fr32) < FRAME_BOUND
    assert relative_l2(lat16, lat32) > 0, "the bf16 path did not run in bf16"


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the full configuration at 512 px needs a GPU; the small one is checked above")
@pytest.mark.parametrize("gs", golden_sets()[:1])
def test_gpu_bf16_full_configuration_matches_fp32_on_scaled_golden_inputs(gs: GoldenSet):
    """The golden inputs (real speech, real webcam frames, the portrait) scaled up to the full model
    (512 px frames, wav2vec2-base), random weights; fp32 and bf16 paths on the GPU."""
    torch.manual_seed(0)
    model = build_model(official(), "cuda")
    raw, enc = gs.inputs("sample"), gs.inputs("ae_encode")
    size = model.config.motion.input_size
    up = lambda img: cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)  # noqa: E731
    with torch.inference_mode():
        portrait = model.motion_autoencoder.encode_portrait(to_model_input(up(enc["image_u8_hwc"].numpy())).cuda())
        frames = np.stack([up(f) for f in raw["user_frames_u8_hwc"].numpy()])
        motion = model.motion_autoencoder.encode_motion(to_model_input(frames).cuda())
        n = motion.shape[0]
        wa = model.audio_encoder(normalize_utterance(raw["avatar_audio_raw"])[None].cuda(), n)[0]
        wa_user = model.audio_encoder(normalize_utterance(raw["user_audio_raw"])[None].cuda(), n)[0]
    g = torch.Generator().manual_seed(1)
    dim = model.config.transformer.dim_w
    noises = [torch.randn(1, 50, dim, generator=g)] + [torch.randn(1, 10, dim, generator=g) for _ in range(4)]

    def inputs():
        return PrecomputedInputs(wa, wa_user, motion)

    lat32, fr32 = run(model, portrait, inputs, noises, "float32")
    lat16, fr16 = run(model, portrait, inputs, noises, "bfloat16")
    assert relative_l2(lat16, lat32) < LATENT_BOUND
    assert relative_l2(fr16, fr32) < FRAME_BOUND
