"""The `recstack` command line. Each subcommand parses its arguments and calls one package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.splits import METHODS
from recstack import __version__, evaluate_cli, recommend_cli, refresh_cli, serve_cli, triton_cli

SOURCES = ("ml-100k", "movielens", "obd", "synthetic", "files")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        # DataError is a ValueError: bad input is reported, not dumped as a traceback
        print(f"recstack: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recstack", description=__doc__)
    parser.add_argument("--version", action="version", version=f"recstack {__version__}")
    commands = parser.add_subparsers(title="commands")

    data = commands.add_parser("data", help="prepare and inspect canonical datasets")
    data_commands = data.add_subparsers(title="data commands")

    prep = data_commands.add_parser("prepare", help="build a canonical dataset directory")
    prep.add_argument("--dataset", required=True, choices=SOURCES)
    prep.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    prep.add_argument("--split", default="random", choices=METHODS)
    prep.add_argument("--seed", type=int, default=2020)
    prep.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    prep.add_argument("--positive-rating", type=float, metavar="R", help="label = rating >= R (click-through task)")
    synth = prep.add_argument_group("synthetic")
    synth.add_argument("--users", type=int, default=1000)
    synth.add_argument("--items", type=int, default=500)
    synth.add_argument("--interactions", type=int, default=20000)
    raw = prep.add_argument_group("movielens / files")
    raw.add_argument("--path", type=Path, help="raw MovieLens file or folder; interactions file for 'files'")
    raw.add_argument("--users-file", type=Path, help="'files': users table (CSV/TSV/parquet)")
    raw.add_argument("--items-file", type=Path, help="'files': items table (CSV/TSV/parquet)")
    raw.add_argument("--map", nargs="*", default=[], metavar="NAME=COLUMN",
                     help="'files': canonical column name = column in the files")
    raw.add_argument("--mapping-file", type=Path, help="'files': YAML mapping of the same form")
    obd = prep.add_argument_group("obd")
    obd.add_argument("--policy", default="random")
    obd.add_argument("--campaign", default="all")
    prep.set_defaults(run=_prepare)

    encode = data_commands.add_parser("encode", help="(re)write a prepared dataset's encoded training inputs")
    encode.add_argument("--data", required=True, type=Path, help="canonical dataset directory; writes DATA/encoded")
    encode.add_argument("--row-group-rows", type=int, default=16_384, help="rows per parquet row group")
    encode.set_defaults(run=_encode)

    stats = data_commands.add_parser("stats", help="print a dataset's statistics")
    stats.add_argument("path", type=Path)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(run=_stats)

    cands = data_commands.add_parser("candidates", help="a ranker table of what retrieval proposes, on its split")
    cands.add_argument("--data", required=True, type=Path, help="the retrieval model's canonical dataset directory")
    cands.add_argument("--models", required=True, type=Path, help="directory of training runs (the two-tower one)")
    cands.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    cands.add_argument("--config", type=Path, help="YAML candidates config (see configs/candidates.yaml)")
    cands.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cands.set_defaults(run=_candidates)

    train = commands.add_parser("train", help="train a retrieval model or a ranker")
    train_commands = train.add_subparsers(title="train commands")
    retrieval = train_commands.add_parser("retrieval", help="two-tower retrieval")
    ranker = train_commands.add_parser("ranker", help="DeepFM, DLRM or linear ranker")
    ranker.add_argument("--model", required=True, choices=("deepfm", "dlrm", "linear"))
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

    refresh_cli.add_commands(commands)
    recommend_cli.add_commands(commands)
    serve_cli.add_commands(commands)
    triton_cli.add_commands(commands)
    evaluate_cli.add_commands(commands)
    return parser


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


def _prepare(args: argparse.Namespace) -> int:
    from data.prepare import prepare
    from data.stats import dataset_stats, format_stats

    ds = _load(args)
    out = prepare(ds, args.out, split=args.split, seed=args.seed, overwrite=args.overwrite,
                  positive_rating=args.positive_rating)
    print(f"wrote {out}")
    print(format_stats(dataset_stats(out)))
    return 0


def _load(args: argparse.Namespace):
    if args.dataset == "ml-100k":
        from data.movielens import load_ml100k

        return load_ml100k()
    if args.dataset == "movielens":
        from data.movielens import load_movielens

        return load_movielens(_need(args.path, "--path"))
    if args.dataset == "obd":
        from data.obd import load_obd

        return load_obd(policy=args.policy, campaign=args.campaign)
    if args.dataset == "synthetic":
        from data.synthetic import SyntheticConfig, generate

        return generate(SyntheticConfig(users=args.users, items=args.items,
                                        interactions=args.interactions, seed=args.seed))
    from data.files import load_files, load_mapping_file, parse_mapping

    mapping = load_mapping_file(args.mapping_file) if args.mapping_file else {}
    mapping.update(parse_mapping(args.map))
    return load_files(_need(args.path, "--path"), users=args.users_file, items=args.items_file, mapping=mapping)


def _need(value, flag: str):
    if value is None:
        raise ValueError(f"{flag} is required for this dataset")
    return value


def _candidates(args: argparse.Namespace) -> int:
    from data.candidates import build_candidates, load_candidates_config
    from data.dataset import write_dataset
    from data.stats import dataset_stats, format_stats

    table = build_candidates(args.data, args.models, load_candidates_config(args.config))
    out = write_dataset(table, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    print(format_stats(dataset_stats(out)))
    return 0


def _encode(args: argparse.Namespace) -> int:
    from data.encoded import EncodeConfig, encode_dataset

    print(f"wrote {encode_dataset(args.data, EncodeConfig(row_group_rows=args.row_group_rows))}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from data.stats import dataset_stats, format_stats

    stats = dataset_stats(args.path)
    print(json.dumps(stats) if args.json else format_stats(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
