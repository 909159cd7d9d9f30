"""Orderers: ``(query, ranked) -> (ranked candidates, propensities)``; they may drop or reorder
candidates, never add any. The first receives the scored candidates ranked by score (ties in
blend order); each hands the next a ranking. A propensity (M,) float64 is the probability that
the orderer puts that item in that slot given the slots above it: 1.0 for a deterministic
orderer, NaN where a deterministic policy chose among arms (UCB1, greedy), which replay refuses.

    MaxPerSourceOrderer  at most ``cap`` items from each source (diversity of sources)
    BoostOrderer         scores of items matching a rule raised (promotions), then ranked again
    MMROrderer           maximal marginal relevance over an item column (diversity of content)
    SpacingOrderer       no two items sharing a column value within ``gap`` positions
    PinOrderer           editorial items at fixed positions
    TopKOrderer          the first k (a final orderer)
    ExploreOrderer       the first k, each slot explored with probability epsilon: one of the best
                         items of a source a `SourceBandit` finds rewarding (a final orderer)
    BanditOrderer        k slots allocated among sources by a bandit policy (a final orderer)
    StrategyBanditOrderer  one of several named orderer chains per request, drawn by a bandit
                         policy, then the first k (a final orderer)

Each orderer's config spec (its ``kind:`` in the pipeline's ``orderers:``) is defined beside it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, Protocol, Union

import numpy as np
import pandas as pd
from pydantic import Field, StringConstraints, model_validator

from inference.pipeline.bandits import UCB1, BanditPolicy, EpsilonGreedy, SourceBandit, Thompson, strategy_arm
from inference.pipeline.spec import StageSpec
from inference.pipeline.types import Candidates, Query

if TYPE_CHECKING:
    from inference.version import ServingVersion

log = logging.getLogger(__name__)


class Orderer(Protocol):
    """Ranks scored candidates and records each slot's propensity."""

    name: str

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        """(M,) ranked candidates taken from ``scored``, and their (M,) propensities."""
        ...


def by_score(scored: Candidates) -> np.ndarray:
    """(N,) positions of ``scored`` by descending score; ties keep their order."""
    return np.argsort(-scored.scores, kind="stable")


def item_column(scored: Candidates, column: str) -> list:
    """The hydrated item ``column`` of the N candidates, one value each."""
    if scored.columns is None or column not in scored.columns:
        raise ValueError(f"orderers read item column {column!r}, but the candidates carry "
                         f"{[] if scored.columns is None else sorted(scored.columns)}")
    return list(scored.columns[column])


class TopKOrderer:
    """The first ``query.k`` candidates of the ranking."""

    name = "top_k"

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        first = _top(query, scored)
        return first, np.ones(len(first))


class ExploreOrderer:
    """The first ``query.k`` candidates of the ranking, except that each slot, with probability
    ``epsilon``, explores: it takes a random one of the ``pool`` best remaining items (default:
    all of them) of a source drawn in proportion to ``bandit``'s estimates (among the sources with
    items left), so those candidates can be shown and an off-policy estimate of another ranking
    has support. A smaller pool explores less far down the ranking, with larger propensities.

    A slot's propensity is the probability of its item given the slots above it,
    (1 - epsilon) [it is the best remaining item] + epsilon q_s / min(n_s, pool), with q_s its
    source's share of the estimates and n_s the source's remaining items; the product over the
    slots is the probability of the whole list. ``seed`` fixes the draws (tests); by default they
    differ per run.
    """

    name = "explore"

    def __init__(self, bandit: SourceBandit, epsilon: float, pool: int | None = None, seed: int | None = None) -> None:
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon = {epsilon!r}; expected a probability in [0, 1)")
        if pool is not None and pool < 1:
            raise ValueError(f"pool = {pool}; expected at least 1 item to explore, or None for all")
        self.bandit, self.epsilon, self.pool = bandit, epsilon, pool
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # a Generator is not thread-safe; requests run on many threads

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        order = np.arange(len(scored))
        names, source_of = np.unique(scored.sources[order], return_inverse=True)
        remaining = [np.flatnonzero(source_of == s).tolist() for s in range(len(names))]  # ranks, best first
        weights = self.bandit.estimates(names)  # (S,)
        slots = min(query.k, len(order))
        with self._lock:
            explores, draws = self._rng.random(slots) < self.epsilon, self._rng.random((slots, 2))
        chosen, propensities = np.zeros(slots, np.intp), np.zeros(slots)
        for slot in range(slots):
            left = np.array([len(r) for r in remaining])
            reach = left if self.pool is None else np.minimum(left, self.pool)  # (S,) items exploration draws from
            share = np.where(left > 0, weights, 0.0) / weights[left > 0].sum()  # (S,)
            greedy = min(np.flatnonzero(left), key=lambda s: remaining[s][0])  # the source of the best item
            source, position = greedy, 0
            if explores[slot]:
                source = min(int(np.searchsorted(np.cumsum(share), draws[slot, 0], side="right")), len(names) - 1)
                source = source if left[source] else int(np.flatnonzero(left)[-1])  # cumsum rounding at the end
                position = int(draws[slot, 1] * reach[source])
            chosen[slot] = remaining[source].pop(position)
            best = source == greedy and position == 0
            propensities[slot] = (1.0 - self.epsilon) * best + self.epsilon * share[source] / reach[source]
        return scored.take(order[chosen]), np.minimum(propensities, 1.0)  # (1 - e) + e q / n may round above 1


class MaxPerSourceOrderer:
    """All candidates in their order, except that only the ``cap`` best ranked of each source stay."""

    name = "max_per_source"

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"cap = {cap}; expected at least 1 item per source")
        self.cap = cap

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        _, source_of = np.unique(scored.sources, return_inverse=True)
        by_source = np.argsort(source_of, kind="stable")  # each source's candidates in turn, in their order
        sizes = np.bincount(source_of)
        rank_in_source = np.empty(len(scored), np.intp)  # 0 = the source's best
        rank_in_source[by_source] = np.arange(len(scored)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        kept = np.flatnonzero(rank_in_source < self.cap)
        return scored.take(kept), np.ones(len(kept))


class MMROrderer:
    """Maximal marginal relevance over an item column: the first ``depth`` slots (default
    ``query.k``) are filled one at a time with the item maximising
    lambda * relevance - (1 - lambda) * (its largest similarity to the items above it),
    relevance being the score rescaled to [0, 1] over the candidates; the rest follow in order.

    Similarity is Jaccard's between value sets for a list-valued column (e.g. genres) and
    equality for a scalar one (e.g. category). lambda 1 keeps the ranking; lambda 0 takes, after
    the first item, the one least like those above it (ties go to the better ranked).
    """

    name = "mmr"

    def __init__(self, column: str, lambda_: float, depth: int | None = None) -> None:
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"lambda = {lambda_!r}; expected a weight in [0, 1]")
        self.column, self.lambda_, self.depth = column, lambda_, depth

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        n = len(scored)
        slots = min(self.depth or query.k, n)
        if self.lambda_ == 1.0 or slots < 2:
            return scored, np.ones(n)
        members = _value_sets(item_column(scored, self.column))  # (N, V) 0/1
        sizes = members.sum(axis=1)
        spread = scored.scores.max() - scored.scores.min()
        relevance = (scored.scores - scored.scores.min()) / spread if spread > 0 else np.zeros(n)
        chosen, left = [0], np.ones(n, bool)
        left[0] = False
        closest = np.zeros(n)  # (N,) each item's largest similarity to the chosen ones
        for _ in range(slots - 1):
            last = chosen[-1]
            common = members @ members[last]  # (N,)
            union = sizes + sizes[last] - common
            closest = np.maximum(closest, np.divide(common, union, out=np.zeros(n), where=union > 0))
            gain = np.where(left, self.lambda_ * relevance - (1 - self.lambda_) * closest, -np.inf)
            best = int(np.argmax(gain))  # the first of equal gains: the better ranked
            chosen.append(best)
            left[best] = False
        order = np.concatenate([chosen, np.flatnonzero(left)])
        return scored.take(order), np.ones(n)


class SpacingOrderer:
    """No two items with the same ``column`` value within ``gap`` positions of each other among the
    first ``depth`` slots (default ``query.k``), whenever an alternative exists: each slot takes the
    best ranked remaining item whose value differs from the ``gap`` slots above it. When none does,
    the slot takes the best ranked item anyway, and `broken` counts it (and a debug line says so)."""

    name = "spacing"

    def __init__(self, column: str, gap: int, depth: int | None = None) -> None:
        if gap < 1:
            raise ValueError(f"gap = {gap}; expected at least 1 position")
        self.column, self.gap, self.depth = column, gap, depth
        self._lock = threading.Lock()
        self.broken = 0  # slots where every remaining item repeated a value within the gap

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        values = [_hashable(v) for v in item_column(scored, self.column)]
        remaining, chosen, broken = list(range(len(scored))), [], 0
        for _ in range(min(self.depth or query.k, len(scored))):
            recent = {values[i] for i in chosen[-self.gap:]}
            pick = next((i for i in remaining if values[i] not in recent), None)
            if pick is None:
                pick, broken = remaining[0], broken + 1
                log.debug("spacing on %s: slot %d repeats %r within %d positions: no alternative left",
                          self.column, len(chosen), values[pick], self.gap)
            chosen.append(pick)
            remaining.remove(pick)
        if broken:
            with self._lock:
                self.broken += broken
        return scored.take(np.array(chosen + remaining, np.intp)), np.ones(len(scored))


class BoostOrderer:
    """Scores of the items matching a rule (``column`` equal to, or in, ``values``; or on the
    store's list ``list_name``) become score * ``multiply`` + ``add``, for at most ``cap`` of them
    (the best ranked); then the list is ranked again by score, ties in their order."""

    name = "boost"

    def __init__(self, matches: Callable[[Candidates], np.ndarray], multiply: float = 1.0, add: float = 0.0,
                 cap: int | None = None) -> None:
        self.matches, self.multiply, self.add, self.cap = matches, multiply, add, cap

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        boosted = np.flatnonzero(self.matches(scored))[:self.cap]
        scores = scored.scores.copy()
        scores[boosted] = scores[boosted] * self.multiply + self.add
        ranked = Candidates(scored.item_ids, scored.sources, scores, scored.columns)
        return ranked.take(by_score(ranked)), np.ones(len(scored))


class PinOrderer:
    """Editorial items at fixed positions: ``items[i]`` moves to ``positions[i]`` (0 is the top)
    when it is among the candidates, that is when a source proposed it and it passed the filters;
    the other items keep their order around them. A position past the list's end puts it last."""

    name = "pin"

    def __init__(self, items: Callable[[], np.ndarray], positions: list[int]) -> None:
        self.items, self.positions = items, positions

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        pinned = self.items()[:len(self.positions)]
        rows = pd.Index(scored.item_ids).get_indexer(pinned)  # -1: not among the candidates
        placed = sorted((position, row) for position, row in zip(self.positions, rows, strict=False) if row >= 0)
        order = [i for i in range(len(scored)) if i not in {row for _, row in placed}]
        for position, row in placed:
            order.insert(min(position, len(order)), row)
        return scored.take(np.array(order, np.intp)), np.ones(len(scored))


class BanditOrderer:
    """``query.k`` slots allocated among the sources by a bandit ``policy`` over ``bandit``'s counts:
    each slot draws a source among those with items left and takes its best ranked remaining item.
    A slot's propensity is its source's probability under the policy (NaN when the policy is
    deterministic). The policy's probabilities are computed once per request and again only when a
    source runs out (Thompson's estimate is then shared by the request's slots, and each draw is
    exact given it). ``seed`` fixes the draws (tests); by default they differ per run."""

    name = "bandit"

    def __init__(self, bandit: SourceBandit, policy: BanditPolicy, seed: int | None = None) -> None:
        self.bandit, self.policy = bandit, policy
        self._draws = RequestDraws(seed)

    def __call__(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray]:
        rng = self._draws.generator()
        names, source_of = np.unique(scored.sources, return_inverse=True)
        remaining = [np.flatnonzero(source_of == s).tolist() for s in range(len(names))]  # positions, best first
        served, rewards = self.bandit.counts(names)
        slots = min(query.k, len(scored))
        chosen, propensities = np.zeros(slots, np.intp), np.zeros(slots)
        available = None
        for slot in range(slots):
            left = np.array([len(r) > 0 for r in remaining])
            if available is None or (left != available).any():  # the counts only change between requests
                available, p = left, self.policy.probabilities(served, rewards, left, rng)
            source = draw_arm(p, rng)
            chosen[slot] = remaining[source].pop(0)
            propensities[slot] = np.nan if self.policy.deterministic else p[source]
        return scored.take(chosen), propensities


@dataclass(frozen=True)
class Strategy:
    """The strategy a `StrategyBanditOrderer` drew for a request, and its probability under the
    policy (NaN when the policy is deterministic)."""

    name: str
    propensity: float


class StrategyBanditOrderer:
    """One of the named ``strategies`` per request, drawn by a bandit ``policy`` over ``bandit``'s
    counts of each strategy's arm (`strategy_arm`); the drawn strategy's chain of orderers ranks the
    candidates and its first ``query.k`` are kept. The chains hold deterministic orderers (each
    slot's propensity 1), none of the final ones.

    Every strategy's list is computed, so that each slot's propensity is exact, whichever
    strategies agree: the probability under the policy of the strategies whose lists agree with the
    served one down to that slot, over that of those agreeing down to the slot above. The product
    over the slots is the probability of the served list, which replay needs; slots where every
    strategy agrees (e.g. MMR's first item) have propensity 1. NaN when the policy is
    deterministic. Not an `Orderer`: `draw` also returns the `Strategy`, which the service credits
    feedback to. ``seed`` fixes the draws (tests); by default they differ per run."""

    name = "bandit"

    def __init__(self, strategies: dict[str, list[Orderer]], bandit: SourceBandit, policy: BanditPolicy,
                 seed: int | None = None) -> None:
        if len(strategies) < 2:
            raise ValueError(f"strategies {list(strategies)}; expected at least 2 to choose among")
        self.strategies, self.bandit, self.policy = strategies, bandit, policy
        self._arms = np.array([strategy_arm(name) for name in strategies])
        self._draws = RequestDraws(seed)

    def draw(self, query: Query, scored: Candidates) -> tuple[Candidates, np.ndarray, Strategy]:
        """(M,) ranked candidates of the drawn strategy, their (M,) propensities, and the strategy."""
        rng = self._draws.generator()
        lists = [_top(query, _chained(chain, query, scored)) for chain in self.strategies.values()]
        served, rewards = self.bandit.counts(self._arms)
        p = self.policy.probabilities(served, rewards, np.ones(len(lists), bool), rng)
        p = p / p.sum()  # (S,)
        arm = draw_arm(p, rng)
        ranked = lists[arm]
        items = ranked.item_ids
        agree = np.zeros((len(lists), len(items)), bool)  # (S, M) strategy s's list has the served item at slot j
        for s, other in enumerate(lists):
            n = min(len(other), len(items))
            agree[s, :n] = other.item_ids[:n] == items[:n]
        reach = p @ np.cumprod(agree, axis=1)  # (M,) probability of a list starting with the served slots 0..j
        propensities = np.minimum(reach / np.concatenate([[1.0], reach[:-1]]), 1.0)
        name = list(self.strategies)[arm]
        if self.policy.deterministic:
            return ranked, np.full(len(items), np.nan), Strategy(name, np.nan)
        return ranked, propensities, Strategy(name, float(p[arm]))


class RequestDraws:
    """An independent random generator per request from ``seed`` (None: different per run);
    thread-safe, as requests run on many threads (spawning is not)."""

    def __init__(self, seed: int | None) -> None:
        self._seeds = np.random.SeedSequence(seed)
        self._lock = threading.Lock()

    def generator(self) -> np.random.Generator:
        with self._lock:
            return np.random.default_rng(self._seeds.spawn(1)[0])


def draw_arm(p: np.ndarray, rng: np.random.Generator) -> int:
    """An arm drawn with the (K,) probabilities ``p``."""
    return min(int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right")), len(p) - 1)


def _chained(chain: list[Orderer], query: Query, scored: Candidates) -> Candidates:
    for orderer in chain:
        scored, _ = orderer(query, scored)
    return scored


def _top(query: Query, ranked: Candidates) -> Candidates:
    return ranked.take(np.arange(min(query.k, len(ranked))))


def _value_sets(values: list) -> np.ndarray:
    """(N, V) 0/1 membership of each of N cells' values (a list cell holds several) in the V seen."""
    vocabulary: dict = {}
    rows, columns = [], []
    for row, value in enumerate(values):
        for member in set(_members(value)):
            rows.append(row)
            columns.append(vocabulary.setdefault(member, len(vocabulary)))
    members = np.zeros((len(values), max(len(vocabulary), 1)))
    members[rows, columns] = 1.0
    return members


def _members(value: object) -> tuple:
    return tuple(value) if isinstance(value, list | tuple | np.ndarray) else (value,)


def _hashable(value: object) -> object:
    return tuple(value) if isinstance(value, list | np.ndarray) else value


def _check_item_column(version: ServingVersion, column: str, field: str) -> None:
    """ValueError naming ``field`` unless the version's items have ``column``."""
    columns = version.store.item_columns()
    if column not in columns:
        raise ValueError(f"{field} = {column!r} is not an item column; expected one of {sorted(columns)}")


class TopKSpec(StageSpec):
    kind: Literal["top_k"]

    def build(self, version: ServingVersion, bandit: SourceBandit) -> Orderer:
        return TopKOrderer()


class ExploreSpec(StageSpec):
    kind: Literal["explore"]
    epsilon: float = Field(ge=0, lt=1)  # the share of slots that explore
    pool: int | None = Field(None, ge=1)  # explore among each source's pool best remaining items; default all
    seed: int | None = None  # fixed draws, for tests; by default they differ per run

    def build(self, version: ServingVersion, bandit: SourceBandit) -> Orderer:
        return ExploreOrderer(bandit, self.epsilon, self.pool, self.seed)


class MaxPerSourceSpec(StageSpec):
    kind: Literal["max_per_source"]
    cap: int = Field(ge=1)

    def build(self, version: ServingVersion, bandit: SourceBandit) -> Orderer:
        return MaxPerSourceOrderer(self.cap)


class MMRSpec(StageSpec):
    kind: Literal["mmr"]
    column: str  # an item column: categorical (category) or a list of values (genres)
    lambda_: float = Field(alias="lambda", ge=0, le=1)  # 1: relevance only; 0: dissimilarity only
    depth: int | None = Field(None, ge=1)  # the slots rearranged; default the request's k

    def build(self, version: ServingVersion, bandit: SourceBandit) -> Orderer:
        _check_item_column(version, self.column, "mmr column")
        return MMROrderer(self.column, self.lambda_, self.depth)


class SpacingSpec(StageSpec):
    kind: Literal["spacing"]
    column: str  # e.g. category or seller
    gap: int = Field(ge=1)  # items sharing a value are more than gap positions apart
    depth: int | None = Field(None, ge=1)  # the slots spaced; default the request's k

    def build(self, version: ServingVersion, bandit: SourceBandit) -> Orderer:
        _check_item_column(version, self.column, "spacing column")
        return SpacingOrderer(self.column, self.gap, self.depth)


class BoostSpec(StageSpec):
    kind: Literal["boost"]
    column: str | None = None  # the rule: column equals a value, or is in values ...
    equals: bool | int | float | str | None = None
    in_: list[bool | int | float | str] | None = Field(None, alias="in")
    list_name: str | None = None  # ... or the item is on this store list (e.g. promoted)
    multiply: float = Field(1.0, gt=0)
    add: float = 0.0
    cap: int | None = Field(None, ge=1)  # at most this many boosted items per list

    @model_validator(mode="after")
    def _one_rule(self) -> BoostSpec:
        rules = {"column with equals": self.column is not None and self.equals is not None,
                 "column with in": self.column is not None and self.in_ is not None,
                 "list_name": self.list_name is not None}
        if sum(rules.values()) != 1 or (self.column is None) != (self.equals is None and self.in_ is None):
            raise ValueError(f"boost takes one rule: one of {list(rules)}; got column={self.column!r}, "
                             f"equals={self.equals!r}, in={self.in_!r}, list_name={self.list_name!r}")
        if self.multiply == 1.0 and self.add == 0.0:
            raise ValueError("boost changes no score: set multiply (not 1) or add (not 0)")
        return self

    def build(self, version: ServingVersion, bandit: SourceBandit) -> Orderer:
        if self.list_name is not None:
            store, name = version.store, self.list_name
            return BoostOrderer(lambda scored: np.isin(scored.item_ids, store.get_list(name)[0]),
                                self.multiply, self.add, self.cap)
        _check_item_column(version, self.column, "boost column")
        wanted = {_hashable(self.equals)} if self.in_ is None else {_hashable(v) for v in self.in_}
        column = self.column
        return BoostOrderer(lambda scored: np.array([bool(wanted & set(_members(v)))
                                                     for v in item_column(scored, column)], bool),
                            self.multiply, self.add, self.cap)


class PinSpec(StageSpec):
    kind: Literal["pin"]
    items: list[int] | None = None  # the items to pin, in the order of positions ...
    list_name: str | None = None  # ... or the first ones of this store list (e.g. editorial)
    positions: list[int] = Field(min_length=1)  # 0 is the top

    @model_validator(mode="after")
    def _one_source(self) -> PinSpec:
        if (self.items is None) == (self.list_name is None):
            raise ValueError(f"pin takes items or list_name, not both or neither; got items={self.items!r}, "
                             f"list_name={self.list_name!r}")
        if min(self.positions) < 0 or len(set(self.positions)) < len(self.positions):
            raise ValueError(f"pin positions {self.positions}; expected distinct positions >= 0")
        if self.items is not None and len(self.items) != len(self.positions):
            raise ValueError(f"pin has {len(self.items)} items for {len(self.positions)} positions; expected one each")
        return self

    def build(self, version: ServingVersion, bandit: SourceBandit) -> Orderer:
        if self.items is not None:
            items = np.array(self.items, np.int64)
            return PinOrderer(lambda: items, self.positions)
        store, name = version.store, self.list_name
        return PinOrderer(lambda: store.get_list(name)[0], self.positions)


STRATEGY_SPECS = (MaxPerSourceSpec, BoostSpec, MMRSpec, SpacingSpec, PinSpec)  # the orderers a strategy may chain
StrategyName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$")]  # also a bandit arm and a log value
StrategyChain = list[Annotated[Union[STRATEGY_SPECS], Field(discriminator="kind")]]  # noqa: UP007


class BanditSpec(StageSpec):
    kind: Literal["bandit"]
    policy: Literal["epsilon_greedy", "ucb1", "thompson"]
    epsilon: float = Field(0.1, ge=0, le=1)  # epsilon_greedy's share of uniform draws
    draws: int = Field(200, ge=1)  # thompson's posterior draws per request, which estimate its propensities
    explore: float = Field(0.0, ge=0, le=1)  # thompson's share of uniform draws: propensities >= explore / arms
    # the arms: by default the sources (per slot); or these named chains of orderers (one per request),
    # e.g. {diverse: [{kind: mmr, column: genres, lambda: 0.7}], plain: []}
    strategies: dict[StrategyName, StrategyChain] | None = Field(None, min_length=2)
    seed: int | None = None

    def build(self, version: ServingVersion, bandit: SourceBandit) -> Orderer | StrategyBanditOrderer:
        if self.policy == "epsilon_greedy":
            policy = EpsilonGreedy(self.epsilon)
        else:
            policy = UCB1() if self.policy == "ucb1" else Thompson(self.draws, self.explore)
        if self.strategies is None:
            return BanditOrderer(bandit, policy, self.seed)
        return StrategyBanditOrderer({name: _built(name, specs, version, bandit)
                                      for name, specs in self.strategies.items()}, bandit, policy, self.seed)


def _built(strategy: str, specs: list[StageSpec], version: ServingVersion, bandit: SourceBandit) -> list[Orderer]:
    """The orderers of ``strategy``'s chain; ValueError naming the strategy when one cannot be built."""
    try:
        return [spec.build(version, bandit) for spec in specs]
    except ValueError as error:
        raise ValueError(f"bandit strategy {strategy!r}: {error}") from error


ORDERER_SPECS = (*STRATEGY_SPECS, TopKSpec, ExploreSpec, BanditSpec)
FINAL_ORDERERS = ("top_k", "explore", "bandit")  # the orderers that cut the list to Query.k
