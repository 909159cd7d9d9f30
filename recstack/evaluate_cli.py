"""`recstack evaluate replay`: an off-policy estimate of a pipeline config from an impression log."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from recstack.recommend_cli import published_pipeline

log = logging.getLogger(__name__)


def add_commands(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("evaluate", help="evaluate a pipeline offline")
    tasks = evaluate.add_subparsers(dest="task", required=True, metavar="{replay}")
    replay = tasks.add_parser("replay", help="estimate a pipeline config's reward on the traffic an impression "
                                             "log holds (recstack serve --log, with an explore orderer)")
    replay.add_argument("--log", required=True, type=Path, help="impression log directory")
    replay.add_argument("--artifacts", required=True, type=Path, help="artefact root (versions + CURRENT)")
    replay.add_argument("--config", required=True, type=Path,
                        help="YAML pipeline config of the candidate; it must not explore (a top_k final orderer)")
    replay.add_argument("--depth", type=int, nargs="+", default=[1, 5, 10],
                        help="report the reward per request in the top d slots, for each d")
    replay.set_defaults(run=_replay)


def _replay(args: argparse.Namespace) -> int:
    from evaluation.replay import replay
    from inference.impressions import logged_slots
    from inference.pipeline.types import Query

    slots = logged_slots(args.log)
    version, pipeline = published_pipeline(args.artifacts, args.config)
    failed = 0

    def rank(query: Query):
        nonlocal failed
        try:
            response = pipeline(query)
        except (RuntimeError, ValueError) as e:  # the candidate fails or refuses it: it shows nothing
            failed += 1
            log.warning("the candidate failed on %s: %s", query, e)
            return []
        if (response.propensities < 1).any():
            raise ValueError(f"{args.config}: the candidate's orderers draw at random (propensities below 1); "
                             "replay estimates deterministic rankings: use a top_k final orderer")
        return response.item_ids

    try:
        estimates = replay(slots, rank, args.depth)
    finally:
        pipeline.close()
    print(json.dumps({"version": version, "requests": int(slots["request_id"].nunique()), "failed": failed,
                      "depths": [asdict(e) for e in estimates]}))
    return 0
