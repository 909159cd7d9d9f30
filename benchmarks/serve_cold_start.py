"""Cold start of `recstack serve`: the serving modules' import time and the time from launch to
the first 200 on ``/healthz``, for this tree against a baseline commit, measured in the same run.

The baseline commit is extracted with ``git archive`` into a scratch directory and run with the
same interpreter; runs alternate between the two trees so both see the same machine load.
Each tree serves ``--artifacts`` with its own ``configs/pipeline.yaml``.

    .venv/bin/python benchmarks/serve_cold_start.py --baseline ddc3752 --artifacts out/artifacts
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from report import describe_machine, finish, free_port

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ("lightning", "training", "inference.refresh")
IMPORT = ("import json, sys, time\n"
          "start = time.perf_counter()\n"
          "import inference.service\n"
          "seconds = time.perf_counter() - start\n"
          f"offline = sorted(p for p in {OFFLINE!r} if p in sys.modules)\n"
          "print(json.dumps({'seconds': seconds, 'modules': len(sys.modules), 'offline': offline}))")


def measure_import(tree: Path) -> dict:
    """Import of `inference.service` in a fresh interpreter: seconds, modules loaded, offline packages among them."""
    out = subprocess.run([sys.executable, "-c", IMPORT], cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_healthz(tree: Path, artifacts: Path, timeout_s: float) -> float:
    """Seconds from launching `recstack serve` in ``tree`` to its first 200 on /healthz."""
    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "recstack", "serve", "--artifacts", str(artifacts),
                               "--config", "configs/pipeline.yaml", "--port", str(port)],
                              cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < timeout_s:
            if server.poll() is not None:
                raise RuntimeError(f"recstack serve in {tree} exited with {server.returncode} before answering")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
                    if reply.status == 200:
                        return time.perf_counter() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        raise RuntimeError(f"recstack serve in {tree} did not answer /healthz within {timeout_s} s")
    finally:
        server.terminate()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare against")
    parser.add_argument("--artifacts", type=Path, required=True, help="artefact root both servers serve")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_cold_start.json")
    args = parser.parse_args()
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} must be at least 1")
    artifacts = args.artifacts.resolve()
    with tempfile.TemporaryDirectory(prefix="cold-start-") as scratch:
        baseline = Path(scratch)
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
        trees = {f"baseline {args.baseline}": baseline, "this tree": ROOT}
        imports: dict[str, list[dict]] = {name: [] for name in trees}
        healthz: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():
                imports[name].append(measure_import(tree))
                healthz[name].append(measure_healthz(tree, artifacts, args.timeout_s))
    rows, result = [], {"machine": describe_machine(), "baseline": args.baseline, "repeats": args.repeats, "trees": {}}
    for name in trees:
        seconds = [run["seconds"] for run in imports[name]]
        summary = {"import_s_median": statistics.median(seconds), "import_s_min": min(seconds),
                   "modules": imports[name][-1]["modules"], "offline": imports[name][-1]["offline"],
                   "healthz_s_median": statistics.median(healthz[name]), "healthz_s_min": min(healthz[name])}
        result["trees"][name] = summary
        rows.append(f"| {name} | {summary['import_s_median']:.2f} | {summary['import_s_min']:.2f} | "
                    f"{summary['modules']} | {', '.join(summary['offline']) or 'none'} | "
                    f"{summary['healthz_s_median']:.2f} | {summary['healthz_s_min']:.2f} |")
    result["passed"] = result["trees"]["this tree"]["offline"] == []
    machine = result["machine"]
    table = "\n".join([f"{machine['cpu']}, {machine['cores']} cores, load {machine['load_average_1min']:.1f}; "
                       f"{args.repeats} runs per tree, alternating",
                       "", "| tree | import s (median) | import s (min) | modules | offline loaded | "
                       "first /healthz 200 s (median) | (min) |", "|---|---|---|---|---|---|---|", *rows])
    return finish(result, table, args.out)


if __name__ == "__main__":
    sys.exit(main())
