"""The base of every stage's config spec: a small pydantic model with unknown keys rejected.

Each source, filter and orderer declares its spec beside its class (``kind:`` plus its own
fields, and ``build``), and the pipeline config admits the kinds those specs declare.
"""

from pydantic import BaseModel, ConfigDict


class StageSpec(BaseModel):
    """A stage's YAML entry: frozen, unknown keys rejected, fields also settable by name."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
