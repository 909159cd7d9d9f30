import math

import pytest
import torch

from models.mf import MatrixFactorization, bpr_loss

USERS = torch.tensor([1, 2, 4])
ITEMS = torch.tensor([1, 5, 0])


def test_golden_scores():
    torch.manual_seed(0)
    model = MatrixFactorization(num_users=5, num_items=6, dim=4)
    with torch.no_grad():
        scores = model.score(USERS, ITEMS)
    torch.testing.assert_close(scores, torch.tensor([0.00762532, -0.09119453, 0.01981771]), rtol=1e-5, atol=0)


def test_score_is_the_dot_product_plus_the_item_bias():
    model = MatrixFactorization(num_users=5, num_items=6, dim=4)
    with torch.no_grad():
        model.user_embedding.weight.fill_(1.0)
        model.item_embedding.weight.copy_(torch.arange(24.0).reshape(6, 4))
        model.item_bias.copy_(torch.arange(6.0) / 10)
        scores = model.score(USERS, ITEMS)
    # item i's row is 4i .. 4i + 3, which sum to 16i + 6
    torch.testing.assert_close(scores, torch.tensor([22.1, 86.5, 6.0]))


def test_shapes():
    model = MatrixFactorization(num_users=5, num_items=6, dim=4)
    assert model.score(USERS, ITEMS).shape == (3,)
    all_items = torch.arange(6)
    matrix = model(USERS, all_items)
    assert matrix.shape == (3, 6)
    torch.testing.assert_close(matrix[torch.arange(3), ITEMS], model.score(USERS, ITEMS))


def test_without_item_bias_the_bias_is_frozen_at_zero():
    model = MatrixFactorization(num_users=5, num_items=6, dim=4, item_bias=False)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        "user_embedding.weight", "item_embedding.weight"
    ]
    assert not model.item_bias.any()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_users": 0, "num_items": 6}, "num_users = 0"),
    ({"num_users": 5, "num_items": 6, "dim": 2.5}, "dim = 2.5"),
    ({"num_users": 5, "num_items": True}, "num_items = True"),
])
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MatrixFactorization(**kwargs)


def test_torchscript_round_trip(script_round_trip):
    script_round_trip(MatrixFactorization(num_users=5, num_items=6, dim=4), USERS, torch.arange(6))


def test_bpr_loss_by_hand():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    # -(log sigmoid(1) + log sigmoid(0)) / 2 = (log(1 + e^-1) + log 2) / 2
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    torch.testing.assert_close(bpr_loss(pos, neg), torch.tensor(expected))


def test_bpr_loss_falls_as_positives_pull_ahead():
    neg = torch.zeros(3)
    assert bpr_loss(torch.full((3,), 5.0), neg) < bpr_loss(torch.zeros(3), neg) < bpr_loss(torch.full((3,), -5.0), neg)


def test_bpr_loss_needs_aligned_pairs():
    with pytest.raises(ValueError, match=r"pos_scores \(3,\) and neg_scores \(3, 2\)"):
        bpr_loss(torch.zeros(3), torch.zeros(3, 2))
