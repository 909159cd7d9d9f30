"""`recstack evaluate`: `offline`, the pipeline stage by stage on a dataset's held-out part;
`replay`, an off-policy estimate of a pipeline config from an impression log; `ab`, the
analysis of an experiment the service ran; `drift`, how a dataset's model inputs moved between
two samples of its interactions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from recstack.recommend_cli import published_pipeline

log = logging.getLogger(__name__)


def _scalars(fields: list[tuple[str, object]]) -> dict:
    """A dataclass's fields for JSON, without per-row arrays (an `Estimate`'s ``rewards``)."""
    return {name: value for name, value in fields if not hasattr(value, "shape")}


def add_commands(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("evaluate", help="evaluate a pipeline offline")
    tasks = evaluate.add_subparsers(title="evaluate commands", required=True)
    offline = tasks.add_parser("offline", help="the published pipeline stage by stage on a dataset's held-out "
                                               "users, against retrieval alone and popularity")
    offline.add_argument("--artifacts", required=True, type=Path, help="artefact root (versions + CURRENT)")
    offline.add_argument("--config", required=True, type=Path, help="YAML pipeline config (configs/pipeline.yaml)")
    offline.add_argument("--data", required=True, type=Path, help="canonical dataset directory with a split")
    offline.add_argument("--part", choices=("valid", "test"), default="test",
                         help="held-out part; its users' history is train (test: train and valid)")
    offline.add_argument("--k", type=int, nargs="+", default=[10, 20, 50], help="list lengths to report")
    offline.add_argument("--users", type=int, metavar="N", help="a seeded sample of N users (default: all)")
    offline.add_argument("--out", type=Path, help="write report.json, PNG figures and report.html here")
    offline.add_argument("--truth", action="store_true",
                         help="synthetic data: expected clicks by the generator's true click probabilities")
    offline.add_argument("--seed", type=int, default=0, help="seeds the user sample and the bootstrap")
    offline.add_argument("--diversity-column", default="category",
                         help="item column of labels for intra-list diversity (e.g. genres)")
    offline.set_defaults(run=_offline)
    replay = tasks.add_parser("replay", help="estimate a pipeline config's reward on the traffic an impression "
                                             "log holds (recstack serve --log, with an explore orderer)")
    replay.add_argument("--log", required=True, type=Path, help="impression log directory")
    replay.add_argument("--artifacts", required=True, type=Path, help="artefact root (versions + CURRENT)")
    replay.add_argument("--config", required=True, type=Path,
                        help="YAML pipeline config of the candidate; it must not explore (a top_k final orderer)")
    replay.add_argument("--depth", type=int, nargs="+", default=[1, 5, 10],
                        help="report the reward per request in the top d slots, for each d")
    replay.add_argument("--last", type=int, default=None, metavar="N",
                        help="replay only the log's last N requests (the candidate answers each one)")
    replay.set_defaults(run=_replay)
    ab = tasks.add_parser("ab", help="an experiment's arms from an impression log (recstack serve "
                                     "--experiment-config): reward per request per user, Welch's t-test, "
                                     "sample-ratio check")
    ab.add_argument("--log", required=True, type=Path, help="impression log directory")
    ab.add_argument("--treatment", default="treatment", help="the experiment arm's name (--experiment-name)")
    ab.add_argument("--share", type=float, default=0.5, help="the designed share of users in the arm")
    ab.set_defaults(run=_ab)
    drift = tasks.add_parser("drift", help="population stability (PSI) and KS of every model input between "
                                           "two samples of interactions, e.g. the training rows and today's")
    drift.add_argument("--reference", required=True, type=Path, help="canonical dataset directory")
    drift.add_argument("--current", required=True, type=Path, help="canonical dataset directory (may be the same)")
    for side in ("reference", "current"):
        drift.add_argument(f"--{side}-part", choices=("train", "valid", "test"),
                           help=f"compare only this split part of --{side} (default: every interaction)")
    drift.add_argument("--psi-alert", type=float, default=0.2, help="alert on a feature whose PSI exceeds this")
    drift.add_argument("--fail-on-alert", action="store_true", help="exit with status 1 when any feature alerts")
    drift.set_defaults(run=_drift)


def _offline(args: argparse.Namespace) -> int:
    from evaluation.offline import OfflineConfig, evaluate_offline, format_table
    from evaluation.plots import write_report
    from inference.pipeline.config import load_pipeline_config

    config = OfflineConfig(args.part, tuple(args.k), args.users, args.seed, args.diversity_column, args.truth)
    max_k = load_pipeline_config(args.config).max_k
    if max(config.ks) > max_k:  # checked before the version loads
        raise ValueError(f"--k {max(config.ks)} exceeds max_k = {max_k} of {args.config}")
    version, pipeline = published_pipeline(args.artifacts, args.config)
    try:
        report = {"version": version, **evaluate_offline(pipeline, args.data, config)}
    finally:
        pipeline.close()
    table = format_table(report)
    print(table, file=sys.stderr)
    if args.out is not None:
        write_report(report, table, args.out)
    print(json.dumps(report))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from evaluation.replay import replay
    from inference.impressions import logged_slots
    from inference.pipeline.types import Query

    slots = logged_slots(args.log)
    if args.last is not None:
        if args.last < 1:
            raise ValueError(f"--last {args.last}; expected a positive number of requests")
        kept = slots["request_id"].drop_duplicates().iloc[-args.last:]
        slots = slots[slots["request_id"].isin(kept)]
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
                      "depths": [asdict(e, dict_factory=_scalars) for e in estimates]}))
    return 0


def _drift(args: argparse.Namespace) -> int:
    from data.dataset import read_dataset, read_part
    from data.encoders import join_features
    from evaluation.drift import feature_drift

    samples = {}
    for side in ("reference", "current"):
        directory, part = getattr(args, side), getattr(args, f"{side}_part")
        dataset = read_dataset(directory)
        rows = dataset.interactions if part is None else read_part(directory, part)
        samples[side] = join_features(rows, dataset.users, dataset.items)
        if side == "reference":
            features = list(dataset.schema.features)
    report = feature_drift(samples["reference"], samples["current"], features, args.psi_alert)
    print(report.round(4).to_string(), file=sys.stderr)
    alerts = report.index[report["alert"]].tolist()
    rows = json.loads(report.reset_index().to_json(orient="records"))  # NaN (KS of a category) -> null
    print(json.dumps({"rows": {side: len(frame) for side, frame in samples.items()}, "alerts": alerts,
                      "features": rows}))
    return 1 if alerts and args.fail_on_alert else 0


def _ab(args: argparse.Namespace) -> int:
    from evaluation.ab import logged_experiment
    from inference.impressions import read_log

    report = logged_experiment(*read_log(args.log), args.treatment, args.share)
    print(json.dumps({**asdict(report), "sample_ratio_alarm": report.sample_ratio_p_value < 0.001}))
    return 0
