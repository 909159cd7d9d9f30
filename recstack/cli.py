"""The `recstack` command line. Each subcommand parses its arguments and calls one package."""

from __future__ import annotations

import argparse
import sys

from recstack import __version__, data_cli, evaluate_cli, recommend_cli, refresh_cli, serve_cli, train_cli, triton_cli


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        # DataError is a ValueError: bad input is reported, not dumped as a traceback
        print(f"recstack: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recstack", description=__doc__)
    parser.add_argument("--version", action="version", version=f"recstack {__version__}")
    commands = parser.add_subparsers(title="commands")
    data_cli.add_commands(commands)
    train_cli.add_commands(commands)
    refresh_cli.add_commands(commands)
    recommend_cli.add_commands(commands)
    serve_cli.add_commands(commands)
    triton_cli.add_commands(commands)
    evaluate_cli.add_commands(commands)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
