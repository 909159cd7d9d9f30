"""`recstack triton export|serve`: the Triton model repository and a local server."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("triton", help="export a Triton model repository and serve it locally")
