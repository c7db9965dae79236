"""`avatar-forcing weights list | download | convert | verify`.

Each action is a function of the parsed arguments returning an exit code; failures the operator can fix
raise WeightsError, which the top-level dispatcher prints as one line.
"""

from __future__ import annotations

import argparse

from avatar_forcing.errors import WeightsError

# hub, convert and verify import torch / huggingface_hub: each action imports what it uses, so that
# `avatar-forcing weights --help` answers at once.
from .registry import CHECKPOINTS, WAV2VEC2


def cmd_list(args: argparse.Namespace) -> int:
    from . import hub

    source = hub.weights_source(args.weights)
    directory = None if source == hub.HUB else source
    where = f"directory {directory}" if directory is not None else f"hub cache {hub.hub_cache_dir(args.cache_dir)}"
    print(f"looking in the {where}")
    for ckpt in CHECKPOINTS:
        found = hub.locate(ckpt, directory, args.cache_dir)
        size = f"~{ckpt.approx_mb} MB" if ckpt.approx_mb else "size unknown"
        print(f"{ckpt.name}  ({size})")
        print(f"    hub:      {ckpt.repo_id}: {' or '.join(w.filename for w in ckpt.weights)}")
        print(f"    holds:    {', '.join(p + '*' for p in ckpt.prefixes)}")
        if ckpt.google_drive_id:
            print(f"    drive id: {ckpt.google_drive_id} (reference's download_weights.sh; not used here)")
        print(f"    license:  {ckpt.license}")
        print(f"    local:    {found if found is not None else 'not present'}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from . import hub

    files = hub.official_files_from_hub(cache_dir=args.cache_dir, local_dir=args.dir)
    for ckpt, path in files.items():
        print(f"{ckpt.name}: {path}")
    if files.wav2vec2_config is not None:
        print(f"{WAV2VEC2.name} config: {files.wav2vec2_config}")
    if args.dir:
        print(f"use it with --weights {args.dir} (or AVATAR_FORCING_WEIGHTS={args.dir})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from . import convert

    if bool(args.input) == bool(args.all):
        raise WeightsError("give either one checkpoint file (IN.pth) or --all DIR")
    if args.all and args.output:
        raise WeightsError("-o/--output names one file: it cannot be combined with --all")
    outputs = convert.convert_dir(args.all) if args.all else [convert.convert_file(args.input, args.output)]
    for out in outputs:
        print(out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from . import verify

    return verify.run_verify(args.weights, args.config, cache_dir=args.cache_dir)


def add_weights_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "weights", help="list, download, convert and verify the model checkpoints",
        description="Checkpoints of the official model: motion_autoencoder.pth, flow_transformer.pth "
                    "(hub mirror multimodalart/AvatarForcingHelpers) and facebook/wav2vec2-base-960h.")
    actions = parser.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    weights_help = ("a directory in the official layout (default: $AVATAR_FORCING_WEIGHTS if set, "
                    "else the Hugging Face cache)")
    cache_help = "Hugging Face cache folder (default: HF_HUB_CACHE / HF_HOME as huggingface_hub uses them)"

    p = actions.add_parser("list", help="the known checkpoints and where each is on disk")
    p.add_argument("--weights", metavar="DIR", help=weights_help)
    p.add_argument("--cache-dir", metavar="DIR", help=cache_help)
    p.set_defaults(func=cmd_list)

    p = actions.add_parser("download", help="fetch the official files (needs network; honours HF_HUB_OFFLINE)")
    p.add_argument("--dir", metavar="DIR", help="put the files in DIR in the official layout instead of the cache")
    p.add_argument("--cache-dir", metavar="DIR", help=cache_help)
    p.set_defaults(func=cmd_download)

    p = actions.add_parser("convert", help="rewrite a .pth / .bin checkpoint as .safetensors")
    p.add_argument("input", nargs="?", metavar="IN", help="checkpoint file (.pth, .bin, .safetensors)")
    p.add_argument("-o", "--output", metavar="OUT", help="output .safetensors (default: IN with the suffix changed)")
    p.add_argument("--all", metavar="DIR", help="convert the official files of DIR, next to themselves")
    p.set_defaults(func=cmd_convert)

    p = actions.add_parser("verify", help="check files exist, parse and fit the configuration")
    p.add_argument("--weights", metavar="PATH",
                   help="a directory in the official layout or one whole-model .safetensors/.pth file "
                        "(default: $AVATAR_FORCING_WEIGHTS if set, else the Hugging Face cache)")
    p.add_argument("--config", metavar="official|GOLDEN_DIR", default="official",
                   help="model configuration the weights must fit (default: official)")
    p.add_argument("--cache-dir", metavar="DIR", help=cache_help)
    p.set_defaults(func=cmd_verify)
    return parser
