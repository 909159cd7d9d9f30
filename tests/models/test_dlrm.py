import itertools

import pytest
import torch

from data.schema import FeatureSpec
from models.dlrm import DLRM, DenseArch, DLRMConfig, InteractionArch, InteractionDCNArch, OverArch

B, F, D = 3, 8, 4


@pytest.mark.parametrize(
    ("interaction", "expected"),
    [
        ("dot", [-0.026774153, -0.062069211, -0.047016792]),
        ("dcn", [-0.13110304, -0.13164696, -0.13265811]),
    ],
)
def test_golden_logits(features, dense, sparse, interaction, expected):
    torch.manual_seed(0)
    model = DLRM(DLRMConfig(features, dense_dim=2, interaction=interaction))
    with torch.no_grad():
        logits = model(dense, sparse)
    torch.testing.assert_close(logits, torch.tensor(expected), rtol=1e-5, atol=0)


def test_sub_part_shapes(features, dense, sparse):
    model = DLRM(DLRMConfig(features, dense_dim=2))
    assert model.sparse_arch(sparse).shape == (B, F, D)
    assert DenseArch(2, (8,), D)(dense).shape == (B, D)
    sparse_vectors, dense_vector = torch.randn(B, F, D), torch.randn(B, D)
    assert InteractionArch(F, D)(dense_vector, sparse_vectors).shape == (B, D + F * (F + 1) // 2)
    assert InteractionDCNArch(F, D, num_layers=2, rank=3)(dense_vector, sparse_vectors).shape == (B, (F + 1) * D)
    assert OverArch(7, (5,))(torch.randn(B, 7)).shape == (B,)
    assert model(dense, sparse).shape == (B,)


def test_interaction_arch_is_the_dense_vector_then_every_pairs_dot_product():
    generator = torch.Generator().manual_seed(0)
    dense_vector, sparse_vectors = torch.randn(B, D, generator=generator), torch.randn(B, F, D, generator=generator)
    vectors = [dense_vector] + [sparse_vectors[:, f] for f in range(F)]
    dots = [(vectors[i] * vectors[j]).sum(dim=1) for i, j in itertools.combinations(range(F + 1), 2)]
    expected = torch.cat([dense_vector, torch.stack(dots, dim=1)], dim=1)
    torch.testing.assert_close(InteractionArch(F, D)(dense_vector, sparse_vectors), expected)


def test_mixed_embedding_dims_raise_naming_them(features):
    mixed = (*features, FeatureSpec("brand", "items", "categorical", vocab_size=3, embedding_dim=6))
    with pytest.raises(ValueError, match=r"'price': 4, 'brand': 6\}; expected one dim"):
        DLRM(DLRMConfig(mixed, dense_dim=2))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"interaction": "attention"}, r"DLRMConfig.interaction = 'attention'; expected one of \('dot', 'dcn'\)"),
        ({"dense_dim": 0}, "DLRMConfig.dense_dim = 0; expected values >= 1"),
        ({"over_sizes": (-1,)}, r"DLRMConfig.over_sizes = \(-1,\)"),
        ({"dcn_rank": 0}, "DLRMConfig.dcn_rank = 0"),
        ({"dropout": -0.5}, r"DLRMConfig.dropout = -0.5; expected a rate in \[0, 1\)"),
        ({"features": ()}, "DLRMConfig.features is empty"),
    ],
)
def test_bad_config_raises(features, fields, message):
    with pytest.raises(ValueError, match=message):
        DLRMConfig(**{"features": features, "dense_dim": 2, **fields})


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_torchscript_round_trip(features, dense, sparse, script_round_trip, interaction, dropout):
    model = DLRM(DLRMConfig(features, dense_dim=2, interaction=interaction, dropout=dropout)).eval()
    script_round_trip(model, dense, sparse)


def test_dropout_follows_each_relu_of_the_dense_and_over_arches(features):
    model = DLRM(DLRMConfig(features, dense_dim=2, dense_sizes=(8,), over_sizes=(8, 4), dropout=0.25))
    def kinds(arch):
        return [type(m).__name__ for m in arch.mlp]

    assert kinds(model.dense_arch) == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout"]
    assert kinds(model.over_arch) == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
