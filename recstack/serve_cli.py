"""`recstack serve`: the HTTP API (inference.service) over the published artefact version."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from recstack.recommend_cli import parse_context

API_KEY_ENV = "RECSTACK_API_KEY"
LIMITS = ("max_in_flight", "max_queue", "queue_timeout_s", "request_timeout_s", "max_body_bytes")  # Limits' fields


def add_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve recommendations over HTTP, switching to each new version")
    serve.add_argument("--artifacts", required=True, type=Path, help="artefact root (versions + CURRENT)")
    serve.add_argument("--config", required=True, type=Path, help="YAML pipeline config (configs/pipeline.yaml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--poll-s", type=float, default=5.0, help="seconds between checks for a new version")
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
    import uvicorn

    from inference.impressions import ImpressionLog
    from inference.pipeline.config import load_pipeline_config
    from inference.pipeline.types import Query
    from inference.service import Experiment, Limits, Recommender, Shadow, create_app

    # swaps and refusals log at INFO and ERROR; force: importing torchrec already added a WARNING root handler
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
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
    recommender = Recommender(args.artifacts, config, probe, args.poll_s, log, shadow, experiment).start()
    # the event loop admits, sheds and answers /healthz while request threads compute: a 1 ms GIL
    # switch interval (default 5 ms) lets it in between them sooner
    sys.setswitchinterval(0.001)
    try:
        # until SIGTERM or Ctrl-C; uvicorn shuts down gracefully, then re-raises the signal
        uvicorn.run(create_app(recommender, limits, api_key), host=args.host, port=args.port)
    except KeyboardInterrupt:  # Ctrl-C is how an operator stops it, not an error
        pass
    finally:
        recommender.close()
        if log is not None:
            log.close()
    return 0
