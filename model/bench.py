"""`avatar-forcing bench`: timings of the streaming path, printed as tables.

`bench sampler`: one session, the time per 10-frame block split by stage.
`bench engine`: N concurrent sessions, batched and one-at-a-time side by side: per-block latency by stage
(p50/p99), real-time factor per session, and the largest N whose every block meets its deadline.

Inputs are synthetic by default (speech-like noise, a random face crop); `--media DIR` uses a folder with
avatar.wav, user.mp4 and a portrait. Random weights give the same timings as trained ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .avatar_forcing import AvatarForcing, build_model
from .engine import STAGES, EngineSettings, StreamingEngine
from .generate import config_from_arg, pick_device


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
    from .media.audio import load_audio
    from .media.face import FaceTracker
    from .media.video import iter_video_frames
    from .offline import portrait_crop

    cfg = model.config
    size, sr = cfg.motion.input_size, cfg.sampling_rate
    portrait_path = next(p for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    tracker = FaceTracker(size=size)
    crops = []
    for frame in iter_video_frames(folder / "user.mp4"):
        crops.append(tracker.crop(frame))
        if len(crops) >= seconds * cfg.fps:
            break
    return BenchInputs(portrait_crop(portrait_path, size, True), load_audio(folder / "avatar.wav", sr)[: int(seconds * sr)],
                       load_audio(folder / "user.mp4", sr)[: int(seconds * sr)], np.stack(crops))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@dataclass
class RunStats:
    sessions: int
    batching: bool
    block_latency: list[float]  # seconds from "all due" to "outputs ready", one per session-block
    stage: dict[str, list[float]]  # per step, seconds (shared by the batch)
    step_wall: list[float]
    frames_per_session: int
    wall: float

    def rtf(self, fps: int) -> float:
        """Seconds of video per session per second of compute (>= 1 keeps up with real time)."""
        return self.frames_per_session / fps / self.wall


def run_sessions(model: AvatarForcing, inputs: BenchInputs, sessions: int, blocks: int, batching: bool,
                 decode: bool = True) -> RunStats:
    """Open `sessions` live sessions fed the same media, prime them, then time `blocks` steps.

    Every session's inputs are complete before each step (their session clocks start far in the past),
    so every step advances all of them at once: the worst case for a GPU worker. A block's latency runs
    from the start of its step to the moment its outputs are ready, so one-at-a-time stepping pays for
    the sessions served before it.
    """
    cfg = model.config
    engine = StreamingEngine(model, EngineSettings(max_sessions=sessions, decode=decode, batching=batching),
                             clock=time.perf_counter)
    base = time.perf_counter()
    opened = []
    for i in range(sessions):
        s = engine.open_session(inputs.portrait, seed=i, now=base - 1e4)  # a session clock far in the past
        s.inputs.push_speech(inputs.avatar_pcm)  # the application queues the whole utterance
        s.inputs.push_user_audio(inputs.user_pcm, 0.0)
        opened.append(s)
    block = cfg.transformer.block_frames
    pushed = 0

    def feed_camera(until_frame: int) -> None:
        """Webcam frames arrive as a camera sends them: the ones of the next block, before its step."""
        nonlocal pushed
        for j in range(pushed, min(until_frame, len(inputs.user_crops))):
            for s in opened:
                s.inputs.push_user_frame(inputs.user_crops[j], j / cfg.fps)
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
    for s in opened:
        engine.close_session(s.id)
    return RunStats(sessions, batching, latency, stage, step_wall, blocks * cfg.transformer.block_frames, wall)


# ----------------------------------------------------------------------------------------------------------
# Command line


def _model_for(args) -> AvatarForcing:
    cfg = config_from_arg(args.config)
    device = pick_device(args.device)
    if args.weights:
        from weights.loading import load_model

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
    stats = run_sessions(model, inputs, 1, args.blocks, batching=True)
    block_s = model.config.transformer.block_frames / model.config.fps
    print(f"\none session, {args.blocks} streaming blocks of {model.config.transformer.block_frames} frames "
          f"({block_s * 1000:.0f} ms of video each)")
    print(f"{'stage':<16}{'mean ms':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for k in STAGES:
        v = stats.stage[k]
        print(f"{k:<16}{1000 * statistics.fmean(v):>10.1f}{1000 * percentile(v, 50):>10.1f}{1000 * percentile(v, 99):>10.1f}")
    v = stats.step_wall
    print(f"{'block total':<16}{1000 * statistics.fmean(v):>10.1f}{1000 * percentile(v, 50):>10.1f}{1000 * percentile(v, 99):>10.1f}")
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
    for n in counts:
        for batching in (True, False):
            stats = run_sessions(model, inputs, n, args.blocks, batching, decode=not args.no_decode)
            results[(n, batching)] = stats
            per_stage = "".join(f"{1000 * percentile(stats.stage[k], 50):>7.1f}/{1000 * percentile(stats.stage[k], 99):<6.1f}"
                                for k in STAGES)
            ok = percentile(stats.block_latency, 99) <= deadline
            print(f"{n:>4} {'batched' if batching else 'one-by-one':<10}{per_stage}"
                  f"{1000 * percentile(stats.block_latency, 50):>9.1f}ms{1000 * percentile(stats.block_latency, 99):>9.1f}ms"
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
