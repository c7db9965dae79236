"""`avatar-forcing generate`: portrait + avatar speech + user video -> an mp4 of the avatar."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .errors import UserError
from .provenance.offline import add_provenance_arguments

# The model code (torch, transformers, PyAV) is imported in run_generate, not here: the command line
# registers this command without paying for it (`avatar-forcing --help` stays instant).

log = logging.getLogger("avatar_forcing.generate")


def add_generate_command(subparsers) -> None:
    p = subparsers.add_parser("generate", help="render an avatar video offline from files",
                              description=__doc__)
    p.add_argument("--avatar-image", required=True, type=Path, help="portrait of the avatar (JPEG/PNG)")
    p.add_argument("--avatar-audio", required=True, type=Path, help="what the avatar says (any audio file)")
    p.add_argument("--user-video", required=True, type=Path, help="the user's side of the conversation")
    p.add_argument("--user-audio", type=Path, help="the user's audio (default: the user video's track)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .mp4")
    p.add_argument("--config", default="official",
                   help="'official', 'builtin' (the built-in model) or a golden folder with small_config.json")
    p.add_argument("--weights", default=None,
                   help="checkpoint directory or full-model file (default: $AVATAR_FORCING_WEIGHTS, else the official "
                        "weights when cached, else the built-in model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=20, help="noise seed (same seed, same video)")
    p.add_argument("--no-crop", action="store_true", help="the portrait is already a square face crop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_provenance_arguments(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from avatar_forcing.weights import builtin, hub
    from avatar_forcing.weights.loading import load_model

    from .model.config import config_from_name
    from .model.device import pick_device
    from .model.media.face import default_detector
    from .model.media.video import Mp4Writer, probe_video
    from .model.offline import OfflineJob, check_files, generate_blocks, portrait_crop, prepare

    if args.output.suffix.lower() != ".mp4":
        raise UserError(f"output {args.output} must end in .mp4")
    if not args.output.parent.is_dir():
        raise UserError(f"output folder {args.output.parent} does not exist: create it or choose another -o")
    job = OfflineJob(args.avatar_image, args.avatar_audio, args.user_video, args.user_audio,
                     crop_portrait=not args.no_crop, seed=args.seed)
    # Everything that can be wrong with the inputs is found before the model loads (minutes with the
    # official weights): missing files, a portrait without a face, a video that is not one, no weights.
    check_files(job)
    stands_in = use_builtin_unless_configured(args)
    cfg = config_from_name(args.config)
    portrait_crop(job.avatar_image, cfg.motion.input_size, job.crop_portrait, default_detector())
    probe_video(job.user_video)
    if stands_in:  # said once the inputs are known to be good, as `serve` says it when it starts
        log.warning(builtin.notice())
    if args.config in ("", "official"):
        log.info("weights: %s", hub.preflight(args.weights))
    elif args.config != builtin.NAME:  # (the built-in model was announced, or named)
        log.warning("the %s configuration with its random weights gives a moving, meaningless face: fine for "
                    "testing the pipeline, not an avatar (use the official weights for that)", args.config)
    device = pick_device(args.device)
    t0 = time.perf_counter()
    from .provenance.offline import OfflineProvenance

    provenance = OfflineProvenance(args, cfg.name)
    model = load_model(cfg, args.weights, device=device)
    log.info("model loaded on %s in %.1f s", device, time.perf_counter() - t0)

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.no_progress:
            return
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, unit="frame", leave=False))
        bar.update(done - bar.n)

    prepared = prepare(model, job, progress=progress)
    for bar in bars.values():
        bar.close()
    size = cfg.motion.input_size
    sr = cfg.sampling_rate
    t1 = time.perf_counter()
    with Mp4Writer(args.output, fps=cfg.fps, width=size, height=size, audio_rate=sr) as writer, \
            tqdm(total=prepared.num_frames, desc="generating", unit="frame", disable=args.no_progress) as bar:
        # Decoded and marked on the model's device: every block has frames.
        for block in generate_blocks(model, prepared, seed=args.seed, frame_marker=provenance.marker,
                                     session_id=provenance.run_id):
            if block.frames is None:
                raise RuntimeError(f"block {block.index} came without frames: the engine did not decode it")
            writer.write_frames(block.frames)
            writer.write_audio(block.audio)
            bar.update(len(block.frames))
    elapsed = time.perf_counter() - t1
    provenance.sign(args.output)
    seconds = prepared.num_frames / cfg.fps
    speed = seconds / max(elapsed, 1e-9)
    pace = f"{speed:.2f}x faster than real time" if speed >= 1 else f"{1 / speed:.2f}x slower than real time"
    log.info("wrote %s: %.2f s of video (%d frames) generated in %.1f s, %s", args.output, seconds,
             prepared.num_frames, elapsed, pace)
    return 0


def use_builtin_unless_configured(args: argparse.Namespace) -> bool:
    """Nothing configured and no official files in the cache: the built-in model (True: the caller says so in
    one line, as `avatar-forcing serve` does)."""
    import os

    from avatar_forcing.weights import builtin, hub

    if args.config == builtin.NAME:
        args.weights = args.weights or builtin.NAME
    elif builtin.stands_in(args.config, args.weights or os.environ.get(hub.WEIGHTS_ENV)):
        args.config, args.weights = builtin.NAME, builtin.NAME
        return True
    return False
