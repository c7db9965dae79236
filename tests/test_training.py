"""Diffusion-forcing training of the transformer: the noising convention, condition dropout against the
sampler's guidance branches, a short run that lowers the loss, resume, and a checkpoint that streams."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from golden_data import golden_folders
from synthetic_dyadic import make_clips

from avatar_forcing.model.avatar_forcing import build_model
from avatar_forcing.model.config import from_golden_dir
from avatar_forcing.model.engine import EngineSettings, StreamingEngine
from avatar_forcing.model.sampler import Conditions, GuidedSampler
from avatar_forcing.model.scheduler import FlowMatchSchedule
from avatar_forcing.model.training.data import WindowSet, load_shards, save_shards
from avatar_forcing.model.training.flow_matching import (
    AUDIO_ONLY,
    FULL,
    UNCOND,
    USER_ONLY,
    DropoutSettings,
    FlowMatchTable,
    NoiseSettings,
    draw,
    per_window_l1,
)
from avatar_forcing.model.training.loop import LoopSettings, learning_rate
from avatar_forcing.model.training.objectives import Velocity
from avatar_forcing.model.training.transformer import CHECKPOINT_NAME, transformer_trainer

FOLDER = next((f for f in golden_folders() if (f / "small_config.json").exists()), None)
pytestmark = pytest.mark.skipif(FOLDER is None, reason="needs a golden folder for the small configuration")


def tiny_config():
    """The golden small configuration (its wav2vec2 and auto-encoder) with a narrower transformer."""
    cfg = from_golden_dir(FOLDER)
    return dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, dim_h=64, depth=2))


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_config())


def synthetic(cfg, count: int = 8, frames: int = 80, seed: int = 0):
    return make_clips(count, frames, cfg.transformer.dim_w, cfg.audio.projection_in_features(), seed=seed)[0]


def quick(steps: int, **kw) -> LoopSettings:
    base = dict(steps=steps, micro_batch=4, lr=2e-3, warmup=2, log_every=1, save_every=10_000, progress=False,
                ema_decay=0.9)
    return LoopSettings(**{**base, **kw})


TABLE = FlowMatchTable(FlowMatchSchedule(tiny_config().sampler))


# -- the noising convention --------------------------------------------------------------------------------


def test_noising_is_the_reference_convention_and_the_sampler_update_inverts_it():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 50, 8, generator=gen), torch.randn(2, 50, 8, generator=gen)
    index = torch.randint(0, len(TABLE), (2, 50), generator=gen)
    x_t, t, v = TABLE.noised(x0, noise, index)
    sigma = (1 - index.double() / (len(TABLE) - 1)).float()  # linspace(1, 0, 1000)
    torch.testing.assert_close(t, 1000 * sigma)
    torch.testing.assert_close(x_t, (1 - sigma[..., None]) * x0 + sigma[..., None] * noise)
    torch.testing.assert_close(v, noise - x0)
    # The sampler's Euler update x <- x + (sigma_next - sigma_cur) v, all the way to sigma 0, gives back x0.
    torch.testing.assert_close(x_t + (0 - sigma[..., None]) * v, x0, atol=1e-5, rtol=0)


def test_loss_weight_is_the_reference_bell_and_clean_frames_never_count():
    w = TABLE.weights
    assert w.mean() == pytest.approx(1.0)
    assert w.min() == 0 and int(w.argmax()) in (499, 500)  # zero at the ends, peak at t = 500
    index = torch.tensor([[0, 500, len(TABLE) - 1]])
    fw = TABLE.frame_weights(index, weighted=False)
    assert fw.tolist() == [[1.0, 1.0, 0.0]]  # sigma 0 (t = 0): nothing to predict


def test_per_window_l1_by_hand():
    v = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])
    target = torch.zeros(1, 2, 2)
    weights = torch.tensor([[3.0, 1.0]])
    # frame errors 2 and 0, weights 3 and 1 -> 6 / 4
    assert per_window_l1(v, target, weights).item() == pytest.approx(1.5)


def test_draws_depend_on_the_window_only_and_noise_levels_are_per_frame_or_per_block():
    kw = dict(frames=50, dim=4, table=len(TABLE), dropout=DropoutSettings())
    whole = draw(3, 7, torch.arange(4), noise=NoiseSettings(), **kw)
    part = draw(3, 7, torch.tensor([2, 3]), noise=NoiseSettings(), **kw)
    torch.testing.assert_close(whole.noise[2:], part.noise)
    assert torch.equal(whole.index[2:], part.index) and torch.equal(whole.branch[2:], part.branch)
    assert len(set(whole.index[0].tolist())) > 25  # per frame: (almost) every frame its own level
    blocks = draw(3, 7, torch.arange(4), noise=NoiseSettings(per_frame=False), **kw).index
    assert (blocks.view(4, 5, 10) == blocks.view(4, 5, 10)[..., :1]).all()  # one level per 10-frame block
    clean = draw(3, 7, torch.arange(16), noise=NoiseSettings(clean_prefix=1.0), **kw).index
    first_noisy = (clean != len(TABLE) - 1).int().argmax(1)
    assert ((first_noisy % 10) == 0).all() and (first_noisy > 0).all()  # clean history up to a block boundary


def test_dropout_choices_follow_their_probabilities():
    d = draw(0, 0, torch.arange(4000), 1, 1, 10, NoiseSettings(), DropoutSettings(0.2, 0.1, 0.3, 0.5))
    freq = torch.bincount(d.branch, minlength=4).float() / 4000
    assert freq.tolist() == pytest.approx([0.4, 0.2, 0.1, 0.3], abs=0.03)
    assert d.drop_reference.float().mean().item() == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match="sum"):
        DropoutSettings(0.5, 0.5, 0.5)


def test_condition_dropout_is_exactly_the_samplers_guidance_branches():
    """A window trained with the audio-only / user-only / unconditional choice sees the very condition the
    sampler builds for that branch (zeros of the projected features, r_s kept)."""
    model = tiny_model()
    clip = synthetic(model.config, count=1, frames=50)[0]
    windows = WindowSet([clip], 50, 10)
    batch = windows.batch(0, 1, 0, 1)
    velocity = Velocity(model)
    ft = model.flow_transformer
    sampler = GuidedSampler(ft, model.config.sampler)
    x_t = torch.randn(1, 50, clip.motion.shape[1])
    t = torch.full((1, 50), 600.0)
    proj = model.audio_encoder.audio_projection
    cond3 = sampler.branch_conditions(Conditions(proj(batch.audio), proj(batch.user_audio), batch.user_motion))
    pos = torch.arange(50)[None]
    expected = [ft(x_t, t, cond3[i:i + 1], batch.r_s, pos)[0] for i in range(3)]  # uncond, audio, user
    no = torch.tensor([False])
    for branch, want in ((UNCOND, expected[0]), (AUDIO_ONLY, expected[1]), (USER_ONLY, expected[2])):
        got = velocity(x_t, t, batch, torch.tensor([branch]), no)
        torch.testing.assert_close(got, want)
    full = velocity(x_t, t, batch, torch.tensor([FULL]), no)
    assert not torch.allclose(full, expected[1])
    dropped_ref = velocity(x_t, t, batch, torch.tensor([FULL]), torch.tensor([True]))
    zero_ref = dataclasses.replace(batch, r_s=torch.zeros_like(batch.r_s))
    torch.testing.assert_close(dropped_ref, velocity(x_t, t, zero_ref, torch.tensor([FULL]), no))


def test_learning_rate_warms_up_then_decays_to_its_floor():
    s = LoopSettings(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, s) == pytest.approx(0.1) and learning_rate(9, s) == pytest.approx(1.0)
    assert learning_rate(10, s) == pytest.approx(1.0) and learning_rate(100, s) == pytest.approx(0.1)
    assert learning_rate(55, s) == pytest.approx(0.55)


def test_windows_and_shards(tmp_path):
    cfg = tiny_config()
    clips = synthetic(cfg, count=3, frames=60)
    save_shards(clips, tmp_path, clips_per_shard=2)
    back = load_shards(tmp_path)
    assert [c.name for c in back] == [c.name for c in clips]
    torch.testing.assert_close(back[2].user_audio, clips[2].user_audio)
    windows = WindowSet(back, 50, 10)
    assert len(windows) == 3 * 2
    # Any split of a global batch reads the same windows.
    whole = windows.batch(5, 4, 0, 4)
    halves = [windows.batch(5, 4, 0, 2), windows.batch(5, 4, 2, 2)]
    torch.testing.assert_close(whole.motion, torch.cat([h.motion for h in halves]))
    with pytest.raises(ValueError, match="shorter than a training window"):
        WindowSet(clips, 61, 10)
    bad = dataclasses.replace(clips[0], audio=clips[0].audio[:, :5])
    with pytest.raises(ValueError, match="audio has shape"):
        bad.check(cfg.transformer.dim_w, cfg.audio.projection_in_features())


# -- training ----------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_its_checkpoint_streams_in_the_engine(tmp_path):
    from avatar_forcing.weights.loading import load_model

    model = tiny_model()
    cfg = model.config
    trainer = transformer_trainer(model, synthetic(cfg), quick(40, micro_batch=8), tmp_path)
    history = trainer.run()
    first, last = np.mean([h["loss"] for h in history[:4]]), np.mean([h["loss"] for h in history[-4:]])
    assert last < 0.75 * first, f"loss {first:.3f} -> {last:.3f}"
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,grad_norm,lr") and len(rows) == 41

    # The checkpoint holds the EMA weights under official names and loads through the weights package.
    served = load_model(cfg, tmp_path / CHECKPOINT_NAME)
    ema = trainer.ema.module.state_dict()
    torch.testing.assert_close(served.state_dict()["flow_transformer.blocks.1.attn.qkv.weight"],
                               ema["flow_transformer.blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(served.state_dict()["audio_encoder.audio_projection.0.weight"],
                               ema["audio_projection.0.weight"])

    # ... and streams a live session: priming plus streaming blocks of finite latents and frames.
    engine = StreamingEngine(served, EngineSettings(max_sessions=1))
    size = cfg.motion.input_size
    portrait = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    session = engine.open_session(portrait, seed=1, now=0.0)
    rng = np.random.default_rng(1)
    session.inputs.push_speech((rng.standard_normal(16000 * 3) * 0.05).astype(np.float32))
    session.inputs.push_user_audio((rng.standard_normal(16000 * 3) * 0.05).astype(np.float32), 0.0)
    for j in range(75):
        session.inputs.push_user_crop(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), j / 25)
    blocks = []
    for _ in range(3):
        blocks.extend(engine.step(now=1e6))
    assert [b.index for b in blocks] == [0, 1, 2]
    assert all(torch.isfinite(b.latents).all() and b.frames.shape[1:] == (size, size, 3) for b in blocks)


def test_resume_continues_exactly_where_an_uninterrupted_run_is(tmp_path):
    cfg = tiny_config()
    clips = synthetic(cfg, count=4, frames=60)
    straight = transformer_trainer(tiny_model(), clips, quick(4), tmp_path / "a")
    straight.run()
    first = transformer_trainer(tiny_model(), clips, quick(4), tmp_path / "b")
    first.run(until=2)  # as if it stopped right after the checkpoint of step 2
    resumed = transformer_trainer(tiny_model(), clips, quick(4), tmp_path / "b")
    assert resumed.resume() and resumed.step == 2
    resumed.run()
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values(), strict=False):
        torch.testing.assert_close(a, b, msg=name)
    for a, b in zip(straight.ema.module.parameters(), resumed.ema.module.parameters(), strict=False):
        torch.testing.assert_close(a, b)


def test_train_command_runs_resumes_and_rejects_bad_data(tmp_path, capsys):
    from avatar_forcing.cli import main

    cfg = from_golden_dir(FOLDER)
    save_shards(synthetic(cfg, count=2, frames=50), tmp_path / "shards")
    args = ["train", "transformer", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "run"),
            "--config", str(FOLDER), "--weights", "none", "--device", "cpu", "--batch", "2", "--warmup", "1",
            "--no-progress"]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "3"]) == 0  # resumes at step 2, runs one more
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()  # logged at each run's last step
    assert [r.split(",")[0] for r in rows] == ["step", "2", "3"]
    assert (tmp_path / "run" / CHECKPOINT_NAME).exists()
    bad = ["train", "transformer", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"),
           "--config", str(FOLDER), "--weights", "none", "--device", "cpu"]
    assert main(bad) == 2
    assert "not a training shard folder" in capsys.readouterr().err
    # Branch shares that cannot be probabilities are refused by name, before any training.
    assert main([*args, "--steps", "4", "--branch-dropout", "0.5", "0.5", "0.5"]) == 2
    assert "--branch-dropout" in capsys.readouterr().err
    assert main([*args, "--steps", "4", "--branch-dropout", "0.3", "0.3", "0.2"]) == 0
