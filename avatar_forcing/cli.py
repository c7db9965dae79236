"""avatar-forcing: a head avatar that talks and listens, live over WebRTC.

Start with `avatar-forcing serve` and open the page it names; `generate` renders a video from files;
`weights` gets and checks the official model files. `avatar-forcing COMMAND --help` tells more.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import UserError

# One line per command: its name, one line of help, and "module:function" that adds its arguments.
# Only the command being run is imported (torch, aiortc and transformers take seconds), so `--help`
# and a mistyped command answer at once.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("run the avatar server and its web page", "avatar_forcing.server.cli:add_serve_command"),
    "generate": ("render an avatar video offline from files", "avatar_forcing.generate:add_generate_command"),
    "weights": ("list, download, convert and verify the model files", "avatar_forcing.weights.cli:add_weights_command"),
    "bench": ("measure the model's speed and quality", "avatar_forcing.bench:add_bench_command"),
    "loadtest": ("drive a running server with WebRTC clients", "avatar_forcing.server.loadtest:add_loadtest_command"),
    "provenance": ("check a video for the AI-generated mark", "avatar_forcing.provenance.cli:add_provenance_command"),
    "train": ("train the transformer: flow matching, label-free DPO", "avatar_forcing.train:add_train_command"),
    "data": ("prepare training shards from dyadic videos", "avatar_forcing.data:add_data_command"),
    "eval": ("the paper's listening metrics of generated motion", "avatar_forcing.evaluate:add_eval_command"),
}


def _wanted_command(argv: list[str]) -> str | None:
    """The command named on the line (the first word that is one), before anything is imported."""
    for word in argv:
        if word in COMMANDS:
            return word
        if not word.startswith("-"):
            return None  # an unknown command: argparse says so
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser of `command` (all of them when None: slower, for tools that list every option)."""
    parser = argparse.ArgumentParser(prog="avatar-forcing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"avatar-forcing {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, target) in COMMANDS.items():
        if command is None or name == command:
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _wanted_command(argv)
    parser = build_parser(command or "")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for chatty in ("httpx", "aioice", "aiortc"):  # a line per request / ICE check drowns the command's output
            logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"avatar-forcing {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
