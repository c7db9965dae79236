"""`avatar-forcing` console command. Each subcommand lives with the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-forcing", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from avatar_forcing.bench import add_bench_command
    from avatar_forcing.generate import add_generate_command
    from avatar_forcing.server.cli import add_serve_command
    from avatar_forcing.server.loadtest import add_loadtest_command
    from avatar_forcing.weights.cli import add_weights_command

    add_serve_command(sub)
    add_generate_command(sub)
    add_weights_command(sub)
    add_bench_command(sub)
    add_loadtest_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"avatar-forcing {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
