"""`avatar-forcing generate`: portrait + avatar speech + user video -> an mp4 of the avatar."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tqdm import tqdm

from .errors import UserError
from .model.config import config_from_name
from .model.device import pick_device
from .model.media.video import Mp4Writer
from .model.offline import OfflineJob, check_files, generate_blocks, prepare

log = logging.getLogger("avatar_forcing.generate")


def add_generate_command(subparsers) -> None:
    p = subparsers.add_parser("generate", help="render an avatar video offline from files",
                              description=__doc__)
    p.add_argument("--avatar-image", required=True, type=Path, help="portrait of the avatar (JPEG/PNG)")
    p.add_argument("--avatar-audio", required=True, type=Path, help="what the avatar says (any audio file)")
    p.add_argument("--user-video", required=True, type=Path, help="the user's side of the conversation")
    p.add_argument("--user-audio", type=Path, help="the user's audio (default: the user video's track)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .mp4")
    p.add_argument("--config", default="official", help="'official' or a golden folder with small_config.json")
    p.add_argument("--weights", default=None,
                   help="checkpoint directory or full-model file (default: $AVATAR_FORCING_WEIGHTS or the hub)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=20, help="noise seed (same seed, same video)")
    p.add_argument("--no-crop", action="store_true", help="the portrait is already a square face crop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from avatar_forcing.weights.loading import load_model

    if args.output.suffix.lower() != ".mp4":
        raise UserError(f"output {args.output} must end in .mp4")
    job = OfflineJob(args.avatar_image, args.avatar_audio, args.user_video, args.user_audio,
                     crop_portrait=not args.no_crop, seed=args.seed)
    check_files(job)  # before the (slow) model load
    cfg = config_from_name(args.config)
    device = pick_device(args.device)
    t0 = time.perf_counter()
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
        for block in generate_blocks(model, prepared, seed=args.seed):
            writer.write_frames(block.frames)
            writer.write_audio(block.audio)
            bar.update(len(block.frames))
    elapsed = time.perf_counter() - t1
    seconds = prepared.num_frames / cfg.fps
    log.info("wrote %s: %d frames (%.2f s) in %.1f s (%.2fx real time)", args.output, prepared.num_frames,
             seconds, elapsed, seconds / max(elapsed, 1e-9))
    return 0
