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
instead (`split_collections`): whole on every rank, its tables emitting sparse gradients, stepped by
the module's own row-sparse optimizer. DDP leaves them out: once the backward has ended,
`average_sparse_gradients` gathers every rank's rows and row gradients (dense all-gathers, one after
another) and averages them, so they step as in one process. A model may hold both kinds (DeepFM:
sharded second-order tables, replicated first-order ones) or replicated ones only (the linear model).
A replicated table must fit every device; give large tables dims that are multiples of 4
(``model.embedding_dim``).

Sharding (``--sharding``): ``table_wise`` puts each table whole on one rank, ``row_wise`` splits
its rows over the ranks (torchrec offers it on CUDA only), ``column_wise`` its columns; ``auto``
lets the planner choose per table from its size and the devices' memory. Row-wise Adagrad keeps
one float per row of each shard, so where the planner does split a table's columns each column
shard scales its rows by the mean square of its own columns: close to, not equal to, one
process.

Checkpoints are sharded, written by ``torch.distributed.checkpoint`` (DCP): ``best.ckpt`` and
``last.ckpt`` are links to directories where every rank wrote its own shards of the tables and of
their fused optimizer's state (the replicated tensors once), and rank 0 the rest of Lightning's
checkpoint (`META`: epoch, loops, callbacks, the module's own optimizer). No rank gathers a whole
table. A new checkpoint goes to a directory of its own and the link then moves in one rename, so a
crash while saving leaves the previous checkpoint. Each rank of a resumed run reads its own shards;
`read_weights` puts whole tables together on one process, for `inference.export`.

On GPUs the same command runs one process per GPU (``--accelerator gpu``, nccl); on several
nodes start it under torchrun as the DDP strategy is (training/README.md). Replicated tables are
averaged with all-gathers, which nccl has too; on nccl this path is untested.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from lightning.pytorch.overrides.distributed import prepare_for_backward
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.ddp import _DDPForwardRedirection
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader
from torch.nn.parallel import DistributedDataParallel
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.comm_ops import set_gradient_division
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

SHARDINGS = ("auto", "table_wise", "row_wise", "column_wise")
# fbgemm's fused table optimizers that run on the CPU (fbgemm-gpu-cpu); the rest are CUDA-only
CPU_KERNELS = (EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_SGD)
META = "meta.pt"  # in a sharded checkpoint's directory: what is not a tensor of the model or the tables' optimizer


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
    for ebc in replicated:  # stepped by the module's own optimizer, after `average_sparse_gradients`
        for bag in ebc.embedding_bags.values():
            bag.sparse = True
    replicated_ids = {id(bag.weight) for ebc in replicated for bag in ebc.embedding_bags.values()}
    left_to_strategy = [name for name, param in module.named_parameters(remove_duplicate=False)
                        if id(param) in replicated_ids]  # DDP never reduces them
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
    model = DistributedModelParallel(module, device=device, plan=plan, sharders=sharders,
                                     data_parallel_wrapper=DefaultDataParallelWrapper(  # the graph: as Lightning's DDP
                                         static_graph=False, params_to_ignore=left_to_strategy))
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
    """Table (module path.table) -> its sharding type, the ranks holding it and its shards from the
    model's plan (each shard's rank, row and column offsets, rows and columns); the tables of
    collections left whole (`split_collections`) are "replicated" on every rank."""
    placement = {
        f"{path}.{table}": {"sharding_type": sharding.sharding_type, "ranks": sharding.ranks,
                            "shards": [{"rank": shard.placement.rank(), "offsets": shard.shard_offsets,
                                        "sizes": shard.shard_sizes} for shard in sharding.sharding_spec.shards]}
        for path, module_plan in model.plan.plan.items()
        for table, sharding in module_plan.items()
    }
    everywhere = list(range(dist.get_world_size()))
    for path, ebc in model.module.named_modules():
        if isinstance(ebc, EmbeddingBagCollection):
            placement.update({f"{path}.{table}": {"sharding_type": "replicated", "ranks": everywhere}
                              for table in ebc.embedding_bags})
    return placement


def replicated_tables(model: DistributedModelParallel) -> list[nn.Parameter]:
    """The weights of the tables DMP left whole on every rank (`split_collections`), each once."""
    weights = {id(bag.weight): bag.weight for ebc in model.module.modules() if isinstance(ebc, EmbeddingBagCollection)
               for bag in ebc.embedding_bags.values()}
    return list(weights.values())


@torch.no_grad()
def average_sparse_gradients(tables: list[nn.Parameter]) -> None:
    """Replaces each table's sparse gradient (the rows this rank's batch read) with its mean over the
    ranks, as DDP averages a dense one: every rank's rows and row gradients are gathered, padded to the
    longest. ``tables`` are the same on every rank; a table without a gradient counts as no rows.

    Run after the backward, one collective after another, so no collective ever runs beside torchrec's
    all-to-alls (see the module docstring), and with dense collectives only, which nccl has too.
    """
    if not tables:
        return
    world, device = dist.get_world_size(), tables[0].device
    read = []  # per table: the rows this rank read (R,) and their gradients (R, dim)
    for table in tables:
        grad = table.grad.coalesce() if table.grad is not None else None
        read.append((grad.indices()[0], grad.values()) if grad is not None else
                    (torch.empty(0, dtype=torch.long, device=device), table.new_empty(0, table.shape[1])))
    counts = torch.empty(world * len(tables), dtype=torch.long, device=device)
    dist.all_gather_single(counts, torch.tensor([len(rows) for rows, _ in read], device=device))
    for table, (rows, values), per_rank in zip(tables, read, counts.view(world, -1).T, strict=True):
        longest = int(per_rank.max())
        if longest == 0:  # no rank read the table (gloo gathers nothing empty)
            continue
        every_rows = rows.new_empty(world * longest)
        every_values = values.new_empty(world * longest, table.shape[1])
        dist.all_gather_single(every_rows, nn.functional.pad(rows, (0, longest - len(rows))))
        dist.all_gather_single(every_values, nn.functional.pad(values, (0, 0, 0, longest - len(rows))))
        kept = (torch.arange(longest, device=device) < per_rank.unsqueeze(1)).flatten()  # (W * longest,)
        table.grad = torch.sparse_coo_tensor(every_rows[kept].unsqueeze(0), every_values[kept] / world,
                                             table.shape, check_invariants=False)  # rows from torch's own gradients


@torch.no_grad()
def load_unsharded(state: Mapping[str, Any], whole: Mapping[str, Any]) -> None:
    """Copies ``whole`` (an unsharded state: the module's before sharding) into the tensors of ``state``:
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


class ModelParallelStrategy(DDPStrategy):
    """Lightning's DDP strategy with the module's embedding tables sharded by DMP (``sharding`` is one
    of `SHARDINGS`) and stepped in the backward by ``table_optimizer`` (class, arguments; see
    `training.optimizers.fused_optimizer`). The module's own optimizer then steps the rest: its
    `configure_optimizers` runs on the sharded module, where the tables already have theirs.
    Checkpoints are sharded directories (see the module docstring).
    """

    def __init__(self, sharding: str, table_optimizer: tuple[type[torch.optim.Optimizer], dict],
                 **kwargs: Any) -> None:
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding = {sharding!r}; expected one of {SHARDINGS}")
        super().__init__(**kwargs)
        self.sharding = sharding
        self.table_optimizer = table_optimizer
        self._replicated: list[nn.Parameter] = []  # `replicated_tables`, once the tables are sharded
        self._forward_redirection = _DenseForwardRedirection()

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # a checkpoint's shards load into the sharded tables

    def configure_ddp(self) -> None:
        self.model = shard_tables(self.lightning_module, self.table_optimizer, self.sharding, self.root_device)
        self._replicated = replicated_tables(self.model)
        rank_zero_info(f"model_parallel tables: {json.dumps(table_placement(self.model))}")

    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        """Under manual optimization (`training.lean_module.LeanModule`) the backward runs inside the
        forward of DMP's DDP over the dense layers, where `DDPStrategy` does not look; its reducer is
        prepared here, as DDPStrategy prepares its own."""
        dense = _dense_ddp(self.model)
        if dense is not None and not self.lightning_module.automatic_optimization:
            prepare_for_backward(dense, closure_loss)

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        average_sparse_gradients(self._replicated)

    def teardown(self) -> None:
        if isinstance(self.model, DistributedModelParallel):
            self.model = self.lightning_module  # sharded in place: validate and test run it as it is
        super().teardown()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path,
                        storage_options: Any = None) -> None:
        """Every rank writes its shards of the weights and of the tables' optimizer state, rank 0 the rest
        (`META`), into a new directory; ``filepath`` then links to it (`_swap_in`)."""
        sharded = {"state_dict": checkpoint["state_dict"]}
        if "optimizer_states" in checkpoint:
            sharded["tables"] = self._fused_optimizer().state_dict()
        path = Path(filepath)
        target = path.with_name(f".{path.name}.{self.broadcast(uuid.uuid4().hex)}")  # one name on every rank
        dcp.save(sharded, checkpoint_id=target)
        if self.is_global_zero:
            rest = {key: value for key, value in checkpoint.items() if key != "state_dict"}
            self.checkpoint_io.save_checkpoint(rest, target / META, storage_options=storage_options)
            _swap_in(path, target)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint ``save_checkpoint`` wrote, each rank reading its own shards into the sharded
        module's state (and, while fitting, the tables' optimizer state under "tables")."""
        path = Path(checkpoint_path)
        checkpoint = self.checkpoint_io.load_checkpoint(path / META, weights_only=weights_only)
        sharded = {"state_dict": self.lightning_module.state_dict()}
        if isinstance(self.model, DistributedModelParallel):  # fitting: the tables' optimizer resumes too
            sharded["tables"] = self.model.fused_optimizer.state_dict()
        dcp.load(sharded, checkpoint_id=path)
        return {**checkpoint, **sharded}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)  # the module's own optimizer
        self._fused_optimizer().load_state_dict(checkpoint["tables"])

    def _fused_optimizer(self) -> torch.optim.Optimizer:
        if not isinstance(self.model, DistributedModelParallel):
            raise ValueError(f"{type(self).__name__}: the optimizer state exists while fitting, after the tables "
                             "are sharded")
        return self.model.fused_optimizer


def _dense_ddp(model: nn.Module | None) -> DistributedDataParallel | None:
    """DMP's DDP over the dense layers; None before sharding or when the module has no dense layer."""
    inner = getattr(model, "_dmp_wrapped_module", None)
    return inner if isinstance(inner, DistributedDataParallel) else None


class _DenseForwardRedirection(_DDPForwardRedirection):
    """Lightning's DDP redirection of ``training_step`` through the model's forward, applied to the DDP
    inside DMP: under manual optimization that DDP leaves the backward to `pre_backward`."""

    def on_after_inner_forward(self, wrapper_module: nn.Module, original_module: L.LightningModule) -> None:
        super().on_after_inner_forward(_dense_ddp(wrapper_module), original_module)

    def on_after_outer_forward(self, wrapper_module: nn.Module, original_module: L.LightningModule) -> None:
        super().on_after_outer_forward(_dense_ddp(wrapper_module), original_module)


def _swap_in(path: Path, target: Path) -> None:
    """Makes ``path`` a link to the checkpoint directory ``target`` in one rename, so ``path`` is the
    previous checkpoint or the new one, whole, whenever a crash comes; then deletes the directories it
    linked to before and any a crash left half written."""
    link = path.with_name(f"{path.name}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(target.name)
    os.replace(link, path)
    for stale in path.parent.glob(f".{path.name}.*"):
        if stale != target:
            shutil.rmtree(stale)


def checkpoint_file(path: str | Path) -> Path:
    """The file of checkpoint ``path`` holding its epoch, step and loop state: ``path`` itself when a
    single process wrote it, its `META` when it is the directory of a sharded one."""
    path = Path(path)
    return path / META if path.is_dir() else path


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of checkpoint ``path`` (its ``state_dict``), each tensor whole on this process: a
    sharded checkpoint's tables are put together from the shards every rank wrote."""
    path = Path(path)
    if not path.is_dir():  # weights_only: nothing a checkpoint holds is unpickled as code
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "state_dict."  # DCP's key for state["state_dict"][key]
    weights = {key.removeprefix(prefix): torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in FileSystemReader(path).read_metadata().state_dict_metadata.items()
               if key.startswith(prefix)}
    state = {"state_dict": weights}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return state["state_dict"]
