"""Rows per second into model-ready ranker batches: the encoded stream against per-batch pandas
encoding, in the same run, with no model.

    python benchmarks/input_pipeline.py            # 2M synthetic interactions, batch 1024
    python benchmarks/input_pipeline.py --small    # a quick run

Both paths make the `Batch` (KJT, dense, labels) of every non-sequence feature that
`RankingDataModule` trains on, in a shuffled order:
- pandas: the loader training used before the encoded parts: the train part joined with users
  and items into one frame (once, not counted), then a DataLoader over `EncodedRows` with a
  shuffling `DistributedSampler`, `FeatureEncoder.encode` per batch; ``--pandas-batches`` batches;
- stream: `BatchStream` over the encoded train part (row groups -> numpy -> tensors), a whole
  epoch, in this process and with DataLoader workers.
The dataset is prepared once into a temporary folder (not timed). On a shared machine the
rows/s swing with the load, so each path runs ``--repeats`` times, interleaved, and the table
shows the best run and the median. The run passes when the in-process stream's best is at least
10x the pandas path's best.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from report import describe_machine, finish
from torch.utils.data import DataLoader, DistributedSampler

from data.dataset import read_dataset, read_part
from data.encoded import ENCODED, BatchStream, EncodedPart, StreamConfig
from data.encoders import FeatureEncoder, join_features
from data.prepare import prepare
from data.synthetic import SyntheticConfig, generate
from training.data import EncodedRows, as_is

ROOT = Path(__file__).resolve().parents[1]
FULL = {"users": 100_000, "items": 100_000, "interactions": 2_000_000}
SMALL = {"users": 5_000, "items": 5_000, "interactions": 200_000}
TARGET_SPEEDUP = 10


def pandas_rows(data_dir: Path, names: list[str]) -> tuple[EncodedRows, float]:
    """The joined train part as the pandas loader's dataset, and the seconds the join took."""
    encoder = FeatureEncoder.load(data_dir / "encoders.json")
    tables = read_dataset(data_dir, tables=("users", "items"))
    start = time.perf_counter()
    frame = join_features(read_part(data_dir, "train"), tables.users, tables.items)
    return EncodedRows(frame, encoder, [names]), time.perf_counter() - start


def time_pandas(rows: EncodedRows, batch_size: int, batches: int, seed: int) -> dict:
    """Rows/s of the first ``batches`` shuffled batches of the pandas loader."""
    sampler = DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=as_is)
    done = 0
    start = time.perf_counter()
    for (batch, _), _ in zip(loader, range(batches), strict=False):
        done += len(batch)
    seconds = time.perf_counter() - start
    return {"rows": done, "seconds": seconds, "rows_per_s": done / seconds}


def time_stream(data_dir: Path, names: list[str], batch_size: int, workers: int, seed: int) -> dict:
    """Rows/s of one streamed epoch of the encoded train part."""
    schema = FeatureEncoder.load(data_dir / "encoders.json").schema
    config = StreamConfig(batch_size, units=max(workers, 1), seed=seed)
    stream = BatchStream(EncodedPart(data_dir / ENCODED / "train"), schema, [names], config, lambda: 0,
                         workers=workers)
    rows = 0
    start = time.perf_counter()
    for batch, _ in stream:
        rows += len(batch)
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


def summary(runs: list[dict]) -> dict:
    """The best of repeated runs, with every run's rows/s and their median."""
    rates = [r["rows_per_s"] for r in runs]
    return {**max(runs, key=lambda r: r["rows_per_s"]), "median_rows_per_s": statistics.median(rates),
            "all_rows_per_s": rates}


def format_table(result: dict) -> str:
    m, s = result["machine"], result["sizes"]
    pandas = result["pandas"]["rows_per_s"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"numpy {m['numpy']}, pandas {m['pandas']}, pyarrow {m['pyarrow']}; "
        f"load average {m['load_average_1min']:.1f} at the start",
        f"Sizes: {s['users']:,} users, {s['items']:,} items, {s['interactions']:,} interactions "
        f"({result['train_rows']:,} train rows), batch {result['batch_size']:,}, "
        f"{len(result['features'])} features",
        "",
        f"| path (best of {result['repeats']}) | rows timed | seconds | rows/s | median rows/s | x pandas |",
        "|---|---:|---:|---:|---:|---:|",
        f"| pandas: encode per batch (join once: {result['join_s']:.1f} s, not counted) | "
        f"{result['pandas']['rows']:,} | {result['pandas']['seconds']:.2f} | {pandas:,.0f} | "
        f"{result['pandas']['median_rows_per_s']:,.0f} | 1.0 |",
    ]
    for name, run in result["stream"].items():
        lines.append(f"| stream, {name} | {run['rows']:,} | {run['seconds']:.2f} | {run['rows_per_s']:,.0f} | "
                     f"{run['median_rows_per_s']:,.0f} | {run['rows_per_s'] / pandas:.1f} |")
    verdict = "pass" if result["passed"] else "FAIL"
    lines += ["", f"Target: the in-process stream >= {TARGET_SPEEDUP}x pandas: {result['speedup']:.1f}x, {verdict}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help=f"quick run at {SMALL}")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--pandas-batches", type=int, default=200, help="batches the pandas path encodes")
    parser.add_argument("--workers", type=int, nargs="*", default=[2], help="DataLoader worker counts to add")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "input_pipeline.json")
    args = parser.parse_args(argv)
    sizes = SMALL if args.small else FULL

    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="input-pipeline-") as tmp:
        data_dir = prepare(generate(SyntheticConfig(**sizes, seed=args.seed)), Path(tmp) / "synthetic")
        schema = FeatureEncoder.load(data_dir / "encoders.json").schema
        names = [f.name for f in schema.features if f.kind != "sequence"]
        rows, join_s = pandas_rows(data_dir, names)
        paths = {"in process": 0, **{f"{w} DataLoader workers": w for w in args.workers}}
        runs = {"pandas": [], **{name: [] for name in paths}}
        for _ in range(args.repeats):  # interleaved, so a burst of load hits every path alike
            runs["pandas"].append(time_pandas(rows, args.batch_size, args.pandas_batches, args.seed))
            for name, workers in paths.items():
                runs[name].append(time_stream(data_dir, names, args.batch_size, workers, args.seed))
        pandas = summary(runs.pop("pandas"))
        stream = {name: summary(r) for name, r in runs.items()}
        train_rows = EncodedPart(data_dir / ENCODED / "train").num_rows
    speedup = stream["in process"]["rows_per_s"] / pandas["rows_per_s"]
    result = {
        "machine": machine,
        "sizes": sizes,
        "train_rows": train_rows,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "join_s": join_s,
        "features": names,
        "pandas": pandas,
        "stream": stream,
        "speedup": speedup,
        "target_speedup": TARGET_SPEEDUP,
        "passed": speedup >= TARGET_SPEEDUP,
    }
    return finish(result, format_table(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
