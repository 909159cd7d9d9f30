"""`recstack serve`: the HTTP API (inference.service) over the published artefact version, in
this process or, with ``--workers N``, in N worker processes on one listening socket.

With several workers, this process only supervises: it binds the socket, makes a scratch
directory for the workers to share (prometheus-client's multiprocess files, so that /metrics
sums them all; the `AnswerStore` file /feedback reads, so that feedback finds an answer whichever
worker gave it; the `HealthBoard`, so that /healthz lists every worker's version), starts the
workers, marks each one that exits dead for the metrics and starts it again, and removes the
scratch directory when stopped (SIGTERM or Ctrl-C). Each worker loads the published version
itself and follows new ones as a single server does.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from multiprocessing.connection import wait
from pathlib import Path

from recstack.recommend_cli import parse_context

log = logging.getLogger(__name__)

API_KEY_ENV = "RECSTACK_API_KEY"
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client when the workers import it
STOP_S = 30.0  # how long a stopped worker may take to finish its requests before it is killed
LIMITS = ("max_in_flight", "max_queue", "queue_timeout_s", "request_timeout_s", "max_body_bytes")  # Limits' fields


def add_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve recommendations over HTTP, switching to each new version")
    serve.add_argument("--artifacts", required=True, type=Path, help="artefact root (versions + CURRENT)")
    serve.add_argument("--config", required=True, type=Path, help="YAML pipeline config (configs/pipeline.yaml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--poll-s", type=float, default=5.0, help="seconds between checks for a new version")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes answering on the same port, each with the version loaded (default 1); "
                            "/metrics and /feedback span them all")
    serve.add_argument("--torch-threads", type=int, default=1, metavar="N",
                       help="torch's intra-op threads in each worker (default 1: a request's tensors are small and "
                            "requests already run side by side; more threads spin for a core the others need)")
    serve.add_argument("--probe-user", type=int, default=None, metavar="ID",
                       help="user of the query each version must answer before it serves (default: anonymous; "
                            "required when the config has allow_anonymous: false)")
    serve.add_argument("--log", type=Path, default=None, metavar="DIR",
                       help="write every answer and feedback event to this impression log (for off-policy evaluation)")
    serve.add_argument("--log-keep-days", type=float, default=None, metavar="DAYS",
                       help="delete log files last written more than DAYS ago (default: keep them all)")
    serve.add_argument("--shadow-config", type=Path, default=None, metavar="YAML",
                       help="a candidate pipeline config to run beside the live one on sampled requests (GET /shadow)")
    serve.add_argument("--shadow-sample", type=float, default=0.1, metavar="SHARE",
                       help="share of requests mirrored to the shadow pipeline")
    serve.add_argument("--experiment-config", type=Path, default=None, metavar="YAML",
                       help="A/B test: the pipeline config a share of users get instead of --config")
    serve.add_argument("--experiment-name", default="treatment", help="the experiment arm's name in the log")
    serve.add_argument("--experiment-share", type=float, default=0.5, metavar="SHARE",
                       help="share of users in the experiment arm (by a hash of the name and the user id)")
    serve.add_argument("--probe-context", nargs="*", default=[], metavar="NAME=VALUE",
                       help="context of that query, e.g. hour=12 weekday=3 (default: derived, as for any request)")
    limits = serve.add_argument_group("limits (what the server admits, the rest shed at once with 503; "
                                      "defaults: inference.service.Limits)")
    for flag, kind, what in (("--max-in-flight", int, "requests computed at once"),
                             ("--max-queue", int, "requests waiting for a turn"),
                             ("--queue-timeout-s", float, "longest wait for a turn"),
                             ("--request-timeout-s", float, "each request's time budget from its arrival; its "
                              "stages get what is left"),
                             ("--max-body-bytes", int, "larger bodies are refused (413) before they are read")):
        limits.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=what)
    serve.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                       help=f"require the key this file holds (or ${API_KEY_ENV}) on every path but /healthz, as "
                            "'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
    serve.set_defaults(run=_serve)


def read_api_key(path: Path | None) -> str | None:
    """The API key in file ``path`` (surrounding whitespace stripped), else in ${API_KEY_ENV}, else None."""
    key = path.read_text().strip() if path is not None else os.environ.get(API_KEY_ENV, "").strip()
    if path is not None and not key:
        raise ValueError(f"--api-key-file {path} is empty; expected the API key")
    return key or None


def _serve(args: argparse.Namespace) -> int:
    for flag in ("workers", "torch_threads"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}; expected at least 1")
    # swaps and refusals log at INFO and ERROR; force: importing torchrec already added a WARNING root handler
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
                        force=True)
    return _run(args) if args.workers == 1 else _supervise(args)


def _run(args: argparse.Namespace, listening: socket.socket | None = None, scratch: Path | None = None,
         ready: multiprocessing.synchronize.Event | None = None) -> int:
    """Serves in this process: on ``listening`` (a worker's share of the supervisor's socket)
    or on --host:--port; with a ``scratch`` directory, as one of several workers (the `AnswerStore`
    and the `HealthBoard` there); sets ``ready`` once the version is loaded."""
    import torch
    import uvicorn

    from inference.impressions import ImpressionLog
    from inference.pipeline.config import load_pipeline_config
    from inference.pipeline.types import Query
    from inference.service import Experiment, HealthBoard, Limits, Recommender, Shadow, create_app

    torch.set_num_threads(args.torch_threads)
    if listening is not None:  # a spawned worker: its logging is not the supervisor's
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
                            force=True)
    config = load_pipeline_config(args.config)
    limits = Limits(**{name: getattr(args, name) for name in LIMITS if hasattr(args, name)})
    api_key = read_api_key(args.api_key_file)
    probe = Query(args.probe_user, parse_context(args.probe_context, "--probe-context"), k=min(10, config.max_k))
    shadow = None
    if args.shadow_config is not None:
        shadow = Shadow(load_pipeline_config(args.shadow_config), args.shadow_sample)
    experiment = None
    if args.experiment_config is not None:
        experiment = Experiment(args.experiment_name, load_pipeline_config(args.experiment_config),
                                args.experiment_share)
    keep_s = None if args.log_keep_days is None else args.log_keep_days * 86400
    log = None if args.log is None else ImpressionLog(args.log, keep_s=keep_s)
    answers = None if scratch is None else scratch / "answers.sqlite"
    recommender = Recommender(args.artifacts, config, probe, args.poll_s, log, shadow, experiment, answers).start()
    board = None if scratch is None else HealthBoard(scratch / "health", recommender).start()
    if ready is not None:
        ready.set()
    # the event loop admits, sheds and answers /healthz while request threads compute: a 1 ms GIL
    # switch interval (default 5 ms) lets it in between them sooner
    sys.setswitchinterval(0.001)
    # uvicorn shuts down gracefully on SIGTERM or Ctrl-C, then raises the signal again: either one
    # then ends here, so that the log and the recommender are closed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server = uvicorn.Server(uvicorn.Config(create_app(recommender, limits, api_key, board), host=args.host,
                                               port=args.port))
        server.run(sockets=None if listening is None else [listening])
    except KeyboardInterrupt:  # how an operator or the supervisor stops it, not an error
        pass
    finally:
        if board is not None:
            board.close()
        recommender.close()
        if log is not None:
            log.close()
    return 0


def _supervise(args: argparse.Namespace) -> int:
    """Runs ``args.workers`` workers (`_run`) on one socket until SIGTERM or Ctrl-C; a worker that
    exits is started again, unless it exits before it loaded the version (then all stop: 1)."""
    from prometheus_client import multiprocess

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listening = socket.create_server((args.host, args.port), family=family, backlog=2048)
    scratch = Path(tempfile.mkdtemp(prefix="recstack-serve-"))
    (scratch / "metrics").mkdir()
    os.environ[MULTIPROCESS_DIR] = str(scratch / "metrics")  # before the workers import prometheus-client
    spawn = multiprocessing.get_context("spawn")  # each worker imports torch and loads the version afresh
    workers: dict[int, tuple[multiprocessing.Process, multiprocessing.synchronize.Event]] = {}

    def start() -> None:
        ready = spawn.Event()
        worker = spawn.Process(target=_run, args=(args, listening, scratch, ready),
                               name="recstack-serve-worker")
        worker.start()
        workers[worker.sentinel] = (worker, ready)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    status = 0
    try:
        for _ in range(args.workers):
            start()
        log.info("serving on %s:%d with %d workers; scratch directory %s", args.host, args.port, args.workers, scratch)
        while not stopping:
            for sentinel in wait(list(workers), timeout=0.5):
                worker, ready = workers.pop(sentinel)
                worker.join()
                multiprocess.mark_process_dead(worker.pid)
                if not ready.is_set():
                    log.error("worker %d exited with %s before it served; stopping", worker.pid, worker.exitcode)
                    stopping.append(True)
                    status = 1
                    break
                log.warning("worker %d exited with %s; starting another", worker.pid, worker.exitcode)
                start()
    finally:
        for worker, _ in workers.values():
            worker.terminate()  # SIGTERM: each one finishes its requests
        for worker, _ in workers.values():
            worker.join(STOP_S)
            if worker.is_alive():
                worker.kill()
                worker.join()
            multiprocess.mark_process_dead(worker.pid)
        listening.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return status
