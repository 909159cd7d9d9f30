import pytest
import torch
from torchrec import PoolingType

from data.schema import FeatureSpec
from models.layers import MLP, SparseArch, check_config, embedding_configs
from models.linear import LinearConfig


def test_mlp_widths_and_final_activation():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    assert MLP(3, [4, 2])(x).shape == (5, 2)
    assert (MLP(3, [4, 2])(x) >= 0).all()
    assert (MLP(3, [4, 2], final_activation=False)(x) < 0).any()
    assert isinstance(MLP(3, [4, 2], final_activation=False)[-1], torch.nn.Linear)


def test_mlp_dropout_follows_each_relu_and_only_acts_while_training():
    kinds = [type(m).__name__ for m in MLP(3, [4, 2], final_activation=False, dropout=0.5)]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear"]
    assert [type(m).__name__ for m in MLP(3, [4], dropout=0.5)] == ["Linear", "ReLU", "Dropout"]
    torch.manual_seed(0)
    mlp, x = MLP(3, [64, 2], final_activation=False, dropout=0.5), torch.randn(5, 3)
    first, second = mlp[0], mlp[3]
    torch.testing.assert_close(mlp.eval()(x), second(torch.relu(first(x))))
    mlp.train()
    hidden, kept = mlp[2](mlp[1](first(x))), torch.relu(first(x))  # (5, 64) with and without dropout
    assert ((hidden == 0) | torch.isclose(hidden, 2 * kept)).all()  # survivors are scaled by 1 / (1 - 0.5)
    assert ((hidden == 0) & (kept > 0)).any()


def test_one_table_per_sparse_feature_and_sequences_join_their_source(features):
    tables = {t.name: t for t in embedding_configs(features)}
    # "hour" is dense only; "recent_items" reads the item id table.
    assert list(tables) == ["user_id", "country", "item_id", "device", "category", "tags", "price"]
    assert tables["item_id"].feature_names == ["recent_items", "item_id"]
    assert tables["item_id"].pooling == PoolingType.MEAN
    assert tables["user_id"].pooling == PoolingType.SUM
    assert tables["tags"].pooling == PoolingType.MEAN
    price = next(f for f in features if f.name == "price")
    assert (tables["price"].num_embeddings, tables["price"].embedding_dim) == (price.num_embeddings, 4)


def test_embedding_dim_replaces_each_features_dim(features):
    assert {t.embedding_dim for t in embedding_configs(features, embedding_dim=1)} == {1}


def test_a_sequence_reads_a_table_sized_from_a_source_outside_the_list(query_features, item_features):
    tables = {t.name: t for t in embedding_configs(query_features, sources=item_features)}
    assert tables["item_id"].feature_names == ["recent_items"]
    assert tables["item_id"].num_embeddings == 6


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ([FeatureSpec("hour", "interactions", "numerical")], "no sparse feature"),
        ([FeatureSpec("user_id", "users", "categorical", embedding_dim=4)], "'user_id' has num_embeddings=None"),
        ([FeatureSpec("user_id", "users", "categorical", vocab_size=5)], "embedding_dim=None"),
        ([FeatureSpec("recent", "users", "sequence", max_len=3, source="item_id")], "'item_id', which is not among"),
        (
            [
                FeatureSpec("item_id", "items", "categorical", vocab_size=6, embedding_dim=4),
                FeatureSpec("recent", "users", "sequence", vocab_size=9, max_len=3, source="item_id"),
            ],
            "has 9 rows; expected its source 'item_id''s 6",
        ),
    ],
)
def test_bad_features_raise_naming_the_value(features, message):
    with pytest.raises(ValueError, match=message):
        embedding_configs(features)


def test_unknown_kind_raises():
    spec = FeatureSpec("photo", "items", "categorical", vocab_size=5, embedding_dim=4)
    object.__setattr__(spec, "kind", "image")  # FeatureSpec itself refuses it; a spec from elsewhere might not
    with pytest.raises(ValueError, match="kind 'image' is not one of"):
        embedding_configs([spec])


def test_sparse_arch_stacks_features(features, sparse):
    arch = SparseArch(embedding_configs(features))
    assert arch(sparse).shape == (3, 8, 4)  # (B, F, D)


def test_sparse_arch_rejects_mixed_dims():
    mixed = [
        FeatureSpec("user_id", "users", "categorical", vocab_size=5, embedding_dim=4),
        FeatureSpec("item_id", "items", "categorical", vocab_size=6, embedding_dim=8),
    ]
    with pytest.raises(ValueError, match=r"\{'user_id': 4, 'item_id': 8\}; expected one dim"):
        SparseArch(embedding_configs(mixed))


def test_config_checks_name_the_field(features):
    with pytest.raises(ValueError, match=r"LinearConfig.dense_dim = -1; expected values >= 0"):
        LinearConfig(features, dense_dim=-1)
    with pytest.raises(ValueError, match=r"LinearConfig.features is empty"):
        LinearConfig(())


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_config_checks_rates_in_zero_one(features, rate):
    config = LinearConfig(features)
    object.__setattr__(config, "dense_dim", rate)  # any field will do: the check reads it by name
    with pytest.raises(ValueError, match=rf"LinearConfig.dense_dim = {rate}; expected a rate in \[0, 1\)"):
        check_config(config, rates=("dense_dim",))
