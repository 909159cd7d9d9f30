"""One full refresh of a large synthetic catalogue, in a child process: wall time and peak RSS, per step.

    python benchmarks/refresh_scale.py                       # 1M items, 100k users, 10M interactions
    python benchmarks/refresh_scale.py --items 10000000 --users 1000000 --interactions 100000000
    python benchmarks/refresh_scale.py --prepared /tmp/scale/1m      # prepares once, then reuses

Steps: prepare the synthetic dataset (`data.synthetic.generate`, `data.prepare.prepare`, seed 0,
temporal split) and an untrained two-tower run, as `benchmarks/refresh.py` does (not timed);
then one full refresh with `benchmarks/refresh.py`'s config (no rankers, no Redis) in a child
process on one torch thread (FAISS's OpenMP and OpenBLAS threads, and DuckDB's, still use every
core), DuckDB limited to ``--duckdb-gb``. The child's peak RSS comes from
wait4; the parent also samples its RSS every 0.2 s, and a step's peak is the largest sample
taken while it ran (the steps' times are the manifest's; their CPU times come from the same
samples). The JSON also holds the RSS once a second (``rss_trace``: seconds since the start,
GiB). Passes when the peak RSS stays within ``--max-rss-gib`` (12 GiB, the target at 10M items)
and the index reaches its recall target. With ``--prepared DIR`` the dataset and the untrained
run are kept in DIR and reused by later runs of the same sizes (``--prepare-only`` stops there);
the refresh's versions still go to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from refresh import CONFIG, untrained_run
from report import describe_machine, finish

from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from inference.artifacts import ArtifactRoot, read_manifest

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"items": 1_000_000, "users": 100_000, "interactions": 10_000_000}
STEPS = ("export", "embeddings", "lists", "index", "pools", "store")
SAMPLE_S = 0.2


def prepared(sizes: dict, where: Path) -> tuple[Path, Path]:
    """The dataset and models directories of ``sizes`` under ``where``, prepared unless a
    previous run of the same sizes left them there (``sizes.json`` is written last)."""
    data, models, done = where / "data", where / "models", where / "sizes.json"
    if done.exists():
        if json.loads(done.read_text()) != sizes:
            raise SystemExit(f"{where} holds data of other sizes: {done.read_text()}")
        return data, models
    start = time.perf_counter()
    prepare(generate(SyntheticConfig(**sizes, seed=0)), data, split="temporal", seed=0, overwrite=True)
    if (models / "two_tower").exists():
        shutil.rmtree(models / "two_tower")
    untrained_run(data, models / "two_tower")
    done.write_text(json.dumps(sizes))
    print(f"prepared {sizes} in {time.perf_counter() - start:.0f} s", flush=True)
    return data, models


def child_main(data: Path, models: Path, root: Path, duckdb_gb: float) -> int:
    import torch

    from inference.refresh.job import refresh

    torch.set_num_threads(1)
    root.with_name("started").write_text(str(time.time()))  # before the inputs are read
    pools = CONFIG.pools.model_copy(update={"memory_limit_gb": duckdb_gb})
    refresh(data, models, root, CONFIG.model_copy(update={"pools": pools}))
    return 0


def usage(pid: int) -> tuple[float, float] | None:
    """(RSS GiB, CPU seconds: user + system) of process ``pid`` now; None once it is gone."""
    try:
        status, stat = Path(f"/proc/{pid}/status").read_text(), Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return None if kib is None else (kib / 2**20, cpu_s)


def run_refresh(data: Path, models: Path, root: Path, duckdb_gb: float) -> dict:
    """Wall and CPU seconds, peak RSS and (time, RSS GiB, CPU s) samples of a full refresh in a child process."""
    root.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--models", str(models), "--root", str(root),
           "--duckdb-gb", str(duckdb_gb)]
    start, spawned = time.perf_counter(), time.time()
    child = subprocess.Popen(cmd, cwd=ROOT / "benchmarks")
    samples, done = [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            if (now := usage(child.pid)) is not None:
                samples.append((time.time(), *now))
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, status, rusage = os.wait4(child.pid, 0)
    ended = time.time()
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {"wall_s": time.perf_counter() - start, "cpu_s": rusage.ru_utime + rusage.ru_stime,
            "peak_rss_gib": rusage.ru_maxrss / 2**20, "spawned": spawned, "ended": ended, "samples": samples}


def per_step(run: dict, manifest: dict, started: float) -> dict[str, dict]:
    """Seconds, CPU seconds and peak sampled RSS of each step: the child's start (imports),
    reading the inputs, the manifest's steps, then manifest and publish (until the child exits).
    A step's CPU time is the child's between the last samples before its start and its end
    (the last step's ends with the child's total)."""
    bounds = [("process start, imports", run["spawned"], started), ("inputs", started, manifest["created_at"])]
    t = manifest["created_at"]
    for step in STEPS:
        bounds.append((step, t, t + manifest["step_seconds"][step]))
        t += manifest["step_seconds"][step]
    bounds.append(("manifest, publish", t, run["ended"]))

    def cpu_at(moment: float) -> float:
        if moment >= run["ended"]:
            return run["cpu_s"]
        return max((cpu for at, _, cpu in run["samples"] if at <= moment), default=0.0)

    return {name: {"seconds": end - begin, "cpu_s": cpu_at(end) - cpu_at(begin),
                   "peak_rss_gib": max((rss for at, rss, _ in run["samples"] if begin <= at <= end), default=0.0)}
            for name, begin, end in bounds}


def format_table(result: dict) -> str:
    m, s, r = result["machine"], result["sizes"], result["refresh"]
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; load average "
        f"{m['load_average_1min']:.1f} at the start",
        f"Sizes: {s['items']:,} items ({result['catalogue']['items']:,} eligible), {s['users']:,} users, "
        f"{s['interactions']:,} interactions; DuckDB limit {result['duckdb_gb']} GiB; index "
        f"{result['index']['kind']} (nlist {result['index']['nlist']}, nprobe {result['index']['nprobe']})",
        "",
        f"Full refresh: wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB "
        f"(target <= {result['max_rss_gib']}); index recall@100 {result['recall']:.4f} "
        f"(target {CONFIG.target_recall})",
        "",
        "| step | seconds | CPU seconds | peak RSS sampled (GiB) |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {step['seconds']:.1f} | {step['cpu_s']:.1f} | {step['peak_rss_gib']:.2f} |"
          for name, step in result["steps"].items()],
        "",
        f"Result: {'pass' if result['passed'] else 'FAIL'}",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in SIZES.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--duckdb-gb", type=float, default=2.0, help="DuckDB's memory limit in the refresh")
    parser.add_argument("--max-rss-gib", type=float, default=12.0)
    parser.add_argument("--workdir", type=Path, help="where the data and versions go (default: a temporary directory)")
    parser.add_argument("--prepared", type=Path, help="keep the prepared data and run here and reuse them")
    parser.add_argument("--prepare-only", action="store_true", help="stop once the data and run are prepared")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "refresh_scale.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("data", "models", "root"):
        parser.add_argument(f"--{hidden}", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.data, args.models, args.root, args.duckdb_gb)
    sizes = {name: getattr(args, name) for name in SIZES}
    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="refresh-scale-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        data, models = prepared(sizes, args.prepared or tmp)
        if args.prepare_only:
            return 0
        run = run_refresh(data, models, tmp / "artifacts", args.duckdb_gb)
        manifest = read_manifest(ArtifactRoot(tmp / "artifacts").path("v0001"))
        started = float((tmp / "started").read_text())
    recall = manifest["index"]["recall"]["recall@100"]
    result = {"machine": machine, "sizes": sizes, "duckdb_gb": args.duckdb_gb, "max_rss_gib": args.max_rss_gib,
              "catalogue": manifest["catalogue"], "index": manifest["index"]["params"], "recall": recall,
              "refresh": {k: v for k, v in run.items() if k not in ("samples", "spawned", "ended")},
              "steps": per_step(run, manifest, started),
              "rss_trace": [[round(at - run["spawned"], 1), round(rss, 3)]  # (s since the start, GiB), 1 a second
                            for at, rss, _ in run["samples"][::round(1 / SAMPLE_S)]],
              "passed": run["peak_rss_gib"] <= args.max_rss_gib and recall >= CONFIG.target_recall}
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
