"""`recstack train retrieval|ranker`: one training run; its validation and test metrics are printed as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models import RANKERS


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a retrieval model or a ranker")
    train_commands = train.add_subparsers(title="train commands", required=True)
    retrieval = train_commands.add_parser("retrieval", help="two-tower retrieval")
    ranker = train_commands.add_parser("ranker", help="DeepFM, DLRM or linear ranker")
    ranker.add_argument("--model", required=True, choices=RANKERS)
    for sub, run in ((retrieval, _train_retrieval), (ranker, _train_ranker)):
        sub.add_argument("--data", required=True, type=Path, help="canonical dataset directory")
        sub.add_argument("--out", required=True, type=Path, help="run directory (resumed if it has a checkpoint)")
        sub.add_argument("--config", type=Path, help="YAML run config (see configs/)")
        sub.add_argument("--max-epochs", type=int)
        sub.add_argument("--batch-size", type=int)
        sub.add_argument("--seed", type=int)
        sub.add_argument("--devices", type=int, help="devices per node")
        sub.add_argument("--num-nodes", type=int, help="nodes, each started with the same command (e.g. by torchrun)")
        sub.add_argument("--accelerator", choices=("auto", "cpu", "gpu"))
        sub.add_argument("--strategy", help="Lightning strategy, e.g. ddp; or model_parallel: embedding tables "
                         "sharded by torchrec over the devices")
        sub.add_argument("--sharding", choices=("auto", "table_wise", "row_wise", "column_wise"),
                         help="model_parallel: how tables are split (auto: torchrec's planner chooses)")
        sub.set_defaults(run=run)


def _train_config(args: argparse.Namespace):
    from training.train import load_config

    return load_config(args.config, max_epochs=args.max_epochs, batch_size=args.batch_size, seed=args.seed,
                       devices=args.devices, num_nodes=args.num_nodes, accelerator=args.accelerator,
                       strategy=args.strategy, sharding=args.sharding)


def _train_retrieval(args: argparse.Namespace) -> int:
    from training.train import train_retrieval

    _print_metrics(train_retrieval(args.data, args.out, _train_config(args)))
    return 0


def _train_ranker(args: argparse.Namespace) -> int:
    from training.train import train_ranker

    _print_metrics(train_ranker(args.model, args.data, args.out, _train_config(args)))
    return 0


def _print_metrics(metrics: dict | None) -> None:
    if metrics is not None:  # None on the other ranks of a multi-process run: rank 0 prints once
        print(json.dumps(metrics))
