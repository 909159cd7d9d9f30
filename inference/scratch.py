"""Scratch directories that a killed process does not leave behind.

A process killed by SIGKILL or the OOM killer cannot remove its scratch directory, and a
refresh's DuckDB spill can hold GiBs. `scratch_dir` names each directory after the machine and
the process that make it (``{prefix}{host}+{pid}-XXXXXXXX``), and first removes the directories
of that prefix whose process on this machine is gone.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path


def scratch_dir(prefix: str, parent: Path | None = None) -> Path:
    """A new directory under ``parent`` (the system's temporary directory when None; made if
    missing), after the stale ones of ``prefix`` there are removed."""
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for path in parent.glob(f"{prefix}*"):
        owner = _owner(path.name[len(prefix):], host)
        if owner is not None and not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{host}+{os.getpid()}-", dir=parent))


def _owner(name: str, host: str) -> int | None:
    """The pid in ``name`` (``{host}+{pid}-XXXXXXXX``) when it names this ``host``, else None."""
    owner, dash, _ = name.rpartition("-")  # mkdtemp's random part has no dash; a host name may
    made_on, plus, pid = owner.rpartition("+")
    return int(pid) if dash and plus and made_on == host and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
