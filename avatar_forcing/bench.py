"""`avatar-forcing bench`: timings of the streaming path, printed as tables.

`bench sampler`: one session, the time per 10-frame block split by stage.
`bench engine`: N concurrent sessions, batched and one-at-a-time side by side: per-block latency by stage
(p50/p99), real-time factor per session, and the largest N whose every block meets its deadline.

Inputs are synthetic by default (speech-like noise, a random face crop); `--media DIR` uses a folder with
avatar.wav, user.mp4 and a portrait. Random weights give the same timings as trained ones.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar_forcing.errors import UserError
from avatar_forcing.stats import percentile

from .model.avatar_forcing import AvatarForcing, build_model
from .model.config import config_from_name
from .model.device import pick_device
from .model.engine import STAGES, EngineSettings, LiveInputs, StreamingEngine, batch_buckets


@dataclass
class BenchInputs:
    portrait: np.ndarray  # [S, S, 3] uint8
    avatar_pcm: np.ndarray
    user_pcm: np.ndarray
    user_crops: np.ndarray  # [N, S, S, 3] uint8 at 25 fps


def synthetic_inputs(model: AvatarForcing, seconds: float, seed: int = 0) -> BenchInputs:
    cfg = model.config
    rng = np.random.default_rng(seed)
    size, sr = cfg.motion.input_size, cfg.sampling_rate
    n = int(seconds * sr)
    t = np.arange(n) / sr
    # Amplitude-modulated noise: voiced-looking bursts, so the normaliser sees speech and pauses.
    envelope = (np.sin(2 * np.pi * 3.0 * t) > -0.3).astype(np.float32)
    speech = (rng.standard_normal(n) * 0.05 * envelope).astype(np.float32)
    crops = rng.integers(0, 255, (int(seconds * cfg.fps), size, size, 3), dtype=np.uint8)
    return BenchInputs(crops[0], speech, np.roll(speech, sr // 3), crops)


def media_inputs(model: AvatarForcing, folder: Path, seconds: float) -> BenchInputs:
    from .model.media.audio import load_audio
    from .model.media.face import FaceTracker
    from .model.media.video import iter_video_frames
    from .model.offline import portrait_crop

    cfg = model.config
    size, sr = cfg.motion.input_size, cfg.sampling_rate
    portrait_path = next(p for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    tracker = FaceTracker(size=size)
    crops = []
    for frame in iter_video_frames(folder / "user.mp4"):
        crops.append(tracker.crop(frame))
        if len(crops) >= seconds * cfg.fps:
            break
    samples = int(seconds * sr)
    return BenchInputs(portrait_crop(portrait_path, size, True), load_audio(folder / "avatar.wav", sr)[:samples],
                       load_audio(folder / "user.mp4", sr)[:samples], np.stack(crops))


@dataclass
class RunStats:
    block_latency: list[float]  # seconds from "all due" to "outputs ready", one per session-block
    stage: dict[str, list[float]]  # per step, seconds (shared by the batch)
    step_wall: list[float]
    frames_per_session: int
    wall: float

    def rtf(self, fps: int) -> float:
        """Seconds of video per session per second of compute (>= 1 keeps up with real time)."""
        return self.frames_per_session / fps / self.wall


def make_engine(model: AvatarForcing, max_sessions: int, batching: bool = True, decode: bool = True,
                precision: str = "float32", upstream_steps: bool = False, compile: str | None = None,
                channels_last: bool = False) -> StreamingEngine:
    """An engine as the server builds it; a compiled one is precompiled for every bucket and phase here, so
    no timed step pays for compilation. compile: None, or the scope ("step" or "loop")."""
    buckets = batch_buckets(max_sessions) if compile is not None else None
    engine = StreamingEngine(model, EngineSettings(max_sessions=max_sessions, decode=decode, batching=batching,
                                                   precision=precision, upstream_steps=upstream_steps,
                                                   compile=compile is not None, compile_scope=compile or "step",
                                                   channels_last=channels_last,
                                                   batch_buckets=buckets),
                             clock=time.perf_counter)
    if compile is not None:
        engine.precompile()
    return engine


def run_sessions(model: AvatarForcing, inputs: BenchInputs, sessions: int, blocks: int, batching: bool,
                 decode: bool = True, precision: str = "float32", upstream_steps: bool = False,
                 compile: str | None = None, engine: StreamingEngine | None = None, profile: bool = False
                 ) -> RunStats:
    """Open `sessions` live sessions fed the same media, prime them, then time `blocks` steps.

    Every session's inputs are complete before each step (their session clocks start far in the past),
    so every step advances all of them at once: the worst case for a GPU worker. A block's latency runs
    from the start of its step to the moment its outputs are ready, so one-at-a-time stepping pays for
    the sessions served before it.
    """
    cfg = model.config
    engine = engine or make_engine(model, sessions, batching, decode, precision, upstream_steps, compile)
    # Stage times need a device sync around each stage (profiling); step times are measured without.
    engine.settings.profile_stages = profile
    base = time.perf_counter()
    opened: list[LiveInputs] = []
    ids: list[str] = []
    for i in range(sessions):
        live = engine.new_live_inputs()
        ids.append(engine.open_session(inputs.portrait, inputs=live, seed=i, now=base - 1e4).id)  # a past clock
        live.push_speech(inputs.avatar_pcm)  # the application queues the whole utterance
        live.push_user_audio(inputs.user_pcm, 0.0)
        opened.append(live)
    block = cfg.transformer.block_frames
    pushed = 0

    def feed_camera(until_frame: int) -> None:
        """Webcam frames arrive as a camera sends them: the ones of the next block, before its step."""
        nonlocal pushed
        for j in range(pushed, min(until_frame, len(inputs.user_crops))):
            for live in opened:
                live.push_user_crop(inputs.user_crops[j], j / cfg.fps)
        pushed = max(pushed, until_frame)

    engine.step()  # priming (the silent lead-in)
    latency: list[float] = []
    stage: dict[str, list[float]] = {k: [] for k in STAGES}
    step_wall: list[float] = []
    t_start = time.perf_counter()
    for b in range(blocks):
        feed_camera((b + 1) * block)
        t0 = time.perf_counter()
        outputs = engine.step()
        step_wall.append(time.perf_counter() - t0)
        if len(outputs) != sessions:
            raise RuntimeError(f"step {b} advanced {len(outputs)} of {sessions} sessions")
        latency.extend(out.done_at - t0 for out in outputs)
        for timings in {id(o.timings): o.timings for o in outputs}.values():
            for k in STAGES:
                stage[k].append(timings[k])
    wall = time.perf_counter() - t_start
    for sid in ids:
        engine.close_session(sid)
    return RunStats(latency, stage, step_wall, blocks * cfg.transformer.block_frames, wall)


def measure_audio_windows(model: AvatarForcing, folder: Path, windows: list[int], lookaheads: list[int],
                          seed: int = 20):
    """Streaming audio features (rolling windows) against whole-utterance encoding, on real media.

    Both runs use the same portrait, webcam crops (the offline fixed crop), noise seed and engine; only the
    audio features differ. Yields (window, avatar look-ahead, normalisation, avatar feature error, user
    feature error, output-latent error) as relative L2 over the whole clip. Normalisation "streaming" is the deployed
    running normaliser; "utterance" feeds audio already normalised over the whole clip, isolating the
    effect of the window itself.
    """
    from .model.audio_encoder import normalize_utterance
    from .model.engine import LiveSettings, PrecomputedInputs
    from .model.media.audio import load_audio
    from .model.media.face import default_detector
    from .model.offline import audio_features, clip_frames, motion_latents, portrait_crop, user_video_crops

    cfg = model.config
    sr, spf, size = cfg.sampling_rate, cfg.audio.samples_per_frame, cfg.motion.input_size
    avatar, user = load_audio(folder / "avatar.wav", sr), load_audio(folder / "user.mp4", sr)
    num_frames = clip_frames(avatar, user, spf)
    crops = list(user_video_crops(folder / "user.mp4", size, num_frames, default_detector()))
    portrait = portrait_crop(next(folder.glob("*.jpg")), size, True)
    motion = motion_latents(model, crops, num_frames)
    wa_ref, wu_ref = audio_features(model, avatar, num_frames), audio_features(model, user, num_frames)

    def run(live: LiveSettings | None = None, fill=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents, avatar and user features of one run: precomputed reference features, or live windows."""
        settings = EngineSettings(max_sessions=1, decode=False, record_conditions=True)
        if live is not None:
            settings.live = live
        engine = StreamingEngine(model, settings)
        inputs = PrecomputedInputs(wa_ref, wu_ref, motion) if live is None else engine.new_live_inputs()
        session = engine.open_session(portrait, seed=seed, inputs=inputs, now=0.0)
        if fill is not None:
            fill(session)
        outs = []
        while session.next_frame < num_frames:
            outs.extend(engine.step(now=1e9))

        def cat(part):
            return torch.cat([part(o) for o in outs])[:num_frames]

        return cat(lambda o: o.latents), cat(lambda o: o.conditions.wa[0]), cat(lambda o: o.conditions.wa_user[0])

    ref_latents, _, _ = run()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    runs = [(w, la, "streaming") for w in windows for la in lookaheads]
    runs += [(w, lookaheads[len(lookaheads) // 2], "utterance") for w in windows]
    for w, la, norm in runs:
        live = LiveSettings(window_frames=w, lead_in_frames=0, normalize=norm == "streaming",
                            avatar_lookahead_frames=la)
        a_pcm = avatar if norm == "streaming" else normalize_utterance(avatar).numpy()
        u_pcm = user if norm == "streaming" else normalize_utterance(user).numpy()

        def fill(session, a_pcm=a_pcm, u_pcm=u_pcm):
            session.inputs.push_speech(a_pcm)
            session.inputs.push_user_audio(u_pcm, 0.0)
            for j, crop in enumerate(crops):
                session.inputs.push_user_crop(crop, j / cfg.fps)

        latents, wa, wu = run(live, fill)
        yield w, la, norm, rel(wa, wa_ref), rel(wu, wu_ref), rel(latents, ref_latents)


def run_bench_audio_window(args) -> int:
    model = _model_for(args)
    if not args.media:
        raise UserError("bench audio-window needs --media FOLDER (avatar.wav, user.mp4 and a .jpg portrait)")
    _header(args, model)
    print("\nstreaming audio features vs whole-utterance encoding (relative L2 over the clip); the avatar's "
          "speech is queued, so its window may look ahead")
    print(f"{'window':>8}{'look-ahead':>12} {'normalisation':<14}{'avatar feat':>12}{'user feat':>12}{'latents':>10}")
    for w, la, norm, ea, eu, el in measure_audio_windows(model, Path(args.media), [int(x) for x in args.windows],
                                                         [int(x) for x in args.lookaheads]):
        print(f"{w:>5} fr{la:>9} fr {norm:<14}{ea:>12.4f}{eu:>12.4f}{el:>10.4f}")
    return 0


def measure_drift(model: AvatarForcing, inputs: BenchInputs, seconds: float, anchor: bool, seed: int = 0):
    """One live session for `seconds` of video, inputs looped; yields (time_s, |block mean - r_s| / |r_s|)
    per block, the distance the pose anchor acts on."""
    from .model.engine import PoseAnchorSettings

    cfg = model.config
    settings = EngineSettings(max_sessions=1, decode=False, pose_anchor=PoseAnchorSettings() if anchor else None)
    engine = StreamingEngine(model, settings)
    live = engine.new_live_inputs()
    session = engine.open_session(inputs.portrait, inputs=live, seed=seed, now=0.0)
    r_s = session.portrait.r_s[0]
    block = cfg.transformer.block_frames
    clip = len(inputs.user_crops)
    engine.step(now=0.0)
    for b in range(int(seconds * cfg.fps / block)):
        t = b * block / cfg.fps
        span = slice((b * block) % clip, (b * block) % clip + block)
        pcm = slice(span.start * cfg.audio.samples_per_frame, span.stop * cfg.audio.samples_per_frame)
        live.push_user_audio(inputs.user_pcm[pcm], t)
        if live.queued_speech_frames() < block:
            live.push_speech(inputs.avatar_pcm[pcm])
        for j, crop in enumerate(inputs.user_crops[span]):
            live.push_user_crop(crop, t + j / cfg.fps)
        (out,) = engine.step(now=t + 1.0)  # past the late-input wait: exactly this block is due
        yield t, float((out.latents.mean(0) - r_s).norm() / r_s.norm())


def run_bench_drift(args) -> int:
    model = _model_for(args)
    inputs = _inputs_for(args, model, 40)
    _header(args, model)
    print(f"\none live session, {args.seconds:.0f} s; inputs looped; distance = |block-mean latent - r_s| / |r_s|")
    runs = {a: list(measure_drift(model, inputs, args.seconds, a)) for a in (False, True)}
    print(f"{'time':>8}{'no anchor':>12}{'anchor':>10}")
    every = max(1, len(runs[False]) // 12)
    for i in range(0, len(runs[False]), every):
        window = slice(max(0, i - every + 1), i + 1)
        plain, anchored = (statistics.fmean(d for _, d in runs[a][window]) for a in (False, True))
        print(f"{runs[False][i][0]:>7.0f}s{plain:>12.3f}{anchored:>10.3f}")
    return 0


SWEEP_COUNTS = (1, 2, 4, 8, 12, 16, 20, 24, 32, 40, 48, 64)


@contextmanager
def reference_kernels():
    """Every kernel on its plain reference (kernels/), for the baseline run."""
    old = os.environ.get("AVATAR_FORCING_KERNELS")
    os.environ["AVATAR_FORCING_KERNELS"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AVATAR_FORCING_KERNELS")
        else:
            os.environ["AVATAR_FORCING_KERNELS"] = old


def stage_row(label: str, stats: RunStats) -> str:
    cells = " | ".join(f"{1000 * percentile(stats.stage[k], 50):.1f}" for k in STAGES)
    return (f"| {label} | {cells} | {1000 * percentile(stats.step_wall, 50):.1f} | "
            f"{1000 * percentile(stats.step_wall, 99):.1f} |")


def run_bench_gpu(args) -> int:
    """The numbers of benchmarks/RESULTS.md: one session the fast way and the reference way in the same
    run, the session sweep with per-session memory, and a latency budget from the measurements."""
    model = _model_for(args)
    device = next(model.parameters()).device
    cfg = model.config
    block_s = cfg.transformer.block_frames / cfg.fps
    inputs = _inputs_for(args, model, args.blocks)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    precision = args.precision or ("bfloat16" if device.type == "cuda" else "float32")
    _header(args, model)

    # One engine for the whole sweep, as in the server (a compiled one is precompiled here, untimed).
    t0 = time.perf_counter()
    engine = make_engine(model, args.max_sessions, precision=precision, compile=args.compile,
                         channels_last=args.channels_last)
    compiled = f" (precompiled every bucket, scope {args.compile})" if args.compile else ""
    print(f"engine ready in {time.perf_counter() - t0:.1f} s{compiled}",
          flush=True)
    run_sessions(model, inputs, min(2, args.max_sessions), 3, batching=True, engine=engine)  # warm-up
    with reference_kernels():
        baseline = run_sessions(model, inputs, 1, args.blocks, batching=False, precision="float32",
                                upstream_steps=True, profile=True)
    fast = run_sessions(model, inputs, 1, args.blocks, batching=True, engine=engine, profile=True)
    fast_unprofiled = run_sessions(model, inputs, 1, args.blocks, batching=True, engine=engine)

    sweep = []
    counts = sorted({int(n) for n in args.sessions}) if args.sessions else SWEEP_COUNTS
    for n in [c for c in counts if c <= args.max_sessions]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base_mem = torch.cuda.memory_allocated(device)
        stats = run_sessions(model, inputs, n, args.blocks, batching=True, engine=engine)
        peak = (torch.cuda.max_memory_allocated(device) - base_mem) if device.type == "cuda" else float("nan")
        p99 = percentile(stats.block_latency, 99)
        # Activations per session, plus the session's share of the KV pool (allocated once, up front).
        per_session = peak / n + engine.pool.nbytes() / engine.pool.capacity
        sweep.append((n, percentile(stats.block_latency, 50), p99, per_session / 2**20))
        print(f"N={n}: block p50 {1000 * sweep[-1][1]:.1f} ms, p99 {1000 * p99:.1f} ms", flush=True)
        if p99 > block_s:
            break
    held = max((n for n, _, p99, _ in sweep if p99 <= block_s), default=0)

    fast_p50, base_p50 = percentile(fast_unprofiled.step_wall, 50), percentile(baseline.step_wall, 50)
    compute_p99 = percentile(fast_unprofiled.block_latency, 99)
    command = "avatar-forcing " + " ".join(sys.argv[1:])
    lines = [
        f"## {time.strftime('%Y-%m-%d')}: {name}, {cfg.name}",
        "",
        f"Command: `{command}`; torch {torch.__version__}; precision {precision}; {args.blocks} streaming blocks "
        f"per run; inputs {'media ' + args.media if args.media else 'synthetic'}.",
        "",
        "Per block (10 frames, 400 ms of video), one session, milliseconds (p50 per stage; step p50 / p99):",
        "",
        "| path | " + " | ".join(STAGES) + " | step p50 | step p99 |",
        "|" + " --- |" * (len(STAGES) + 3),
        stage_row(f"fast ({precision}, fast kernels, batched{f', compiled ({args.compile})' if args.compile else ''}"
                  f"{', channels_last' if args.channels_last else ''})", fast),
        stage_row("reference way (fp32, reference kernels, one at a time, 9 transformer calls)", baseline),
        "",
        f"Stage times were taken with a device sync around each stage; without them, one session's step is "
        f"{1000 * fast_p50:.1f} ms p50, {1000 * percentile(fast_unprofiled.step_wall, 99):.1f} ms p99.",
        "",
        f"Speed-up of the fast path over the reference way, same run: {base_p50 / fast_p50:.2f}x (step p50).",
        "",
        "Concurrent sessions (batched), block latency from inputs complete to frames ready:",
        "",
        "| sessions | p50 ms | p99 ms | GPU memory per session MiB |",
        "| --- | --- | --- | --- |",
        *[f"| {n} | {1000 * p50:.1f} | {1000 * p99:.1f} | {'n/a (CPU)' if mem != mem else f'{mem:.0f}'} |"
          for n, p50, p99, mem in sweep],
        "",
        f"Largest number of sessions with every block (p99) inside {1000 * block_s:.0f} ms: **{held}**.",
        "",
        "Latency budget of one conversational turn (user speaks -> avatar reacts), one session:",
        "",
        "| part | ms | from |",
        "| --- | --- | --- |",
        f"| input buffering: a block's 10 frames of input | {1000 * block_s:.0f} | configuration |",
        f"| compute: the block, all stages (p99) | {1000 * compute_p99:.0f} | measured above |",
        f"| pacing: playout delay target minus the two above | "
        f"{max(0.0, 1000 * (args.target_latency - block_s - compute_p99)):.0f} | server setting "
        f"target_latency_s={args.target_latency} |",
        "| network and codecs: one WebRTC hop | measure with `avatar-forcing loadtest` (RTT/2) | not measured here |",
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(text + "\n")
        print(f"appended to {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Command line


def _model_for(args) -> AvatarForcing:
    cfg = config_from_name(args.config)
    device = pick_device(args.device)
    if args.weights:
        from avatar_forcing.weights.loading import load_model

        return load_model(cfg, args.weights, device=device)
    torch.manual_seed(0)
    return build_model(cfg, device)


def _inputs_for(args, model, blocks: int) -> BenchInputs:
    seconds = (blocks + 4) * model.config.transformer.block_frames / model.config.fps + 2
    if args.media:
        return media_inputs(model, Path(args.media), seconds)
    return synthetic_inputs(model, seconds)


def _header(args, model) -> None:
    dev = next(model.parameters()).device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    cfg = model.config
    print(f"config {cfg.name}: transformer {cfg.transformer.depth}x{cfg.transformer.dim_h}, "
          f"frames {cfg.motion.input_size}px; device {name}; torch {torch.__version__}; "
          f"inputs {'media ' + args.media if args.media else 'synthetic'}")


def run_bench_sampler(args) -> int:
    model = _model_for(args)
    inputs = _inputs_for(args, model, args.blocks)
    _header(args, model)
    run_sessions(model, inputs, 1, 3, batching=True)  # warm-up: first-call costs stay out of the figures
    stats = run_sessions(model, inputs, 1, args.blocks, batching=True)
    block_s = model.config.transformer.block_frames / model.config.fps
    print(f"\none session, {args.blocks} streaming blocks of {model.config.transformer.block_frames} frames "
          f"({block_s * 1000:.0f} ms of video each)")
    print(f"{'stage':<16}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}")

    def row(label: str, v: list[float]) -> str:
        mean, p50, p99 = 1000 * statistics.fmean(v), 1000 * percentile(v, 50), 1000 * percentile(v, 99)
        return f"{label:<16}{mean:>10.1f}{p50:>10.1f}{p99:>10.1f}"

    for k in STAGES:
        print(row(k, stats.stage[k]))
    print(row("block total", stats.step_wall))
    print(f"real-time factor {stats.rtf(model.config.fps):.2f}x (>= 1 keeps up)")
    return 0


def run_bench_engine(args) -> int:
    model = _model_for(args)
    counts = sorted({int(n) for n in args.sessions})
    inputs = _inputs_for(args, model, args.blocks)
    _header(args, model)
    deadline = model.config.transformer.block_frames / model.config.fps
    print(f"\n{args.blocks} streaming blocks per session after priming; deadline {deadline * 1000:.0f} ms per block")
    print(f"{'N':>4} {'mode':<10}" + "".join(f"{k[:12]:>14}" for k in STAGES)
          + f"{'block p50':>11}{'block p99':>11}{'RTF/sess':>10}{'in time':>9}")
    results: dict[tuple[int, bool], RunStats] = {}
    run_sessions(model, inputs, max(counts), 3, True, decode=not args.no_decode)  # warm-up: first-call costs
    for n in counts:
        for batching in (True, False):
            stats = run_sessions(model, inputs, n, args.blocks, batching, decode=not args.no_decode)
            results[(n, batching)] = stats
            per_stage = "".join(
                f"{1000 * percentile(stats.stage[k], 50):>7.1f}/{1000 * percentile(stats.stage[k], 99):<6.1f}"
                for k in STAGES)
            ok = percentile(stats.block_latency, 99) <= deadline
            p50, p99 = (1000 * percentile(stats.block_latency, q) for q in (50, 99))
            print(f"{n:>4} {'batched' if batching else 'one-by-one':<10}{per_stage}{p50:>9.1f}ms{p99:>9.1f}ms"
                  f"{stats.rtf(model.config.fps):>9.2f}x{'yes' if ok else 'NO':>9}")
    print("(stage columns: p50/p99 ms per step; a batched step serves all N sessions at once)")
    for batching in (True, False):
        fitting = [n for n in counts if percentile(results[(n, batching)].block_latency, 99) <= deadline]
        label = "batched" if batching else "one-by-one"
        print(f"largest N with every block (p99) inside {deadline * 1000:.0f} ms, {label}: "
              f"{max(fitting) if fitting else 'none of ' + str(counts)}")
    for n in counts:
        b, u = results[(n, True)], results[(n, False)]
        print(f"N={n}: one-by-one / batched wall time = {u.wall / b.wall:.2f}x")
    return 0


def add_bench_command(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks of the streaming path")
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")

    def common(q):
        q.add_argument("--config", default="official", help="'official' or a golden folder")
        q.add_argument("--weights", default=None, help="load weights (default: random, same speed)")
        q.add_argument("--device", default="auto")
        q.add_argument("--media", default=None, help="folder with avatar.wav, user.mp4 and a portrait")
        q.add_argument("--blocks", type=int, default=20, help="streaming blocks to time per session")

    s = sub.add_parser("sampler", help="one session: time per block by stage")
    common(s)
    s.set_defaults(func=run_bench_sampler)
    e = sub.add_parser("engine", help="N concurrent sessions, batched vs one at a time")
    common(e)
    e.add_argument("--sessions", nargs="+", default=[1, 4, 16], help="session counts to run (e.g. 1 4 16)")
    e.add_argument("--no-decode", action="store_true", help="skip frame decoding")
    e.set_defaults(func=run_bench_engine)
    gpu = sub.add_parser("gpu", help="the GPU numbers of benchmarks/RESULTS.md (fast vs reference way, sweep)")
    common(gpu)
    gpu.add_argument("--max-sessions", type=int, default=64)
    gpu.add_argument("--sessions", nargs="+", help="session counts of the sweep (default: 1 2 4 8 ... up to the max)")
    gpu.add_argument("--precision", choices=("float32", "bfloat16"), help="default: bfloat16 on a GPU")
    gpu.add_argument("--target-latency", type=float, default=0.7, help="the server's target_latency_s")
    gpu.add_argument("--compile", nargs="?", const="step", choices=("step", "loop"),
                     help="compiled engine (CUDA graphs per bucket): the transformer call (step, the default) or "
                          "the whole denoising loop (loop)")
    gpu.add_argument("--channels-last", action="store_true",
                     help="the motion auto-encoder in channels_last memory (also for the reference way: same model)")
    gpu.add_argument("--results", default="benchmarks/RESULTS.md", help="append the section here ('' to skip)")
    gpu.set_defaults(func=run_bench_gpu)
    d = sub.add_parser("drift", help="pose drift of a long session, with and without the pose anchor")
    common(d)
    d.add_argument("--seconds", type=float, default=120.0)
    d.set_defaults(func=run_bench_drift)
    w = sub.add_parser("audio-window", help="streaming audio features vs whole-utterance encoding")
    common(w)
    w.add_argument("--windows", nargs="+", default=[25, 50, 60, 100, 200], help="window lengths in frames")
    w.add_argument("--lookaheads", nargs="+", default=[0, 10, 25, 50], help="avatar look-ahead in frames")
    w.set_defaults(func=run_bench_audio_window)
