import itertools

import pytest
import torch

from data.schema import FeatureSpec
from models.deepfm import DeepFM, DeepFMConfig, FactorizationMachine


def test_golden_logits(features, dense, sparse):
    torch.manual_seed(0)
    model = DeepFM(DeepFMConfig(features, dense_dim=2))
    with torch.no_grad():
        logits = model(dense, sparse)
    torch.testing.assert_close(logits, torch.tensor([1.6053226, -0.52991503, 3.3346386]), rtol=1e-5, atol=0)


def test_factorization_machine_matches_the_sum_over_pairs():
    embeddings = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))  # (B, F, D)
    pairs = sum((embeddings[:, i] * embeddings[:, j]).sum(dim=1) for i, j in itertools.combinations(range(5), 2))
    torch.testing.assert_close(FactorizationMachine()(embeddings), pairs)


def test_sub_part_shapes(features, dense, sparse):
    model = DeepFM(DeepFMConfig(features, dense_dim=2, hidden_sizes=(8,)))
    embeddings = model.sparse_arch(sparse)
    assert embeddings.shape == (3, 8, 4)  # (B, F, D)
    assert model.first_order(dense, sparse).shape == (3,)
    assert model.second_order(embeddings).shape == (3,)
    assert model.deep(torch.cat([embeddings.flatten(1), dense], dim=1)).shape == (3, 1)
    assert model(dense, sparse).shape == (3,)


def test_embedding_dim_replaces_mixed_feature_dims(features, dense, sparse):
    mixed = (*features, FeatureSpec("brand", "items", "categorical", vocab_size=3, embedding_dim=6))
    with pytest.raises(ValueError, match=r"'brand': 6\}; expected one dim"):
        DeepFM(DeepFMConfig(mixed, dense_dim=2))
    assert DeepFM(DeepFMConfig(features, dense_dim=2, embedding_dim=3)).sparse_arch(sparse).shape == (3, 8, 3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"features": ()}, "DeepFMConfig.features is empty"),
        ({"hidden_sizes": (8, 0)}, r"DeepFMConfig.hidden_sizes = \(8, 0\); expected values >= 1"),
        ({"embedding_dim": -4}, "DeepFMConfig.embedding_dim = -4"),
        ({"dropout": 1.0}, r"DeepFMConfig.dropout = 1.0; expected a rate in \[0, 1\)"),
    ],
)
def test_bad_config_raises(features, fields, message):
    with pytest.raises(ValueError, match=message):
        DeepFMConfig(**{"features": features, **fields})


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_torchscript_round_trip(features, dense, sparse, script_round_trip, dropout):
    script_round_trip(DeepFM(DeepFMConfig(features, dense_dim=2, dropout=dropout)).eval(), dense, sparse)


def test_dropout_sits_in_the_deep_part_only(features):
    model = DeepFM(DeepFMConfig(features, dense_dim=2, hidden_sizes=(8, 4), dropout=0.25))
    rates = [m.p for m in model.deep if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.25, 0.25]  # after each hidden ReLU, none after the logit
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 2
