"""`avatar-forcing eval`: the paper's Table 4 (rPCC, SID, Var, FD per group, and a lip-sync proxy) of generated
motion against the ground truth of training shards.

    avatar-forcing eval --data shards/ --generated runs/dpo/model.safetensors --weights hub --out eval/

`--generated` is either a model checkpoint (the clips are generated through the streaming engine) or a
safetensors file of latents, one [T, dim_w] tensor per clip name. Parameters come from the motion latents'
coordinates in the auto-encoder's basis; `--groups exp=0-9,pose=10-19` names the groups (see docs/training.md).

On videos, with face landmarks (expression and head pose, and lip sync from the mouth; `make install-train`):

    avatar-forcing eval --videos clips/ --generated renders/flow_matching/ renders/dpo/ --out eval/

`clips/` holds NAME.truth.mp4 (the real avatar side, with its speech) and NAME.user.mp4 per conversation;
each `--generated` folder holds NAME.mp4, the avatar generated for it (one row of the table per folder).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .errors import UserError

log = logging.getLogger("avatar_forcing.eval")


def add_eval_command(subparsers) -> None:
    p = subparsers.add_parser("eval", help="the paper's listening metrics of generated motion", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="shard folder with the ground truth (motion latents)")
    source.add_argument("--videos", type=Path,
                        help="folder of NAME.truth.mp4 + NAME.user.mp4: measure videos with face landmarks")
    p.add_argument("--generated", required=True, nargs="+", type=Path,
                   help="checkpoints to generate with, or safetensors files of latents per clip; with --videos, "
                        "folders of NAME.mp4 (one row each)")
    p.add_argument("--weights", default=None, help="the model whose motion basis reads the latents ('hub', file)")
    p.add_argument("--config", default="official")
    p.add_argument("--device", default="auto")
    p.add_argument("--groups", default="", help="direction groups, e.g. exp=0-9,pose=10-19 (default: one group)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="folder for table.md, scores.json and plots")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.videos is not None:
        return run_eval_videos(args)
    from safetensors.torch import load_file

    from avatar_forcing.model.config import config_from_name
    from avatar_forcing.model.device import pick_device
    from avatar_forcing.model.training.data import load_shards
    from avatar_forcing.model.training.evaluate import evaluate, motion_basis_extractor, parse_groups
    from avatar_forcing.model.training.rollout import generate_latents
    from avatar_forcing.weights.loading import load_model

    try:
        clips = load_shards(args.data)
        groups = parse_groups(args.groups)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    cfg = config_from_name(args.config)
    device = pick_device(args.device)
    base = load_model(cfg, args.weights, device=device)
    extractor = motion_basis_extractor(base.motion_autoencoder.dec.direction.basis(), groups)
    evaluations = {}
    for path in args.generated:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        tensors = load_file(str(path))
        if all(c.name in tensors for c in clips):  # a file of latents
            generated = [tensors[c.name].float() for c in clips]
        else:  # a checkpoint: generate through the streaming engine
            model = load_model(cfg, path, device=device)
            generated = generate_latents(model, clips, seed=args.seed)
        try:
            evaluations[path.stem] = evaluate(clips, generated, extractor, seed=0)
        except ValueError as exc:
            raise UserError(f"{path}: {exc}") from exc
    truth = evaluate(clips, [c.motion for c in clips], extractor)
    report(evaluations, truth, args.out)
    return 0


def report(evaluations: dict, truth, out: Path | None) -> None:
    """Print the table (and the lip-sync proxy where measured); with `out`, write table.md, scores.json and
    the per-dimension plots there."""
    import dataclasses

    from avatar_forcing.model.training.evaluate import plot_per_dimension
    from avatar_forcing.model.training.metrics import table

    rows = {name: ev.scores for name, ev in evaluations.items()} | {"ground truth": truth.scores}
    text = table(rows, groups=list(truth.scores))
    sync = {name: ev.lip_sync for name, ev in evaluations.items()} | {"ground truth": truth.lip_sync}
    if any(v is not None for v in sync.values()):
        text += "\n\nlip sync (mouth opening vs speech envelope: best correlation, its lag in frames)\n" + "\n".join(
            f"{name}: r {v[0]:.3f} at {v[1]:+.1f}" for name, v in sync.items() if v is not None)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text + "\n")
        scores = {name: {g: dataclasses.asdict(s) for g, s in r.items()} for name, r in rows.items()}
        (out / "scores.json").write_text(json.dumps({"scores": scores, "lip_sync": sync}, indent=1))
        plot = plot_per_dimension(evaluations, out / "per_dimension.png")
        log.info("wrote %s%s", out / "table.md", f" and {plot}" if plot else " (no matplotlib: no plots)")


def run_eval_videos(args: argparse.Namespace) -> int:
    import numpy as np

    from avatar_forcing.errors import MediaError
    from avatar_forcing.model.media.audio import load_audio
    from avatar_forcing.model.media.face_mesh import FaceMesh, LandmarksUnavailable
    from avatar_forcing.model.media.video import iter_video_frames
    from avatar_forcing.model.training.evaluate import LandmarkClip, evaluate_landmarks
    from avatar_forcing.model.training.landmarks import LandmarkExtractor

    names = sorted(p.name.removesuffix(".truth.mp4") for p in args.videos.glob("*.truth.mp4"))
    if not names:
        raise UserError(f"{args.videos}: no NAME.truth.mp4 files (each needs a NAME.user.mp4 beside it)")
    missing = [f"{n}.user.mp4" for n in names if not (args.videos / f"{n}.user.mp4").is_file()]
    missing += [str(folder / f"{n}.mp4") for folder in args.generated for n in names
                if not (folder / f"{n}.mp4").is_file()]
    if missing:
        raise UserError(f"missing videos: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    try:
        mesh = FaceMesh()
    except LandmarksUnavailable as exc:
        raise UserError(str(exc)) from None

    def landmarks(path: Path):
        try:
            points = mesh.video(iter_video_frames(path, 25.0))
        except MediaError as exc:
            raise UserError(f"{path}: {exc}") from None
        if len(points) == 0 or np.isnan(points).all():
            raise UserError(f"{path}: no face found in any frame")
        return points

    clips = []
    for n in names:
        truth = args.videos / f"{n}.truth.mp4"
        try:
            speech = load_audio(truth, 16000)
        except MediaError:
            speech = None  # no audio track: no lip-sync proxy
        clips.append(LandmarkClip(n, landmarks(args.videos / f"{n}.user.mp4"), landmarks(truth), speech))
        log.info("measured %s", n)
    extractor = LandmarkExtractor().fit([c.truth for c in clips])
    evaluations = {folder.name: evaluate_landmarks(clips, [landmarks(folder / f"{n}.mp4") for n in names], extractor)
                   for folder in args.generated}
    truth = evaluate_landmarks(clips, [c.truth for c in clips], extractor)
    report(evaluations, truth, args.out)
    return 0
