"""Load on `recstack serve` over loopback: stepped load to find its capacity, then an overload
at a multiple of it, a steady load below it, and optional faults injected during the steady load.

    python benchmarks/load.py --artifacts out/artifacts --config configs/pipeline.yaml
    python benchmarks/load.py --repo /tmp/before --server-arg=--probe-context --server-arg=hour=12 ...
    python benchmarks/load.py ... --fault "recstack artifacts rollback --artifacts out/artifacts@60"
    python benchmarks/load.py ... --rates "" --capacity 20 --overload 0 --steady 0.5 --steady-s 90 --kill redis
    python benchmarks/load.py ... --server-arg=--workers --server-arg=2

The server runs as a subprocess (`python -m recstack serve` in ``--repo``, so an older checkout
is measured with the same client). The client is open-loop: requests start at the offered rate
whatever the replies do, each with a timeout, at most ``--max-outstanding`` at once (a request
that would exceed it counts as dropped by the client). Every phase is bounded in requests and
time, and the traffic goes to 127.0.0.1 only.

Capacity is the highest stepped rate whose replies were all 200 with p99 under ``--p99-ms``.
Overload offers ``--overload`` x capacity: goodput (200s per second) against capacity, how fast
shed requests (503) were answered, and the server's RSS before and after. Steady offers
``--steady`` x capacity: errors, p50 / p95 / p99, RSS growth after the first tenth of the phase.
A fault is a shell command run once during the steady phase, at the given second. Swaps publish
the artefact root's two newest versions in turn during the steady phase (`recstack artifacts
rollback`), one every ``--swap-every`` seconds: the server's RSS after the first swap and after
the last one (each read just before the next swap would come) show what old versions leave behind.
RSS is the server's with all its processes (``--workers N``: the supervisor and its workers).

``--kill redis`` (or ``triton``) starts that dependency for the published version (Redis loaded
with it; Triton on its repository, DeepFM scored there first) and serves with a copy of the config
that uses it; during the steady phase it is killed (SIGKILL) at ``--kill-at`` seconds and started
again, empty, ``--down-s`` later. The steady phase is then also counted in three windows (before
the kill, while down, after the restart), each with how many /healthz samples (one a second) said
the server was degraded, and the last one's reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from report import describe_machine, finish, free_port

from inference.store import load_snapshot_into_redis

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Phase:
    """What one phase of offered load got back."""

    rate: float
    seconds: float
    statuses: Counter = field(default_factory=Counter)  # HTTP status, or "timeout" / "error" / "dropped"
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # by status
    rss_mb: list[float] = field(default_factory=list)  # the server's, sampled each second
    rss_at_s: list[float] = field(default_factory=list)  # when each sample was taken, from the phase's start
    swap_every_s: float | None = None  # with swaps: one every so many seconds, from then on
    requests: list[tuple[float, int | str, float]] = field(default_factory=list)  # (started at s, status, ms)
    degraded: list[str | None] = field(default_factory=list)  # /healthz's, sampled with the RSS
    fallbacks: list[Counter] = field(default_factory=list)  # the scorer fallbacks so far, by scorer, sampled too

    def record(self, status: int | str, ms: float, at_s: float) -> None:
        self.statuses[status] += 1
        self.latency_ms.setdefault(str(status), []).append(ms)
        self.requests.append((at_s, status, ms))

    def window(self, start_s: float, end_s: float) -> Phase:
        """The requests started from ``start_s`` to ``end_s`` into the phase, and the samples taken then."""
        part = Phase(self.rate, end_s - start_s)
        for at_s, status, ms in self.requests:
            if start_s <= at_s < end_s:
                part.record(status, ms, at_s)
        for mb, at_s, degraded, fallbacks in zip(self.rss_mb, self.rss_at_s, self.degraded, self.fallbacks,
                                                  strict=True):
            if start_s <= at_s < end_s:
                part.rss_mb.append(mb)
                part.rss_at_s.append(at_s)
                part.degraded.append(degraded)
                part.fallbacks.append(fallbacks)
        return part

    def rss_before(self, at_s: float) -> float | None:
        """The last RSS sample taken before ``at_s`` seconds into the phase."""
        return next((mb for mb, t in zip(reversed(self.rss_mb), reversed(self.rss_at_s), strict=True) if t < at_s),
                    None)

    def summary(self) -> dict:
        ok = np.asarray(self.latency_ms.get("200", []))
        shed = np.asarray(self.latency_ms.get("503", []))
        sent = sum(self.statuses.values())

        def percentile(values: np.ndarray, q: float) -> float | None:
            return round(float(np.percentile(values, q)), 1) if len(values) else None

        return {
            "offered_per_s": self.rate, "seconds": self.seconds, "sent": sent,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
            "goodput_per_s": round(len(ok) / self.seconds, 1),
            "errors": sent - len(ok) - len(shed),  # neither answered nor shed: 5xx other than 503, timeouts
            "p50_ms": percentile(ok, 50), "p95_ms": percentile(ok, 95), "p99_ms": percentile(ok, 99),
            "shed_p50_ms": percentile(shed, 50), "shed_p99_ms": percentile(shed, 99),
            "shed_max_ms": None if not len(shed) else round(float(shed.max()), 1),
            "rss_mb_first": self.rss_mb[0] if self.rss_mb else None,
            "rss_mb_last": self.rss_mb[-1] if self.rss_mb else None,
            "degraded_samples": sum(d is not None for d in self.degraded),
            "degraded_last": self.degraded[-1] if self.degraded else None,
            **({} if self.swap_every_s is None else {  # the second swap would come at 2 x swap_every_s
                "rss_mb_after_first_swap": self.rss_before(2 * self.swap_every_s),
                "rss_mb_after_last_swap": self.rss_mb[-1] if self.rss_mb else None}),
        }


async def offer(url: str, rate: float, seconds: float, bodies: list[bytes], server: psutil.Process,
                timeout_s: float, max_outstanding: int, faults: list[tuple[str, float]] = (),
                swap_every_s: float | None = None) -> Phase:
    """Starts ``rate`` requests per second for ``seconds``, open-loop; waits for the last replies."""
    phase = Phase(rate, seconds, swap_every_s=swap_every_s)
    outstanding = 0
    connector = aiohttp.TCPConnector(limit=max_outstanding, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(body: bytes) -> None:
            nonlocal outstanding
            started = time.perf_counter()
            at_s = started - start
            try:
                async with session.post(url + "/recommend", data=body,
                                        headers={"Content-Type": "application/json"}) as reply:
                    await reply.read()
                    status: int | str = reply.status
            except TimeoutError:
                status = "timeout"
            except aiohttp.ClientError:
                status = "error"
            finally:
                outstanding -= 1
            phase.record(status, (time.perf_counter() - started) * 1000, at_s)

        async def sample() -> None:
            while True:
                phase.rss_mb.append(round(rss(server) / 2**20, 1))
                phase.rss_at_s.append(time.perf_counter() - start)
                try:
                    async with session.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=1.0)) as reply:
                        phase.degraded.append((await reply.json())["degraded"])
                except (TimeoutError, aiohttp.ClientError):
                    phase.degraded.append("/healthz did not answer")
                try:
                    async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=1.0)) as reply:
                        phase.fallbacks.append(parse_counts(await reply.text())["scorer_fallbacks"])
                except (TimeoutError, aiohttp.ClientError):
                    phase.fallbacks.append(phase.fallbacks[-1] if phase.fallbacks else Counter())
                await asyncio.sleep(1.0)

        async def inject(command: str, at_s: float) -> None:
            await asyncio.sleep(at_s)
            process = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.DEVNULL,
                                                            stderr=asyncio.subprocess.PIPE)
            _, err = await process.communicate()
            print(f"fault {command!r} at {at_s} s: exit {process.returncode} {err.decode()[-300:]}", file=sys.stderr)

        start = time.perf_counter()
        sampler = asyncio.create_task(sample())
        injected = [asyncio.create_task(inject(command, at_s)) for command, at_s in faults]
        tasks = []
        for n in range(int(rate * seconds)):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if outstanding >= max_outstanding:
                phase.record("dropped", 0.0, n / rate)
                continue
            outstanding += 1
            tasks.append(asyncio.create_task(one(bodies[n % len(bodies)])))
        await asyncio.gather(*tasks, *injected)
        sampler.cancel()
    return phase


def rss(server: psutil.Process) -> int:
    """The resident bytes of ``server`` and its processes (``--workers N``: the workers)."""
    processes = [server, *server.children(recursive=True)]
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that exited meanwhile
            total += process.memory_info().rss
    return total


def wait_ready(what: str, ready: Callable[[], object], log: Path, exited: Callable[[], int | None] = lambda: None,
               timeout_s: float = 300.0) -> None:
    """Calls ``ready`` every 0.5 s until it returns without an OSError (or a Redis error) or
    ``exited()`` returns an exit status; RuntimeError naming ``log`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if exited() is not None:
            raise RuntimeError(f"{what} exited with {exited()}; see {log}")
        try:
            ready()
            return
        except (OSError, redis.RedisError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not ready within {timeout_s:g} s; see {log}") from None
            time.sleep(0.5)


def start_server(repo: Path, artifacts: Path, config: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "recstack", "serve", "--artifacts", str(artifacts.resolve()), "--config",
               str(config.resolve()), "--host", "127.0.0.1", "--port", str(port), *extra]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"load-server-{port}.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=repo, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready("the server", lambda: urllib.request.urlopen(url + "/healthz", timeout=2).close(), log, server.poll)
    except RuntimeError:
        server.kill()
        raise
    return server, url


def metric_counts(url: str) -> dict[str, Counter]:
    """The server's shed requests so far, by reason, and its scorer fallbacks, by scorer (its /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as reply:
        return parse_counts(reply.read().decode())


def parse_counts(text: str) -> dict[str, Counter]:
    counts = {"shed_reasons": Counter(), "scorer_fallbacks": Counter()}
    for family in text_string_to_metric_families(text):
        key, label = {"recstack_shed_requests": ("shed_reasons", "reason"),
                      "recstack_scorer_fallbacks": ("scorer_fallbacks", "scorer")}.get(family.name, (None, None))
        for sample in family.samples if key else ():
            counts[key][sample.labels[label]] += sample.value
    return counts


def make_bodies(users: int, context: dict, seed: int, n: int = 1000) -> list[bytes]:
    rng = random.Random(seed)
    return [json.dumps({"user_id": rng.randint(1, users), "context": context, "k": 10}).encode() for _ in range(n)]


def swap_commands(artifacts: Path, swaps: int, every_s: float) -> list[tuple[str, float]]:
    """``swaps`` commands publishing the two newest versions under ``artifacts`` in turn, the one
    not published first, one every ``every_s`` seconds."""
    root = artifacts.resolve()
    current = (root / "CURRENT").read_text().strip()
    newest = sorted(path.name for path in root.iterdir() if path.is_dir() and path.name.startswith("v"))[-2:]
    if len(newest) < 2 or current not in newest:
        raise ValueError(f"{root}: versions {newest}, published {current!r}; swaps need two versions, the newer "
                         "or the older of them published")
    turns = [newest[0] if current == newest[1] else newest[1], current]
    return [(shlex.join([sys.executable, "-m", "recstack", "artifacts", "rollback", "--artifacts", str(root),
                         "--version", turns[n % 2]]), (n + 1) * every_s) for n in range(swaps)]


@dataclass(frozen=True)
class Dependency:
    """A server ``recstack serve`` uses, started in the background by a shell command that writes its
    pid to a file, so that a fault can kill it and start it again."""

    start: str  # the shell command that starts it
    kill: str  # the shell command that SIGKILLs it


def background(command: list[str], directory: Path) -> Dependency:
    """``command`` run in the background, its output appended to ``directory``/log."""
    pid = directory / "pid"
    return Dependency(start=f"{shlex.join(command)} >>{directory / 'log'} 2>&1 & echo $! >{pid}",
                      kill=f"kill -9 $(cat {pid})")


def start_dependency(kind: str, artifacts: Path, config: Path, directory: Path) -> tuple[Dependency, Path]:
    """Starts Redis or Triton for the version published under ``artifacts`` (Redis loaded with it);
    returns it and a copy of ``config`` that uses it."""
    version = (artifacts / "CURRENT").read_text().strip()
    settings = yaml.safe_load(config.read_text())
    port, http_port = free_port(), free_port()
    if kind == "redis":
        dependency = background(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(directory)], directory)
        settings["redis"] = f"127.0.0.1:{port}"
        ready: Callable[[], object] = redis.Redis("127.0.0.1", port, socket_connect_timeout=1.0).ping
    else:
        dependency = background([sys.executable, "-m", "recstack", "triton", "serve", "--repo",
                                 str(artifacts.resolve() / version / "triton"), "--http-port", str(http_port),
                                 "--grpc-port", str(port)], directory)
        settings["triton"] = f"127.0.0.1:{port}"
        settings["scorer"] = [{"kind": "triton", "model": "deepfm_py"}, *settings["scorer"]]
        ready = lambda: urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1)  # noqa: E731
    subprocess.run(dependency.start, shell=True, check=True)
    wait_ready(kind, ready, directory / "log")
    if kind == "redis":
        load_snapshot_into_redis(artifacts / version / "store", "127.0.0.1", port, version)
    used = directory / "pipeline.yaml"
    used.write_text(yaml.safe_dump(settings, sort_keys=False))
    return dependency, used


def capacity_of(steps: list[dict], p99_ms: float) -> float:
    """The highest offered rate whose replies were all 200 with p99 under ``p99_ms`` (0: none)."""
    held = [s["offered_per_s"] for s in steps
            if s["statuses"].keys() == {"200"} and s["p99_ms"] is not None and s["p99_ms"] < p99_ms]
    return max(held, default=0.0)


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; client and server on it; "
             f"load average {m['load_average_1min']:.1f} at the start",
             f"Server: {result['server']}; capacity {result['capacity_per_s']} requests/s "
             f"(p99 under {result['p99_ms']} ms, all 200); overload and steady scaled from "
             f"{result['scaled_from_per_s']} requests/s", *[f"Fault: {fault}" for fault in result["faults"]],
             *([f"Swaps: {result['swaps']}, one every {result['swap_every_s']} s"] if result["swaps"] else []), "",
             "| phase | offered /s | sent | goodput /s | 200 | 503 | errors | p50 ms | p95 ms | p99 ms | "
             "shed p50 ms | shed p99 ms | shed max ms | shed by reason | RSS MB first -> last | "
             "degraded samples (last) | scorer fallbacks |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for name, row in result["phases"]:
        lines.append(f"| {name} | {row['offered_per_s']:g} | {row['sent']} | {row['goodput_per_s']} | "
                     f"{row['statuses'].get('200', 0)} | {row['statuses'].get('503', 0)} | {row['errors']} | "
                     f"{row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | {row['shed_p50_ms']} | "
                     f"{row['shed_p99_ms']} | "
                     f"{row['shed_max_ms']} | {', '.join(f'{k} {v:g}' for k, v in row['shed_reasons'].items())} | "
                     f"{row['rss_mb_first']} -> {row['rss_mb_last']} | "
                     f"{row['degraded_samples']} ({row['degraded_last']}) | "
                     f"{', '.join(f'{k} {v:g}' for k, v in row['scorer_fallbacks'].items())} |")
    for name, row in result["phases"]:
        if "rss_mb_after_first_swap" in row:
            lines.append(f"\n{name}: RSS {row['rss_mb_after_first_swap']} MB after the first swap, "
                         f"{row['rss_mb_after_last_swap']} MB after the last")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose `recstack serve` runs")
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--server-arg", action="append", default=[], help="passed on to recstack serve")
    parser.add_argument("--users", type=int, default=943, help="user ids drawn in 1..USERS")
    parser.add_argument("--context", default='{"hour": 20, "weekday": 5}', help="JSON context of every request")
    parser.add_argument("--rates", default="10,20,40,60,80,100,130,160", help="stepped rates, requests/s")
    parser.add_argument("--step-s", type=float, default=60.0,
                        help="seconds per stepped rate: with two workers on 2 cores 15 s steps read 160/s and 60 s "
                        "ones 130/s; a 5-minute steady load at 0.8x shed 1.8%% of the first, 0.02%% of the second")
    parser.add_argument("--p99-ms", type=float, default=100.0)
    parser.add_argument("--capacity", type=float, default=None,
                        help="requests/s the overload and steady phases scale (default: the one measured)")
    parser.add_argument("--overload", type=float, default=2.0, help="x capacity; 0 skips the phase")
    parser.add_argument("--overload-s", type=float, default=120.0)
    parser.add_argument("--steady", type=float, default=0.8, help="x capacity; 0 skips the phase")
    parser.add_argument("--steady-s", type=float, default=300.0)
    parser.add_argument("--fault", action="append", default=[], metavar="COMMAND@SECONDS",
                        help="a shell command run once during the steady phase, at that second")
    parser.add_argument("--swaps", type=int, default=0,
                        help="versions published during the steady phase (the root's two newest, in turn)")
    parser.add_argument("--swap-every", type=float, default=20.0, metavar="SECONDS")
    parser.add_argument("--kill", choices=("redis", "triton"), default=None,
                        help="start this dependency, kill it (SIGKILL) during the steady phase, start it again")
    parser.add_argument("--kill-at", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--down-s", type=float, default=5.0, help="seconds between the kill and the restart")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="client timeout per request")
    parser.add_argument("--max-outstanding", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load.json")
    args = parser.parse_args()
    faults = [(command, float(at)) for command, _, at in (f.rpartition("@") for f in args.fault)]
    swaps = swap_commands(args.artifacts, args.swaps, args.swap_every) if args.swaps else []
    bodies = make_bodies(args.users, json.loads(args.context), args.seed)
    machine = describe_machine()
    config, windows, dependency = args.config, [], None
    if args.kill:
        directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"load-{args.kill}-{os.getpid()}"
        directory.mkdir()
        dependency, config = start_dependency(args.kill, args.artifacts, args.config, directory)
        restart_at = args.kill_at + args.down_s
        faults += [(dependency.kill, args.kill_at), (dependency.start, restart_at)]
        args.fault += [f"{args.kill} killed (SIGKILL) at {args.kill_at:g} s, started again empty at {restart_at:g} s"]
        windows = [("before the kill", 0.0, args.kill_at), (f"{args.kill} down", args.kill_at, restart_at),
                   ("after the restart", restart_at, args.steady_s)]
    server, url = start_server(args.repo, args.artifacts, config, args.server_arg)
    process = psutil.Process(server.pid)
    phases = []
    try:
        def run(name: str, rate: float, seconds: float, faults=(), swap_every_s: float | None = None,
                windows=()) -> dict:
            before = metric_counts(url)
            phase = asyncio.run(offer(url, rate, seconds, bodies, process, args.timeout_s, args.max_outstanding,
                                      faults, swap_every_s))
            row = phase.summary()
            after = metric_counts(url)  # what the server says it shed, and why; which scorers failed over
            row.update({key: dict(after[key] - before[key]) for key in after})
            print(name, json.dumps(row), file=sys.stderr)
            phases.append((name, row))
            for label, start_s, end_s in windows:  # shed counts not split; fallbacks from the samples (each second)
                part = phase.window(start_s, end_s)
                phases.append((f"{name}: {label}", {**part.summary(), "shed_reasons": {},
                                                    "scorer_fallbacks": dict(part.fallbacks[-1] - part.fallbacks[0])}))
            time.sleep(2.0)  # let the server drain between phases
            return row

        run("warm-up", 5, 10)
        steps = []
        for rate in (float(rate) for rate in args.rates.split(",") if rate):  # "": no steps (give --capacity)
            steps.append(run(f"step {rate:g}/s", rate, args.step_s))
            if steps[-1]["errors"] > 0.05 * steps[-1]["sent"]:  # collapsed: higher steps only take longer
                break
        measured = capacity_of(steps, args.p99_ms)
        capacity = args.capacity or measured
        if capacity and args.overload:
            run(f"overload {args.overload:g}x", args.overload * capacity, args.overload_s)
        if capacity and args.steady:
            run(f"steady {args.steady:g}x" + (" + faults" if faults else "") + (" + swaps" if swaps else ""),
                args.steady * capacity, args.steady_s, faults + swaps, args.swap_every if swaps else None, windows)
        rev = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    finally:
        server.terminate()
        server.wait(30)
        if dependency is not None:
            subprocess.run(dependency.kill, shell=True)
    result = {"machine": machine, "server": f"{shlex.join(['recstack', 'serve', *args.server_arg])} at {rev}",
              "capacity_per_s": measured, "scaled_from_per_s": capacity, "p99_ms": args.p99_ms, "phases": phases,
              "faults": args.fault, "swaps": args.swaps, "swap_every_s": args.swap_every,
              "passed": measured > 0 or args.capacity is not None}
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
