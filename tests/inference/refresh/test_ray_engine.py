"""The refresh on a local Ray (`--engine ray`) against the local engine on the tiny dataset, full and
incremental; faults (an unreachable address, an actor dying mid-export, a SIGKILL of the driver)
publish nothing and the previous version keeps serving."""

import multiprocessing
import os
import time

import numpy as np
import pandas as pd
import pytest
import ray

from inference.artifacts import ArtifactRoot, verify_version
from inference.refresh import ray_engine
from inference.refresh.job import RefreshConfig, read_embeddings, refresh
from inference.store import read_lists
from inference.version import open_version

CONFIG = RefreshConfig(rankers=[], pools={"user_n": 20, "similar_k": 10, "similar_items": 50})  # no rankers: quicker
RAY = CONFIG.model_copy(update={"engine": "ray"})


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, logging_level="WARNING",
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def assert_same_versions(ray_dir, local_dir):
    ray_ids, ray_vectors = read_embeddings(ray_dir)
    local_ids, local_vectors = read_embeddings(local_dir)
    assert np.array_equal(np.sort(ray_ids), np.sort(local_ids))
    np.testing.assert_allclose(ray_vectors[np.argsort(ray_ids)], local_vectors[np.argsort(local_ids)], atol=1e-6)
    ray_lists, local_lists = (read_lists(d / "store").to_pandas() for d in (ray_dir, local_dir))
    pd.testing.assert_frame_equal(ray_lists.drop(columns="score"), local_lists.drop(columns="score"))
    np.testing.assert_allclose(ray_lists["score"], local_lists["score"], atol=1e-5)
    # vectors agree within 1e-6, not bit for bit (the actors' thread counts differ), and so do what is computed
    # from them: their shards, the index, and the scores of the lists that come from index searches
    from_vectors = ("embeddings/v", "index/", "store/lists/similar", "store/lists/user")
    ray_manifest, local_manifest = (verify_version(d) for d in (ray_dir, local_dir))
    deterministic = [p for p in local_manifest["files"] if not p.startswith(from_vectors)]
    assert {p: ray_manifest["files"].get(p) for p in deterministic} == {
        p: local_manifest["files"][p] for p in deterministic}
    assert set(ray_manifest["files"]) == set(local_manifest["files"])
    assert ray_manifest["catalogue"] == local_manifest["catalogue"]
    ray_index, local_index = ({k: v for k, v in m["index"].items() if k != "recall"}
                              for m in (ray_manifest, local_manifest))
    assert ray_index == local_index
    assert ray_manifest["index"]["recall"] == pytest.approx(local_manifest["index"]["recall"], abs=0.01)


def test_full_and_incremental_refreshes_on_ray_equal_the_local_engine(change_catalogue, ray_cluster, data_copy,
                                                                       models_dir, tmp_path):
    first = {}
    for engine, config in (("local", CONFIG), ("ray", RAY)):
        first[engine] = refresh(data_copy, models_dir, tmp_path / engine, config)
    assert_same_versions(ArtifactRoot(tmp_path / "ray").path("v0001"), ArtifactRoot(tmp_path / "local").path("v0001"))

    change_catalogue(data_copy, first["local"]["now"])
    for engine, config in (("local", CONFIG), ("ray", RAY)):
        manifest = refresh(data_copy, models_dir, tmp_path / engine, config, incremental=True)
        assert manifest["mode"] == "incremental" and manifest["catalogue"]["reembedded"] == 5
    assert_same_versions(ArtifactRoot(tmp_path / "ray").path("v0002"), ArtifactRoot(tmp_path / "local").path("v0002"))


def assert_previous_serves(root_dir, expected):
    root = ArtifactRoot(root_dir)
    assert root.current() == expected and root.versions()[-1] == expected
    verify_version(root.path(expected))
    open_version(root.path(expected))


def test_an_unreachable_ray_address_fails_fast_and_publishes_nothing(ray_cluster, tiny_dataset, models_dir, tmp_path,
                                                                       free_port):
    refresh(tiny_dataset, models_dir, tmp_path, CONFIG)
    for address in (f"127.0.0.1:{free_port()}", f"ray://127.0.0.1:{free_port()}"):
        started = time.monotonic()
        config = RAY.model_copy(update={"ray_address": address})
        with pytest.raises(ValueError, match=f"ray address '{address}': cannot connect"):
            refresh(tiny_dataset, models_dir, tmp_path, config, incremental=True)
        assert time.monotonic() - started < 5
    with pytest.raises(ValueError, match="expected host:port"):
        ray_engine.check_address("head")
    assert_previous_serves(tmp_path, "v0001")


def test_ray_workers_dying_mid_export_fail_the_refresh(change_catalogue, ray_cluster, data_copy, models_dir, tmp_path,
                                                       monkeypatch):
    refresh(data_copy, models_dir, tmp_path, CONFIG)
    change_catalogue(data_copy, 0)

    class DyingEmbedder(ray_engine.ItemTowerEmbedder):  # defined here: Ray ships it to the workers by value
        def __call__(self, batch):
            os._exit(1)

    monkeypatch.setattr(ray_engine, "ItemTowerEmbedder", DyingEmbedder)
    monkeypatch.setattr(ray_engine, "ACTOR_RESTARTS", 1)
    with pytest.raises(Exception, match="(?i)actor"):
        refresh(data_copy, models_dir, tmp_path, RAY, incremental=True)
    assert_previous_serves(tmp_path, "v0001")


def test_sigkill_of_the_driver_mid_refresh_keeps_the_previous_version(ray_cluster, data_copy, models_dir, tmp_path):
    # the driver is a fresh process that connects to the test's Ray, killed at points through its run;
    # spawned, not forked from a server started earlier, so that it inherits the token ray.init set
    fork = multiprocessing.get_context("spawn")
    root, config = tmp_path / "art", RAY.model_copy(update={"ray_address": ray_cluster})
    refresh(data_copy, models_dir, root, CONFIG)

    def run() -> multiprocessing.Process:
        process = fork.Process(target=refresh, args=(data_copy, models_dir, root, config), daemon=True)
        process.start()
        return process

    started = time.monotonic()
    run().join()
    whole = time.monotonic() - started
    assert ArtifactRoot(root).current() == "v0002"
    for fraction in (0.35, 0.7):
        process = run()
        time.sleep(fraction * whole)
        process.kill()  # SIGKILL
        process.join()
        current = ArtifactRoot(root).current()
        assert current in ("v0002", ArtifactRoot(root).versions()[-1])
        verify_version(ArtifactRoot(root).path(current))
        open_version(ArtifactRoot(root).path(current))
