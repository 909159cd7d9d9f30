"""The pipeline config: the YAML file (see configs/pipeline.yaml) that declares a `Pipeline`'s
stages, each picked by its ``kind``, and the request-time features derived from the request's clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, model_validator

from data.config import read_yaml_config
from inference.pipeline.filters import FILTER_SPECS
from inference.pipeline.orderers import FINAL_ORDERERS, ORDERER_SPECS
from inference.pipeline.scorers import SCORER_SPECS
from inference.pipeline.sources import SOURCE_SPECS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TimeField = Literal["hour", "weekday", "day", "month"]
TIME_FIELDS = {  # a request-time feature derivable from the request's clock, as data.movielens encodes it
    "hour": lambda now: now.hour,
    "weekday": lambda now: now.weekday(),  # Monday is 0
    "day": lambda now: now.day,
    "month": lambda now: now.month,
}


def time_zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError naming it when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ValueError(f"time_zone {name!r} is not an IANA time zone; expected e.g. 'UTC' or 'Europe/Paris'") \
            from error


class PipelineConfig(_Strict):
    """A YAML pipeline config (see configs/pipeline.yaml); each stage is picked by its ``kind``."""

    max_k: int = Field(100, ge=1)  # the largest Query.k answered
    # "host:port": read users, items and lists from the Redis server `recstack refresh` loaded the
    # version into (its config's `redis`); default: the version's embedded snapshot
    redis: str | None = Field(None, pattern=r"^[^:\s]+:\d+$")
    redis_timeout_s: float = Field(0.1, gt=0)  # per Redis call; a failure or timeout raises StoreUnavailable
    # "host:port": the gRPC endpoint of a Triton server serving the version's rankers (`recstack triton
    # serve --repo <version>/triton`), which scorers of kind triton call
    triton: str | None = Field(None, pattern=r"^[^:\s]+:\d+$")
    triton_timeout_s: float = Field(0.05, gt=0)  # per Triton call; a failure or timeout falls back to the next scorer
    allow_anonymous: bool = True  # answer anonymous users (user_id None) and users the store does not know
    # request-time features a query's context may leave out, derived from the request's clock in
    # `time_zone` (e.g. {hour: hour, weekday: weekday}); any other one the models read as missing
    time_features: dict[str, TimeField] = {}
    time_zone: str = "UTC"  # an IANA name, e.g. Europe/Paris
    workers: int = Field(8, ge=1)  # threads running sources, shared by concurrent requests
    sources: list[Annotated[Union[SOURCE_SPECS], Field(discriminator="kind")]] = Field(min_length=1)  # noqa: UP007
    # retrieval: the scorer sees each candidate's item and request features; scoring: also its
    # source and retrieval score (`CANDIDATE_FEATURES`), for a ranker that learns the blend
    blend: Literal["retrieval", "scoring"] = "retrieval"
    filters: list[Annotated[Union[FILTER_SPECS], Field(discriminator="kind")]] = []  # noqa: UP007  cheapest first
    # exported rankers of the version, each the next one's fallback: {kind: torchscript, model: deepfm}
    # runs in process, {kind: triton, model: deepfm} on the `triton` server (deepfm_py: its Python-backend twin)
    scorer: list[Annotated[Union[SCORER_SPECS], Field(discriminator="kind")]] = Field(min_length=1)  # noqa: UP007
    orderers: list[Annotated[Union[ORDERER_SPECS], Field(discriminator="kind")]] = Field(  # noqa: UP007
        min_length=1)
    display: list[str] = []  # item columns each answer shows beside its items, e.g. [title]

    @model_validator(mode="after")
    def _known_time_zone(self) -> PipelineConfig:
        time_zone(self.time_zone)
        return self

    @model_validator(mode="after")
    def _triton_named(self) -> PipelineConfig:
        remote = [spec.model for spec in self.scorer if spec.kind == "triton"]
        if remote and self.triton is None:
            raise ValueError(f"scorers of kind triton {remote} run on Triton; expected `triton: host:port` naming "
                             "its gRPC endpoint")
        return self

    @model_validator(mode="after")
    def _ends_with_top_k(self) -> PipelineConfig:
        kinds = [spec.kind for spec in self.orderers]
        if kinds[-1] not in FINAL_ORDERERS or any(kind in FINAL_ORDERERS for kind in kinds[:-1]):
            raise ValueError(f"orderers {kinds}; expected exactly one of {list(FINAL_ORDERERS)}, last "
                             "(the final top-k)")
        return self

    @model_validator(mode="after")
    def _pins_within_max_k(self) -> PipelineConfig:
        chained = [spec for bandit in self.orderers if bandit.kind == "bandit" and bandit.strategies
                   for chain in bandit.strategies.values() for spec in chain]  # the strategies' orderers
        for spec in [*self.orderers, *chained]:
            if spec.kind == "pin" and max(spec.positions) >= self.max_k:
                raise ValueError(f"pin positions {spec.positions}: {max(spec.positions)} is past the longest "
                                 f"list, max_k = {self.max_k} (positions count from 0)")
        return self


def load_pipeline_config(path: Path) -> PipelineConfig:
    """The config in the YAML file ``path``; ValueError naming the file when it is invalid."""
    return read_yaml_config(path, PipelineConfig)
