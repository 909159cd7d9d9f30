"""Plain matrix factorisation for implicit feedback: a user's score for an item is the dot
product of their embeddings, plus the item's bias when the model has one.

The ids are the encoded ids of the dataset's `user_id` and `item_id` features (0 is the
out-of-vocabulary row). ``bpr_loss`` below trains it from (positive, negative) pairs, as in
Rendle et al. 2009, "BPR: Bayesian Personalized Ranking from Implicit Feedback".
"""

import torch
import torch.nn.functional as F
from torch import nn


class MatrixFactorization(nn.Module):
    """score(users (B,), items (B,)) -> (B,), the score of each user with the item in the same row;
    forward(users (U,), items (I,)) -> (U, I), every user's score for every item (what ranking needs)."""

    def __init__(self, num_users: int, num_items: int, dim: int = 64, item_bias: bool = True) -> None:
        super().__init__()
        for name, value in (("num_users", num_users), ("num_items", num_items), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MatrixFactorization {name} = {value!r}; expected an integer >= 1")
        self.user_embedding = nn.Embedding(num_users, dim)
        self.item_embedding = nn.Embedding(num_items, dim)
        # Without a bias it stays frozen at zero, so that scoring has one code path.
        self.item_bias = nn.Parameter(torch.zeros(num_items), requires_grad=item_bias)
        # Small starting vectors (as in BPR's reference implementations): early scores near 0.
        for table in (self.user_embedding, self.item_embedding):
            nn.init.normal_(table.weight, std=0.1)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = (self.user_embedding(users) * self.item_embedding(items)).sum(dim=1)  # (B,)
        return dot + self.item_bias[items]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dots = self.user_embedding(users) @ self.item_embedding(items).T  # (U, I)
        return dots + self.item_bias[items]


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """-mean log sigmoid(pos - neg) over aligned (B,) pairs -> scalar: the BPR-Opt likelihood term.

    The prior (L2 on the parameters) is the optimizer's weight decay.
    """
    if pos_scores.shape != neg_scores.shape:
        raise ValueError(
            f"pos_scores {tuple(pos_scores.shape)} and neg_scores {tuple(neg_scores.shape)}; expected one shape"
        )
    return -F.logsigmoid(pos_scores - neg_scores).mean()
