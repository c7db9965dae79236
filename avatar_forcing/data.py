"""`avatar-forcing data prepare`: a manifest of dyadic clips -> training shards for `avatar-forcing train`.
`avatar-forcing data conversations`: dyadic clips made here (rigged public-domain portraits, espeak-ng voices).

    avatar-forcing data prepare --manifest clips.jsonl --out shards/ --weights hub
    avatar-forcing data conversations --out convs/ --count 8 --seconds 30

Manifest lines: {"name": ..., "avatar_video": ..., "user_video": ..., "avatar_audio"?: ..., "user_audio"?: ...}
(paths relative to the manifest). Rerun the same command to continue an interrupted run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .errors import UserError

log = logging.getLogger("avatar_forcing.data")


def add_data_command(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare training shards from dyadic videos", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = actions.add_parser("prepare", help="manifest of dyadic clips -> safetensors shards + index.json")
    k.add_argument("--manifest", required=True, type=Path, help="JSON list or JSON lines of clips")
    k.add_argument("--out", required=True, type=Path, help="shard folder (created; reruns continue in it)")
    k.add_argument("--config", default="official", help="'official' or a folder with small_config.json")
    k.add_argument("--weights", default=None, help="the frozen motion encoder and wav2vec2 ('hub', folder, file)")
    k.add_argument("--device", default="auto")
    k.add_argument("--clips-per-shard", type=int, default=64)
    k.add_argument("--max-seconds", type=float, default=None, help="cut each clip to at most this long")
    k.add_argument("--skip-bad", action="store_true",
                   help="record clips without a face or audio in index.json's 'rejected' and go on (default: stop)")
    k.add_argument("--whole-frames", action="store_true",
                   help="the videos are face crops already (as `data conversations` writes): no face detection")
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=run_prepare)
    c = actions.add_parser("conversations", help="make dyadic conversations here: rigged public-domain portraits, "
                                                 "espeak-ng voices (the built-in model's data)")
    c.add_argument("--out", required=True, type=Path, help="folder for the videos and manifest.jsonl")
    c.add_argument("--count", type=int, default=8, help="conversations to make")
    c.add_argument("--seconds", type=float, default=30.0, help="length of each")
    c.add_argument("--size", type=int, default=256, help="frame side (square face crops)")
    c.add_argument("--portrait", type=Path, action="append", default=[],
                   help="a portrait you may use (repeatable; default: the public-domain ones packages ship)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=run_conversations)


def run_conversations(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from avatar_forcing.errors import MediaError, NoFaceError
    from avatar_forcing.model.media.face import crop_portrait
    from avatar_forcing.model.media.image import load_image
    from avatar_forcing.model.training.conversations import (
        augmented,
        make_conversation,
        packaged_portraits,
        write_conversation,
    )
    from avatar_forcing.model.training.rig import FaceRig

    sources = args.portrait or list(packaged_portraits().values())
    if not sources:
        raise UserError("no portraits: pass --portrait (the packaged one comes with matplotlib: `make install-train`)")
    try:
        faces = [crop_portrait(load_image(path), args.size) for path in sources]
    except (MediaError, NoFaceError, OSError) as exc:
        raise UserError(f"a portrait could not be used: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in range(args.count):
        # Two different looks (a face and an augmentation of one), so avatar and user never share one.
        looks = rng.choice(len(faces) * 8, 2, replace=False)
        rigs = [FaceRig(augmented(faces[int(k) % len(faces)], int(k) // len(faces) + 1000 * args.seed)) for k in looks]
        conversation = make_conversation(args.seconds, seed=args.seed * 100_000 + n)
        rows.append(write_conversation(conversation, rigs[0], rigs[1], args.out, f"conv{args.seed:03d}-{n:04d}"))
        log.info("wrote %s (%d/%d)", rows[-1]["name"], n + 1, args.count)
    (args.out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{args.count} conversations of {args.seconds:.0f} s in {args.out} (manifest.jsonl)")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from avatar_forcing.model.config import config_from_name
    from avatar_forcing.model.device import pick_device
    from avatar_forcing.model.training.prepare import ClipError, prepare_shards, read_manifest
    from avatar_forcing.weights.loading import load_model

    try:
        manifest = read_manifest(args.manifest)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    cfg = config_from_name(args.config)
    model = load_model(cfg, args.weights, device=pick_device(args.device))
    max_frames = None if args.max_seconds is None else int(args.max_seconds * model.config.fps)
    with tqdm(total=len(manifest), desc="prepare", unit="clip", disable=args.no_progress) as bar:
        try:
            writer = prepare_shards(model, manifest, args.out, args.clips_per_shard, args.skip_bad, max_frames,
                                    progress=lambda name: bar.update(1), whole_frames=args.whole_frames)
        except ClipError as exc:
            raise UserError(f"{exc} (rerun with --skip-bad to leave such clips out; finished clips are kept)") from exc
    log.info("%d clips in %s; %d rejected", len(writer.entries), args.out, len(writer.rejected))
    for name, reason in writer.rejected.items():
        log.warning("rejected %s: %s", name, reason)
    return 0
