"""TritonScorer: scores through Triton (gRPC, concurrently, and HTTP) equal in-process TorchScript,
and every failure is a TritonScoringError naming the server and the model; the query tower serves
the same embeddings as in process."""

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from data.dataset import read_dataset
from inference.pipeline.scorers import ModelInputs, TorchScriptScorer
from inference.triton.scorer import TritonScorer, TritonScoringError

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(models_dir, scoring_requests) -> list[np.ndarray]:
    scorer = TorchScriptScorer(models_dir, "deepfm")
    return [scorer(q, c) for q, c in scoring_requests]


@pytest.fixture(scope="module")
def inputs(models_dir) -> ModelInputs:
    return ModelInputs.load(models_dir, "deepfm")


def test_concurrent_grpc_scores_equal_torchscript_on_1000_requests(triton, inputs, scoring_requests, reference):
    scorer = TritonScorer(triton.grpc_url, "deepfm_py", inputs, "grpc", timeout_s=30.0)
    with ThreadPoolExecutor(32) as pool:  # 32 requests in flight: Triton batches them
        got = list(pool.map(lambda request: scorer.infer(*request), scoring_requests))
    for (_, candidates), result, expected in zip(scoring_requests, got, reference, strict=True):
        assert result.scores.dtype == np.float32 and result.scores.shape == (len(candidates),)
        np.testing.assert_allclose(result.scores, expected, atol=TOLERANCE, rtol=0)
        assert result.model_version == "1"
    stats = grpcclient.InferenceServerClient(triton.grpc_url).get_inference_statistics("deepfm_py", as_json=True)
    stats = stats["model_stats"][0]
    assert int(stats["execution_count"]) < int(stats["inference_stats"]["success"]["count"])  # some were batched


def test_http_scores_equal_torchscript_on_1000_requests(triton, inputs, scoring_requests, reference):
    scorer = TritonScorer(triton.http_url, "deepfm_py", inputs, "http", timeout_s=30.0)
    for (query, candidates), expected in zip(scoring_requests, reference, strict=True):
        np.testing.assert_allclose(scorer(query, candidates), expected, atol=TOLERANCE, rtol=0)


def test_scores_follow_the_candidates_order(triton, inputs, scoring_requests):
    scorer = TritonScorer(triton.grpc_url, "deepfm_py", inputs)
    query, candidates = max(scoring_requests, key=lambda r: len(r[1]))
    order = np.random.default_rng(1).permutation(len(candidates))
    np.testing.assert_allclose(scorer(query, candidates.take(order)), scorer(query, candidates)[order], atol=TOLERANCE)
    assert scorer(query, candidates.take(np.zeros(len(candidates), bool))).shape == (0,)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_failures_name_the_server_and_the_model(protocol, triton, inputs, scoring_requests, free_port):
    query, candidates = scoring_requests[0]
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with pytest.raises(TritonScoringError, match=f"{protocol}://{url} model 'no_such_model'"):
        TritonScorer(url, "no_such_model", inputs, protocol)(query, candidates)
    down = f"localhost:{free_port()}"
    with pytest.raises(TritonScoringError, match=f"{protocol}://{down} model 'deepfm_py'"):
        TritonScorer(down, "deepfm_py", inputs, protocol)(query, candidates)


def test_a_paused_server_times_out(triton, inputs, scoring_requests):
    query, candidates = scoring_requests[0]
    scorers = [TritonScorer(triton.grpc_url, "deepfm_py", inputs, "grpc", timeout_s=0.3),
               TritonScorer(triton.http_url, "deepfm_py", inputs, "http", timeout_s=0.3)]
    os.kill(triton.process.pid, signal.SIGSTOP)
    try:
        for scorer in scorers:
            with pytest.raises(TritonScoringError, match="(?i)deadline|timed out"):
                scorer(query, candidates)
    finally:
        os.kill(triton.process.pid, signal.SIGCONT)
    for scorer in scorers:
        assert scorer(query, candidates).shape == (len(candidates),)


def test_bad_arguments_are_refused(models_dir, inputs):
    with pytest.raises(ValueError, match="'udp'"):
        TritonScorer("localhost:1", "deepfm_py", inputs, "udp")
    with pytest.raises(ValueError, match="timeout_s = 0"):
        TritonScorer("localhost:1", "deepfm_py", inputs, timeout_s=0)
    with pytest.raises(ValueError, match="'embedding'"):
        TritonScorer("localhost:1", "two_tower_py", ModelInputs.load(models_dir, "two_tower"))


def test_a_failing_forward_pass_answers_with_the_models_error(triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    arrays = {"dense": np.zeros((2, 2), np.float32), "ids": np.full((2, 7, 1), 10**9, np.int64),
              "lengths": np.ones((2, 7), np.int64)}  # ids far outside every embedding table
    inputs = []
    for name, array in arrays.items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), "FP32" if name == "dense" else "INT64"))
        inputs[-1].set_data_from_numpy(array)
    with pytest.raises(InferenceServerException, match="(?i)index"):
        client.infer("deepfm_py", inputs)


def test_the_query_tower_serves_embeddings_equal_to_torchscript(triton, models_dir, tiny_dataset):
    users = read_dataset(tiny_dataset, tables=("users",)).users.head(40)
    tensors = [t.numpy() for t in ModelInputs.load(models_dir, "two_tower")(users)]
    with torch.inference_mode():
        expected = torch.jit.load(str(models_dir / "two_tower.pt"))(*map(torch.from_numpy, tensors)).numpy()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    inputs = []
    for name, array in zip(("dense", "ids", "lengths"), tensors, strict=True):
        inputs.append(grpcclient.InferInput(name, list(array.shape), "FP32" if name == "dense" else "INT64"))
        inputs[-1].set_data_from_numpy(array)
    client.load_model("two_tower_py")  # explicit model control: the server starts without it
    try:
        got = client.infer("two_tower_py", inputs).as_numpy("embedding")
    finally:
        client.unload_model("two_tower_py")
    assert got.shape == expected.shape == (40, 16)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
