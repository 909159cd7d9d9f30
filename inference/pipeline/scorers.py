"""Scorers: ``(query, candidates) -> scores`` (N,) float32, one per input candidate, in input order.

A scorer never drops or reorders candidates; sorting and truncation belong to orderers.

    TorchScriptScorer   an exported ranker (``inference.export``) run in this process
    FallbackScorer      tries scorers in turn (e.g. Triton, then TorchScript, then the linear
                        ranker) and counts how often each one failed over to the next

`ModelInputs` turns candidate feature columns into the padded tensors every exported model takes
(`pad_batch`); the Triton scorer (``inference.triton.scorer``) sends the same tensors over the wire.

Each scorer's config spec (an entry of the pipeline's ``scorer:`` list, ``{kind: torchscript,
model: deepfm}`` or ``{kind: triton, model: deepfm_py}``) is defined here, and `SCORER_SPECS`
lists them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import fbgemm_gpu  # noqa: F401  registers the fbgemm ops that scripted torchrec modules call
import numpy as np
import pandas as pd
import torch

from data.columns import FeatureColumns
from data.encoders import Batch, FeatureEncoder
from inference.pipeline.spec import StageSpec
from inference.pipeline.types import Candidates, Query

if TYPE_CHECKING:
    from inference.version import ServingVersion

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """Scores every candidate of a request; never drops or reorders them."""

    name: str

    def __call__(self, query: Query, candidates: Candidates) -> np.ndarray:
        """(N,) float32 scores aligned with ``candidates``."""
        ...


def pad_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` as (dense (B, n), ids (B, F, L), lengths (B, F)); L is the longest feature, at least 1.

    Padded in numpy: a request's batch is small, and numpy's calls cost less than torch's."""
    sparse, n = batch.sparse, len(batch)
    lengths = sparse.lengths().numpy().astype(np.int64)  # (F * B,) key-major
    f = len(sparse.keys())
    width = max(int(lengths.max()) if len(lengths) else 0, 1)
    rows = np.repeat(np.arange(f * n), lengths)
    positions = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids = np.zeros((f * n, width), np.int64)
    ids[rows, positions] = sparse.values().numpy()
    return (batch.dense, torch.from_numpy(np.ascontiguousarray(ids.reshape(f, n, width).transpose(1, 0, 2))),
            torch.from_numpy(np.ascontiguousarray(lengths.reshape(f, n).T)))


class ModelInputs:
    """Feature rows (columns or a frame) -> the padded tensors of one exported model (see ``inference.export``).

    ``features`` are the model's feature names (its ``<name>.json``); ``output`` is
    "probability" for a ranker, "embedding" for the query tower. ``digest`` is the SHA-256 of the
    interface and encoder files: two models encode rows alike exactly when their digests agree.
    """

    def __init__(self, encoder: FeatureEncoder, features: list[str], output: str, digest: str) -> None:
        self.encoder = encoder
        self.features = features
        self.output = output
        self.digest = digest

    @classmethod
    def load(cls, model_dir: Path, name: str) -> ModelInputs:
        """The inputs of model ``name`` in an `export_models` directory (``<name>.json`` and the encoder it names)."""
        interface_path = Path(model_dir) / f"{name}.json"
        if not interface_path.is_file():
            raise ValueError(f"{interface_path} does not exist; expected an exported model named {name!r}")
        interface = json.loads(interface_path.read_text())
        encoder_path = Path(model_dir) / interface["encoders"]
        digest = hashlib.sha256(interface_path.read_bytes() + encoder_path.read_bytes()).hexdigest()
        return cls(FeatureEncoder.load(encoder_path), interface["features"], interface["output"], digest)

    def __call__(self, rows: FeatureColumns | pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B feature rows -> dense (B, n) float32, ids (B, F, L) int64, lengths (B, F) int64."""
        return pad_batch(self.encoder.encode(rows, self.features))


def check_ranker_inputs(inputs: ModelInputs, name: str) -> None:
    """Raises ValueError unless ``inputs`` belong to a ranker (the query tower outputs embeddings)."""
    if inputs.output != "probability":
        raise ValueError(f"model {name!r} outputs {inputs.output!r}; a scorer needs a ranker (output 'probability')")


def candidate_rows(candidates: Candidates) -> FeatureColumns:
    """The hydrated feature columns of ``candidates``; ValueError when they were not hydrated."""
    if candidates.columns is None:
        raise ValueError("candidates.features is None; expected hydrated feature columns before scoring")
    return candidates.columns


class TorchScriptScorer:
    """Scores with the exported ranker ``<model_dir>/<name>.pt`` in this process."""

    def __init__(self, model_dir: Path, name: str) -> None:
        self.name = f"torchscript:{name}"
        self.inputs = ModelInputs.load(model_dir, name)
        check_ranker_inputs(self.inputs, name)
        self.model = torch.jit.load(str(Path(model_dir) / f"{name}.pt"), map_location="cpu")

    def __call__(self, query: Query, candidates: Candidates) -> np.ndarray:
        rows = candidate_rows(candidates)
        if len(rows) == 0:
            return np.zeros(0, np.float32)
        with torch.inference_mode():
            return self.model(*self.inputs(rows)).numpy().astype(np.float32, copy=False)  # (N,)


class FallbackScorer:
    """Asks each scorer in turn until one answers.

    A scorer that raises, or returns anything but (N,) scores, counts one in
    ``fallbacks[scorer.name]`` and the next scorer, if any, is asked; ``answered[scorer.name]``
    counts the requests each one scored. Timeouts are the scorers' own (e.g. a Triton client timeout).
    When every scorer fails, RuntimeError lists each one's error.
    """

    def __init__(self, scorers: list[Scorer]) -> None:
        if not scorers:
            raise ValueError("FallbackScorer got no scorers; expected at least one")
        self.name = "fallback(" + ", ".join(s.name for s in scorers) + ")"
        self.scorers = list(scorers)
        self.fallbacks: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self._lock = threading.Lock()  # Counter updates are read-modify-write

    def close(self) -> None:
        """Closes the scorers that hold a connection (a `TritonScorer`)."""
        for scorer in self.scorers:
            close = getattr(scorer, "close", None)
            if close is not None:
                close()

    def __call__(self, query: Query, candidates: Candidates) -> np.ndarray:
        errors = []
        for scorer in self.scorers:
            try:
                scores = np.asarray(scorer(query, candidates), dtype=np.float32)
                if scores.shape != (len(candidates),):
                    raise ValueError(f"returned scores of shape {scores.shape}; expected ({len(candidates)},)")
            except Exception as error:  # any failure of one scorer is the next one's turn
                log.warning("scorer %s failed, falling back: %s", scorer.name, error)
                errors.append(f"{scorer.name}: {type(error).__name__}: {error}")
                with self._lock:
                    self.fallbacks[scorer.name] += 1
                continue
            with self._lock:
                self.answered[scorer.name] += 1
            return scores
        raise RuntimeError(f"every scorer of {self.name} failed on {len(candidates)} candidates: " + "; ".join(errors))


class TorchScriptSpec(StageSpec):
    kind: Literal["torchscript"]
    model: str  # an exported ranker of the version, run in this process

    def build(self, version: ServingVersion, triton: str | None, triton_timeout_s: float) -> Scorer:
        return TorchScriptScorer(version.directory / "models", self.model)


class TritonSpec(StageSpec):
    kind: Literal["triton"]
    model: str  # a ranker of the version's Triton repository, or its Python-backend twin "<ranker>_py"

    def build(self, version: ServingVersion, triton: str | None, triton_timeout_s: float) -> Scorer:
        """The scorer on the Triton server at ``triton`` (gRPC "host:port"); one that cannot score
        now is built anyway and logged: the next scorer answers instead, each call a fallback."""
        from inference.triton.repository import PYTHON_SUFFIX  # tritonclient loads only for pipelines that use it
        from inference.triton.scorer import TritonScorer

        if triton is None:
            raise ValueError(f"scorer {{kind: triton, model: {self.model}}} needs `triton: host:port`")
        inputs = ModelInputs.load(version.directory / "models", self.model.removesuffix(PYTHON_SUFFIX))
        scorer = TritonScorer(triton, self.model, inputs, timeout_s=triton_timeout_s)
        problem = scorer.unserved()
        if problem is not None:
            log.warning("scorer %r cannot score now, so requests fall back: %s", scorer.name, problem)
        return scorer


SCORER_SPECS = (TorchScriptSpec, TritonSpec)
