"""`recstack recommend`: one request through the pipeline over the published artefact version."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inference.pipeline.executor import Pipeline


def add_commands(commands: argparse._SubParsersAction) -> None:
    recommend = commands.add_parser("recommend", help="answer one request with the published version's pipeline")
    recommend.add_argument("--artifacts", required=True, type=Path, help="artefact root (versions + CURRENT)")
    recommend.add_argument("--config", required=True, type=Path, help="YAML pipeline config (configs/pipeline.yaml)")
    recommend.add_argument("--user", type=int, help="user id (default: an anonymous visitor)")
    recommend.add_argument("--recent", type=int, nargs="*", default=[], help="the session's recent items, oldest first")
    recommend.add_argument("--context", nargs="*", default=[], metavar="NAME=VALUE",
                           help="request-time features, e.g. hour=20 weekday=5 (numbers are read as numbers)")
    recommend.add_argument("--k", type=int, default=10)
    recommend.set_defaults(run=_recommend)


def parse_context(pairs: list[str], flag: str = "--context") -> dict[str, object]:
    """``["hour=20", "device=phone"]`` -> {"hour": 20, "device": "phone"}; errors name ``flag``."""
    context = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"{flag} {pair!r}: expected NAME=VALUE, e.g. hour=20")
        context[name] = _number(value)
    return context


def _number(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def published_pipeline(root: Path, config: Path) -> tuple[str, Pipeline]:
    """The published version under ``root`` and the pipeline the YAML ``config`` declares over it."""
    from inference.artifacts import ArtifactError, ArtifactRoot
    from inference.pipeline.config import load_pipeline_config
    from inference.pipeline.executor import open_pipeline

    pipeline_config = load_pipeline_config(config)
    artifacts = ArtifactRoot(root)
    published = artifacts.current()
    if published is None:
        raise ArtifactError(f"{root}: no published version; run `recstack refresh` first")
    return published, open_pipeline(pipeline_config, artifacts.path(published))


def _recommend(args: argparse.Namespace) -> int:
    from inference.pipeline.types import Query
    from inference.store import StoreError
    from recstack.cli import print_error  # here, not at the top: recstack.cli imports this module

    query = Query(args.user, parse_context(args.context), tuple(args.recent), args.k)  # checked before loading
    published, pipeline = published_pipeline(args.artifacts, args.config)
    try:
        pipeline.warm_up(query)
        response = pipeline(query)
    except (RuntimeError, StoreError) as e:  # a fail-closed source, every scorer, or Redis failed
        print_error(e)
        return 1
    finally:
        pipeline.close()
    items = [{"item_id": int(i), "score": round(float(s), 6), "source": str(src), "propensity": float(p),
              **({"display": shown} if shown else {})}  # the config's display columns, e.g. the title
             for i, s, src, p, shown in zip(response.item_ids, response.scores, response.sources,
                                            response.propensities, response.display_rows(), strict=True)]
    stages = {name: {"out": counts["out"], "ms": round(counts["total_ms"], 2)}
              for name, counts in pipeline.stats.snapshot()["stages"].items()}
    print(json.dumps({"version": published, "items": items, "removed": Counter(response.reasons.tolist()),
                      "stages": stages}))
    return 0
