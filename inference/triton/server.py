"""A local Triton server: the ``tritonserver`` binary that nvidia-pytriton ships, on a model repository.

`TritonServer` starts it with the Python backend assembled for the running interpreter and
explicit model control, waits until it is ready, and stops it (SIGTERM, then SIGKILL). The server
runs in its own process group and is killed by the kernel when the thread that started it dies,
so it never outlives its parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytriton
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from inference.scratch import scratch_dir

TRITON = Path(pytriton.__file__).parent / "tritonserver"
SITE_PACKAGES = Path(pytriton.__file__).parents[1]
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
LOG_TAIL_CHARS = 4000
SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")


class TritonServer:
    """``tritonserver`` serving ``repo`` on loopback ports ``http_port`` and ``grpc_port``.

    ``models`` are loaded at start (None: every Python-backend model in ``repo``, the only
    backend the bundled server has); others can be loaded later through the repository API.
    With ``copy``, the server reads a copy of ``repo`` taken at start: the Python backend writes
    ``__pycache__`` beside each model it loads, and a repository inside a published artefact
    version must stay as its manifest's checksums say. Use as a context manager, or call `start`
    and `stop`; `start` may be called again after `stop` (or after the process died).
    """

    def __init__(self, repo: Path, http_port: int = 8000, grpc_port: int = 8001,
                 models: Sequence[str] | None = None, copy: bool = False) -> None:
        self.repo, self.copy = Path(repo).resolve(), copy
        if not self.repo.is_dir():
            raise ValueError(f"model repository {self.repo} is not a directory")
        if not SAFE_PATH.fullmatch(str(self.repo)):
            # the Python backend starts its stub through a shell, with the model path unquoted
            raise ValueError(f"model repository path {str(self.repo)!r} has characters outside {SAFE_PATH.pattern}; "
                             "expected a path without spaces or shell characters")
        self.http_port, self.grpc_port = http_port, grpc_port
        self.models = list(models) if models is not None else python_models(self.repo)
        if models is None and not self.models:
            raise ValueError(f"{self.repo} has no Python-backend model; expected a repository written by "
                             "write_repository (recstack triton export)")
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path | None:
        """The server's stdout and stderr while it runs; None when stopped."""
        return None if self._workdir is None else self._workdir / "tritonserver.log"

    def start(self, timeout_s: float = 120.0) -> None:
        """Starts the server and returns once it is ready; RuntimeError with its log tail if it is
        not ready within ``timeout_s`` (it is then stopped)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"tritonserver (pid {self.process.pid}) for {self.repo} is already running")
        self.stop()
        self._workdir = scratch_dir("recstack-triton-")
        repo = self.repo
        if self.copy:
            repo = shutil.copytree(self.repo, self._workdir / "repository")
        command = [
            str(TRITON / "bin" / "tritonserver"),
            f"--model-repository={repo}",
            f"--backend-directory={_python_backend(self._workdir / 'backends')}",
            "--model-control-mode=explicit", "--disable-auto-complete-config",
            *(f"--load-model={m}" for m in self.models),
            f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1", "--allow-metrics=false", "--exit-timeout-secs=5",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_environment(),
                                            start_new_session=True, preexec_fn=_die_with(os.getpid()))
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                reason = (f"exited with code {self.process.returncode}" if self.process.poll() is not None
                          else f"was not ready after {timeout_s:.0f} s")
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"tritonserver on {self.repo} (http {self.http_port}, grpc {self.grpc_port}) "
                                   f"{reason}; log tail:\n{tail}")
            time.sleep(0.1)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, SIGKILL after ``grace_s``, then SIGKILL to anything left in its process group
        (the Python backend's stubs); removes the log and backend directory."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            _kill_group(self.process.pid, grace_s)
            self.process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def log_tail(self) -> str:
        """The last few thousand characters of the server's log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-LOG_TAIL_CHARS:].decode(errors="replace")

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False


def python_models(repo: Path) -> list[str]:
    """The models of ``repo`` whose config.pbtxt names the Python backend, sorted."""
    configs = sorted(Path(repo).glob("*/config.pbtxt"))
    return [c.parent.name for c in configs
            if text_format.Parse(c.read_text(), pb.ModelConfig()).backend == "python"]


def _kill_group(pgid: int, timeout_s: float) -> None:
    """SIGKILL to every process left in group ``pgid``; returns once none is left (or after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(ProcessLookupError):  # raised once the group is empty
        os.killpg(pgid, signal.SIGKILL)
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.02)


def _python_backend(directory: Path) -> Path:
    """A backend directory holding Triton's Python backend and the stub for this interpreter."""
    python = directory / "python"
    python.mkdir(parents=True)
    backend = TRITON / "backends" / "python"
    stub = TRITON / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    for source in (backend / "libtriton_python.so", backend / "triton_python_backend_utils.py",
                   stub / "triton_python_backend_stub"):
        if not source.is_file():
            raise RuntimeError(f"{source} is missing; expected nvidia-pytriton's Triton build for Python "
                               f"{sys.version_info.major}.{sys.version_info.minor}")
        (python / source.name).symlink_to(source)
    return directory


def _environment() -> dict[str, str]:
    """The stub links libpython: this interpreter's LIBDIR comes first, then pytriton's own libraries;
    the stub runs models with the ``python`` first on PATH, so this interpreter's bin comes first."""
    env = dict(os.environ)
    libraries = [sysconfig.get_config_var("LIBDIR"), str(SITE_PACKAGES / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _die_with(parent: int):
    """A ``preexec_fn``: the child gets SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), and
    exits at once if the parent already died between fork and exec."""

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0 or os.getppid() != parent:
            os._exit(127)

    return preexec
