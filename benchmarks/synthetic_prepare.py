"""Times `recstack data prepare --dataset synthetic` against a parquet-write floor.

    python benchmarks/synthetic_prepare.py           # 100k users, 1M items, 10M interactions
    python benchmarks/synthetic_prepare.py --small   # a quick run

The prepare runs as a child process; its wall time and peak RSS come from wait4. The floor is
the time this process takes to write the same number of rows of random int64/float32 columns
(the interaction columns' dtypes) to parquet, so ``ratio = prepare / floor`` says how far the
whole pipeline is from pure I/O. The run passes when prepare stays under 120 s and 4 GiB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from report import describe_machine, finish

ROOT = Path(__file__).resolve().parents[1]
FULL = {"users": 100_000, "items": 1_000_000, "interactions": 10_000_000}
SMALL = {"users": 2_000, "items": 10_000, "interactions": 200_000}
TARGET_SECONDS = 120
TARGET_GIB = 4


def time_prepare(sizes: dict, seed: int, out: Path) -> dict:
    """Wall and CPU seconds and peak RSS (GiB) of one `recstack data prepare` child process."""
    cmd = [sys.executable, "-m", "recstack.cli", "data", "prepare", "--dataset", "synthetic",
           "--users", str(sizes["users"]), "--items", str(sizes["items"]),
           "--interactions", str(sizes["interactions"]), "--seed", str(seed), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed with exit code {child.returncode}:\n{log.read()[-3000:]}")
    # ru_maxrss is KiB on Linux; CPU time tells contention apart from slowness on a shared box
    return {"prepare_s": seconds, "prepare_cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gib": usage.ru_maxrss / 2**20}


def time_parquet_floor(rows: int, path: Path) -> float:
    """Seconds to write ``rows`` rows of 3 int64 and 3 float32 random columns to parquet."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        **{f"int{k}": rng.integers(0, 2**31, rows) for k in range(3)},
        **{f"float{k}": rng.random(rows, dtype=np.float32) for k in range(3)},
    })
    start = time.perf_counter()
    frame.to_parquet(path, index=False)
    return time.perf_counter() - start


def format_table(result: dict) -> str:
    m, s = result["machine"], result["sizes"]
    verdict = lambda ok: "pass" if ok else "FAIL"  # noqa: E731
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"numpy {m['numpy']}, pandas {m['pandas']}, pyarrow {m['pyarrow']}; "
        f"load average {m['load_average_1min']:.1f} at the start",
        f"Sizes: {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions, "
        f"seed {result['seed']}",
        "",
        "| measure | value | target | result |",
        "|---|---:|---:|---|",
        f"| prepare wall time (s) | {result['prepare_s']:.1f} | < {TARGET_SECONDS} | "
        f"{verdict(result['prepare_s'] < TARGET_SECONDS)} |",
        f"| prepare CPU time, user + sys (s) | {result['prepare_cpu_s']:.1f} | | |",
        f"| prepare peak RSS (GiB) | {result['peak_rss_gib']:.2f} | < {TARGET_GIB} | "
        f"{verdict(result['peak_rss_gib'] < TARGET_GIB)} |",
        f"| parquet write floor (s) | {result['floor_s']:.1f} | | |",
        f"| ratio prepare / floor | {result['ratio']:.1f} | | |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help=f"quick run at {SMALL}")
    for name in FULL:
        parser.add_argument(f"--{name}", type=int, help=f"default {FULL[name]:,} ({SMALL[name]:,} with --small)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "synthetic_prepare.json")
    args = parser.parse_args(argv)
    sizes = {name: getattr(args, name) or (SMALL if args.small else FULL)[name] for name in FULL}

    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="synthetic-prepare-") as tmp:
        prepare = time_prepare(sizes, args.seed, Path(tmp) / "synthetic")
        floor_s = time_parquet_floor(sizes["interactions"], Path(tmp) / "floor.parquet")
    result = {
        "machine": machine,
        "sizes": sizes,
        "seed": args.seed,
        **prepare,
        "floor_s": floor_s,
        "ratio": prepare["prepare_s"] / floor_s,
        "targets": {"seconds": TARGET_SECONDS, "gib": TARGET_GIB},
        "passed": prepare["prepare_s"] < TARGET_SECONDS and prepare["peak_rss_gib"] < TARGET_GIB,
    }
    return finish(result, format_table(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
