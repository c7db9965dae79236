"""Parity with the released reference: every case and every stored tensor of each golden folder.

The model is configured only from the folder's own files. Tolerances: relative L2 < 1e-4, and < 2e-5 for the
strong variant's transformer and sample cases (README of the golden folder, "Tolerances").
"""

from __future__ import annotations

import json

import pytest
import torch
from golden_data import GoldenSet, assert_matches, case_meta, engine_rollout, golden_model, golden_sets
from safetensors import safe_open

from avatar_forcing.model.audio_encoder import normalize_utterance
from avatar_forcing.model.config import from_golden_dir
from avatar_forcing.model.engine import EngineSettings, StreamingEngine
from avatar_forcing.model.media.image import to_model_input as frames_to_model_input
from avatar_forcing.model.motion_autoencoder import PortraitCode
from avatar_forcing.model.sampler import Conditions, GuidedSampler

pytestmark = pytest.mark.parametrize("gs", golden_sets())


def test_motion_autoencoder_encode(gs: GoldenSet):
    mae = golden_model(gs).motion_autoencoder
    case = gs.case("ae_encode")
    tol = gs.tolerance("ae_encode")
    assert_matches(frames_to_model_input(case["image_u8_hwc"]), case["image"], 1e-7, "image normalisation")
    s_r, feats = mae.encode_appearance(case["image"])
    assert_matches(s_r, case["s_r"], tol, "s_r")
    assert_matches(mae.enc.fc(s_r), case["lambda"], tol, "lambda")
    assert_matches(mae.dec.direction.basis(), case["Q"], tol, "Q")
    assert_matches(mae.motion_of_code(s_r), case["r_s"], tol, "r_s")
    assert len(feats) == sum(k.startswith("feat_") for k in case)
    for i, feat in enumerate(feats):
        assert_matches(feat, case[f"feat_{i}"], tol, f"feat_{i}")


def test_motion_autoencoder_decode(gs: GoldenSet):
    mae = golden_model(gs).motion_autoencoder
    case = gs.case("ae_decode")
    feats = [case[f"feat_{i}"] for i in range(sum(k.startswith("feat_") for k in case))]
    out = mae.decode(case["latent"], feats)
    assert_matches(case["s_r"] + case["r"], case["latent"], 1e-7, "latent")
    assert_matches(out.image, case["image"], gs.tolerance("ae_decode"), "decoded image")
    assert_matches(out.flow, case["flow"], gs.tolerance("ae_decode"), "flow grid")


def test_user_motion(gs: GoldenSet):
    mae = golden_model(gs).motion_autoencoder
    case = gs.case("user_motion")
    tol = gs.tolerance("user_motion")
    frames = frames_to_model_input(case["frames_u8_hwc"])
    assert_matches(frames, case["frames"], 1e-7, "frame normalisation")
    h_app, _ = mae.encode_appearance(frames)
    assert_matches(h_app, case["h_app"], tol, "h_app")
    assert_matches(mae.enc.fc(h_app), case["lambda"], tol, "lambda")
    assert_matches(mae.encode_motion(frames)[None], case["user_motion"], tol, "user_motion")


def test_audio_features(gs: GoldenSet):
    enc = golden_model(gs).audio_encoder
    case, raw = gs.case("audio"), gs.inputs("audio")
    tol = gs.tolerance("audio")
    with safe_open(str(gs.folder / "case_audio.safetensors"), "pt") as f:
        subcases = json.loads(f.metadata()["meta"])["subcases"]
    assert subcases, "no audio sub-cases"
    for sub in subcases:
        tag, n = sub["tag"], sub["seq_len"]
        wave = normalize_utterance(raw[f"{tag}_wave_raw"])
        assert_matches(wave, case[f"{tag}_wave_norm"], tol, f"{tag}: normalised wave")
        padded = enc.pad_waveform(wave[None], n)
        assert_matches(padded[0], case[f"{tag}_wave_padded"], tol, f"{tag}: padded wave")
        cnn = enc.cnn_features(padded)
        assert_matches(cnn, case[f"{tag}_cnn_features"], tol, f"{tag}: CNN features")
        frames = enc.to_frame_rate(cnn, n)
        assert_matches(frames, case[f"{tag}_cnn_interp"], tol, f"{tag}: CNN features at 25 fps")
        layers = enc.encoder_layers(frames)
        assert_matches(layers[0], case[f"{tag}_encoder_input"], tol, f"{tag}: encoder input")
        assert_matches(enc.stacked_features(wave[None], n), case[f"{tag}_stacked_layers"], tol,
                       f"{tag}: stacked layers")
        assert_matches(enc(wave[None], n), case[f"{tag}_projected"], tol, f"{tag}: projected features")


def test_dual_motion_encoder(gs: GoldenSet):
    dme = golden_model(gs).flow_transformer.c_embedder
    case = gs.case("condition")
    tol = gs.tolerance("condition")
    prefixes = sorted({k.split("_", 1)[0] for k in case})
    assert prefixes, "no condition sub-cases"
    for p in prefixes:
        wa, wa_user, motion = case[f"{p}_wa"], case[f"{p}_wa_user"], case[f"{p}_motion_user"]
        assert_matches(dme.motion_embedder(motion), case[f"{p}_motion_embed"], tol, f"{p}: motion embedding")
        user = dme.user_state(wa_user, motion)
        assert_matches(user, case[f"{p}_dual_modal_out"], tol, f"{p}: dual-modal attention output")
        avatar = dme.avatar_state(wa, user)
        assert_matches(avatar, case[f"{p}_user_agent_out"], tol, f"{p}: user-agent attention output")
        assert_matches(dme(wa_user, motion, wa), case[f"{p}_c"], tol, f"{p}: condition")


def test_flow_transformer_forward(gs: GoldenSet):
    ft = golden_model(gs).flow_transformer
    case = gs.case("transformer")
    tol = gs.tolerance("transformer")
    cond = ft.condition(case["wa_user"], case["motion_user"], case["wa"])
    assert_matches(cond, case["c"], tol, "condition")
    t_embed, ada = ft.time_modulation(case["t"])
    assert_matches(t_embed, case["t_embed"], tol, "t_embed")
    assert_matches(ada, case["adaLN_all"], tol, "adaLN output")
    assert_matches(ft.final_layer.adaLN_modulation(t_embed), case["final_adaLN_all"], tol, "final adaLN output")
    assert_matches(ft.x_embedder(case["x_t"], case["r_s"]), case["x_embedded"], tol, "x_embedded")

    block_outputs = []
    hooks = [blk.register_forward_hook(lambda _m, _i, out: block_outputs.append(out[0])) for blk in ft.blocks]
    try:
        b, n = case["t"].shape
        v, _ = ft(case["x_t"], case["t"], cond, case["r_s"], torch.arange(n).expand(b, -1))
    finally:
        for h in hooks:
            h.remove()
    for i, out in enumerate(block_outputs):
        assert_matches(out, case[f"block_{i}_out"], tol, f"block {i} output")
    assert_matches(v, case["v"], tol, "velocity")


def _sample_inputs(gs: GoldenSet):
    model = golden_model(gs)
    case, raw = gs.case("sample"), gs.inputs("sample")
    return model, case, raw


def test_sample_conditions(gs: GoldenSet):
    model, case, raw = _sample_inputs(gs)
    tol = gs.tolerance("sample")
    num_frames = case["out_latents"].shape[1]
    for track in ("avatar", "user"):
        wave = normalize_utterance(raw[f"{track}_audio_raw"])[None]
        assert_matches(wave, case[f"{track}_audio"], tol, f"{track} audio normalisation")
        assert_matches(model.audio_encoder(wave, num_frames), case[f"{track}_wa"], tol, f"{track} audio features")
    frames = frames_to_model_input(raw["user_frames_u8_hwc"])
    assert_matches(model.motion_autoencoder.encode_motion(frames)[None], case["user_motion"], tol, "user motion")


def test_sample_settings_are_the_recorded_ones(gs: GoldenSet):
    """The model is configured from the folder's own record: small_config.json's sampling section agrees
    with what case_sample recorded, and the sampler runs with exactly those settings."""
    meta = case_meta(gs, "sample")
    cfg = from_golden_dir(gs.folder).sampler
    assert (cfg.nfe, cfg.a_cfg_scale, cfg.u_cfg_scale) == (meta["nfe"], meta["a_cfg_scale"], meta["u_cfg_scale"])
    sampler = StreamingEngine(golden_model(gs), EngineSettings(max_sessions=1)).sampler
    assert (sampler.schedule.denoising_timesteps.numel(), sampler.a_scale, sampler.u_scale) == (
        meta["nfe"] - 1, meta["a_cfg_scale"], meta["u_cfg_scale"])


def test_sample_schedule(gs: GoldenSet):
    model, case, _ = _sample_inputs(gs)
    meta = case_meta(gs, "sample")
    sched = GuidedSampler(model.flow_transformer, model.config.sampler, skip_noop_steps=False).schedule
    assert torch.equal(sched.sigmas, case["scheduler_sigmas"])
    assert torch.equal(sched.timesteps, case["scheduler_timesteps"])
    assert torch.equal(sched.denoising_timesteps, case["denoising_timesteps"])
    assert torch.equal(torch.tensor([s.sigma_cur for s in sched.steps], dtype=torch.float32), case["sigma_cur"])
    assert torch.equal(torch.tensor([s.sigma_next for s in sched.steps], dtype=torch.float32), case["sigma_next"])
    if "sigma_table_index_cur" in meta:
        sigmas = case["scheduler_sigmas"]
        assert [s.sigma_cur for s in sched.steps] == [float(sigmas[i]) if s.t_cur else 0.0 for s, i in
                                                      zip(sched.steps, meta["sigma_table_index_cur"], strict=True)]


def _golden_rollout(gs: GoldenSet, upstream_steps: bool):
    """case_sample through the production path (engine + block runner), noise from the recorded seed."""
    model, case, _ = _sample_inputs(gs)
    meta = case_meta(gs, "sample")
    num_frames = int(meta["T"])
    assert case["out_latents"].shape[1] == num_frames
    cond = Conditions(case["avatar_wa"], case["user_wa"], case["user_motion"])
    latents, trace = engine_rollout(model, case["r_s"], cond, num_frames, trace=True, upstream_steps=upstream_steps,
                                    seed=int(meta["torch_manual_seed_before_sample"]))
    assert len(trace) == meta["n_randn_calls"], "one noise draw per block, as the reference"
    return latents, trace


def test_sample_rollout_trace(gs: GoldenSet):
    """Every per-block trace, both KV-cache snapshots and the output latents (reference step list)."""
    _, case, _ = _sample_inputs(gs)
    tol = gs.tolerance("sample")
    latents, blocks = _golden_rollout(gs, upstream_steps=True)
    assert len(blocks) == sum(k.startswith("block") and k.endswith("_x_init") for k in case)
    for b, blk in enumerate(blocks):
        for key in ("x_init", "c", "wa_in", "wa_user_in", "motion_user_in", "cache_update_x"):
            assert_matches(blk[key], case[f"block{b}_{key}"], tol, f"block {b} {key}")
        for key in ("x_steps", "v_branches", "v_guided", "t_cur_frames", "t_next_frames"):
            assert_matches(torch.stack(blk[key]), case[f"block{b}_{key}"], tol, f"block {b} {key}")
    for snapshot, blk in (("kv_after_priming", blocks[0]), ("kv_final", blocks[-1])):
        for layer, kv in enumerate(blk["cache"]):
            for part in ("self_k", "self_v", "cross_k", "cross_v"):
                assert_matches(getattr(kv, part), case[f"{snapshot}_layer{layer}_{part}"], tol,
                               f"{snapshot} layer {layer} {part}")
    assert_matches(latents, case["out_latents"], tol, "out_latents")


def test_sample_rollout_without_noop_step(gs: GoldenSet):
    """The default engine drops the reference's final t=0 -> 0 evaluation; the output is the same."""
    _, case, _ = _sample_inputs(gs)
    latents, _ = _golden_rollout(gs, upstream_steps=False)
    assert_matches(latents, case["out_latents"], gs.tolerance("sample"), "out_latents")


def test_decode_video(gs: GoldenSet):
    mae = golden_model(gs).motion_autoencoder
    case = gs.case("decode_video")
    feats = [case[f"feat_{i}"] for i in range(sum(k.startswith("feat_") for k in case))]
    portrait = PortraitCode(case["s_r"], feats, case["r_s"])
    frames = mae.decode_frames(portrait, case["r_d"][0])
    assert_matches(frames, case["frames"], gs.tolerance("decode_video"), "decoded frames")
    # Chunking is a memory knob only: decoding 4 at a time gives the same frames.
    assert_matches(mae.decode_frames(portrait, case["r_d"][0], chunk=4), case["frames"],
                   gs.tolerance("decode_video"), "decoded frames, chunk 4")
