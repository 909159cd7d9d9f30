"""Times `recstack data prepare --dataset synthetic` against a parquet-write floor, and
optionally one DLRM epoch over the prepared data.

    python benchmarks/synthetic_prepare.py                 # 100k users, 1M items, 10M interactions
    python benchmarks/synthetic_prepare.py --small         # a quick run
    python benchmarks/synthetic_prepare.py --train-epoch   # also one DLRM epoch (peak RSS)
    python benchmarks/synthetic_prepare.py --baseline REV  # also the prepare of git revision REV

The prepare runs as a child process; its wall time and peak RSS come from wait4. The floor is
the time this process takes to write the same number of rows of random int64/float32 columns
(the interaction columns' dtypes) to parquet, so ``ratio = prepare / floor`` says how far the
whole pipeline is from pure I/O. With ``--train-epoch``, `recstack train ranker --model dlrm
--config configs/synthetic_ctr_dlrm.yaml --max-epochs 1` runs as a second child over the
prepared dataset's encoded parts (the epoch, its validation and the final validation and
test). With ``--baseline REV``, the same prepare also runs from that revision's tree (`git
archive`, this venv), after this tree's, in the same run. The run passes when prepare stays
under 120 s and 4 GiB, and the epoch under 6 GiB.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
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
TARGET_EPOCH_GIB = 6


def time_prepare(sizes: dict, seed: int, out: Path, root: Path = ROOT) -> dict:
    """Wall and CPU seconds and peak RSS (GiB) of one `recstack data prepare` child process run
    from the source tree ``root``."""
    cmd = [sys.executable, "-m", "recstack.cli", "data", "prepare", "--dataset", "synthetic",
           "--users", str(sizes["users"]), "--items", str(sizes["items"]),
           "--interactions", str(sizes["interactions"]), "--seed", str(seed), "--out", str(out)]
    run = time_child(cmd, root)
    return {"prepare_s": run["s"], "prepare_cpu_s": run["cpu_s"], "peak_rss_gib": run["peak_rss_gib"]}


def time_epoch(data: Path, out: Path, config: Path, batch_size: int) -> dict:
    """Wall and CPU seconds and peak RSS (GiB) of one DLRM epoch, as a child process."""
    cmd = [sys.executable, "-m", "recstack.cli", "train", "ranker", "--model", "dlrm", "--data", str(data),
           "--out", str(out), "--config", str(config.resolve()), "--max-epochs", "1",
           "--batch-size", str(batch_size), "--accelerator", "cpu"]
    run = time_child(cmd)
    return {"epoch_s": run["s"], "epoch_cpu_s": run["cpu_s"], "epoch_peak_rss_gib": run["peak_rss_gib"]}


def time_child(cmd: list[str], root: Path = ROOT) -> dict:
    """Wall and CPU seconds and peak RSS (GiB) of ``cmd`` run in a child process in ``root``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed with exit code {child.returncode}:\n{log.read()[-3000:]}")
    # ru_maxrss is KiB on Linux; CPU time tells contention apart from slowness on a shared box
    return {"s": seconds, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss / 2**20}


def export_revision(rev: str, folder: Path) -> Path:
    """The source tree of git revision ``rev``, extracted into ``folder``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


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
        *(baseline_rows(result) if "baseline" in result else []),
        *([f"| DLRM epoch ({result['epoch_config']}), batch {result['epoch_batch_size']:,}: wall time (s) | "
           f"{result['epoch_s']:.1f} | | |",
           f"| DLRM epoch: CPU time, user + sys (s) | {result['epoch_cpu_s']:.1f} | | |",
           f"| DLRM epoch: peak RSS (GiB) | {result['epoch_peak_rss_gib']:.2f} | < {TARGET_EPOCH_GIB} | "
           f"{verdict(result['epoch_peak_rss_gib'] < TARGET_EPOCH_GIB)} |"] if "epoch_s" in result else []),
    ])


def baseline_rows(result: dict) -> list[str]:
    """The table rows of the baseline revision's prepare, run in the same process."""
    base = result["baseline"]
    return [f"| baseline {base['revision']}: prepare wall time (s) | {base['prepare_s']:.1f} | | |",
            f"| baseline: prepare CPU time, user + sys (s) | {base['prepare_cpu_s']:.1f} | | |",
            f"| baseline: prepare peak RSS (GiB) | {base['peak_rss_gib']:.2f} | | |",
            f"| peak RSS this tree / baseline | {result['peak_rss_gib'] / base['peak_rss_gib']:.2f} | | |",
            f"| CPU time this tree / baseline | {result['prepare_cpu_s'] / base['prepare_cpu_s']:.2f} | | |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help=f"quick run at {SMALL}")
    for name in FULL:
        parser.add_argument(f"--{name}", type=int, help=f"default {FULL[name]:,} ({SMALL[name]:,} with --small)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-epoch", action="store_true", help="also time one DLRM epoch over the data")
    parser.add_argument("--epoch-batch-size", type=int, default=4096)
    parser.add_argument("--epoch-config", type=Path, default=ROOT / "configs" / "synthetic_ctr_dlrm.yaml",
                        help="the DLRM run config of the epoch (its batch size is --epoch-batch-size's)")
    parser.add_argument("--baseline", metavar="REV", help="also time the prepare of this git revision")
    parser.add_argument("--tmp", type=Path, help="folder for the dataset and run (default: the system's)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "synthetic_prepare.json")
    args = parser.parse_args(argv)
    sizes = {name: getattr(args, name) or (SMALL if args.small else FULL)[name] for name in FULL}

    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="synthetic-prepare-", dir=args.tmp) as tmp:
        prepare = time_prepare(sizes, args.seed, Path(tmp) / "synthetic")
        floor_s = time_parquet_floor(sizes["interactions"], Path(tmp) / "floor.parquet")
        if args.train_epoch:
            epoch = time_epoch(Path(tmp) / "synthetic", Path(tmp) / "dlrm", args.epoch_config, args.epoch_batch_size)
            prepare.update(epoch, epoch_batch_size=args.epoch_batch_size, epoch_config=args.epoch_config.name)
        if args.baseline:
            shutil.rmtree(Path(tmp) / "synthetic")  # its disk, before the baseline writes its own
            tree = export_revision(args.baseline, Path(tmp) / "baseline-tree")
            prepare["baseline"] = {"revision": args.baseline,
                                   **time_prepare(sizes, args.seed, Path(tmp) / "baseline", tree)}
    result = {
        "machine": machine,
        "sizes": sizes,
        "seed": args.seed,
        **prepare,
        "floor_s": floor_s,
        "ratio": prepare["prepare_s"] / floor_s,
        "targets": {"seconds": TARGET_SECONDS, "gib": TARGET_GIB, "epoch_gib": TARGET_EPOCH_GIB},
        "passed": (prepare["prepare_s"] < TARGET_SECONDS and prepare["peak_rss_gib"] < TARGET_GIB
                   and prepare.get("epoch_peak_rss_gib", 0) < TARGET_EPOCH_GIB),
    }
    return finish(result, format_table(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
