"""The local server under faults: killed under load (requests fall back, then return to Triton after a
restart), a killed launcher (no orphan), a server that cannot start (its log in the error), and the
`serve` command."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from inference.artifacts import ArtifactRoot, checksum_files, verify_version
from inference.pipeline.scorers import FallbackScorer, ModelInputs, TorchScriptScorer
from inference.refresh.job import RefreshConfig, refresh
from inference.triton.repository import write_repository
from inference.triton.scorer import TritonScorer
from inference.triton.server import TritonServer

TOLERANCE = 1e-5


def test_killing_triton_under_load_falls_back_then_returns_to_triton(triton, models_dir, scoring_requests,
                                                                     steady_load, wait_until):
    triton_scorer = TritonScorer(triton.grpc_url, "deepfm_py", ModelInputs.load(models_dir, "deepfm"), timeout_s=0.5)
    in_process = TorchScriptScorer(models_dir, "deepfm")
    scorer = FallbackScorer([triton_scorer, in_process, TorchScriptScorer(models_dir, "linear")])
    requests = scoring_requests[:50]
    reference = [in_process(q, c) for q, c in requests]
    name = triton_scorer.name
    with steady_load(scorer, requests) as load:
        wait_until(lambda: scorer.answered[name] >= 20, 30, "Triton to answer")
        os.kill(triton.process.pid, signal.SIGKILL)
        wait_until(lambda: scorer.fallbacks[name] >= 10, 30, "requests to fall back")
        triton.stop()
        triton.start()
        restarted = scorer.answered[name]
        wait_until(lambda: scorer.answered[name] > restarted, 60, "Triton to answer after the restart")
        fallbacks, answered = scorer.fallbacks[name], scorer.answered[name]
        wait_until(lambda: scorer.answered[name] >= answered + 50, 60, "50 more answers from Triton")
        assert scorer.fallbacks[name] == fallbacks
    assert load.failures == []
    assert scorer.answered[in_process.name] >= 10 and scorer.fallbacks[in_process.name] == 0
    for index, scores in load.results:
        np.testing.assert_allclose(scores, reference[index], atol=TOLERANCE, rtol=0)


def test_killing_the_launcher_leaves_no_orphan(repository, free_port, processes, wait_until):
    launcher = textwrap.dedent(f"""
        import time
        from inference.triton.server import TritonServer
        server = TritonServer({str(repository)!r}, {free_port()}, {free_port()}, models=[])
        server.start()
        print(server.process.pid, server.log_path.parent, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    try:
        pid, workdir = parent.stdout.readline().split()
        pid = int(pid)
        assert [p[1:] for p in processes() if p[0] == pid] == [(parent.pid, pid, "tritonserver")]
    finally:
        parent.kill()
        parent.wait()
    wait_until(lambda: not [p for p in processes() if p[2] == pid], 10, f"tritonserver {pid} to exit")
    shutil.rmtree(workdir)  # the killed launcher could not remove its backend directory and log


def test_a_server_that_cannot_start_reports_its_log(repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = TritonServer(repository, http_port=port, grpc_port=port, models=[])
        with pytest.raises(RuntimeError, match=rf"(?s)exited with code .*log tail:.*{port}"):
            server.start(timeout_s=60)
    assert server.process is None and server.log_path is None


def test_bad_repositories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        TritonServer(tmp_path / "missing")
    with pytest.raises(ValueError, match="no Python-backend model"):
        TritonServer(tmp_path)
    (tmp_path / "a repo").mkdir()
    with pytest.raises(ValueError, match="'.*a repo' has characters outside"):
        TritonServer(tmp_path / "a repo", models=[])


def test_serve_command_serves_until_sigterm(models_dir, scoring_requests, tmp_path, free_port, processes,
                                            wait_until):
    linear = tmp_path / "linear"
    linear.mkdir()
    for name in ("linear.pt", "linear.json", "linear.encoders.json"):
        (linear / name).write_bytes((models_dir / name).read_bytes())
    write_repository(linear, tmp_path / "repo")
    http, grpc = free_port(), free_port()
    serve = subprocess.Popen([sys.executable, "-m", "recstack", "triton", "serve", "--repo", tmp_path / "repo",
                              "--http-port", str(http), "--grpc-port", str(grpc)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout.readline().startswith(f"serving linear_py from {tmp_path / 'repo'}")
        servers = [p for p in processes() if p[1] == serve.pid and p[3] == "tritonserver"]
        assert len(servers) == 1
        served = TritonScorer(f"127.0.0.1:{grpc}", "linear_py", ModelInputs.load(models_dir, "linear"))
        query, candidates = scoring_requests[0]
        expected = TorchScriptScorer(models_dir, "linear")(query, candidates)
        np.testing.assert_allclose(served(query, candidates), expected, atol=TOLERANCE, rtol=0)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0, serve.stderr.read()
    finally:
        serve.kill()
        serve.wait()
    wait_until(lambda: not [p for p in processes() if p[2] == servers[0][0]], 10, "the server to be gone")


def test_a_version_served_through_triton_still_verifies_and_can_be_rolled_back_to(tiny_dataset, trained_runs,
                                                                                  scoring_requests, models_dir,
                                                                                  tmp_path, free_port):
    root = tmp_path / "artifacts"
    config = RefreshConfig(rankers=["linear"], pools={"user_n": 20, "similar_k": 10, "similar_items": 50})
    refresh(tiny_dataset, trained_runs["two_tower"].parent, root, config)
    before = checksum_files(root / "v0001")
    with TritonServer(root / "v0001" / "triton", free_port(), free_port(), ["linear_py"], copy=True) as server:
        served = TritonScorer(server.grpc_url, "linear_py", ModelInputs.load(root / "v0001" / "models", "linear"))
        query, candidates = scoring_requests[0]
        assert served(query, candidates).shape == (len(candidates),)
        served.close()
    assert checksum_files(root / "v0001") == before  # no __pycache__, nothing else written
    verify_version(root / "v0001")
    refresh(tiny_dataset, trained_runs["two_tower"].parent, root, config, incremental=True)
    assert ArtifactRoot(root).rollback("v0001") == "v0001"
