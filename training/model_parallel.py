"""Model-parallel DLRM training with torchrec, for embedding tables too large for one device.

`shard_dlrm` wraps a `DLRM` in torchrec's `DistributedModelParallel` (DMP): each embedding table
lives whole on one rank (table-wise sharding) and is updated by SGD fused into the backward pass,
while the dense arches are replicated on every rank and trained through DMP's DDP wrapper by a
plain SGD. `train_model_parallel` runs it on one machine with `torch.multiprocessing.spawn`;
`train_single_process` is the same training on one process, the reference it must match.

    rank r of W takes rows [r B/W, (r+1) B/W) of every global batch of B rows:
      dense (B/W, n_dense) -> DenseArch replica -> (B/W, D)
      sparse KJT (B/W rows) -> all-to-all: each table's owner gets its ids from every rank (B rows)
                            -> pooled there -> all-to-all back -> (B/W, F, D)
      -> InteractionArch, OverArch replicas -> logits (B/W,)

Gradient scaling. Every rank's loss is the mean over its own B/W rows, so its gradients are W times
too large for the global batch mean. DDP averages the dense gradients over the W ranks, which
removes that factor. A table's gradient is assembled on its owner rank from every rank's rows,
a sum over ranks; torchrec's output all-to-all divides it by W in backward (its default
``torchrec.distributed.comm_ops`` gradient division, set explicitly in `shard_dlrm`). Both parts
therefore step on the gradient of the global-batch mean, as one process on the whole batch does,
with the same learning rate.

Launching on several GPUs or machines: run one process per GPU with torchrun, which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each of them; call
``dist.init_process_group("nccl")`` (it reads those variables), then
``shard_dlrm(model, lr, torch.device("cuda", int(os.environ["LOCAL_RANK"])))`` and feed each rank
its own rows of every global batch:

    torchrun --nproc_per_node=8 train.py                        # one machine, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --master_addr=HOST0 --master_port=29500 train.py        # on HOST0; node_rank=1 on the other

torchrun also sets LOCAL_WORLD_SIZE, which the planner reads to tell fast intra-host links from the
network. Each process builds the whole DLRM in host memory before `shard_dlrm` moves its own tables
to its device, so the tables must fit a host's RAM once per process, but not one GPU.
"""

import os
import socket
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.comm_ops import set_gradient_division
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from data.encoders import Batch
from models.dlrm import DLRM, DLRMConfig

BACKENDS = {"gloo": "cpu", "nccl": "cuda"}  # process-group backend -> the device each rank trains on
TIMEOUT = timedelta(seconds=60)  # a collective waiting longer than this means a rank has died


@dataclass(frozen=True)
class ParallelRun:
    """``world_size`` processes on one machine; with nccl, rank r trains on cuda:r."""

    world_size: int = 2
    backend: str = "gloo"

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"ParallelRun.world_size = {self.world_size}; expected >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"ParallelRun.backend = {self.backend!r}; expected one of {tuple(BACKENDS)}")


def shard_dlrm(model: DLRM, lr: float, device: torch.device) -> tuple[DistributedModelParallel, torch.optim.SGD]:
    """Shards ``model``'s tables table-wise over the initialised default process group.

    Returns the DMP model, whose tables step by SGD(lr) inside ``backward()``, and the SGD(lr) for
    its dense parameters. The sharded model starts from ``model``'s weights.
    """
    initial = model.state_dict()
    apply_optimizer_in_backward(torch.optim.SGD, model.sparse_arch.parameters(), {"lr": lr})
    set_gradient_division(True)  # table gradients / W, see the module docstring
    constraints = {
        table.name: ParameterConstraints(
            sharding_types=[ShardingType.TABLE_WISE.value], compute_kernels=[EmbeddingComputeKernel.FUSED.value]
        )
        for table in model.sparse_arch.ebc.embedding_bag_configs()
    }
    world_size = dist.get_world_size()
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=get_local_size(world_size)),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    planner = EmbeddingShardingPlanner(topology, constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    sharded = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    _load_full_state_dict(sharded, initial)  # DMP gives the tables fresh random weights
    dense_params = [p for _, p in in_backward_optimizer_filter(sharded.named_parameters())]
    return sharded, torch.optim.SGD(dense_params, lr=lr)


def train_model_parallel(config: DLRMConfig, batches: list[Batch], lr: float, seed: int, run: ParallelRun) -> dict:
    """Trains a `DLRM(config)` seeded with ``seed`` on ``run.world_size`` ranks, one step per global batch.

    Returns ``losses`` (one global-batch mean BCE per step, before its update), the final
    ``state_dict`` gathered whole on rank 0, and ``plan``: table -> {"sharding_type", "ranks"}.
    """
    for i, batch in enumerate(batches):
        rows = batch.dense.shape[0]
        if batch.labels is None:
            raise ValueError(f"batch {i} has labels=None; expected (B,) float labels to train on")
        if rows % run.world_size:
            raise ValueError(
                f"batch {i} has {rows} rows; expected a multiple of world_size={run.world_size} "
                "so that every rank gets an equal slice"
            )
    if run.backend == "nccl" and torch.cuda.device_count() < run.world_size:
        raise ValueError(f"world_size={run.world_size} nccl ranks need as many GPUs; {torch.cuda.device_count()} seen")
    with tempfile.TemporaryDirectory() as out_dir:
        args = (config, batches, lr, seed, run, _free_port(), out_dir)
        mp.spawn(_train_rank, args=args, nprocs=run.world_size, join=True)  # a failed rank stops the others
        return torch.load(Path(out_dir) / "result.pt")


def train_single_process(config: DLRMConfig, batches: list[Batch], lr: float, seed: int) -> dict:
    """The reference: the same model, loss and SGD on whole global batches; returns ``losses`` and ``state_dict``."""
    torch.manual_seed(seed)
    model = DLRM(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for batch in batches:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch.dense, batch.sparse), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "state_dict": model.state_dict()}


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of ``batch``; the KJT's values are key-major, so each key keeps its own run."""
    sparse = batch.sparse
    rows = sparse.stride()
    lengths = sparse.lengths().view(len(sparse.keys()), rows)  # (F, B)
    offsets = sparse.offsets().tolist()  # F B + 1 positions in values
    values = [sparse.values()[offsets[f * rows + start] : offsets[f * rows + stop]] for f in range(lengths.shape[0])]
    kjt = KeyedJaggedTensor(
        keys=sparse.keys(),
        values=torch.cat(values),
        lengths=lengths[:, start:stop].reshape(-1),  # (F (stop - start),)
        stride=stop - start,
    )
    labels = None if batch.labels is None else batch.labels[start:stop]
    return Batch(kjt, batch.dense[start:stop], labels)


def _train_rank(
    rank: int, config: DLRMConfig, batches: list[Batch], lr: float, seed: int, run: ParallelRun, port: int, out_dir: str
) -> None:
    """One spawned rank: trains on its slice of every batch; rank 0 writes the result to ``out_dir``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(BACKENDS[run.backend], rank if run.backend == "nccl" else None)
    dist.init_process_group(run.backend, rank=rank, world_size=run.world_size, timeout=TIMEOUT)
    try:
        torch.manual_seed(seed)  # the reference's initial weights
        model, dense_optimizer = shard_dlrm(DLRM(config), lr, device)
        losses = []
        for batch in batches:
            rows = batch.dense.shape[0] // run.world_size
            local = slice_batch(batch, rank * rows, (rank + 1) * rows)
            logits = model(local.dense.to(device), local.sparse.to(device))  # (B/W,)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, local.labels.to(device))
            dense_optimizer.zero_grad()
            loss.backward()  # also steps the tables
            dense_optimizer.step()
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)  # equal slices: the global mean is the mean of the rank means
            losses.append(global_loss.item() / run.world_size)
        state_dict = _gather_state_dict(model, device)
        if rank == 0:
            result = {"losses": losses, "state_dict": state_dict, "plan": _table_ranks(model)}
            torch.save(result, Path(out_dir) / "result.pt")
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def _load_full_state_dict(model: DistributedModelParallel, state_dict: dict[str, torch.Tensor]) -> None:
    """Copies an unsharded state dict into ``model``, each rank into its own shards of each table."""
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, ShardedTensor):
            for shard in tensor.local_shards():
                (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(state_dict[name][row : row + rows, col : col + cols])
        else:
            tensor.copy_(state_dict[name])


def _gather_state_dict(model: DistributedModelParallel, device: torch.device) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on CPU, complete on rank 0 only; every rank must call it."""
    full = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, ShardedTensor):
            out = torch.empty(tensor.size(), dtype=tensor.dtype, device=device) if dist.get_rank() == 0 else None
            tensor.gather(dst=0, out=out)
            tensor = out
        if tensor is not None:
            full[name] = tensor.cpu()
    return full


def _table_ranks(model: DistributedModelParallel) -> dict[str, dict]:
    """Table -> its sharding type and the ranks holding it, from the model's plan."""
    return {
        table: {"sharding_type": sharding.sharding_type, "ranks": sharding.ranks}
        for module_plan in model.plan.plan.values()
        for table, sharding in module_plan.items()
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
