"""`recstack serve`: the HTTP API (inference.service) over the published artefact version."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recstack.recommend_cli import parse_context


def add_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve recommendations over HTTP, switching to each new version")
    serve.add_argument("--artifacts", required=True, type=Path, help="artefact root (versions + CURRENT)")
    serve.add_argument("--config", required=True, type=Path, help="YAML pipeline config (configs/pipeline.yaml)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--poll-s", type=float, default=5.0, help="seconds between checks for a new version")
    serve.add_argument("--warm-up-context", nargs="*", default=[], metavar="NAME=VALUE",
                       help="context of the query each version must answer before it serves, e.g. hour=12 weekday=3")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from inference.pipeline.executor import load_pipeline_config
    from inference.service import Recommender, create_app

    # swaps and refusals log at INFO and ERROR; force: importing torchrec already added a WARNING root handler
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    context = parse_context(args.warm_up_context, "--warm-up-context")
    recommender = Recommender(args.artifacts, load_pipeline_config(args.config), context, args.poll_s).start()
    try:
        # until SIGTERM or Ctrl-C; uvicorn shuts down gracefully, then re-raises the signal
        uvicorn.run(create_app(recommender), host=args.host, port=args.port)
    except KeyboardInterrupt:  # Ctrl-C is how an operator stops it, not an error
        pass
    finally:
        recommender.close()
    return 0
