"""Versions, manifests and publication: what a reader sees is always a complete, verified version."""

import json
import os
import time

import pytest

from inference import artifacts
from inference.artifacts import (
    ArtifactError,
    ArtifactRoot,
    LiveArtifacts,
    link_or_copy,
    read_manifest,
    verify_version,
    write_manifest,
)


def build(root: ArtifactRoot, content: str, publish: bool = True) -> str:
    with root.build() as (version, staging):
        (staging / "index").mkdir()
        (staging / "index" / "items.bin").write_text(content)
        (staging / "pools.json").write_text(json.dumps([content]))
        write_manifest(staging, {"version": version})
    if publish:
        root.publish(version)
    return version


def read_state(directory):
    return (directory / "index" / "items.bin").read_text()


def test_versions_publish_in_order_with_checksums(tmp_path):
    root = ArtifactRoot(tmp_path)
    assert root.current() is None and root.versions() == []
    assert [build(root, "a"), build(root, "b")] == ["v0001", "v0002"]
    assert root.current() == "v0002" and root.versions() == ["v0001", "v0002"]
    manifest = verify_version(root.path("v0002"))
    assert set(manifest["files"]) == {"index/items.bin", "pools.json"}
    assert manifest["files"]["index/items.bin"]["bytes"] == 1


def test_a_failed_build_leaves_nothing_and_the_published_version_stays(tmp_path):
    root = ArtifactRoot(tmp_path)
    build(root, "a")
    with pytest.raises(RuntimeError), root.build() as (_, staging):
        (staging / "half").write_text("x")
        raise RuntimeError("index build failed")
    with pytest.raises(ArtifactError, match="no manifest"), root.build() as (_, staging):
        (staging / "half").write_text("x")  # never wrote its manifest
    assert root.versions() == ["v0001"] and root.current() == "v0001"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".staging")] == []


def test_a_build_removes_staging_left_by_a_killed_one(tmp_path):
    root = ArtifactRoot(tmp_path)
    build(root, "a")
    (tmp_path / ".staging-v0002-99999").mkdir()
    assert build(root, "b") == "v0002"
    assert not (tmp_path / ".staging-v0002-99999").exists()


def test_two_builds_at_once_are_refused(tmp_path):
    root = ArtifactRoot(tmp_path)
    with root.build() as (_, staging):
        with pytest.raises(ArtifactError, match="another build"), root.build():
            pass
        write_manifest(staging, {})


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "add"])
def test_a_corrupt_version_is_refused_naming_the_file(damage, tmp_path):
    root = ArtifactRoot(tmp_path)
    build(root, "a")
    version = build(root, "bbbb", publish=False)
    target = root.path(version) / "index" / "items.bin"
    target.chmod(0o644)  # published files are read-only: this is someone overriding that
    if damage == "flip":
        target.write_text("bbbc")
    elif damage == "truncate":
        target.write_text("bb")
    elif damage == "delete":
        target.unlink()
    else:
        (root.path(version) / "stray.bin").write_text("x")
    with pytest.raises(ArtifactError, match="stray.bin" if damage == "add" else "index/items.bin"):
        root.publish(version)
    assert root.current() == "v0001"


def test_published_files_are_read_only_and_still_pruned(tmp_path):
    root = ArtifactRoot(tmp_path)
    first = root.path(build(root, "a"))
    assert all(not p.stat().st_mode & 0o222 for p in first.rglob("*") if p.is_file())
    build(root, "b")
    assert root.prune(keep=1) == ["v0001"] and not first.exists()


def test_a_failing_smoke_test_keeps_the_published_version(tmp_path):
    root = ArtifactRoot(tmp_path)
    build(root, "a")
    version = build(root, "b", publish=False)

    def smoke(directory):
        raise ValueError("smoke query returned no items")

    with pytest.raises(ValueError, match="smoke"):
        root.publish(version, smoke)
    assert root.current() == "v0001"


def test_rollback_and_prune(tmp_path):
    root = ArtifactRoot(tmp_path)
    for content in "abcd":
        build(root, content)
    assert root.rollback() == "v0003" and root.current() == "v0003"
    assert root.rollback("v0001") == "v0001"
    with pytest.raises(ArtifactError, match="no version older"):
        root.rollback()
    with pytest.raises(ArtifactError, match="v0009"):
        root.rollback("v0009")
    assert root.prune(keep=2) == ["v0002"]  # v0001 is published, so it stays
    assert root.versions() == ["v0001", "v0003", "v0004"]
    with pytest.raises(ValueError, match="keep = 0"):
        root.prune(0)


def test_prune_keeps_the_redis_base_of_a_kept_version_and_releases_before_deleting(tmp_path):
    root = ArtifactRoot(tmp_path)
    for base in (None, "v0001", "v0001", None, "v0004"):  # v0002 and v0003 read through v0001, v0005 through v0004
        with root.build() as (version, staging):
            write_manifest(staging, {"version": version, "redis_base": base})
        root.publish(version)
    released = []

    def release(version):
        if version == "v0001":
            raise ConnectionError("redis is down")
        released.append(version)

    with pytest.raises(ConnectionError):
        root.prune(keep=2, release=release)  # keeps v0004, v0005; v0003 goes before its base v0001
    assert released == ["v0003", "v0002"] and root.versions() == ["v0001", "v0004", "v0005"]
    assert root.prune(keep=2) == ["v0001"]  # the next prune deletes what the failed release kept
    assert root.prune(keep=1) == [] and root.versions() == ["v0004", "v0005"]  # v0005 reads through v0004


def test_hard_linked_files_verify_in_the_new_version(tmp_path):
    root = ArtifactRoot(tmp_path)
    build(root, "a")
    with root.build() as (version, staging):
        link_or_copy(root.path("v0001") / "index" / "items.bin", staging / "index" / "items.bin")
        write_manifest(staging, {})
    assert os.path.samefile(root.path("v0001") / "index" / "items.bin", root.path(version) / "index" / "items.bin")
    verify_version(root.path(version))


def test_live_artifacts_swap_only_to_versions_that_load(tmp_path):
    root = ArtifactRoot(tmp_path)
    with pytest.raises(ArtifactError, match="nothing to serve"):
        LiveArtifacts(tmp_path, read_state)
    build(root, "a")
    live = LiveArtifacts(tmp_path, read_state)
    assert (live.version, live.state) == ("v0001", "a")
    build(root, "b")
    assert live.refresh() and (live.version, live.state) == ("v0002", "b")

    # published behind the job's back, then corrupted on disk: refused, v0002 keeps serving
    version = build(root, "c")
    (root.path(version) / "index" / "items.bin").chmod(0o644)
    (root.path(version) / "index" / "items.bin").write_text("x")
    live.refresh()
    assert (live.version, live.state) == ("v0002", "b")
    assert "checksum mismatch in index/items.bin" in live.refused[version]

    def broken(directory):
        raise RuntimeError("smoke query failed")

    # a server starting now serves v0002, the newest version that works
    restarted = LiveArtifacts(tmp_path, read_state)
    assert restarted.version == "v0002" and "v0003" in restarted.refused

    live._load = broken
    build(root, "d")
    assert not live.refresh()
    assert live.version == "v0002" and "smoke query failed" in live.refused["v0004"]


def wait_for_version(live, version, timeout_s=5.0):
    """True once the poller serves ``version``."""
    deadline = time.monotonic() + timeout_s
    while live.version != version and time.monotonic() < deadline:
        time.sleep(0.01)
    return live.version == version


def test_live_artifacts_poll_in_the_background(tmp_path):
    root = ArtifactRoot(tmp_path)
    build(root, "a")
    live = LiveArtifacts(tmp_path, read_state, poll_s=0.02).start()
    try:
        build(root, "b")
        assert wait_for_version(live, "v0002") and live.state == "b"
    finally:
        live.stop()


def test_polling_survives_a_garbled_pointer(tmp_path):
    root = ArtifactRoot(tmp_path)
    build(root, "a")
    live = LiveArtifacts(tmp_path, read_state, poll_s=0.01).start()
    try:
        (tmp_path / "CURRENT").write_text("not a version\n")
        time.sleep(0.1)  # several polls fail, and are logged
        assert live._thread.is_alive() and live.state == "a"
        build(root, "b")  # publishing rewrites the pointer
        assert wait_for_version(live, "v0002") and live.state == "b"
    finally:
        live.stop()


def test_files_hard_linked_from_the_parent_keep_its_checksums_unhashed(tmp_path, monkeypatch):
    root = ArtifactRoot(tmp_path)
    parent = root.path(build(root, "a"))
    hashed = []
    sha256 = artifacts._sha256
    monkeypatch.setattr(artifacts, "_sha256", lambda path: hashed.append(path.name) or sha256(path))
    with root.build() as (version, staging):
        link_or_copy(parent / "index" / "items.bin", staging / "index" / "items.bin")
        (staging / "pools.json").write_text("[\"b\"]")
        manifest = write_manifest(staging, {"version": version}, parent)
    assert hashed == ["pools.json"]
    assert manifest["files"]["index/items.bin"] == read_manifest(parent)["files"]["index/items.bin"]
    hashed.clear()
    root.publish(version, trusted="v0001")
    assert hashed == ["pools.json"]
    hashed.clear()
    verify_version(root.path(version))  # what a server does: every file
    assert sorted(hashed) == ["items.bin", "pools.json"]
