"""`recstack data prepare|encode|stats|candidates`: canonical dataset directories and what is built from them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.splits import METHODS

SOURCES = ("ml-100k", "movielens", "obd", "synthetic", "files")


def add_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="prepare and inspect canonical datasets")
    data_commands = data.add_subparsers(title="data commands", required=True)

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
