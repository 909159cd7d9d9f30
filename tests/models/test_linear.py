import pytest
import torch

from data.schema import FeatureSpec
from models.linear import LinearConfig, LinearModel


def test_golden_logits(features, dense, sparse):
    torch.manual_seed(0)
    model = LinearModel(LinearConfig(features, dense_dim=2))
    with torch.no_grad():
        logits = model(dense, sparse)
    torch.testing.assert_close(logits, torch.tensor([1.1003482, -0.3063426, 1.3304192]), rtol=1e-5, atol=0)


def test_logit_is_the_sum_of_feature_weights(features, dense, sparse):
    model = LinearModel(LinearConfig(features, dense_dim=2))
    with torch.no_grad():
        for bag in model.sparse_weights.embedding_bags.values():
            bag.weight.fill_(1.0)
        model.dense_weights.copy_(torch.tensor([2.0, -1.0]))
        model.bias.fill_(0.5)
        logits = model(dense, sparse)
    # 8 sparse features weigh 1 each: a bag's mean of ones is 1, and an empty bag gives 0 (row 2 has
    # no tags, row 3 no recent items). Then 2 * hour - price + 0.5.
    expected = torch.tensor([8.0, 7.0, 7.0]) + dense @ torch.tensor([2.0, -1.0]) + 0.5
    torch.testing.assert_close(logits, expected)


def test_shape(features, dense, sparse):
    assert LinearModel(LinearConfig(features, dense_dim=2))(dense, sparse).shape == (3,)


def test_bad_config_raises(features):
    with pytest.raises(ValueError, match="LinearConfig.dense_dim = -2"):
        LinearConfig(features, dense_dim=-2)
    unsized = (FeatureSpec("user_id", "users", "categorical"),)
    with pytest.raises(ValueError, match="'user_id' has num_embeddings=None"):
        LinearModel(LinearConfig(unsized))


def test_torchscript_round_trip(features, dense, sparse, script_round_trip):
    script_round_trip(LinearModel(LinearConfig(features, dense_dim=2)), dense, sparse)
