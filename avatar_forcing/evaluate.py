"""`avatar-forcing eval`: the paper's Table 4 (rPCC, SID, Var, FD per group, and a lip-sync proxy) of generated
motion against the ground truth of training shards.

    avatar-forcing eval --data shards/ --generated runs/dpo/model.safetensors --weights hub --out eval/

`--generated` is either a model checkpoint (the clips are generated through the streaming engine) or a
safetensors file of latents, one [T, dim_w] tensor per clip name. Parameters come from the motion latents'
coordinates in the auto-encoder's basis; `--groups exp=0-9,pose=10-19` names the groups (see docs/training.md).
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
    p.add_argument("--data", required=True, type=Path, help="shard folder with the ground truth")
    p.add_argument("--generated", required=True, nargs="+", type=Path,
                   help="checkpoints to generate with, or safetensors files of latents per clip (one row each)")
    p.add_argument("--weights", default=None, help="the model whose motion basis reads the latents ('hub', file)")
    p.add_argument("--config", default="official")
    p.add_argument("--device", default="auto")
    p.add_argument("--groups", default="", help="direction groups, e.g. exp=0-9,pose=10-19 (default: one group)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="folder for table.md, scores.json and plots")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from safetensors.torch import load_file

    from avatar_forcing.model.config import config_from_name
    from avatar_forcing.model.device import pick_device
    from avatar_forcing.model.training.data import load_shards
    from avatar_forcing.model.training.evaluate import (
        evaluate,
        motion_basis_extractor,
        parse_groups,
        plot_per_dimension,
    )
    from avatar_forcing.model.training.metrics import table
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
    rows = {name: ev.scores for name, ev in evaluations.items()} | {"ground truth": truth.scores}
    text = table(rows, groups=list(truth.scores))
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(text + "\n")
        scores = {name: {g: dataclasses.asdict(s) for g, s in r.items()} for name, r in rows.items()}
        (args.out / "scores.json").write_text(json.dumps(scores, indent=1))
        plot = plot_per_dimension(evaluations, args.out / "per_dimension.png")
        log.info("wrote %s%s", args.out / "table.md", f" and {plot}" if plot else " (no matplotlib: no plots)")
    return 0
