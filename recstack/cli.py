"""The `recstack` command line. Each subcommand parses its arguments and calls one package."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from recstack import __version__, data_cli, evaluate_cli, recommend_cli, refresh_cli, serve_cli, train_cli, triton_cli

BAD_INPUT = (ValueError, FileExistsError, FileNotFoundError)  # DataError, ArtifactError and pydantic's are ValueErrors


def main(argv: list[str] | None = None) -> int:
    """Runs one command: 0 when it succeeds, 2 on bad input (reported, not dumped as a traceback), 1 when
    the command itself fails (it reports why)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except BAD_INPUT as e:
        print_error(e)
        return 2


def print_error(message: object) -> None:
    """Reports an error the way every recstack error reads: one line ``recstack: error: ...`` on stderr
    (further lines only when the message has them, such as a config's validation errors)."""
    print(f"recstack: error: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors (exit status 2) carry the same prefix as the others,
    whichever subcommand they are in."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print_error(message)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recstack", description=__doc__)
    parser.add_argument("--version", action="version", version=f"recstack {__version__}")
    commands = parser.add_subparsers(title="commands", required=True)  # subparsers are _Parsers too
    for module in (data_cli, train_cli, refresh_cli, recommend_cli, serve_cli, triton_cli, evaluate_cli):
        module.add_commands(commands)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
