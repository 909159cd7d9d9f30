"""Triton fixtures: the exported tiny models, their repository, one server for the session (on free
loopback ports, checked to leave no process behind), random scoring requests, and helpers handed
to tests as fixtures (tests are imported with --import-mode=importlib, so not as a module)."""

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data.dataset import read_dataset
from inference.export import export_models
from inference.pipeline.types import Candidates, Query
from inference.triton.repository import write_repository
from inference.triton.server import TritonServer

SERVED = ["deepfm_py"]  # the session server loads only these; tests load others through the repository API


def _processes() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, command name) of every process, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            name = stat[stat.index("(") + 1: stat.rindex(")")]
            ppid, pgid = (int(x) for x in stat[stat.rindex(")") + 2:].split()[1:3])
            found.append((int(entry.name), ppid, pgid, name))
    return found


def _group_members(pgid: int) -> list[tuple[int, int, int, str]]:
    return [p for p in _processes() if p[2] == pgid]


def _wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Several OpenMP threads per call on a busy 2-core machine make each call far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def models_dir(trained_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported")
    export_models(trained_runs, out)
    return out


@pytest.fixture(scope="session")
def repository(models_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(models_dir, out)
    return out


@pytest.fixture(scope="session")
def triton(repository, free_port):
    """The session's server with ``SERVED`` loaded; afterwards neither it nor its stubs remain."""
    server = TritonServer(repository, free_port(), free_port(), models=SERVED)
    server.start()
    try:
        yield server
    finally:
        pid = server.process.pid if server.process is not None else None
        server.stop()
        assert not [p for p in _processes() if p[1] == os.getpid() and p[3] == "tritonserver"]
        if pid is not None:
            assert _group_members(pid) == []


@pytest.fixture(scope="session")
def scoring_requests(tiny_dataset) -> list[tuple[Query, Candidates]]:
    """1,000 requests: a random user and 1 to 60 distinct random items, hydrated with both rows' columns."""
    ds = read_dataset(tiny_dataset, tables=("users", "items"))
    users, items = ds.users.reset_index(drop=True), ds.items.reset_index(drop=True)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(1000):
        user = users.iloc[[rng.integers(len(users))]]
        chosen = items.iloc[rng.choice(len(items), size=rng.integers(1, 61), replace=False)].reset_index(drop=True)
        features = pd.concat([user.loc[user.index.repeat(len(chosen))].reset_index(drop=True), chosen], axis=1)
        query = Query(int(user["user_id"].iloc[0]))
        item_ids = chosen["item_id"].to_numpy(np.int64)
        out.append((query, Candidates(item_ids, np.full(len(chosen), "test"), np.zeros(len(chosen), np.float32),
                                      features)))
    return out


class _SteadyLoad:
    """``threads`` client threads calling ``score(query, candidates)`` over ``requests`` in turn until the
    block ends; ``results`` holds (request index, output) and ``failures`` every exception's text."""

    def __init__(self, score: Callable, requests: list, threads: int = 3) -> None:
        self.score, self.requests, self.threads = score, requests, threads
        self.results: list[tuple[int, object]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def _run(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            index = i % len(self.requests)
            try:
                self.results.append((index, self.score(*self.requests[index])))
            except Exception as error:
                self.failures.append(f"{type(error).__name__}: {error}")
            i += self.threads

    def __enter__(self) -> "_SteadyLoad":
        self._workers = [threading.Thread(target=self._run, args=(k,)) for k in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join()




@pytest.fixture
def processes() -> Callable[[], list[tuple[int, int, int, str]]]:
    """A function listing (pid, parent pid, process group, name) of every process."""
    return _processes


@pytest.fixture
def wait_until() -> Callable[[Callable[[], bool], float, str], None]:
    """``wait_until(condition, timeout_s, what)`` polls ``condition``; AssertionError naming ``what`` on timeout."""
    return _wait_until


@pytest.fixture
def steady_load() -> type[_SteadyLoad]:
    return _SteadyLoad
