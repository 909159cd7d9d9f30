"""`TritonScorer`: the Scorer contract over a Triton server (gRPC or HTTP, via tritonclient).

One request's candidates go out as one infer call, so one model version scores all of them;
the version that answered comes back with `infer`. Any failure (server down, timeout, model
missing or unloaded) raises `TritonScoringError` naming the server and the model, for a
`FallbackScorer` to catch. So does a served model that encodes rows differently from the
scorer's `ModelInputs` (another artefact version's vocabularies): its scores would be wrong, not
missing, so the scorer compares the served model's `INPUTS_DIGEST` parameter with its own
before its first call and every `RECHECK_S` seconds after (a server may load another
repository at any time).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from inference.pipeline.scorers import ModelInputs, candidate_rows, check_ranker_inputs
from inference.pipeline.types import Candidates, Query
from inference.triton.repository import INPUTS_DIGEST

PROTOCOLS = ("grpc", "http")
RECHECK_S = 10.0


class TritonScoringError(RuntimeError):
    """A Triton call failed; the message names the protocol, url and model."""


@dataclass(frozen=True)
class TritonScores:
    """(N,) float32 scores and the model version that computed all of them ("" for N = 0: no call)."""

    scores: np.ndarray
    model_version: str


class TritonScorer:
    """Scores with ranker ``model`` on the Triton server at ``url`` (host:port).

    ``inputs`` encode candidate rows for that ranker (``ModelInputs.load(models_dir, name)``).
    Each call waits at most ``timeout_s``. The gRPC client is one shared channel; the HTTP
    client is not thread-safe, so each thread keeps its own connection.
    """

    def __init__(self, url: str, model: str, inputs: ModelInputs, protocol: str = "grpc",
                 timeout_s: float = 1.0) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s = {timeout_s}; expected a positive number of seconds")
        check_ranker_inputs(inputs, model)
        self.name = f"triton:{model}"
        self.url, self.model, self.inputs, self.protocol, self.timeout_s = url, model, inputs, protocol, timeout_s
        self._grpc = grpcclient.InferenceServerClient(url) if protocol == "grpc" else None
        self._http = threading.local()
        self._checked_at = -RECHECK_S  # time.monotonic() of the last completed INPUTS_DIGEST check
        self._mismatch: str | None = None  # its outcome, raised until the next check

    def __call__(self, query: Query, candidates: Candidates) -> np.ndarray:
        return self.infer(query, candidates).scores

    def infer(self, query: Query, candidates: Candidates) -> TritonScores:
        """Scores and the version that answered; TritonScoringError when the call fails."""
        inputs, n = self._request(candidates)
        if n == 0:
            return TritonScores(np.zeros(0, np.float32), "")
        self._check_inputs()
        try:
            if self._grpc is not None:
                result = self._grpc.infer(self.model, inputs, client_timeout=self.timeout_s)
            else:
                result = self._http_client().infer(self.model, inputs)
        except Exception as error:  # connection refused, deadline, unknown model, ... all mean "fall back"
            raise self._error(error) from error
        return self._scores(result, n)

    def _request(self, candidates: Candidates) -> tuple[list, int]:
        """The infer inputs for ``candidates`` and their number N."""
        rows = candidate_rows(candidates)
        if len(rows) == 0:
            return [], 0
        client = grpcclient if self._grpc is not None else httpclient
        inputs = []
        for name, tensor in zip(("dense", "ids", "lengths"), self.inputs(rows), strict=True):
            array = tensor.numpy()
            inputs.append(client.InferInput(name, list(array.shape), "FP32" if name == "dense" else "INT64"))
            inputs[-1].set_data_from_numpy(array)
        return inputs, len(rows)

    def _scores(self, result, n: int) -> TritonScores:
        scores = result.as_numpy("probability")
        if scores is None or scores.size != n:
            raise self._error(f"returned {None if scores is None else scores.shape} probabilities for {n} candidates")
        response = result.get_response()
        version = response["model_version"] if isinstance(response, dict) else response.model_version
        return TritonScores(scores.reshape(n).astype(np.float32, copy=False), str(version))

    def unserved(self) -> str | None:
        """Why the server cannot score with ``model`` now (unreachable, or the model not loaded), or None."""
        try:
            if self._grpc is not None:
                ready = self._grpc.is_model_ready(self.model, client_timeout=self.timeout_s)
            else:
                ready = self._http_client().is_model_ready(self.model)
        except Exception as error:  # unreachable, or any other failure: the reason is the message
            return str(self._error(error))
        return None if ready else str(self._error("the model is not loaded on this server"))

    def close(self) -> None:
        """Closes the gRPC channel, or this thread's HTTP connection; later calls fail (TritonScoringError)."""
        if self._grpc is not None:
            self._grpc.close()
        client = getattr(self._http, "client", None)
        if client is not None:
            client.close()

    def _check_inputs(self) -> None:
        """Raises unless the served model encodes rows as ``inputs`` do (its `INPUTS_DIGEST`),
        asking the server at most every `RECHECK_S` seconds."""
        if time.monotonic() - self._checked_at >= RECHECK_S:
            self._mismatch = self._served_inputs_differ()
            self._checked_at = time.monotonic()
        if self._mismatch is not None:
            raise self._error(self._mismatch)

    def _served_inputs_differ(self) -> str | None:
        try:
            if self._grpc is not None:
                config = self._grpc.get_model_config(self.model, as_json=True, client_timeout=self.timeout_s)["config"]
            else:
                config = self._http_client().get_model_config(self.model)
        except Exception as error:
            raise self._error(error) from error
        served = config.get("parameters", {}).get(INPUTS_DIGEST, {}).get("string_value")
        if served == self.inputs.digest:
            return None
        return (f"the served model encodes rows with inputs {served!r}, not this scorer's {self.inputs.digest!r}: "
                "it was exported with other encoders (another artefact version)")

    def _http_client(self) -> httpclient.InferenceServerClient:
        client = getattr(self._http, "client", None)
        if client is None:
            client = httpclient.InferenceServerClient(self.url, connection_timeout=self.timeout_s,
                                                      network_timeout=self.timeout_s)
            self._http.client = client
        return client

    def _error(self, error: object) -> TritonScoringError:
        message = str(error).strip() or type(error).__name__
        return TritonScoringError(f"triton {self.protocol}://{self.url} model {self.model!r}: {message}")
