"""What every benchmark shares: the machine it ran on, and how a result is reported."""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow


def describe_machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pyarrow.__version__,
        "load_average_1min": os.getloadavg()[0],
    }


def finish(result: dict, table: str, path: Path) -> int:
    """Prints ``table``, writes ``result`` as JSON to ``path``; exit status 0 when it passed."""
    print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0 if result["passed"] else 1


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arguments(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every sized benchmark takes: --small, --seed, and --out (default results/NAME.json)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a quick run at the small sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"{name}.json",
                        help="where the JSON result goes")
    return parser
