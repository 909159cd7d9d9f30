"""Times Lightning DLRM training against a plain torch loop on the identical model, data and batch.

    python benchmarks/train_throughput.py                # the device found: CPU, or CUDA (+ large config)
    python benchmarks/train_throughput.py --device cuda --steps 20

Both loops train `models.dlrm.DLRM` (the project's default sizes) with Adam on one list of batches
built in memory up front: one Zipf-like id per row and table, 13 dense columns and random labels.
No CSV or encoder runs, so the comparison measures the training loop alone. Both read the batches
through the same DataLoader, whose cost is not Lightning's. The plain loop is
`RankingModule.training_loss` and `LeanModule.training_step` written out; the other is
`training.ranking.RankingModule` under a `Trainer`. Every run starts from the same initial weights,
so the last losses of the two should agree. Timing starts at the end of the warm-up steps and stops
at the end of the last step (for Lightning, a callback takes both timestamps): Trainer start-up is
excluded, and everything Lightning does between steps is included. After one untimed run of each,
the pair runs ``--repeats`` times in alternating order; the table shows the median samples/s of
each loop and the median of the repeats' ratios, since the machine may be shared. On CPU the run
passes when Lightning reaches 0.9x the plain loop's samples per second, and when Lightning's extra
CPU time per step on a tiny DLRM (whose own step is a few milliseconds, so Lightning's share shows;
timed over ``--tiny-steps`` steps) stays under 0.3 ms. CPU time, this process's alone, is steadier
than wall time on a shared machine.

The tiny DLRM's step still varies by a few percent from run to run, which is as much as Lightning's
whole share. So on CPU the script also times Lightning's bookkeeping alone: both loops train one
weight on one-number batches (``--bare-steps`` steps), whose step is a few tens of microseconds, and
the table reports Lightning's extra CPU time per step there too. It reads the same to a few
microseconds from run to run, so it shows changes to Lightning's cost that the DLRM rows cannot.

On a busy machine, OMP_NUM_THREADS=1 steadies the numbers: on 2 cores shared with other jobs,
torch's 2 threads kept waiting for each other and steps took up to 10x longer. It also keeps the
CPU-time figures to the work done: with two threads the idle one spins through Lightning's Python
between ops, and its CPU time counts as Lightning's (on the tiny DLRM, 0.39 ms of extra CPU time
per step against 0.19 ms of wall time in one run). So does
MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736: by default glibc hands the
large buffers freed each step (gradients, Adam's temporaries) back to the kernel and faults them
in again, which cost both loops about 40% of their CPU throughput there, by a different amount
each run.

With a CUDA device the script also trains the large config (26 tables x 1M rows x 128 dims, batch
16,384) under bf16 autocast (Lightning: precision="bf16-mixed") and reports its samples per second
and peak GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import lightning as L
import report
import torch
import torch.nn.functional as F
import torchrec
from lightning.fabric.utilities.warnings import PossibleUserWarning
from report import finish
from torch import nn
from torch.utils.data import DataLoader
from torchrec import KeyedJaggedTensor

from data.encoders import Batch
from data.schema import FeatureSpec
from models.dlrm import DLRM, DLRMConfig
from training.lean_module import LeanModule, NullProfiler
from training.optimizers import DENSE_ADAM, EmbeddingOptimizer, build_optimizer
from training.ranking import RankingModule

ROOT = Path(__file__).resolve().parents[1]
DENSE_DIM = 13  # as in Criteo's click logs
LR = 1e-3
WARMUP_STEPS = 5
DISTINCT_BATCHES = 10  # cycled through; more would only cost memory
TARGET_RATIO = 0.9
TARGET_EXTRA_MS = 0.3  # Lightning's extra CPU ms per step, on TINY


@dataclass(frozen=True)
class Workload:
    tables: int
    rows: int
    dim: int
    batch: int
    bf16: bool

    def __str__(self) -> str:
        return f"{self.tables} x {self.rows:,} x {self.dim}, batch {self.batch:,}"


SMALL = Workload(tables=8, rows=100_000, dim=16, batch=2048, bf16=False)
LARGE = Workload(tables=26, rows=1_000_000, dim=128, batch=16_384, bf16=True)
TINY = Workload(tables=8, rows=1_000, dim=16, batch=64, bf16=False)


def build_model(work: Workload, seed: int) -> DLRM:
    """The DLRM `recstack train ranker --model dlrm` would build for these tables, on CPU."""
    features = tuple(FeatureSpec(f"table_{t}", "items", "categorical", vocab_size=work.rows, embedding_dim=work.dim)
                     for t in range(work.tables))
    torch.manual_seed(seed)
    return DLRM(DLRMConfig(features, DENSE_DIM))


def make_batches(work: Workload, seed: int, device: torch.device) -> list[Batch]:
    """``DISTINCT_BATCHES`` labelled batches laid out as `FeatureEncoder.encode` lays them out.

    Ids are log-uniform over [0, rows), so P(id = k) is about proportional to 1 / (k + 1), a Zipf
    law. The KJTs are built on CPU and then moved: their offsets are computed there.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(DISTINCT_BATCHES):
        n = work.batch * work.tables
        ids = (work.rows ** torch.rand(n, generator=generator, dtype=torch.float64)).long() - 1  # (T B,), key-major
        sparse = KeyedJaggedTensor(
            keys=[f"table_{t}" for t in range(work.tables)],
            values=ids.clamp_(0, work.rows - 1),
            lengths=torch.ones(n, dtype=torch.int32),
            stride=work.batch,
        )
        dense = torch.randn(work.batch, DENSE_DIM, generator=generator)
        labels = torch.randint(0, 2, (work.batch,), generator=generator).float()
        batches.append(Batch(sparse, dense, labels).to(device))
    return batches


class Clock(NamedTuple):
    wall_s: float
    cpu_s: float  # this process's CPU time: on a shared machine, steadier than wall time

    @classmethod
    def read(cls, device: torch.device) -> Clock:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return cls(time.perf_counter(), time.process_time())


class Timing(NamedTuple):
    """The steps after the warm-up: wall and CPU seconds, and the last step's loss."""

    wall_s: float
    cpu_s: float
    last_loss: float

    @classmethod
    def between(cls, start: Clock, end: Clock, last_loss: float) -> Timing:
        return cls(end.wall_s - start.wall_s, end.cpu_s - start.cpu_s, last_loss)


def batch_loader(batches: list) -> DataLoader:
    """``batches`` through a DataLoader, as both loops read them: each item one whole batch, a
    1-tuple as RankingDataModule's loaders yield it."""
    return DataLoader([(batch,) for batch in batches], batch_size=None, collate_fn=lambda item: item)


def plain_loop(loss_of: Callable, optimizer: torch.optim.Optimizer, batches: list, device: torch.device) -> Timing:
    """The plain loop: for each batch as `batch_loader` yields it, ``loss_of(batch)``, zero_grad,
    backward and step, in `LeanModule.training_step`'s order."""
    start = None
    for step, (batch,) in enumerate(batch_loader(batches)):
        if step == WARMUP_STEPS:
            start = Clock.read(device)
        loss = loss_of(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Timing.between(start, Clock.read(device), loss.item())


def train_plain(model: DLRM, batches: list[Batch], bf16: bool, tables: EmbeddingOptimizer = DENSE_ADAM) -> Timing:
    device = batches[0].dense.device

    def loss_of(batch: Batch) -> torch.Tensor:  # `RankingModule.training_loss`
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return F.binary_cross_entropy_with_logits(model(batch.dense, batch.sparse), batch.labels)

    # the optimizer as RankingModule.configure_optimizers builds it
    return plain_loop(loss_of, build_optimizer(model, LR, 0.0, tables), batches, device)


class StepTimer(L.Callback):
    """Reads the clock at the end of the last warm-up step and at the end of the last step."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.start: Clock | None = None
        self.timing: Timing | None = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if batch_idx == WARMUP_STEPS - 1:
            self.start = Clock.read(module.device)
        elif batch_idx == self.total_steps - 1:
            self.timing = Timing.between(self.start, Clock.read(module.device), outputs["loss"].item())


def fit_lightning(module: L.LightningModule, batches: list, device: torch.device, bf16: bool) -> Timing:
    """Trains ``module`` on ``batches`` under a Trainer set up as `recstack train`'s, less its
    checkpoints, loggers and progress bar."""
    timer = StepTimer(len(batches))
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=len(batches),
        precision="bf16-mixed" if bf16 else "32-true",
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        profiler=NullProfiler(),  # as `recstack train`'s
    )
    trainer.fit(module, train_dataloaders=batch_loader(batches))
    return timer.timing


def train_lightning(model: DLRM, batches: list[Batch], bf16: bool) -> Timing:
    return fit_lightning(RankingModule(model, lr=LR), batches, batches[0].dense.device, bf16)


LOOPS = {"plain": train_plain, "lightning": train_lightning}


def alternate(loops: dict[str, Callable[[list], Timing]], schedule: list, repeats: int,
              device: torch.device) -> dict[str, list[tuple[Timing, float | None]]]:
    """Each loop once untimed on the warm-up and one step (a process's first runs are slower: heap
    growth, lazy set-up), then ``repeats`` runs of each on ``schedule`` in alternating order, so
    that a repeat's two runs are adjacent in time; each timing with its peak GPU GiB (None on CPU)."""
    for run in loops.values():
        run(schedule[: WARMUP_STEPS + 1])
    runs: dict[str, list[tuple[Timing, float | None]]] = {name: [] for name in loops}
    for repeat in range(repeats):
        for name in list(loops) if repeat % 2 == 0 else list(loops)[::-1]:
            gc.collect()  # the last run's Trainer holds its model in reference cycles
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            timing = loops[name](schedule)
            runs[name].append((timing, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                               else None))
    return runs


def compare(work: Workload, device: torch.device, steps: int, repeats: int, seed: int,
            target_ratio: float | None = None, target_extra_ms: float | None = None) -> dict:
    """Samples/s of both loops, ``repeats`` runs each in alternating order, from one set of initial
    weights; passed when Lightning / plain >= ``target_ratio`` and Lightning's extra CPU ms per step
    < ``target_extra_ms`` (each when given)."""
    template = build_model(work, seed)
    batches = make_batches(work, seed, device)
    schedule = [batches[i % len(batches)] for i in range(WARMUP_STEPS + steps)]
    loops = {name: (lambda batches, train=train: train(copy.deepcopy(template).to(device), batches, work.bf16))
             for name, train in LOOPS.items()}
    runs = {name: [{"wall_s": timing.wall_s, "cpu_s": timing.cpu_s,
                    "samples_per_s": steps * work.batch / timing.wall_s,
                    "samples_per_cpu_s": steps * work.batch / timing.cpu_s,
                    "last_loss": timing.last_loss, "peak_gib": peak} for timing, peak in timed]
            for name, timed in alternate(loops, schedule, repeats, device).items()}
    result = {"workload": asdict(work), "device": device.type, "steps": steps, "repeats": repeats, "runs": runs}
    for name, rs in runs.items():
        result[name] = {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
            "samples_per_cpu_s": statistics.median(r["samples_per_cpu_s"] for r in rs),
            "last_loss": rs[-1]["last_loss"],
            "peak_gib": None if device.type != "cuda" else max(r["peak_gib"] for r in rs),
        }
    # each repeat's two runs are adjacent in time, so their ratio cancels the load of that moment
    pairs = list(zip(runs["plain"], runs["lightning"], strict=True))
    result["ratio"] = statistics.median(light["samples_per_s"] / plain["samples_per_s"] for plain, light in pairs)
    result["cpu_ratio"] = statistics.median(light["samples_per_cpu_s"] / plain["samples_per_cpu_s"]
                                            for plain, light in pairs)
    result["overhead_ms"] = statistics.median((light["wall_s"] - plain["wall_s"]) * 1e3 / steps
                                              for plain, light in pairs)
    result["overhead_cpu_ms"] = statistics.median((light["cpu_s"] - plain["cpu_s"]) * 1e3 / steps
                                                  for plain, light in pairs)
    result["target"] = target_ratio
    result["target_extra_ms"] = target_extra_ms
    result["passed"] = ((target_ratio is None or result["ratio"] >= target_ratio)
                        and (target_extra_ms is None or result["overhead_cpu_ms"] < target_extra_ms))
    return result


class OneWeight(LeanModule):
    """A model whose step is one multiply, so what a step costs beyond it is the loop's."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * x).sum()

    def training_loss(self, step: tuple[torch.Tensor]) -> torch.Tensor:
        loss = self.loss(step[0])
        self.log_train_loss(loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def bare_plain(batches: list[torch.Tensor]) -> Timing:
    model = OneWeight()
    return plain_loop(model.loss, model.configure_optimizers(), batches, batches[0].device)


def bare_lightning(batches: list[torch.Tensor]) -> Timing:
    return fit_lightning(OneWeight(), batches, batches[0].device, bf16=False)


def bookkeeping(steps: int, repeats: int) -> dict:
    """Lightning's extra CPU microseconds per step on `OneWeight`: the median over ``repeats``
    alternating pairs of runs."""
    batches = [torch.full((1,), 1.0 + i % 7) for i in range(WARMUP_STEPS + steps)]
    timed = alternate({"plain": bare_plain, "lightning": bare_lightning}, batches, repeats, torch.device("cpu"))
    runs = {name: [timing.cpu_s * 1e6 / steps for timing, _ in pairs] for name, pairs in timed.items()}
    return {"steps": steps, "repeats": repeats, "runs_cpu_us": runs,
            **{f"{name}_cpu_us": statistics.median(rs) for name, rs in runs.items()},
            "extra_cpu_us": statistics.median(light - plain for plain, light in
                                              zip(runs["plain"], runs["lightning"], strict=True))}


def describe_machine(device: torch.device) -> dict:
    """`report.describe_machine` with the torch stack and the GPU."""
    return {
        **report.describe_machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "lightning": L.__version__,
        "torchrec": torchrec.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def format_machine(m: dict) -> str:
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; GPU: {m['gpu'] or 'none'}; "
            f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), lightning {m['lightning']}, "
            f"torchrec {m['torchrec']}; load average {m['load_average_1min']:.1f} at the start")


def format_table(result: dict) -> str:
    lines = [
        format_machine(result["machine"]),
        f"Device: {result['device']}. DLRM with the project's default sizes, Adam (lr {LR}); per run "
        f"{WARMUP_STEPS} warm-up steps, then the timed steps; {result['repeats']} runs of each loop "
        "in alternating order; medians of samples/s and of the repeats' ratios and differences.",
        "",
        "| tables x rows x dim, batch | timed steps | precision | plain samples/s | Lightning samples/s "
        "| Lightning / plain | same, by CPU time | Lightning's extra ms per step | same, CPU ms "
        "| peak GPU GiB, plain / Lightning | target | result |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    losses = []
    for c in result["configs"]:
        plain, light = c["plain"], c["lightning"]
        peak = f"{plain['peak_gib']:.1f} / {light['peak_gib']:.1f}" if plain["peak_gib"] is not None else ""
        targets = ([f"ratio >= {c['target']}"] if c["target"] is not None else []) + \
            ([f"extra CPU < {c['target_extra_ms']} ms"] if c["target_extra_ms"] is not None else [])
        verdict = ("pass" if c["passed"] else "FAIL") if targets else ""
        work = Workload(**c["workload"])
        lines.append(
            f"| {work} | {c['steps']} | {'bf16' if work.bf16 else 'fp32'} | {plain['samples_per_s']:,.0f} "
            f"| {light['samples_per_s']:,.0f} | {c['ratio']:.2f} | {c['cpu_ratio']:.2f} | {c['overhead_ms']:.2f} "
            f"| {c['overhead_cpu_ms']:.2f} | {peak} | {', '.join(targets)} | {verdict} |"
        )
        losses.append(f"{work}: plain {plain['last_loss']:.6f}, Lightning {light['last_loss']:.6f}")
    lines += ["", "Last loss, the same math in both loops: " + "; ".join(losses) + "."]
    if "bookkeeping" in result:
        bare = result["bookkeeping"]
        lines.append(f"Lightning's bookkeeping alone (one weight, one-number batches, {bare['steps']:,} timed steps, "
                     f"{bare['repeats']} alternating pairs): plain {bare['plain_cpu_us']:.0f} CPU us per step, "
                     f"Lightning {bare['lightning_cpu_us']:.0f}; Lightning's extra {bare['extra_cpu_us']:.0f} us "
                     f"(median of the pairs).")
    if result["device"] != "cuda":
        lines.append(f"Large config ({LARGE}, bf16): skipped, it needs a CUDA device (ran on {result['device']}).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when torch sees one, else cpu")
    parser.add_argument("--steps", type=int, default=20, help=f"timed steps per run, after {WARMUP_STEPS} warm-up")
    parser.add_argument("--tiny-steps", type=int, default=500, help=f"timed steps per run on CPU of {TINY}")
    parser.add_argument("--bare-steps", type=int, default=5000,
                        help="timed steps per run of Lightning's bookkeeping alone (CPU only)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    args = parser.parse_args(argv)
    if min(args.steps, args.tiny_steps, args.bare_steps, args.repeats) < 1:
        raise ValueError(f"--steps {args.steps}, --tiny-steps {args.tiny_steps}, --bare-steps {args.bare_steps}, "
                         f"--repeats {args.repeats}; expected all >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; expected one, or --device cpu")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: ..." banner per run
    warnings.filterwarnings("ignore", category=PossibleUserWarning)  # "does not have many workers"
    machine = describe_machine(device)
    if device.type == "cuda":
        configs = [compare(work, device, args.steps, args.repeats, args.seed) for work in (SMALL, LARGE)]
    else:
        configs = [compare(SMALL, device, args.steps, args.repeats, args.seed, target_ratio=TARGET_RATIO),
                   compare(TINY, device, args.tiny_steps, args.repeats, args.seed, target_extra_ms=TARGET_EXTRA_MS)]
    result = {"machine": machine, "device": device.type, "steps": args.steps, "repeats": args.repeats,
              "configs": configs, "passed": all(c["passed"] for c in configs)}
    if device.type == "cpu":
        result["bookkeeping"] = bookkeeping(args.bare_steps, args.repeats)
    return finish(result, format_table(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
