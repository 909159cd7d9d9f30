"""`recstack train --strategy model_parallel`: the embedding tables sharded over the ranks by
torchrec's planner and `DistributedModelParallel` (DMP), the dense layers replicated.

`ModelParallelStrategy` is Lightning's DDP strategy (one process per device, the same launcher,
each rank streaming its B/W rows of every global batch of B) with one change: where DDP wraps
the LightningModule, DMP shards its `EmbeddingBagCollection`s in place and wraps the rest in
DDP. Everything else (the loss, validation, checkpoints, early stopping) is the one-process code
path.

    rank r of W, its B/W rows of a global batch:
      dense layers (DDP replicas)         -> gradients averaged over the ranks
      sparse KJT (B/W rows) -> all-to-all: each shard's owner gets its ids from every rank (B rows)
                            -> pooled there -> all-to-all back -> (B/W, F, D) on rank r

Tables update inside the backward by torchrec's fused kernels (fbgemm), which update only the
rows a step looked up: the run's ``embedding_optimizer`` picks the kernel (`training.optimizers`;
fbgemm-gpu-cpu has row-wise Adagrad, sparse_adam needs its CUDA kernels), and the dense layers
keep the module's Adam. A sharded table's gradient is summed over the ranks on its owner;
torchrec's output all-to-all divides it by W (``torchrec.distributed.comm_ops`` gradient division),
so tables and dense layers both step on the gradient of the global-batch mean, as one process on
the whole batch does.

DMP shards a collection whole or not at all, and fbgemm's kernels step tables whose dim is a
multiple of 4 only. A collection with another dim (DeepFM's and the linear model's first-order
weights, dim 1; two-tower tables at the schema's own dims), or one sharing a table with another
collection (a query tower's history sequence reading the item tower's id table), is replicated
instead (`split_collections`): whole on every rank under DDP with the dense layers, its tables
emitting sparse gradients that DDP averages, stepped by the module's own row-sparse optimizer,
exactly as in one process. A replicated table must fit every device; give large tables dims
that are multiples of 4 (``model.embedding_dim``).

Sharding (``--sharding``): ``table_wise`` puts each table whole on one rank, ``row_wise`` splits
its rows over the ranks (torchrec offers it on CUDA only), ``column_wise`` its columns; ``auto``
lets the planner choose per table from its size and the devices' memory. Row-wise Adagrad keeps
one float per row of each shard, so where the planner does split a table's columns each column
shard scales its rows by the mean square of its own columns: close to, not equal to, one
process.

Checkpoints hold the unsharded state, gathered on rank 0: the model's ``state_dict`` under the
same keys as a one-process run (so `inference.export` reads it unchanged), and per optimizer its
dense part and the fused table optimizer's state. Every rank reads a checkpoint whole and copies
its own shards from it, so a table must fit one host's memory, not one device.

On GPUs the same command runs one process per GPU (``--accelerator gpu``, nccl); on several
nodes start it under torchrun as the DDP strategy is (training/README.md). Replicated tables
need a sparse all-reduce from the process group, which gloo has; on nccl this path is untested.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.comm_ops import set_gradient_division
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

SHARDINGS = ("auto", "table_wise", "row_wise", "column_wise")
# fbgemm's fused table optimizers that run on the CPU (fbgemm-gpu-cpu); the rest are CUDA-only
CPU_KERNELS = (EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_SGD)


def shard_tables(module: nn.Module, optimizer: tuple[type[torch.optim.Optimizer], dict], sharding: str,
                 device: torch.device) -> DistributedModelParallel:
    """Shards the `EmbeddingBagCollection`s of ``module`` over the initialised default process group,
    each that `split_collections` lets through; the others stay whole on every rank.

    ``optimizer`` (class, arguments) steps the sharded tables inside the backward, as torchrec's
    fused kernel for that class. ``module`` is changed in place (its collections become sharded ones)
    and keeps its weights; the returned DMP wraps it, its dense parameters in DDP.
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding = {sharding!r}; expected one of {SHARDINGS}")
    offered = EmbeddingBagCollectionSharder().sharding_types(device.type)
    if sharding != "auto" and sharding not in offered:
        raise ValueError(f"sharding = {sharding!r}: torchrec does not offer it on {device.type}; expected auto or "
                         f"one of {[t for t in offered if t in SHARDINGS]}")
    collections = [m for m in module.modules() if isinstance(m, EmbeddingBagCollection)]
    if not collections:
        raise ValueError(f"{type(module).__name__} has no EmbeddingBagCollection; model_parallel shards "
                         "embedding tables")
    cls, kwargs = optimizer
    kind = optimizer_type_to_emb_opt_type(cls)
    if device.type == "cpu" and kind not in CPU_KERNELS:
        raise ValueError(f"table optimizer {cls.__name__} ({kind.name}): fbgemm's CPU kernels have "
                         f"{[k.name for k in CPU_KERNELS]} only (embedding_optimizer.kind rowwise_adagrad); "
                         "the others need fbgemm-gpu's CUDA kernels")
    sharded, replicated = split_collections(collections)
    for ebc in replicated:  # stepped by the module's own optimizer, after DDP averages their sparse gradients
        for bag in ebc.embedding_bags.values():
            bag.sparse = True
    initial = module.state_dict()
    apply_optimizer_in_backward(cls, [bag.weight for ebc in sharded for bag in ebc.embedding_bags.values()],
                                kwargs)
    set_gradient_division(True)  # table gradients / W, see the module docstring
    types = {"sharding_types": [sharding]} if sharding != "auto" else {}
    constraints = {
        table.name: ParameterConstraints(compute_kernels=[EmbeddingComputeKernel.FUSED.value], **types)
        for ebc in sharded
        for table in ebc.embedding_bag_configs()
    }
    world_size = dist.get_world_size()
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=get_local_size(world_size)),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    sharders = [_CollectionsSharder({id(ebc) for ebc in sharded})]
    plan = EmbeddingShardingPlanner(topology, constraints=constraints).collective_plan(module, sharders,
                                                                                       dist.GroupMember.WORLD)
    model = DistributedModelParallel(module, device=device, plan=plan, sharders=sharders)
    load_unsharded(module.state_dict(), initial)  # the sharders give the tables fresh random weights
    return model


def split_collections(collections: list[EmbeddingBagCollection]) -> tuple[list[EmbeddingBagCollection],
                                                                           list[EmbeddingBagCollection]]:
    """(the collections to shard, the ones to replicate): a collection is sharded when fbgemm's fused
    kernels can step every table of it (dims that are multiples of 4) and it shares no table with
    another collection (sharding would untie them); DMP shards a collection whole or not at all."""
    holders = Counter(id(bag.weight) for ebc in collections for bag in ebc.embedding_bags.values())
    shardable = [all(bag.weight.shape[1] % 4 == 0 and holders[id(bag.weight)] == 1
                     for bag in ebc.embedding_bags.values()) for ebc in collections]
    return ([ebc for ebc, ok in zip(collections, shardable, strict=True) if ok],
            [ebc for ebc, ok in zip(collections, shardable, strict=True) if not ok])


class _CollectionsSharder(EmbeddingBagCollectionSharder):
    """torchrec's sharder, offering the planner the tables of the collections in ``ids`` only: the
    others get no plan, so DMP leaves them whole on every rank, under DDP with the dense layers."""

    def __init__(self, ids: set[int]) -> None:
        super().__init__()
        self.ids = ids

    def shardable_parameters(self, module: EmbeddingBagCollection) -> dict[str, nn.Parameter]:
        return super().shardable_parameters(module) if id(module) in self.ids else {}


def table_placement(model: DistributedModelParallel) -> dict[str, dict]:
    """Table (module path.table) -> its sharding type and the ranks holding it, from the model's plan;
    the tables of collections left whole (`split_collections`) are "replicated" on every rank."""
    placement = {
        f"{path}.{table}": {"sharding_type": sharding.sharding_type, "ranks": sharding.ranks}
        for path, module_plan in model.plan.plan.items()
        for table, sharding in module_plan.items()
    }
    everywhere = list(range(dist.get_world_size()))
    for path, ebc in model.module.named_modules():
        if isinstance(ebc, EmbeddingBagCollection):
            placement.update({f"{path}.{table}": {"sharding_type": "replicated", "ranks": everywhere}
                              for table in ebc.embedding_bags})
    return placement


def gather_unsharded(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """``state`` (nested dicts) whole on rank 0, each `ShardedTensor` put together from every rank's
    shards on the CPU; None on the other ranks. Every rank must call it.

    The ranks' states may hold different keys: a table-wise shard's optimizer state exists on its
    owner only. Rank 0 gets the union; a value that is not sharded comes from the lowest rank that
    has it.
    """
    flat = {}
    for path, value in _flatten(state):
        if isinstance(value, ShardedTensor):
            blocks = [(shard.metadata.shard_offsets, shard.tensor.detach().cpu()) for shard in value.local_shards()]
            value = _Blocks(tuple(value.size()), value.dtype, blocks)
        elif isinstance(value, torch.Tensor):
            value = value.detach().cpu()
        flat[path] = value
    ranks = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(flat, ranks, dst=0)
    if ranks is None:
        return None
    whole: dict[str, Any] = {}
    for flat in ranks:
        for path, value in flat.items():
            *parents, key = path
            node = whole
            for parent in parents:
                node = node.setdefault(parent, {})
            if isinstance(value, _Blocks):
                tensor = node.setdefault(key, torch.zeros(value.size, dtype=value.dtype))
                for offsets, block in value.blocks:
                    tensor[tuple(slice(o, o + n) for o, n in zip(offsets, block.shape, strict=True))] = block
            else:
                node.setdefault(key, value)
    return whole


@dataclass(frozen=True)
class _Blocks:
    """One rank's shards of a `ShardedTensor` of ``size``: (offsets, block) pairs."""

    size: tuple[int, ...]
    dtype: torch.dtype
    blocks: list[tuple[list[int], torch.Tensor]]


def _flatten(state: Mapping[str, Any], path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(key path, value) of every leaf of nested dicts."""
    leaves = []
    for key, value in state.items():
        if isinstance(value, Mapping):
            leaves.extend(_flatten(value, (*path, key)))
        else:
            leaves.append(((*path, key), value))
    return leaves


@torch.no_grad()
def load_unsharded(state: Mapping[str, Any], whole: Mapping[str, Any]) -> None:
    """Copies ``whole`` (the unsharded state, e.g. from a checkpoint) into the tensors of ``state``:
    each `ShardedTensor` takes its local shards' rows and columns, a plain tensor all of it."""
    for key, value in state.items():
        if isinstance(value, Mapping):
            load_unsharded(value, whole[key])
        elif isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                block = tuple(slice(start, start + size) for start, size in
                              zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=True))
                shard.tensor.copy_(whole[key][block])
        elif isinstance(value, torch.Tensor):
            value.copy_(whole[key])


def _is_sharded(module: nn.Module) -> bool:
    return any(isinstance(v, ShardedTensor) for v in module.state_dict().values())


class ModelParallelStrategy(DDPStrategy):
    """Lightning's DDP strategy with the module's embedding tables sharded by DMP (``sharding`` is one
    of `SHARDINGS`) and stepped in the backward by ``table_optimizer`` (class, arguments; see
    `training.optimizers.fused_optimizer`). The module's own optimizer then steps the rest: its
    `configure_optimizers` runs on the sharded module, where the tables already have theirs.
    Checkpoints hold the unsharded state (see the module docstring).
    """

    def __init__(self, sharding: str, table_optimizer: tuple[type[torch.optim.Optimizer], dict],
                 **kwargs: Any) -> None:
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding = {sharding!r}; expected one of {SHARDINGS}")
        super().__init__(**kwargs)
        self.sharding = sharding
        self.table_optimizer = table_optimizer

    def configure_ddp(self) -> None:
        self.model = shard_tables(self.lightning_module, self.table_optimizer, self.sharding, self.root_device)
        rank_zero_info(f"model_parallel tables: {json.dumps(table_placement(self.model))}")

    def teardown(self) -> None:
        if isinstance(self.model, DistributedModelParallel):
            self.model = self.lightning_module  # sharded in place: validate and test run it as it is
        super().teardown()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return gather_unsharded(self.lightning_module.state_dict())

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        tables = self._fused_optimizer().state_dict()
        return {"dense": super().optimizer_state(optimizer), "tables": gather_unsharded(tables)}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not _is_sharded(self.lightning_module):  # resuming: `shard_tables` copies the weights into shards
            super().load_model_state_dict(checkpoint, strict)
            return
        load_unsharded(self.lightning_module.state_dict(), checkpoint["state_dict"])

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        (state,) = checkpoint["optimizer_states"]  # the module's one optimizer; the tables' is torchrec's
        super().load_optimizer_state_dict({"optimizer_states": [state["dense"]]})
        fused = self._fused_optimizer()
        tables = fused.state_dict()
        load_unsharded(tables, state["tables"])
        fused.load_state_dict(tables)

    def _fused_optimizer(self) -> torch.optim.Optimizer:
        if not isinstance(self.model, DistributedModelParallel):
            raise ValueError(f"{type(self).__name__}: the optimizer state exists while fitting, after the tables "
                             "are sharded")
        return self.model.fused_optimizer
