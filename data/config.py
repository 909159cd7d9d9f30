"""YAML config files read into pydantic models, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def read_yaml_config(path: Path | None, model: type[M]) -> M:
    """The YAML file at ``path`` validated as ``model`` (its defaults when ``path`` is None);
    ValueError naming the file when it is not YAML or does not validate."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) if path else {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from e
    try:
        return model.model_validate(raw or {})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
