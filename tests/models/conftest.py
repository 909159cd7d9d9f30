"""A tiny feature set of every kind and a hand-made batch of three rows."""

import pytest
import torch
from torchrec import KeyedJaggedTensor

from data.schema import FeatureSpec

QUERY_FEATURES = (
    FeatureSpec("user_id", "users", "categorical", vocab_size=5, embedding_dim=4),
    FeatureSpec("country", "users", "categorical", vocab_size=3, embedding_dim=4),
    FeatureSpec("recent_items", "interactions", "sequence", max_len=3, source="item_id"),
    FeatureSpec("device", "interactions", "categorical", vocab_size=3, embedding_dim=4),
    FeatureSpec("hour", "interactions", "numerical"),
)
ITEM_FEATURES = (
    FeatureSpec("item_id", "items", "categorical", vocab_size=6, embedding_dim=4),
    FeatureSpec("category", "items", "categorical", vocab_size=3, embedding_dim=4),
    FeatureSpec("tags", "items", "multi_hot", vocab_size=5, embedding_dim=4),
    FeatureSpec("price", "items", "numerical", buckets=4, embedding_dim=4),
)


@pytest.fixture
def features() -> tuple[FeatureSpec, ...]:
    """Sparse: user_id, country, recent_items, device, item_id, category, tags, price; dense: hour, price."""
    return QUERY_FEATURES + ITEM_FEATURES


@pytest.fixture
def query_features() -> tuple[FeatureSpec, ...]:
    return QUERY_FEATURES


@pytest.fixture
def item_features() -> tuple[FeatureSpec, ...]:
    return ITEM_FEATURES


def _make_sparse(item_ids: list[int], tags: list[list[int]]) -> KeyedJaggedTensor:
    """Three rows; the second user has one recent item, the third none, and item ids and tags vary."""
    per_key = {
        "user_id": [[1], [2], [4]],
        "country": [[0], [1], [2]],
        "recent_items": [[1, 2, 5], [3], []],
        "device": [[1], [2], [1]],
        "item_id": [[i] for i in item_ids],
        "category": [[1], [2], [1]],
        "tags": tags,
        "price": [[0], [3], [2]],
    }
    rows = [row for key_rows in per_key.values() for row in key_rows]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(per_key),
        values=torch.tensor([v for row in rows for v in row], dtype=torch.long),
        lengths=torch.tensor([len(row) for row in rows], dtype=torch.int32),
    )


@pytest.fixture
def make_sparse():
    """The batch builder, for tests that vary the items."""
    return _make_sparse


@pytest.fixture
def sparse() -> KeyedJaggedTensor:
    return _make_sparse(item_ids=[1, 4, 0], tags=[[1, 3], [], [2]])


@pytest.fixture
def dense() -> torch.Tensor:
    """(3, 2): hour, then price."""
    return torch.tensor([[0.5, -1.0], [1.5, 0.0], [-0.25, 2.0]])


@pytest.fixture
def script_round_trip(tmp_path):
    """Script a model, save and reload it, and check it returns exactly what the eager model does."""

    def check(model: torch.nn.Module, *inputs) -> None:
        path = tmp_path / "model.pt"
        torch.jit.script(model).save(str(path))
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)

    return check
