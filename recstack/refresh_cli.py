"""`recstack refresh` and `recstack artifacts list|rollback`: build, publish and manage artefact versions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(commands: argparse._SubParsersAction) -> None:
    refresh = commands.add_parser("refresh", help="build and publish a new artefact version (cron-friendly)")
    refresh.add_argument("--data", required=True, type=Path, help="canonical dataset directory")
    refresh.add_argument("--models", required=True, type=Path, help="directory holding the training runs")
    refresh.add_argument("--artifacts", required=True, type=Path, help="artefact root (versions + CURRENT)")
    refresh.add_argument("--config", type=Path, help="YAML refresh config (see configs/refresh.yaml)")
    refresh.add_argument("--incremental", action="store_true",
                         help="start from the published version: re-embed only new and changed items")
    refresh.add_argument("--now", type=int, help="the time to refresh as of, in epoch seconds; later interactions "
                         "are ignored (default: the last interaction)")
    refresh.add_argument("--engine", choices=["local", "ray"],
                         help="where item embeddings are computed (default: the config's engine, local)")
    refresh.add_argument("--ray-address", help="with --engine ray: host:port or ray://host:port of a Ray cluster "
                         "(default: RAY_ADDRESS, else a local Ray)")
    refresh.set_defaults(run=_refresh)

    artifacts = commands.add_parser("artifacts", help="list artefact versions or roll back")
    artifact_commands = artifacts.add_subparsers(title="artifacts commands", required=True)
    listing = artifact_commands.add_parser("list", help="versions, oldest first; * marks the published one")
    listing.add_argument("--artifacts", required=True, type=Path)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)
    rollback = artifact_commands.add_parser("rollback", help="publish an older version")
    rollback.add_argument("--artifacts", required=True, type=Path)
    rollback.add_argument("--version", help="version to publish (default: the one before the published)")
    rollback.set_defaults(run=_rollback)


def _refresh(args: argparse.Namespace) -> int:
    from inference.refresh.job import load_refresh_config, refresh

    config = load_refresh_config(args.config)
    overrides = {"engine": args.engine, "ray_address": args.ray_address}
    config = config.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    manifest = refresh(args.data, args.models, args.artifacts, config, args.incremental, args.now)
    print(json.dumps({k: manifest[k] for k in ("version", "mode", "parent", "catalogue", "index", "seconds")}))
    return 0


def _list(args: argparse.Namespace) -> int:
    from inference.refresh.job import describe

    rows = describe(args.artifacts)
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        recall = row.get("recall@100")
        print(f"{'*' if row['current'] else ' '} {row['version']}  {row['mode']:<11}  items {row['items']}  "
              f"recall@100 {'-' if recall is None else f'{recall:.3f}'}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from inference.artifacts import ArtifactRoot

    print(ArtifactRoot(args.artifacts).rollback(args.version))
    return 0
