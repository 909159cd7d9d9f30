"""How embedding tables update: dense Adam, or row-sparse optimizers that touch only the rows a
step looked up.

A run config's ``embedding_optimizer`` section is an `EmbeddingOptimizer`; `build_optimizer`
turns it into the one optimizer a LightningModule hands to Lightning. The dense layers always
keep Adam at the run's lr and weight decay.

    kind             table state                  a looked-up row r, with g its gradient summed over the batch
    adam             2 floats per weight          every row moves every step (torch.optim.Adam)
    rowwise_adagrad  1 float per row              s_r += mean(g^2);  w_r -= lr g / (sqrt(s_r) + eps)
    sparse_adam      2 floats per weight          m_r, v_r and w_r only (torch.optim.SparseAdam, lazy Adam)

Row-wise Adagrad is fbgemm's ``EXACT_ROWWISE_ADAGRAD``: "exact" since duplicate ids of a batch
add their gradients before the update, and the weight decay (L2) adds ``weight_decay * w_r`` to
the gradient of looked-up rows only. For the row-sparse kinds the tables emit sparse gradients
(``nn.EmbeddingBag(sparse=True)``), so a step costs the rows it read, not the table size, and rows
not read keep their weights bit for bit.

Under torchrec's `DistributedModelParallel` the same config maps onto its fused kernels (the
optimizer runs inside the backward, on CUDA where fbgemm-gpu has its CUDA kernels):
`fused_optimizer` gives the optimizer class and arguments for
``torchrec.optim.apply_optimizer_in_backward``, from which the sharder picks the ``EmbOptimType``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import ConfigDict
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter

KINDS = ("adam", "rowwise_adagrad", "sparse_adam")
ROW_SPARSE = ("rowwise_adagrad", "sparse_adam")


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """How the embedding tables update. ``lr`` and ``weight_decay`` default (None) to the run's own
    ``train.lr`` and ``train.weight_decay``; ``betas`` are Adam's, for the two Adam kinds only;
    ``sparse_adam`` takes no weight decay (torch's SparseAdam has none)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # YAML keys that are not fields are errors

    kind: Literal["adam", "rowwise_adagrad", "sparse_adam"] = "adam"
    lr: float | None = None
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"embedding_optimizer.kind = {self.kind!r}; expected one of {KINDS}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"embedding_optimizer.lr = {self.lr}; expected > 0 (or unset: the run's lr)")
        if self.eps <= 0:
            raise ValueError(f"embedding_optimizer.eps = {self.eps}; expected > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"embedding_optimizer.betas = {self.betas}; expected both in [0, 1)")
        if self.kind == "rowwise_adagrad" and self.betas != (0.9, 0.999):
            raise ValueError(f"embedding_optimizer.betas = {self.betas} with kind 'rowwise_adagrad'; "
                             "betas belong to the Adam kinds")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"embedding_optimizer.weight_decay = {self.weight_decay}; expected >= 0")


DENSE_ADAM = EmbeddingOptimizer()  # the default: tables update as the dense layers do


class RowWiseAdagrad(torch.optim.Optimizer):
    """fbgemm's EXACT_ROWWISE_ADAGRAD on sparse gradients: one float of state per row (``sum``,
    (rows,)), and only the rows present in the gradient change.

    Each parameter is a table (rows, dim) whose gradient is sparse, as ``nn.EmbeddingBag(sparse=True)``
    makes it.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.01, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"RowWiseAdagrad lr = {lr}, eps = {eps}, weight_decay = {weight_decay}; "
                             "expected lr > 0, eps > 0 and weight_decay >= 0")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for table in group["params"]:
                if table.dim() != 2:
                    raise ValueError(f"RowWiseAdagrad takes tables (rows, dim); got a tensor of shape "
                                     f"{tuple(table.shape)}")
                self.state[table]["sum"] = torch.zeros(table.shape[0], dtype=torch.float32, device=table.device)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch.optim.Optimizer's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for table in group["params"]:
                if table.grad is None:
                    continue
                if not table.grad.is_sparse:
                    raise ValueError("RowWiseAdagrad needs sparse gradients; the table's gradient is dense "
                                     "(build its nn.EmbeddingBag with sparse=True)")
                grad = table.grad.coalesce()  # duplicate ids of the batch summed
                rows, g = grad.indices()[0], grad.values()  # (R,), (R, dim)
                if group["weight_decay"]:
                    g = g + group["weight_decay"] * table[rows]
                sums = self.state[table]["sum"]
                row_sums = sums[rows] + g.float().pow(2).mean(dim=1)  # (R,)
                sums.index_copy_(0, rows, row_sums)
                scale = -group["lr"] / (row_sums.sqrt() + group["eps"])  # (R,)
                table.index_add_(0, rows, (g * scale.unsqueeze(1)).to(table.dtype))
        return loss


class TablesAndDense(torch.optim.Optimizer):
    """Two optimizers stepped as one: ``tables`` over the embedding tables, ``dense`` over the rest.

    Lightning's automatic optimization takes one optimizer and calls ``step(closure)``, where the
    closure runs forward and backward: it runs once here, then both parts step. The state dict
    holds each part's under "tables" and "dense".
    """

    def __init__(self, tables: torch.optim.Optimizer, dense: torch.optim.Optimizer) -> None:
        # no Optimizer.__init__: the two parts own the parameter groups and the state
        self.parts = {"tables": tables, "dense": dense}
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> dict:
        return {param: state for part in self.parts.values() for param, state in part.state.items()}

    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch.optim.Optimizer's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(f"optimizer state has parts {sorted(state_dict)}; expected {sorted(self.parts)} "
                             "(was the checkpoint trained with another embedding_optimizer kind?)")
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        return f"TablesAndDense(tables={self.parts['tables']!r}, dense={self.parts['dense']!r})"


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(table weights of every torchrec `EmbeddingBagCollection` in ``model``, every other trainable
    parameter); a table shared by two collections counts once. Parameters that an optimizer steps
    inside the backward (`fused_optimizer`'s, on tables that DMP has sharded) are in neither."""
    kept = dict(in_backward_optimizer_filter(model.named_parameters()))  # all but those stepped in the backward
    kept_ids = {id(p) for p in kept.values()}
    tables = {id(bag.weight): bag.weight for ebc in model.modules() if isinstance(ebc, EmbeddingBagCollection)
              for bag in ebc.embedding_bags.values() if id(bag.weight) in kept_ids}
    dense = [p for p in kept.values() if p.requires_grad and id(p) not in tables]
    return list(tables.values()), dense


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    config: EmbeddingOptimizer = DENSE_ADAM) -> torch.optim.Optimizer:
    """The optimizer of ``model``: Adam(lr, weight_decay) over the dense layers and ``config`` over
    the tables. The row-sparse kinds switch the tables' bags to sparse gradients."""
    table_lr = config.lr if config.lr is not None else lr
    table_decay = config.weight_decay if config.weight_decay is not None else weight_decay
    tables, dense = split_parameters(model)
    if config.kind == "adam":
        groups = [{"params": dense}, {"params": tables, "lr": table_lr, "weight_decay": table_decay,
                                      "betas": config.betas, "eps": config.eps}]
        return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)
    if not tables:
        if any(hasattr(p, "_in_backward_optimizers") for p in model.parameters()):
            return torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay)  # sharded tables step in the backward
        raise ValueError(f"embedding_optimizer.kind = {config.kind!r}, but the model has no embedding tables")
    for ebc in model.modules():
        if isinstance(ebc, EmbeddingBagCollection):
            for bag in ebc.embedding_bags.values():
                bag.sparse = True
    if config.kind == "rowwise_adagrad":
        table_optimizer = RowWiseAdagrad(tables, lr=table_lr, eps=config.eps, weight_decay=table_decay)
    else:
        if table_decay:
            raise ValueError(f"embedding_optimizer.kind = 'sparse_adam' with weight decay {table_decay} (from "
                             "train.weight_decay when unset); SparseAdam has none: set embedding_optimizer."
                             "weight_decay: 0")
        table_optimizer = torch.optim.SparseAdam(tables, lr=table_lr, betas=config.betas, eps=config.eps)
    return TablesAndDense(table_optimizer, torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay))


def fused_optimizer(config: EmbeddingOptimizer, lr: float,
                    weight_decay: float) -> tuple[type[torch.optim.Optimizer], dict]:
    """(optimizer class, its arguments as fbgemm's kernels name them) for
    ``torchrec.optim.apply_optimizer_in_backward`` on the tables of a model that
    `DistributedModelParallel` then shards: torchrec's sharder maps the class onto fbgemm's fused
    kernel (RowWiseAdagrad -> EXACT_ROWWISE_ADAGRAD, Adam -> ADAM, which
    updates only the looked-up rows, as SparseAdam does). fbgemm-gpu-cpu runs EXACT_ROWWISE_ADAGRAD
    but not ADAM: ``sparse_adam`` needs fbgemm-gpu's CUDA build. ``lr`` and ``weight_decay`` are the run's."""
    import torchrec.optim as trec_optim  # the fused path only
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode

    table_lr = config.lr if config.lr is not None else lr
    table_decay = config.weight_decay if config.weight_decay is not None else weight_decay
    if config.kind == "rowwise_adagrad":
        decay = {"weight_decay": table_decay, "weight_decay_mode": WeightDecayMode.L2} if table_decay else {}
        return trec_optim.RowWiseAdagrad, {"lr": table_lr, "eps": config.eps, **decay}
    if config.kind == "sparse_adam":
        if table_decay:
            raise ValueError(f"embedding_optimizer.kind = 'sparse_adam' with weight decay {table_decay}; "
                             "expected 0 (set embedding_optimizer.weight_decay: 0)")
        return trec_optim.Adam, {"lr": table_lr, "eps": config.eps, "beta1": config.betas[0],
                                 "beta2": config.betas[1]}
    raise ValueError("embedding_optimizer.kind = 'adam' updates every row of every table, which the fused "
                     "kernels do not do; expected 'rowwise_adagrad' or 'sparse_adam' under model parallelism")
