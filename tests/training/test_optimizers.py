"""Embedding-table optimizers: each row-sparse one against a naive float64 reference over several
steps, untouched rows bit for bit, row-wise Adagrad's state size, the dense layers' Adam, the
checkpointed state, the run-config key, and both LightningModules training with it."""

import copy
import math

import numpy as np
import pydantic
import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from training.optimizers import (
    EmbeddingOptimizer,
    RowWiseAdagrad,
    TablesAndDense,
    build_optimizer,
    fused_optimizer,
    split_parameters,
)
from training.train import RunConfig, train_ranker, train_retrieval

ROWS = {"t0": 12, "t1": 20}
FEATURE_TABLE = {"f0": "t0", "f1": "t1", "f2": "t1"}  # f1 and f2 read one table
DIM, BATCH, STEPS = 4, 6, 5


class Toy(nn.Module):
    """Two tables and an independent linear layer: loss = 0.5 |pooled - target|^2 + 0.5 |linear(x) - y|^2."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection([
            EmbeddingBagConfig(name=t, num_embeddings=n, embedding_dim=DIM,
                               feature_names=[f for f, table in FEATURE_TABLE.items() if table == t],
                               pooling=PoolingType.SUM)
            for t, n in ROWS.items()
        ])
        self.linear = nn.Linear(3, 1)

    def loss(self, step: dict) -> torch.Tensor:
        pooled = self.ebc(step["kjt"]).to_dict()
        table_loss = sum(0.5 * (pooled[f] - step["targets"][f]).pow(2).sum() for f in FEATURE_TABLE)
        return table_loss + 0.5 * (self.linear(step["x"]) - step["y"]).pow(2).sum()


def make_steps(seed: int) -> list[dict]:
    """STEPS batches; bags of 0-3 ids drawn from the first half of each table (with repeats), so the
    second half of every table is never looked up."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(STEPS):
        bags = {f: [rng.integers(0, ROWS[t] // 2, size=rng.integers(0, 4)).tolist() for _ in range(BATCH)]
                for f, t in FEATURE_TABLE.items()}
        kjt = KeyedJaggedTensor(keys=list(bags),
                                values=torch.tensor([i for b in bags.values() for bag in b for i in bag]),
                                lengths=torch.tensor([len(bag) for b in bags.values() for bag in b]))
        targets = {f: torch.from_numpy(rng.normal(size=(BATCH, DIM))).float() for f in FEATURE_TABLE}
        steps.append({"bags": bags, "kjt": kjt, "targets": targets, "x": torch.randn(BATCH, 3),
                      "y": torch.randn(BATCH, 1)})
    return steps


def reference_row_grads(weights: dict[str, np.ndarray], step: dict) -> dict[str, dict[int, np.ndarray]]:
    """Per table, the gradient of each looked-up row: its bags' (pooled - target) summed over every
    occurrence of the row."""
    grads: dict[str, dict[int, np.ndarray]] = {t: {} for t in ROWS}
    for f, t in FEATURE_TABLE.items():
        for b, bag in enumerate(step["bags"][f]):
            pooled = sum((weights[t][i] for i in bag), np.zeros(DIM))
            delta = pooled - step["targets"][f][b].double().numpy()
            for i in bag:
                grads[t][i] = grads[t].get(i, 0) + delta
    return grads


def reference_rowwise_adagrad(weights: dict, steps: list[dict], lr: float, eps: float, decay: float) -> dict:
    sums = {t: np.zeros(n) for t, n in ROWS.items()}
    for step in steps:
        for t, rows in reference_row_grads(weights, step).items():
            for r, g in rows.items():
                g = g + decay * weights[t][r]
                sums[t][r] += np.mean(g ** 2)
                weights[t][r] = weights[t][r] - lr * g / (math.sqrt(sums[t][r]) + eps)
    return weights


def reference_sparse_adam(weights: dict, steps: list[dict], lr: float, eps: float, betas: tuple) -> dict:
    m = {t: np.zeros((n, DIM)) for t, n in ROWS.items()}
    v = {t: np.zeros((n, DIM)) for t, n in ROWS.items()}
    for k, step in enumerate(steps, start=1):
        size = lr * math.sqrt(1 - betas[1] ** k) / (1 - betas[0] ** k)
        for t, rows in reference_row_grads(weights, step).items():
            for r, g in rows.items():
                m[t][r] = betas[0] * m[t][r] + (1 - betas[0]) * g
                v[t][r] = betas[1] * v[t][r] + (1 - betas[1]) * g ** 2
                weights[t][r] = weights[t][r] - size * m[t][r] / (np.sqrt(v[t][r]) + eps)
    return weights


def table_weights(model: Toy) -> dict[str, torch.Tensor]:
    return {t: bag.weight.detach().clone() for t, bag in model.ebc.embedding_bags.items()}


def train(model: Toy, optimizer: torch.optim.Optimizer, steps: list[dict]) -> None:
    for step in steps:
        optimizer.zero_grad()
        model.loss(step).backward()
        optimizer.step()


CASES = {
    "rowwise_adagrad": (EmbeddingOptimizer("rowwise_adagrad", lr=0.3, eps=1e-8),
                        lambda w, s: reference_rowwise_adagrad(w, s, 0.3, 1e-8, 0.0)),
    "rowwise_adagrad, weight decay": (EmbeddingOptimizer("rowwise_adagrad", lr=0.3, eps=1e-8, weight_decay=0.1),
                                      lambda w, s: reference_rowwise_adagrad(w, s, 0.3, 1e-8, 0.1)),
    "sparse_adam": (EmbeddingOptimizer("sparse_adam", lr=0.05, eps=1e-8, betas=(0.8, 0.99), weight_decay=0.0),
                    lambda w, s: reference_sparse_adam(w, s, 0.05, 1e-8, (0.8, 0.99))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_row_sparse_optimizer_matches_naive_reference(case):
    config, reference = CASES[case]
    torch.manual_seed(0)
    model = Toy()
    start = {t: w.double().numpy() for t, w in table_weights(model).items()}
    steps = make_steps(seed=1)
    train(model, build_optimizer(model, lr=1e-2, weight_decay=0.0, config=config), steps)
    expected = reference(copy.deepcopy(start), steps)
    for t, w in table_weights(model).items():
        np.testing.assert_allclose(w.double().numpy(), expected[t], rtol=0, atol=1e-6)
        assert not np.allclose(w.double().numpy(), start[t])  # the looked-up rows did move


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "sparse_adam"])
def test_rows_not_looked_up_stay_bit_for_bit(kind):
    torch.manual_seed(0)
    model = Toy()
    optimizer = build_optimizer(model, 1e-2, 0.0, EmbeddingOptimizer(kind, lr=0.1, weight_decay=0.0))
    for step in make_steps(seed=2):
        before = table_weights(model)
        train(model, optimizer, [step])
        after = table_weights(model)
        for t in ROWS:
            ids = torch.tensor(sorted({i for f, table in FEATURE_TABLE.items() if table == t
                                       for bag in step["bags"][f] for i in bag}), dtype=torch.long)
            untouched = torch.ones(ROWS[t], dtype=torch.bool)
            untouched[ids] = False
            assert torch.equal(after[t][untouched], before[t][untouched])
            assert not torch.equal(after[t][ids], before[t][ids])


def test_rowwise_adagrad_keeps_one_float_per_row():
    model = Toy()
    optimizer = build_optimizer(model, 1e-2, 0.0, EmbeddingOptimizer("rowwise_adagrad"))
    train(model, optimizer, make_steps(seed=3))
    table_state = optimizer.parts["tables"].state
    assert sorted(v.shape for s in table_state.values() for v in s.values()) == sorted((n,) for n in ROWS.values())
    assert all(v.dtype == torch.float32 for s in table_state.values() for v in s.values())


def test_dense_layers_keep_adam_and_state_round_trips():
    torch.manual_seed(0)
    model = Toy()
    plain = copy.deepcopy(model.linear)
    steps = make_steps(seed=4)
    optimizer = build_optimizer(model, 1e-2, 1e-3, EmbeddingOptimizer("rowwise_adagrad", lr=0.1))
    assert isinstance(optimizer, TablesAndDense)
    train(model, optimizer, steps[:3])
    adam = torch.optim.Adam(plain.parameters(), lr=1e-2, weight_decay=1e-3)
    for step in steps[:3]:
        adam.zero_grad()
        (0.5 * (plain(step["x"]) - step["y"]).pow(2).sum()).backward()
        adam.step()
    for ours, theirs in zip(model.linear.parameters(), plain.parameters(), strict=True):
        assert torch.equal(ours, theirs)

    # a resumed optimizer continues as the uninterrupted one does
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(resumed_model, 1e-2, 1e-3, EmbeddingOptimizer("rowwise_adagrad", lr=0.1))
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train(model, optimizer, steps[3:])
    train(resumed_model, resumed, steps[3:])
    for ours, theirs in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    wrong = build_optimizer(copy.deepcopy(model), 1e-2, 0.0)
    with pytest.raises(ValueError, match="another embedding_optimizer kind"):
        resumed.load_state_dict(wrong.state_dict())


def test_default_is_dense_adam_over_every_parameter():
    model = Toy()
    optimizer = build_optimizer(model, 1e-2, 1e-4)
    assert isinstance(optimizer, torch.optim.Adam)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())
    tables, dense = split_parameters(model)
    assert len(tables) == len(ROWS) and len(dense) == 2


def test_tables_stepped_in_the_backward_are_left_out():
    """Under model parallelism torchrec steps the tables inside the backward (`fused_optimizer`):
    the module's own optimizer is then Adam over the dense layers alone."""
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    model = Toy()
    apply_optimizer_in_backward(torch.optim.SGD, model.ebc.parameters(), {"lr": 0.1})
    optimizer = build_optimizer(model, 1e-2, 0.0, EmbeddingOptimizer("rowwise_adagrad"))
    assert isinstance(optimizer, torch.optim.Adam)
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(model.linear.parameters())
    with pytest.raises(ValueError, match="no embedding tables"):
        build_optimizer(nn.Linear(2, 1), 1e-2, 0.0, EmbeddingOptimizer("rowwise_adagrad"))


def test_rowwise_adagrad_needs_sparse_gradients():
    table = nn.Parameter(torch.zeros(3, 2))
    table.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="sparse gradients"):
        RowWiseAdagrad([table]).step()


@pytest.mark.parametrize(("section", "message"), [
    ({"kind": "adagrad"}, "kind"),
    ({"kind": "rowwise_adagrad", "momentum": 0.9}, "momentum"),
    ({"kind": "rowwise_adagrad", "lr": 0}, "lr = 0"),
    ({"kind": "rowwise_adagrad", "betas": [0.5, 0.9]}, "betas belong to the Adam kinds"),
    ({"kind": "sparse_adam", "eps": -1}, "eps"),
])
def test_bad_config_is_rejected(section, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        RunConfig.model_validate({"embedding_optimizer": section})


def test_sparse_adam_rejects_weight_decay():
    with pytest.raises(ValueError, match="SparseAdam has none"):
        build_optimizer(Toy(), 1e-2, 1e-4, EmbeddingOptimizer("sparse_adam"))


def test_fused_optimizer_maps_onto_fbgemm_kinds():
    from torchrec.distributed.utils import optimizer_type_to_emb_opt_type

    cls, kwargs = fused_optimizer(EmbeddingOptimizer("rowwise_adagrad", lr=0.2), lr=1e-3, weight_decay=0.0)
    assert optimizer_type_to_emb_opt_type(cls).name == "EXACT_ROWWISE_ADAGRAD"
    assert kwargs == {"lr": 0.2, "eps": 1e-8}
    cls, kwargs = fused_optimizer(EmbeddingOptimizer("sparse_adam", weight_decay=0.0), lr=1e-3, weight_decay=1e-4)
    assert optimizer_type_to_emb_opt_type(cls).name == "ADAM"
    assert kwargs == {"lr": 1e-3, "eps": 1e-8, "beta1": 0.9, "beta2": 0.999}
    with pytest.raises(ValueError, match="fused kernels"):
        fused_optimizer(EmbeddingOptimizer(), lr=1e-3, weight_decay=0.0)


def test_training_runs_with_row_sparse_tables(tiny_dataset, tmp_path):
    """A ranker with row-wise Adagrad and the two-tower model (whose query and item towers share the
    item id table) with sparse Adam train end to end; the checkpoint holds the row state."""
    ranker = RunConfig.model_validate({
        "train": {"lr": 0.03, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"},
        "model": {"embedding_dim": 8, "dense_sizes": [16], "over_sizes": [16]},
        "embedding_optimizer": {"kind": "rowwise_adagrad", "lr": 0.1},
    })
    metrics = train_ranker("dlrm", tiny_dataset, tmp_path / "dlrm", ranker)
    assert metrics["val_auc"] > 0.55
    state = torch.load(tmp_path / "dlrm" / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0]
    assert all(list(s) == ["sum"] and s["sum"].dim() == 1 for s in state["tables"]["state"].values())

    retrieval = RunConfig.model_validate({
        "train": {"lr": 0.01, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"},
        "model": {"hidden_sizes": [32], "output_dim": 16},
        "embedding_optimizer": {"kind": "sparse_adam", "lr": 0.01, "weight_decay": 0},
    })
    metrics = train_retrieval(tiny_dataset, tmp_path / "two_tower", retrieval)
    assert metrics["val_ndcg@10"] > 0
