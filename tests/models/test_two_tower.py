import math

import pytest
import torch
import torch.nn.functional as F

from data.schema import FeatureSpec
from models.two_tower import TwoTower, TwoTowerConfig, sampled_softmax_loss

OUTPUT_DIM = 32


@pytest.fixture
def config(query_features, item_features) -> TwoTowerConfig:
    return TwoTowerConfig(query_features, item_features, query_dense_dim=1, item_dense_dim=1)


def split(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's dense columns: hour for the query tower, price for the item tower."""
    return dense[:, :1], dense[:, 1:]


def test_golden_scores(config, dense, sparse):
    torch.manual_seed(0)
    model = TwoTower(config)
    with torch.no_grad():
        scores = model(*split(dense), sparse)
    torch.testing.assert_close(scores, torch.tensor([-0.31696185, -0.32041547, -0.31118351]), rtol=1e-5, atol=0)


def test_sub_part_shapes(config, dense, sparse):
    model = TwoTower(config)
    query_dense, item_dense = split(dense)
    query_emb, item_emb = model.query_tower(query_dense, sparse), model.item_tower(item_dense, sparse)
    assert query_emb.shape == item_emb.shape == (3, OUTPUT_DIM)
    torch.testing.assert_close(query_emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(item_emb.norm(dim=1), torch.ones(3))
    assert model.score(query_emb, item_emb).shape == (3,)
    torch.testing.assert_close(model(query_dense, item_dense, sparse), (query_emb * item_emb).sum(dim=1))


def test_recent_items_read_the_item_id_table(config):
    model = TwoTower(config)
    history_table = model.query_tower.ebc.embedding_bags["item_id"]
    assert history_table.weight is model.item_tower.ebc.embedding_bags["item_id"].weight
    assert history_table.mode == "mean"


def test_embedding_dim_sets_every_tables_dim(query_features, item_features):
    model = TwoTower(TwoTowerConfig(query_features, item_features, embedding_dim=8))
    tables = [*model.query_tower.ebc.embedding_bags.values(), *model.item_tower.ebc.embedding_bags.values()]
    assert {t.weight.shape[1] for t in tables} == {8}
    query_items, item_items = (tower.ebc.embedding_bags["item_id"] for tower in (model.query_tower, model.item_tower))
    assert query_items.weight is item_items.weight


def test_an_unknown_item_is_placed_by_its_features(config, dense, make_sparse):
    model = TwoTower(config)
    item_dense = torch.zeros(3, 1)
    unknown = make_sparse(item_ids=[0, 0, 0], tags=[[1], [2], [3]])
    with torch.no_grad():
        item_emb = model.item_tower(item_dense, unknown)
        assert not torch.allclose(item_emb[0], item_emb[1])  # same id, other tags (and category)
        model.item_tower.ebc.embedding_bags["item_id"].weight[0] += 1.0  # the unknown-id row plays no part
        torch.testing.assert_close(model.item_tower(item_dense, unknown), item_emb)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"item_id": "sku"}, r"item_id = 'sku'; expected a categorical item feature, one of \['category', 'item_id'\]"),
        ({"item_id": "tags"}, "item_id = 'tags'; expected a categorical item feature"),
        ({"output_dim": 0}, "TwoTowerConfig.output_dim = 0; expected values >= 1"),
        ({"embedding_dim": 0}, "TwoTowerConfig.embedding_dim = 0; expected values >= 1"),
        ({"query_dense_dim": -1}, "TwoTowerConfig.query_dense_dim = -1; expected values >= 0"),
        ({"item_features": ()}, "TwoTowerConfig.item_features is empty"),
    ],
)
def test_bad_config_raises(query_features, item_features, fields, message):
    with pytest.raises(ValueError, match=message):
        TwoTowerConfig(**{"query_features": query_features, "item_features": item_features, **fields})


def test_a_feature_in_both_towers_raises(query_features, item_features):
    country = FeatureSpec("country", "items", "categorical", vocab_size=3, embedding_dim=4)
    with pytest.raises(ValueError, match=r"features \['country'\] are in both towers"):
        TwoTowerConfig(query_features, (*item_features, country))


def test_torchscript_round_trip(config, dense, sparse, script_round_trip):
    model = TwoTower(config)
    query_dense, item_dense = split(dense)
    script_round_trip(model, query_dense, item_dense, sparse)
    script_round_trip(model.query_tower, query_dense, sparse)  # what serving loads
    script_round_trip(model.item_tower, item_dense, sparse)  # what the offline refresh runs


# sampled_softmax_loss


def embeddings(rows: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed)), dim=1)


def diagonal_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.arange(logits.shape[0]))


def test_hand_computed_two_by_two():
    query, item = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # logits [[1, 1], [0, 1]]: row 1 puts 1/2 on its item, row 2 puts e / (1 + e).
    expected = (math.log(2) + math.log(1 + math.exp(-1))) / 2
    assert sampled_softmax_loss(query, item, None, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_log_q_is_subtracted_from_each_candidates_logit():
    query, item = embeddings(4, 0), embeddings(4, 1)
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    corrected = sampled_softmax_loss(query, item, log_q, temperature=1.0)
    torch.testing.assert_close(corrected, diagonal_cross_entropy(query @ item.T - log_q[None, :]))
    assert not torch.isclose(corrected, sampled_softmax_loss(query, item, None, temperature=1.0))


def test_an_item_repeated_in_the_batch_is_not_a_negative_of_its_own_rows():
    query, item = embeddings(3, 0), embeddings(3, 1)
    logits = query @ item.T
    logits[0, 1] = logits[1, 0] = float("-inf")  # rows 0 and 1 share item 7
    loss = sampled_softmax_loss(query, item, None, temperature=1.0, item_ids=torch.tensor([7, 7, 3]))
    torch.testing.assert_close(loss, diagonal_cross_entropy(logits))


def test_a_share_of_the_queries_over_all_the_items_is_that_shares_part_of_the_loss():
    """Each of two ranks holds half the queries and every item: the mean of their losses is the loss."""
    query, item, ids = embeddings(4, 0), embeddings(4, 1), torch.tensor([7, 3, 7, 5])
    log_q = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    whole = sampled_softmax_loss(query, item, log_q, 0.5, item_ids=ids)
    halves = [sampled_softmax_loss(query[r:r + 2], item, log_q, 0.5, item_ids=ids, first=r) for r in (0, 2)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)


def test_temperature_divides_the_logits():
    query, item = embeddings(4, 0), embeddings(4, 1)
    loss = sampled_softmax_loss(query, item, None, temperature=0.5)
    torch.testing.assert_close(loss, diagonal_cross_entropy(query @ item.T / 0.5))
    torch.testing.assert_close(loss, sampled_softmax_loss(2 * query, item, None, temperature=1.0))


def test_mixed_negatives_join_the_candidates_with_their_own_log_q():
    query, item, extra = embeddings(3, 0), embeddings(3, 1), embeddings(5, 2)
    log_q, extra_log_q = torch.log(torch.tensor([0.5, 0.3, 0.2])), torch.full((5,), math.log(1 / 100))
    loss = sampled_softmax_loss(query, item, log_q, 0.1, extra_negatives=extra, extra_log_q=extra_log_q)
    logits = torch.cat([query @ item.T / 0.1 - log_q, query @ extra.T / 0.1 - extra_log_q], dim=1)  # (B, B + N)
    torch.testing.assert_close(loss, diagonal_cross_entropy(logits))


def test_bad_loss_inputs_raise():
    query, item = embeddings(3, 0), embeddings(3, 1)
    with pytest.raises(ValueError, match="temperature = 0; expected > 0"):
        sampled_softmax_loss(query, item, None, temperature=0)
    with pytest.raises(ValueError, match=r"query_emb \(3, 4\) and item_emb \(2, 4\)"):
        sampled_softmax_loss(query, item[:2], None, temperature=1.0)
    with pytest.raises(ValueError, match=r"with first = 1; expected one dim and the queries' items at rows"):
        sampled_softmax_loss(query, item, None, temperature=1.0, first=1)
    with pytest.raises(ValueError, match="expected both or neither"):
        sampled_softmax_loss(query, item, torch.zeros(3), 1.0, extra_negatives=embeddings(2, 2))
