"""A private redis-server per test, on a free loopback port, always killed afterwards."""

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RedisServer:
    """A running server; ``process`` lets a test kill or pause it."""

    host: str
    port: int
    process: subprocess.Popen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function returning a loopback port nothing listens on."""
    return _free_port


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A redis-server without persistence, answering PING; killed (SIGKILL) when the test ends."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail("redis-server is not on PATH; install it with `apt-get install redis-server` (Debian/Ubuntu)")
    port = _free_port()
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    log = tmp_path / "redis.log"
    with log.open("w") as out:
        process = subprocess.Popen([*command, "--dir", str(tmp_path)], stdout=out, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(
            "127.0.0.1", port, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"redis-server exited with code {process.returncode}:\n{log.read_text()}")
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"redis-server on port {port} did not answer PING in {START_TIMEOUT_S} s")
                time.sleep(0.02)
        client.close()
        yield RedisServer("127.0.0.1", port, process)
    finally:
        process.kill()
        process.wait()
