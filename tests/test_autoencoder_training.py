"""Motion auto-encoder training: the loss terms by hand, deterministic frame pairs, and a short run on face
crops of the sample user video that lowers reconstruction error and exports a checkpoint under the official
names that the weights package loads."""

from __future__ import annotations

import pytest
import torch
from golden_data import MEDIA_DIR
from safetensors.torch import load_file
from test_training import FOLDER, quick

from avatar_forcing.model.config import from_golden_dir
from avatar_forcing.model.training.autoencoder import (
    AUTOENCODER_NAME,
    MODEL_NAME,
    FramePairs,
    Reconstruction,
    ReconstructionObjective,
    autoencoder_trainer,
    crops_of_video,
    gradient_loss,
    reconstruction_error,
    ssim,
)

pytestmark = pytest.mark.skipif(FOLDER is None, reason="needs a golden folder for the small configuration")
USER_VIDEO = MEDIA_DIR / "user.mp4"


def test_ssim_and_gradient_terms_by_hand():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert (ssim(x, torch.rand(2, 3, 16, 16)) < 0.5).all()
    # A constant shift has the same gradients; a ramp of slope 1/pixel against a flat image costs 1 in x.
    assert torch.allclose(gradient_loss(x, x + 0.3), torch.zeros(2), atol=1e-6)
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    # dx differs by 1 everywhere, dy by 0: (1 + 0) at every scale; pooling a linear ramp by 2 doubles the slope
    assert gradient_loss(ramp, torch.zeros_like(ramp), scales=1).item() == pytest.approx(1.0)
    assert gradient_loss(ramp, torch.zeros_like(ramp), scales=2).item() == pytest.approx((1 + 2) / 2)


def test_frame_pairs_come_from_one_clip_and_do_not_depend_on_the_split():
    a = torch.zeros(6, 8, 8, 3, dtype=torch.uint8)
    b = torch.full((4, 8, 8, 3), 200, dtype=torch.uint8)
    pairs = FramePairs([a, b], seed=3, min_gap=2)
    whole = pairs.batch(5, 8, 0, 8)
    halves = [pairs.batch(5, 8, 0, 4), pairs.batch(5, 8, 4, 4)]
    assert torch.equal(whole.source, torch.cat([h.source for h in halves]))
    assert torch.equal(whole.driving, torch.cat([h.driving for h in halves]))
    for j in range(8):
        clip, s, d = pairs.pair(5, j)
        assert abs(s - d) >= 2 and s < pairs.clips[clip].shape[0] and d < pairs.clips[clip].shape[0]
        assert torch.equal(whole.source[j, 0, 0, 0], whole.driving[j, 0, 0, 0])  # same clip, same colour
    moved = whole.to("cpu")
    assert moved.source.dtype == torch.float32 and moved.source.min() >= -1 and moved.driving.max() <= 1
    with pytest.raises(ValueError, match="two"):
        FramePairs([a[:1]])
    with pytest.raises(ValueError, match="uint8"):
        FramePairs([a.float()])


@pytest.mark.skipif(not USER_VIDEO.exists(), reason="needs ../shared/media/user.mp4")
def test_short_run_on_user_video_lowers_reconstruction_error_and_loads(tmp_path):
    from avatar_forcing.weights.loading import load_model

    cfg = from_golden_dir(FOLDER)
    size = cfg.motion.input_size
    crops = crops_of_video(USER_VIDEO, size, max_frames=40)
    assert crops.shape == (40, size, size, 3)
    train, held = crops[:32], crops[32:]  # held-out frames of the same person
    torch.manual_seed(0)
    model = load_model(cfg, FOLDER / "small_weights.safetensors")
    held_pairs = FramePairs([held], min_gap=1)
    before = reconstruction_error(model.motion_autoencoder, held_pairs, count=8)
    trainer = autoencoder_trainer(model, [train], quick(16, micro_batch=2, lr=3e-3, warmup=2, ema_decay=0.7),
                                  tmp_path / "ae", min_gap=2)
    history = trainer.run()
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"l1", "ssim", "gradient"} <= set(history[-1])

    # The export: the auto-encoder alone under the official names, and a whole model that load_model takes.
    alone = load_file(str(tmp_path / "ae" / AUTOENCODER_NAME))
    assert set(alone) == {"motion_autoencoder." + k for k in model.motion_autoencoder.state_dict()}
    loaded = load_model(cfg, tmp_path / "ae" / MODEL_NAME)
    for name, value in trainer.ema.module.state_dict().items():
        torch.testing.assert_close(loaded.motion_autoencoder.state_dict()[name], value)
    after = reconstruction_error(loaded.motion_autoencoder, held_pairs, count=8)
    print(f"held-out reconstruction L1: {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before


def test_objective_is_zero_for_a_perfect_reconstruction_and_checks_crop_size(tmp_path):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    parts = ReconstructionObjective().parts(x, x)
    assert all(torch.allclose(v, torch.zeros(2), atol=1e-5) for v in parts.values())
    cfg = from_golden_dir(FOLDER)
    from avatar_forcing.model.avatar_forcing import build_model

    model = build_model(cfg)
    assert isinstance(Reconstruction(model.motion_autoencoder).enc, type(model.motion_autoencoder.enc))
    with pytest.raises(ValueError, match="takes"):
        autoencoder_trainer(model, [torch.zeros(4, 64, 64, 3, dtype=torch.uint8)], quick(1), tmp_path)


def test_still_warps_start_the_decoder_from_the_identity_warp():
    """From random weights the flow heads scramble the source (grids off by a large part of the frame);
    `start_with_still_warps` makes the first warps the identity, which is what lets a from-scratch run learn
    motion at once (docs/training.md, the built-in model)."""
    from avatar_forcing.model.avatar_forcing import build_model
    from avatar_forcing.model.motion_autoencoder import identity_grid
    from avatar_forcing.model.training.autoencoder import start_with_still_warps

    cfg = from_golden_dir(FOLDER)
    torch.manual_seed(0)
    autoencoder = build_model(cfg, "cpu").motion_autoencoder
    size = cfg.motion.input_size
    image = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def largest_offset() -> float:
        with torch.no_grad():
            codes, feats = autoencoder.enc.net_app(image)
            grid = autoencoder.dec(codes, feats).flow
        assert grid is not None
        return float((grid - identity_grid(cfg.motion.flow_resolution)).abs().max())

    before = largest_offset()
    start_with_still_warps(autoencoder)
    after = largest_offset()
    assert before > 0.3 and after < 0.05, (before, after)


def codes_and_frames(autoencoder, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(s_r, r_s of images[0] as the portrait, r_d of the others, their decoded frames)."""
    with torch.no_grad():
        portrait = autoencoder.encode_portrait(images[:1])
        r_d = autoencoder.encode_motion(images[1:])
        return portrait.s_r, portrait.r_s, r_d, autoencoder.decode_frames(portrait, r_d)


def test_scaling_the_motion_latents_keeps_every_frame():
    """`scale_motion_latents` (the built-in recipe's step before the transformer's data): every code the
    auto-encoder makes grows by the factor, and every decoded frame stays the same."""
    from avatar_forcing.model.avatar_forcing import build_model
    from avatar_forcing.model.training.autoencoder import scale_motion_latents

    cfg = from_golden_dir(FOLDER)
    torch.manual_seed(0)
    autoencoder = build_model(cfg, "cpu").motion_autoencoder.eval()
    size = cfg.motion.input_size
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    s_r, r_s, r_d, frames = codes_and_frames(autoencoder, images)
    scale_motion_latents(autoencoder, 7.0)
    s_r7, r_s7, r_d7, frames7 = codes_and_frames(autoencoder, images)
    for before, after in ((s_r, s_r7), (r_s, r_s7), (r_d, r_d7)):
        assert torch.allclose(after, 7.0 * before, rtol=1e-4, atol=1e-5)
    # float32 rounding, amplified by random weights' large warps (3e-4 here; 5e-6 on the trained built-in one)
    assert (frames7 - frames).abs().max() < 1e-3 * max(1.0, float(frames.abs().max()))
    with pytest.raises(ValueError, match="positive"):
        scale_motion_latents(autoencoder, 0.0)


def test_scale_latents_command_writes_a_model_with_larger_latents_and_the_same_frames(tmp_path, capsys):
    from avatar_forcing.cli import main
    from avatar_forcing.weights.loading import load_model

    cfg = from_golden_dir(FOLDER)
    weights = FOLDER / "small_weights.safetensors"
    out = tmp_path / "scaled.safetensors"
    args = ["train", "scale-latents", "--weights", str(weights), "--config", str(FOLDER), "--out", str(out)]
    assert main([*args, "--factor", "5"]) == 0
    size = cfg.motion.input_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    _, _, r_d, frames = codes_and_frames(load_model(cfg, weights).motion_autoencoder.eval(), images)
    _, _, r_d5, frames5 = codes_and_frames(load_model(cfg, out).motion_autoencoder.eval(), images)
    assert torch.allclose(r_d5, 5 * r_d, rtol=1e-4, atol=1e-5)
    assert (frames5 - frames).abs().max() < 1e-3 * max(1.0, float(frames.abs().max()))
    capsys.readouterr()
    assert main([*args, "--factor", "-1"]) == 2
    assert "--factor must be positive" in capsys.readouterr().err


def test_moving_l1_sees_only_what_moved():
    """Copying the source costs the full error where the driving frame moved; an error where nothing moved
    costs (almost) nothing; a perfect reconstruction costs zero."""
    from avatar_forcing.model.training.autoencoder import moving_l1

    source = torch.zeros(1, 3, 32, 32)
    driving = source.clone()
    driving[..., 10:14, 10:14] = 1.0  # a small part moved
    assert float(moving_l1(driving, driving, source)) == 0.0
    copy = float(moving_l1(source, driving, source))
    assert copy > 0.3, copy
    elsewhere = driving.clone()
    elsewhere[..., 25:, 25:] += 0.5  # wrong where nothing moved
    assert float(moving_l1(elsewhere, driving, source)) < 0.01
    # The plain L1 of copying the source is small next to it: the reason for the term.
    assert float((source - driving).abs().mean()) < 0.05 * copy


def test_learning_rate_multipliers_by_parameter_prefix():
    """--motion-lr-scale: the motion MLP's parameters step with a larger rate, the rest with lr."""
    from avatar_forcing.model.training.loop import parameter_groups

    net = torch.nn.ModuleDict({"fc": torch.nn.Linear(2, 2), "conv": torch.nn.Linear(2, 2)})
    groups = parameter_groups(list(net.named_parameters()), {"fc.": 10.0})
    assert sorted(g["lr_scale"] for g in groups) == [1.0, 10.0]
    fast = next(g for g in groups if g["lr_scale"] == 10.0)
    assert {id(p) for p in fast["params"]} == {id(p) for p in net["fc"].parameters()}


def test_teacher_forcing_feeds_the_known_expression_to_the_decoder():
    """Forced pairs decode the known code (another code, another frame); unforced pairs ignore it."""
    from avatar_forcing.model.avatar_forcing import build_model

    cfg = from_golden_dir(FOLDER)
    torch.manual_seed(0)
    net = Reconstruction(build_model(cfg, "cpu").motion_autoencoder).eval()
    size = cfg.motion.input_size
    gen = torch.Generator().manual_seed(2)
    source, driving = (torch.rand(2, 3, size, size, generator=gen) * 2 - 1 for _ in range(2))
    a, b = torch.zeros(2, 8), torch.ones(2, 8)
    forced, free = torch.tensor([True, True]), torch.tensor([False, False])
    with torch.no_grad():
        plain = net(source, driving)
        assert torch.equal(net(source, driving, known=a, forced=free), plain)
        assert not torch.allclose(net(source, driving, known=a, forced=forced),
                                  net(source, driving, known=b, forced=forced))
        _, magnitudes = net(source, driving, with_magnitudes=True, known=a, forced=forced)
    assert magnitudes.shape == (2, cfg.motion.motion_dim)  # the encoder's own prediction, for the code loss


def test_freeze_motion_trains_the_decoder_and_keeps_every_motion_latent(tmp_path):
    """A sharper decoder after the transformer: the motion latents it was trained on must not move."""
    from avatar_forcing.weights.loading import load_model

    cfg = from_golden_dir(FOLDER)
    crops = crops_of_video(USER_VIDEO, cfg.motion.input_size, max_frames=12)
    pixels = crops.permute(0, 3, 1, 2).float() / 127.5 - 1
    model = load_model(cfg, FOLDER / "small_weights.safetensors")
    with torch.inference_mode():
        latents_before = model.motion_autoencoder.encode_motion(pixels)
    synthesis_before = {k: v.clone() for k, v in model.motion_autoencoder.dec.state_dict().items()}
    trainer = autoencoder_trainer(model, [crops], quick(3, micro_batch=2, lr=3e-3, warmup=1, ema_decay=0.0),
                                  tmp_path / "dec", min_gap=2, freeze_motion=True)
    trainer.run()
    trained = {n for n, p in trainer.module.named_parameters() if p.requires_grad}
    assert trained and not any(n.startswith(("enc.", "dec.direction.")) for n in trained)
    loaded = load_model(cfg, tmp_path / "dec" / MODEL_NAME).motion_autoencoder
    with torch.inference_mode():
        torch.testing.assert_close(loaded.encode_motion(pixels), latents_before)
    changed = [k for k, v in loaded.dec.state_dict().items() if not torch.equal(v, synthesis_before[k])]
    assert changed and not any(k.startswith("direction.") for k in changed)


def test_finest_level_names_the_decoders_last_level_from_the_configuration():
    from avatar_forcing.model.avatar_forcing import build_model
    from avatar_forcing.model.training.autoencoder import finest_level

    cfg = from_golden_dir(FOLDER)
    net = Reconstruction(build_model(cfg).motion_autoencoder)
    prefixes = finest_level(net)
    named = dict(net.named_parameters())
    for prefix in prefixes:
        assert any(name.startswith(prefix) for name in named), prefix
    # The flow head of that level predicts the grid at the frame's own size.
    (flow,) = [m for n, m in net.named_modules() if n + "." in prefixes and n.startswith("dec.to_flows.")]
    assert flow.grid.shape[1] == cfg.motion.input_size


def test_code_field_weights_weigh_each_expression_field_in_the_code_term():
    """With one field's error alone, the code term is that error times the field's share of the weights; all-ones
    weights give the plain mean (the recipe's earlier runs); a wrong count is a clear error."""
    from avatar_forcing.model.training.autoencoder import PairBatch, ReconstructionWeights
    from avatar_forcing.model.training.rig_pairs import CODE_FIELDS

    k = len(CODE_FIELDS)
    smile = CODE_FIELDS.index("smile")

    class FixedMagnitudes(torch.nn.Module):
        """Rebuilds the driving frame exactly and predicts every code right but the smile (off by 0.5)."""

        def forward(self, source, driving, with_magnitudes=False, known=None, forced=None):
            magnitudes = known.clone()
            magnitudes[:, smile] += 0.5
            return driving, magnitudes

    frames = torch.zeros(2, 3, 8, 8)
    batch = PairBatch(frames, frames, torch.arange(2), torch.rand(2, k))

    def code_term(fields: tuple[float, ...]) -> float:
        objective = ReconstructionObjective(ReconstructionWeights(code=1.0, code_fields=fields))
        return objective.loss(FixedMagnitudes(), batch, step=0)[1]["code"]

    assert code_term(()) == pytest.approx(0.25 / k)
    assert code_term((1.0,) * k) == pytest.approx(0.25 / k)
    heavy = tuple(8.0 if name == "smile" else 1.0 for name in CODE_FIELDS)
    assert code_term(heavy) == pytest.approx(0.25 * 8 / (k + 7))
    with pytest.raises(ValueError, match="code field weights"):
        code_term((1.0, 2.0))


def test_mouth_term_sees_only_the_mouth_region_and_needs_rig_pairs(tmp_path):
    """The mouth term is the mean error inside each pair's region: an error outside costs nothing, the same
    error inside costs its size whatever the region's area; an empty region costs zero, and a batch without
    regions (video pairs) has no mouth term at all. `--mouth-weight` with video pairs is refused."""
    from avatar_forcing.model.training.autoencoder import (
        PairBatch,
        ReconstructionObjective,
        ReconstructionWeights,
        region_l1,
    )

    target = torch.zeros(3, 3, 16, 16)
    region = torch.zeros(3, 1, 16, 16)
    region[0, :, 4:8, 4:8] = 1  # small region
    region[1, :, 2:14, 2:14] = 1  # large region
    recon = target.clone()
    recon[:2, :, 4:8, 4:8] = 0.5  # wrong inside both regions
    recon[:, :, 14:, 14:] = 1.0  # wrong outside every region
    assert region_l1(recon, target, region).tolist() == pytest.approx([0.5, 0.5 * 16 / 144, 0.0])

    objective = ReconstructionObjective(ReconstructionWeights(mouth=2.0))
    copy = lambda source, driving: recon
    with_region = objective.loss(copy, PairBatch(target, target, torch.arange(3), mouth=region), step=0)[1]
    without = objective.loss(copy, PairBatch(target, target, torch.arange(3)), step=0)[1]
    assert with_region["mouth"] == pytest.approx((0.5 + 0.5 * 16 / 144) / 3)
    assert "mouth" not in without
    assert with_region["loss"] == pytest.approx(without["loss"] + 2 * with_region["mouth"])

    from avatar_forcing.cli import main
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    assert main(["train", "autoencoder", "--videos", str(clip), "--out", str(tmp_path / "out"),
                 "--mouth-weight", "1"]) == 2


def test_code_field_weight_option_names_fields_and_rejects_bad_ones():
    from avatar_forcing.errors import UserError
    from avatar_forcing.model.training.rig_pairs import CODE_FIELDS
    from avatar_forcing.train import code_field_weights

    assert code_field_weights([]) == ()
    weights = code_field_weights(["smile=8", "rounding=4"])
    assert dict(zip(CODE_FIELDS, weights, strict=True)) == {**dict.fromkeys(CODE_FIELDS, 1.0), "smile": 8.0,
                                                             "rounding": 4.0}
    for bad, says in (("grin=3", "no field 'grin'"), ("smile=lots", "must be a number"), ("smile=-1", "0 or more")):
        with pytest.raises(UserError, match=says):
            code_field_weights([bad])


def test_the_same_seed_trains_the_same_file_stopped_and_resumed_or_not(tmp_path):
    """The recipe's first step twice, once straight and once stopped at its checkpoint and resumed: the same
    bytes in both exported files, so a model rebuilt from its recipe can match the shipped file's checksum."""
    import hashlib

    from avatar_forcing.cli import main
    from avatar_forcing.weights import builtin

    def run(out, *extra):
        code = main(["train", "autoencoder", "--rig-looks", "2", "--config", builtin.NAME, "--weights", "none",
                     "--device", "cpu", "--batch", "2", "--warmup", "1", "--ema", "0.9", "--code-weight", "10",
                     "--teacher", "0.5", "--lr", "1e-3", "--save-every", "2", "--seed", "0", "--no-progress",
                     "--out", str(tmp_path / out), "--steps", "4", *extra])
        assert code == 0

    run("straight")
    run("resumed", "--until", "2")
    run("resumed")
    for name in (AUTOENCODER_NAME, MODEL_NAME):
        straight, resumed = ((tmp_path / run_dir / name).read_bytes() for run_dir in ("straight", "resumed"))
        assert hashlib.sha256(straight).hexdigest() == hashlib.sha256(resumed).hexdigest(), name
