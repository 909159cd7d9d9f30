"""Versioned artefact directories, their manifests, and atomic publication.

    ROOT/
      CURRENT                 the published version's name, replaced atomically (os.replace)
      v0007/                  a complete version: manifest.json (lineage, checksums) and its files
      .staging-v0008-<pid>/   a version being built: never read, removed by the next build

A version directory appears under its final name only once it is complete and its manifest
is written, and CURRENT names it only after its checksums verify, so a crash at any point
leaves the previous version published. Versions are immutable (their files read-only): an
incremental build hard-links the files it does not change from its parent.

Servers read through `LiveArtifacts`, which loads a newly published version in the
background, smoke-tests it and only then swaps it in.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "CURRENT"
_VERSION = re.compile(r"^v(\d{4,})$")
T = TypeVar("T")


class ArtifactError(ValueError):
    """A version is missing, incomplete or does not match its manifest."""


def checksum_files(directory: Path, parent: Path | None = None) -> dict[str, dict]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``directory`` but the manifest.

    A file hard-linked from the same path in ``parent``, a complete version, keeps the entry of
    the parent's manifest unhashed: versions are immutable, so it is the file the parent verified.
    """
    directory = Path(directory)
    shared = _shared_entries(directory, parent)
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
                   and p.relative_to(directory).as_posix() not in shared)
    digests = _sha256_all(paths)
    return dict(sorted({**shared, **{p.relative_to(directory).as_posix(): {"sha256": d, "bytes": p.stat().st_size}
                                     for p, d in zip(paths, digests, strict=True)}}.items()))


def write_manifest(directory: Path, manifest: dict, parent: Path | None = None) -> dict:
    """Writes ``manifest`` plus the checksums of every file in ``directory`` (see `checksum_files`
    for files shared with ``parent``); returns what it wrote."""
    manifest = {**manifest, "files": checksum_files(directory, parent)}
    _write_durably(Path(directory) / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: no {MANIFEST}; the version is incomplete") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None


def verify_version(directory: Path, trusted: Path | None = None) -> dict:
    """The manifest of ``directory`` after checking every file against it; ArtifactError names the
    first file that is missing, extra, or whose size or sha256 differs.

    Files hard-linked from the same path in ``trusted``, a version verified before, are checked
    for size only. Servers (`LiveArtifacts`) pass no ``trusted`` and hash every file.
    """
    manifest = read_manifest(directory)
    expected = manifest.get("files", {})
    on_disk = {p.relative_to(directory).as_posix() for p in Path(directory).rglob("*") if p.is_file()} - {MANIFEST}
    for name in sorted(set(expected) | on_disk):
        if name not in on_disk:
            raise ArtifactError(f"{directory}: {name} is in the manifest but missing")
        if name not in expected:
            raise ArtifactError(f"{directory}: {name} is not in the manifest")
        if (Path(directory) / name).stat().st_size != expected[name]["bytes"]:
            raise ArtifactError(f"{directory}: {name} has {(Path(directory) / name).stat().st_size} bytes, "
                                f"expected {expected[name]['bytes']}; the file is truncated or corrupt")
    names = sorted(set(expected) - set(_shared_entries(Path(directory), trusted)))
    for name, digest in zip(names, _sha256_all([Path(directory) / n for n in names]), strict=True):
        if digest != expected[name]["sha256"]:
            raise ArtifactError(f"{directory}: checksum mismatch in {name}; the file is corrupt")
    return manifest


class ArtifactRoot:
    """The versions under one root directory, and the pointer to the published one."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self) -> list[str]:
        """Complete versions (those with a manifest), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if _VERSION.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=_number)

    def current(self) -> str | None:
        """The published version, or None before the first publication."""
        try:
            name = (self.root / POINTER).read_text().strip()
        except FileNotFoundError:
            return None
        if not _VERSION.match(name):
            raise ArtifactError(f"{self.root / POINTER} holds {name!r}; expected a version name like v0001")
        return name

    def path(self, version: str) -> Path:
        if not _VERSION.match(version) or not (self.root / version / MANIFEST).is_file():
            raise ArtifactError(f"{self.root}: no complete version {version!r}; versions are {self.versions()}")
        return self.root / version

    @contextmanager
    def build(self) -> Iterator[tuple[str, Path]]:
        """Yields (new version name, an empty staging directory) to fill; on a clean exit the
        directory becomes the version (not yet published); on an error it is removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ArtifactError(f"{self.root}: another build is running (it holds {lock.name})") from None
            for stale in self.root.glob(".staging-*"):  # left by a build that died
                shutil.rmtree(stale, ignore_errors=True)
            names = [p.name for p in self.root.iterdir() if _VERSION.match(p.name)]
            version = f"v{max(map(_number, names), default=0) + 1:04d}"
            staging = self.root / f".staging-{version}-{os.getpid()}"
            staging.mkdir()
            try:
                yield version, staging
                read_manifest(staging)  # a build writes its manifest last
                _make_read_only(staging)
                os.rename(staging, self.root / version)
                _fsync_directory(self.root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def publish(self, version: str, smoke: Callable[[Path], object] | None = None, trusted: str | None = None) -> None:
        """Points CURRENT at ``version`` once its checksums verify and ``smoke`` (a load and a
        test query) passes on it; otherwise raises and the published version stays. Files it
        shares with the ``trusted`` version (its parent, verified when published) are not rehashed."""
        directory = self.path(version)
        verify_version(directory, self.path(trusted) if trusted else None)
        if smoke is not None:
            smoke(directory)
        _write_durably(self.root / POINTER, version + "\n")
        log.info("published %s", directory)

    def rollback(self, version: str | None = None) -> str:
        """Publishes ``version``, or the newest complete version older than the current one."""
        if version is None:
            current, versions = self.current(), self.versions()
            older = [v for v in versions if current is None or _number(v) < _number(current)]
            if not older:
                raise ArtifactError(f"{self.root}: no version older than {current} to roll back to")
            version = older[-1]
        self.publish(version)
        return version

    def prune(self, keep: int, release: Callable[[str], object] | None = None) -> list[str]:
        """Deletes all but the newest ``keep`` versions; returns the deleted, newest first.

        It never deletes the published version, nor the version whose Redis keys a kept one reads
        through (its manifest's ``redis_base``). ``release(version)`` runs before each directory
        goes (e.g. to delete its Redis keys: newest first, a delta goes before its base); if it
        raises, that directory stays and the next prune tries again.
        """
        if keep < 1:
            raise ValueError(f"keep = {keep}; expected at least 1")
        versions, current = self.versions(), self.current()
        kept = {*versions[-keep:], *([current] if current else [])}
        kept |= {read_manifest(self.root / v).get("redis_base") for v in kept} - {None}
        doomed = [v for v in reversed(versions) if v not in kept]
        for version in doomed:
            if release is not None:
                release(version)
            shutil.rmtree(self.root / version)
        return doomed


class LiveArtifacts(Generic[T]):
    """What a server holds: the loaded published version, swapped for a newer one without a restart.

    ``load(directory)`` builds the serving state of a version and must raise if the version does
    not work (it should run a smoke query). A version that fails checksums or ``load`` is refused,
    logged and remembered in ``refused``; the loaded one keeps serving.
    """

    def __init__(self, root: Path, load: Callable[[Path], T], poll_s: float = 5.0) -> None:
        self.artifacts = ArtifactRoot(root)
        self.poll_s = poll_s
        self.refused: dict[str, str] = {}
        self._load = load
        self._lock = threading.Lock()
        self._state: tuple[str, T] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a server starting while the published version is broken serves the newest one that works
        for version in [self.artifacts.current(), *reversed(self.artifacts.versions())]:
            if version is not None and self._try(version):
                break
        else:
            raise ArtifactError(f"{root}: nothing to serve; published {self.artifacts.current()}, "
                                f"refused {self.refused}")

    @property
    def version(self) -> str:
        return self._state[0]

    @property
    def state(self) -> T:
        """The serving state of the loaded version; read it once per request."""
        return self._state[1]

    def refresh(self) -> bool:
        """Loads the published version if it is new and not refused; True when it is now serving."""
        version = self.artifacts.current()
        if version is None or version in self.refused:
            return False
        return (self._state is not None and self._state[0] == version) or self._try(version)

    def _try(self, version: str) -> bool:
        with self._lock:
            try:
                directory = self.artifacts.path(version)
                verify_version(directory)
                state = self._load(directory)
            except Exception as e:  # noqa: BLE001 -- any failure refuses the version, never the server
                self.refused[version] = f"{type(e).__name__}: {e}"
                log.error("refused artefact version %s: %s", version, self.refused[version])
                return False
            self._state = (version, state)  # one reference swap: a request sees old or new, never a mix
            log.info("serving artefact version %s", version)
            return True

    def start(self) -> LiveArtifacts[T]:
        """Polls for new versions every ``poll_s`` seconds in a background thread."""
        def poll() -> None:
            while not self._stop.wait(self.poll_s):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 -- e.g. a garbled CURRENT: keep serving, keep polling
                    log.exception("polling %s for a new version failed", self.artifacts.root)

        self._thread = threading.Thread(target=poll, name="artifact-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-links ``source`` (an immutable published file) to ``target``; copies across file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _shared_entries(directory: Path, parent: Path | None) -> dict[str, dict]:
    """The manifest entries of ``parent`` whose files ``directory`` holds as hard links at the same path."""
    if parent is None:
        return {}
    shared = {}
    for name, entry in read_manifest(parent).get("files", {}).items():
        try:
            if os.path.samefile(directory / name, parent / name):
                shared[name] = entry
        except FileNotFoundError:
            continue
    return shared


def _make_read_only(directory: Path) -> None:
    """Clears the write bits of every file under ``directory``: a published file may be hard-linked
    into later versions, so writing it in place would change them all."""
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(path.stat().st_mode & ~0o222)


def _number(version: str) -> int:
    return int(_VERSION.match(version).group(1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """Each file's sha256, hashed on every core (hashlib releases the GIL on large reads)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(_sha256, paths))


def _write_durably(path: Path, text: str) -> None:
    """Writes ``path`` through a temporary file and one rename, so readers see old or new, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
