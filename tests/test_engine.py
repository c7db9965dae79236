"""The streaming engine with live inputs: batching, rebasing, the cache pool, and imperfect input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden_data import model_folders, relative_l2, small_model

from avatar_forcing.model.config import from_golden_dir
from avatar_forcing.model.engine import EngineSettings, LiveSettings, PoolFullError, StreamingEngine
from avatar_forcing.model.engine.clock import TimestampMapper
from avatar_forcing.model.engine.timeline import AudioTrack

# Rates and sizes come from the configuration of the folder under test (every folder in
# AVATAR_FORCING_GOLDEN, one after the other): `folder` below sets them before that folder's tests run.
FOLDER = CFG = None
FPS = SR = SPF = CLIP = BLOCK = 0
BLOCK_S = 0.0


@pytest.fixture(scope="module", params=model_folders(), autouse=True)
def folder(request):
    global FOLDER, CFG, FPS, SR, SPF, CLIP, BLOCK, BLOCK_S
    FOLDER = request.param
    CFG = from_golden_dir(FOLDER)
    FPS, SR = CFG.fps, CFG.sampling_rate
    SPF = SR // FPS
    CLIP = CFG.transformer.clip_frames  # the priming window, and the live lead-in
    BLOCK = CFG.transformer.block_frames
    BLOCK_S = BLOCK / FPS
    return FOLDER


@pytest.fixture(scope="module")
def model(folder):
    return small_model(folder)


def speechlike(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    envelope = (np.sin(2 * np.pi * (2 + seed) * t) > -0.2).astype(np.float32)
    return (rng.standard_normal(n) * 0.05 * envelope).astype(np.float32)


def faces(seconds: float, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(100 + seed)
    return rng.integers(0, 255, (int(seconds * FPS), size, size, 3), dtype=np.uint8)


def feed(session, seconds: float, seed: int, size: int) -> None:
    session.inputs.push_speech(speechlike(seconds, seed))
    session.inputs.push_user_audio(speechlike(seconds, seed + 7), 0.0)
    for j, crop in enumerate(faces(seconds, size, seed)):
        session.inputs.push_user_crop(crop, j / FPS)


def portrait(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


# -- batching ----------------------------------------------------------------------------------------------

LATE = 1e6  # a clock far past every block's deadline: every open session is due at every step


def test_batched_steps_equal_each_session_alone(model):
    """Sessions join and leave between steps; every block of every session equals that session run alone."""
    size = model.config.motion.input_size
    plan = {"a": (0, 7), "b": (2, 9), "c": (3, 6)}  # session -> (step it opens before, step it closes after)
    engine = StreamingEngine(model, EngineSettings(max_sessions=3, decode=False))
    batched: dict[str, list[torch.Tensor]] = {k: [] for k in plan}
    seeds = {"a": 1, "b": 2, "c": 3}
    mixed_positions = False
    for step in range(10):
        for sid, (start, _) in plan.items():
            if step == start:
                feed(engine.open_session(portrait(size, seeds[sid]), seed=seeds[sid], session_id=sid, now=0.0),
                     8.0, seeds[sid], size)
        outputs = engine.step(now=LATE)
        if len({o.first_frame for o in outputs}) > 1:
            mixed_positions = True
        for out in outputs:
            batched[out.session_id].append(out.latents)
        for sid, (_, stop) in plan.items():
            if step == stop and sid in engine.sessions:
                engine.close_session(sid)
    assert mixed_positions, "no step mixed sessions at different positions"
    assert engine.capacity_left == 3

    for sid, blocks in batched.items():
        alone = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False))
        feed(alone.open_session(portrait(size, seeds[sid]), seed=seeds[sid], session_id=sid, now=0.0),
             8.0, seeds[sid], size)
        for i, expected in enumerate(blocks):
            (out,) = alone.step(now=LATE)
            assert relative_l2(out.latents, expected) < 1e-5, f"session {sid} block {i}"


def test_session_replays_exactly_with_its_seed(model):
    size = model.config.motion.input_size

    def run(seed):
        engine = StreamingEngine(model, EngineSettings(max_sessions=1))
        feed(engine.open_session(portrait(size, 0), seed=seed, now=0.0), 3.0, 0, size)
        return [engine.step(now=LATE)[0] for _ in range(3)]

    a, b, c = run(11), run(11), run(12)
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[-1].frames, c[-1].frames)
    assert a[0].frames.shape == (CLIP, size, size, 3) and a[1].frames.shape == (BLOCK, size, size, 3)


# -- unbounded sessions ------------------------------------------------------------------------------------


def test_rebased_session_equals_unrebased_run():
    """A 128-position table forces rebasing every few blocks; a 4096 one never does. Same outputs."""
    size = None
    outs = {}
    for positions in (128, 4096):
        m = small_model(FOLDER, positions)
        size = m.config.motion.input_size
        engine = StreamingEngine(m, EngineSettings(max_sessions=1, decode=False))
        session = engine.open_session(portrait(size, 5), seed=5, now=0.0)
        feed(session, 12.0, 5, size)
        outs[positions] = torch.cat([engine.step(now=LATE)[0].latents for _ in range(26)])
        if positions == 128:
            assert session.position_offset > 0, "the short table never rebased"
    assert outs[128].shape[0] == CLIP + 25 * BLOCK
    assert relative_l2(outs[128], outs[4096]) < 1e-5


# -- the cache pool ----------------------------------------------------------------------------------------


def test_pool_capacity_and_slot_reuse(model):
    size = model.config.motion.input_size
    engine = StreamingEngine(model, EngineSettings(max_sessions=2, decode=False))
    a = engine.open_session(portrait(size, 1), now=0.0)
    engine.open_session(portrait(size, 2), now=0.0)
    with pytest.raises(PoolFullError):
        engine.open_session(portrait(size, 3), now=0.0)
    engine.close_session(a.id)
    c = engine.open_session(portrait(size, 3), now=0.0)
    assert c.slot == a.slot
    assert engine.portraits.misses == 3  # one encoding per distinct portrait
    assert engine.capacity_left == 0


# -- imperfect input is normal -----------------------------------------------------------------------------


def test_silent_session_keeps_to_its_schedule(model):
    """No microphone, no camera, no speech: blocks still come, once the late-input wait has passed."""
    size = model.config.motion.input_size
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False))
    session = engine.open_session(portrait(size, 1), now=0.0)
    assert [o.first_frame for o in engine.step(now=0.0)] == [0]  # the silent lead-in primes at once
    wait = engine.live_settings.max_wait_frames / FPS
    assert engine.step(now=BLOCK_S + wait - 0.01) == []
    (block,) = engine.step(now=BLOCK_S + wait + 0.001)
    assert block.first_frame == CLIP and not block.lead_in
    assert np.all(block.audio == 0)
    assert session.inputs.frames.slot(0).frame_id is None


def test_microphone_audio_makes_blocks_due_without_waiting(model):
    size = model.config.motion.input_size
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False))
    session = engine.open_session(portrait(size, 1), now=0.0)
    engine.step(now=0.0)
    session.inputs.push_user_audio(speechlike(BLOCK_S, 1), 0.0)
    assert [o.first_frame for o in engine.step(now=BLOCK_S + 0.01)] == [CLIP]


def test_late_and_bursty_audio(model):
    size = model.config.motion.input_size
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False))
    session = engine.open_session(portrait(size, 1), now=0.0)
    engine.step(now=0.0)
    engine.step(now=1.0)  # the first block (input 0 to one block) given up on: generated from silence
    session.inputs.push_user_audio(speechlike(BLOCK_S, 1), 0.0)  # arrives too late for its block
    assert session.inputs.user.dropped_samples == BLOCK * SPF
    # A burst covering 3 s arrives at once: one block per step, in order, no error (no catch-up configured).
    session.inputs.push_user_audio(speechlike(3.0, 2), BLOCK_S)
    firsts = [o.first_frame for _ in range(4) for o in engine.step(now=1.0)]
    assert firsts == [CLIP + k * BLOCK for k in range(1, 5)]


def test_missing_webcam_frames_hold_then_go_null(model):
    size = model.config.motion.input_size
    settings = EngineSettings(max_sessions=1, decode=False, live=LiveSettings(motion_hold_s=0.4))
    engine = StreamingEngine(model, settings)
    session = engine.open_session(portrait(size, 1), now=0.0)
    for j, crop in enumerate(faces(0.2, size, 1)):  # 5 frames, then the camera stalls
        session.inputs.push_user_crop(crop, j / FPS)
    frames = session.inputs.frames
    assert frames.slot(4).frame_id is not None
    assert frames.slot(12).frame_id == frames.slot(4).frame_id  # held
    assert frames.slot(30).frame_id is None  # too old: null motion


def test_speech_at_any_rate_and_barge_in(model):
    size = model.config.motion.input_size
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False))
    session = engine.open_session(portrait(size, 1), now=0.0)
    engine.step(now=0.0)
    tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(48000 * 2) / 48000)).astype(np.float32)  # 2 s at 48 kHz
    first = session.inputs.push_speech(tone, sample_rate=48000)
    assert first == CLIP  # speech starts at the first frame not generated yet
    (block,) = engine.step(now=1.0)
    spectrum = np.abs(np.fft.rfft(block.audio))
    assert abs(np.argmax(spectrum) * SR / len(block.audio) - 300) < 5
    assert 0.15 < np.abs(block.audio).max() < 0.35
    assert session.inputs.queued_speech_frames() == 2 * FPS - BLOCK
    session.inputs.interrupt()
    assert session.inputs.queued_speech_frames() == 0
    (after,) = engine.step(now=2.0)
    assert np.all(after.audio == 0)


def test_long_live_session_memory_is_bounded(model):
    size = model.config.motion.input_size
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False))
    session = engine.open_session(portrait(size, 1), now=0.0)
    engine.step(now=0.0)
    sizes = []
    for b in range(40):
        t = b * BLOCK_S
        session.inputs.push_user_audio(speechlike(BLOCK_S, b), t)
        for j, crop in enumerate(faces(BLOCK_S, size, b)):
            session.inputs.push_user_crop(crop, t + j / FPS)
        assert len(engine.step(now=t + BLOCK_S)) == 1
        sizes.append((len(session.inputs.user._buf), len(session.inputs.frames._times), len(session.motion_latents)))
    window = (engine.live_settings.window_frames + 16) * SPF
    later = sizes[10:]
    assert max(a for a, _, _ in later) <= 4 * window, "the microphone buffer keeps growing"
    assert max(f for _, f, _ in later) <= 2 * engine.tcfg.block_tokens, "webcam frames are not released"
    assert max(m for _, _, m in later) <= 64


# -- clocks ------------------------------------------------------------------------------------------------


def test_timestamp_mapper_follows_drift_and_ignores_jitter():
    rng = np.random.default_rng(0)
    mapper = TimestampMapper(window_s=5.0)
    drift = 300e-6  # the sender's clock runs 300 ppm fast
    errors = []
    for i in range(3000):  # 60 s of 20 ms packets
        true_time = i * 0.02
        media = 1234.5 + true_time * (1 + drift)
        arrival = true_time + 0.05 + abs(rng.normal(0, 0.02))  # transport delay plus jitter
        mapped = mapper.map(media, arrival)
        errors.append(mapped - (true_time + 0.05))
    assert max(abs(e) for e in errors[-500:]) < 0.01
    # A sender restart (timestamps jump) re-anchors at once.
    mapped = mapper.map(0.0, 60.1)
    assert abs(mapped - 60.1) < 0.01 and mapper.resets == 1


# -- drift control -----------------------------------------------------------------------------------------


def test_pose_anchor_only_acts_outside_its_band_and_is_bounded():
    from avatar_forcing.model.engine.drift import PoseAnchor, PoseAnchorSettings

    r_s = torch.tensor([3.0, 4.0])  # |r_s| = 5
    anchor = PoseAnchor(PoseAnchorSettings(ema=1.0, deadband=0.25, gain=0.5, max_step=0.05))
    near = r_s + torch.tensor([[1.0, 0.0]]).expand(10, 2)  # 1.0 <= 0.25 * 5: inside the band
    assert torch.equal(anchor.apply(near, r_s), near)
    far = r_s + torch.tensor([[4.0, 0.0]]).expand(10, 2)  # 4.0 - 1.25 = 2.75 excess
    out = anchor.apply(far, r_s)
    pull = (far - out)[:, 0]
    assert torch.all(pull[1:] >= pull[:-1]), "the correction ramps in over the block"
    assert abs(float(pull[-1]) - 0.05 * 5) < 1e-6, "bounded by max_step * |r_s|"
    assert torch.all((far - out)[:, 1] == 0), "it pulls straight towards r_s"
    assert anchor.corrections == 1


def test_engine_with_pose_anchor_changes_only_streaming_blocks(model):
    from avatar_forcing.model.engine import PoseAnchorSettings

    size = model.config.motion.input_size
    results = []
    for anchor in (None, PoseAnchorSettings(deadband=0.0)):
        engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False, pose_anchor=anchor))
        feed(engine.open_session(portrait(size, 1), seed=1, now=0.0), 2.0, 1, size)
        results.append([engine.step(now=LATE)[0].latents for _ in range(3)])
    assert torch.equal(results[0][0], results[1][0])  # priming is never anchored
    assert not torch.equal(results[0][1], results[1][1])


# -- static shapes and compilation -------------------------------------------------------------------------


def run_three(model, engine: StreamingEngine | None = None, **settings):
    size = model.config.motion.input_size
    engine = engine or StreamingEngine(model, EngineSettings(max_sessions=4, decode=False, **settings))
    for seed in (1, 2, 3):
        feed(engine.open_session(portrait(size, seed), seed=seed, session_id=f"s{seed}", now=0.0), 3.0, seed, size)
    blocks = {}
    for _ in range(4):
        for out in engine.step(now=LATE):
            blocks.setdefault(out.session_id, []).append(out.latents)
    for sid in list(engine.sessions):
        engine.close_session(sid)
    return {sid: torch.cat(x) for sid, x in blocks.items()}


def test_padding_batches_to_a_bucket_changes_nothing(model):
    plain = run_three(model)
    padded = run_three(model, batch_buckets=(1, 2, 8))  # 3 sessions run as 8 rows
    for sid in plain:
        assert relative_l2(padded[sid], plain[sid]) < 1e-6, sid


def test_speech_pushed_while_a_block_is_in_flight_starts_after_it(model):
    """A block's conditions are read when it is requested; speech arriving while it is being generated
    must not land in its frames (its lips would not move) nor be cut from it by a barge-in."""
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False))
    inputs = engine.new_live_inputs()
    ctx = engine.tcfg.context_frames
    inputs.request(0, CLIP)  # priming claimed
    inputs.request(CLIP - ctx, CLIP + BLOCK)  # the next block is being generated: its frames are claimed
    assert inputs.push_speech(np.ones(BLOCK * SPF, np.float32)) == CLIP + BLOCK
    assert inputs.queued_speech_frames() == BLOCK
    inputs.interrupt()
    assert inputs.queued_speech_frames() == 0


# -- catch-up, failed opens, frame marking ----------------------------------------------------------------


def test_audio_track_shift_moves_queued_samples_later_and_leaves_silence():
    """The move catch-up makes: samples from pos on are said `by` samples later, the gap reads as silence."""
    track = AudioTrack()
    track.write(0, np.arange(1, 11, dtype=np.float32))  # samples 1..10 at positions 0-9
    track.shift(4, 3)
    expected = [1, 2, 3, 4, 0, 0, 0, 5, 6, 7, 8, 9, 10, 0, 0]
    assert track.read(0, 15).tolist() == expected
    assert track.end == 13
    track.shift(13, 5)  # at the end of what is queued: nothing to move
    track.shift(40, 5)  # past it: the same
    assert track.read(0, 15).tolist() == expected and track.end == 13
    track.shift(2, 0)  # by nothing: unchanged
    assert track.read(0, 15).tolist() == expected and track.end == 13
    # Only silence queued from pos on: it is dropped rather than moved, so the queue ends at pos.
    quiet = AudioTrack()
    quiet.write(0, np.array([1, 2, 0, 0, 0], np.float32))
    quiet.shift(2, 4)
    assert quiet.end == 2 and quiet.read(0, 10).tolist() == [1, 2] + [0] * 8


def test_a_session_behind_real_time_skips_to_its_newest_input(model):
    """With catch-up on, a session whose next block ends far behind its newest input skips the stale span:
    the block after the gap ends at the newest input, the model's frames stay contiguous (so its context
    and cache are untouched), and speech queued in the skipped span is said after it, not lost."""
    size = model.config.motion.input_size
    lag = BLOCK
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False, max_lag_frames=lag))
    session = engine.open_session(portrait(size, 1), seed=1, now=0.0)
    engine.step(now=0.0)  # priming
    session.inputs.push_user_audio(speechlike(4.0, 1), 0.0)  # 4 s of microphone arrived
    speech_start = session.inputs.push_speech(speechlike(1.0, 2))
    assert speech_start == CLIP
    (late,) = engine.step(now=4.0)  # the worker was stalled: 4 s of input are waiting
    newest = CLIP + int(4.0 * FPS)
    assert late.skipped_frames == newest - (CLIP + BLOCK)
    assert late.first_frame + BLOCK == newest, "the block after the gap ends at the newest input"
    assert session.next_frame == CLIP + BLOCK, "model frames stay contiguous"
    assert session.input_offset == late.skipped_frames
    assert np.abs(late.audio).max() > 0, "speech queued in the skipped span is said after it"
    assert session.inputs.queued_speech_frames() == FPS - BLOCK
    # On time again: the next block follows without a gap.
    session.inputs.push_user_audio(speechlike(BLOCK_S, 3), 4.0)
    (on_time,) = engine.step(now=4.0 + BLOCK_S)
    assert on_time.skipped_frames == 0 and on_time.first_frame == late.first_frame + BLOCK


def test_without_catch_up_a_late_session_replays_every_block(model):
    size = model.config.motion.input_size
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False))
    session = engine.open_session(portrait(size, 1), seed=1, now=0.0)
    engine.step(now=0.0)
    session.inputs.push_user_audio(speechlike(4.0, 1), 0.0)
    (out,) = engine.step(now=4.0)
    assert out.skipped_frames == 0 and out.first_frame == CLIP


@pytest.mark.parametrize("seed", [2**64, -1])
def test_a_failed_open_leaks_no_slot(model, seed):
    size = model.config.motion.input_size
    engine = StreamingEngine(model, EngineSettings(max_sessions=1, decode=False))
    with pytest.raises(ValueError, match="seed"):
        engine.open_session(portrait(size, 1), seed=seed, now=0.0)
    with pytest.raises(ValueError):
        engine.open_session(np.zeros((size, size), np.uint8), now=0.0)  # not an RGB crop
    assert engine.capacity_left == 1 and not engine.sessions
    engine.open_session(portrait(size, 1), seed=0, now=0.0)


def test_frame_marker_sees_every_decoded_frame_on_the_device(model):
    """The marker hook gets each step's frames (uint8, rows = sessions) before they leave the device."""
    size = model.config.motion.input_size
    seen: list[tuple[list[str], tuple[int, ...], torch.dtype]] = []

    def marker(session_ids: list[str], frames: torch.Tensor) -> torch.Tensor:
        seen.append((session_ids, tuple(frames.shape), frames.dtype))
        marked = frames.clone()
        marked[..., 0, 0, :] = 255  # a visible corner pixel, to check the marked frames are the ones kept
        return marked

    engine = StreamingEngine(model, EngineSettings(max_sessions=2, frame_marker=marker))
    for sid in ("a", "b"):
        feed(engine.open_session(portrait(size, 1), seed=1, session_id=sid, now=0.0), 1.0, 1, size)
    outputs = engine.step(now=LATE)
    assert seen == [(["a", "b"], (2, CLIP, size, size, 3), torch.uint8)]
    assert all(np.all(out.frames[:, 0, 0] == 255) for out in outputs)


def test_motion_basis_is_computed_once_per_weight_version(model):
    """The QR basis is cached under inference mode and follows weight updates."""
    direction = model.motion_autoencoder.dec.direction
    with torch.inference_mode():
        first = direction.basis()
        assert direction.basis() is first
    with torch.no_grad():
        direction.weight.mul_(1.0)  # an in-place update bumps the weight's version
    with torch.inference_mode():
        again = direction.basis()
    assert again is not first and torch.equal(again, first)
    from avatar_forcing.model.motion_autoencoder import Direction

    trainable = Direction(model.config.motion)
    assert trainable.basis().requires_grad, "training still differentiates through the QR"


def test_pixels_normalised_on_the_device_equal_the_host_rule():
    from avatar_forcing.model.engine.staging import PinnedUploads, normalise_pixels
    from avatar_forcing.model.media.image import to_model_input

    crops = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    device = torch.device("cpu")
    on_device = normalise_pixels(PinnedUploads(device)(crops), torch.float32)
    assert torch.equal(on_device, to_model_input(crops))
