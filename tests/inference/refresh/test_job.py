"""The refresh job on the tiny dataset: a full version that serves, rules everywhere, incremental
refresh against a full rebuild, cadence, and faults (a failure at each step, SIGKILL at random
points, corrupt files): the published version is always a complete one that loads."""

import multiprocessing
import os
import random
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import redis
import torch

from data.dataset import read_dataset
from inference import store
from inference.artifacts import ArtifactRoot, LiveArtifacts, verify_version
from inference.refresh import job
from inference.refresh.job import RefreshConfig, load_refresh_config, read_embeddings, refresh
from inference.store import EmbeddedStore, RedisStore, StoreUnavailable, read_lists, redis_address
from inference.version import open_version

CONFIG = RefreshConfig(pools={"user_n": 20, "similar_k": 10, "similar_items": 50})


def positives(data_dir):
    rows = read_dataset(data_dir, tables=("interactions",)).interactions
    return rows[rows["label"] > 0]


def lists_of(version_dir):
    return read_lists(version_dir / "store").to_pandas().astype({"list": str})


def test_full_refresh_publishes_a_version_that_serves(tiny_dataset, models_dir, tmp_path):
    manifest = refresh(tiny_dataset, models_dir, tmp_path, CONFIG)
    root = ArtifactRoot(tmp_path)
    assert root.current() == "v0001" and manifest["mode"] == "full"
    assert verify_version(root.path("v0001"))["files"] == manifest["files"]
    served = open_version(root.path("v0001"))
    items = read_dataset(tiny_dataset, tables=("items",)).items
    live = items[(items["removed_at"] < 0) | (items["removed_at"] > manifest["now"])]
    assert len(served.index) == len(live) == manifest["catalogue"]["items"]
    assert manifest["index"]["recall"]["recall@10"] == 1.0  # flat at this size
    lists = lists_of(root.path("v0001"))
    kinds = set(lists["list"].str.partition(":")[0])
    assert {"popular", "trending", "new", "similar", "user"} <= kinds
    assert set(lists["item_id"]) <= set(live["item_id"])  # removed items are in no list

    # user lists hold n unseen items each
    user_lists = lists[lists["list"].str.startswith("user:")]
    seen = positives(tiny_dataset)
    seen_pairs = set(zip("user:" + seen["user_id"].astype(str), seen["item_id"], strict=True))
    assert not any((name, item) in seen_pairs for name, item in zip(user_lists["list"], user_lists["item_id"],
                                                                       strict=True))
    assert user_lists.groupby("list").size().eq(20).all()

    for model in ("deepfm", "dlrm", "linear", "query_tower"):  # the Triton repository, both backends
        assert (root.path("v0001") / "triton" / model / "config.pbtxt").is_file()
        assert (root.path("v0001") / "triton" / f"{model}_py" / "1" / "model.pt").is_file()

    # the published query tower and index answer a query
    tower = served.query_tower
    assert tower is not None and served.store.get_list("popular")[0].size > 0


def test_a_refresh_as_of_a_past_time_equals_one_of_the_rows_up_to_it(tiny_dataset, data_copy, models_dir, tmp_path):
    """`refresh(now=...)` ignores every later row: its lists (user lists' seen and latest items
    included) are those of the same dataset cut at that time."""
    rows = pd.read_parquet(tiny_dataset / "interactions.parquet")
    now = int(rows["timestamp"].quantile(0.6))
    rows[rows["timestamp"] <= now].to_parquet(data_copy / "interactions.parquet", index=False)
    refresh(tiny_dataset, models_dir, tmp_path / "past", CONFIG, now=now)
    refresh(data_copy, models_dir, tmp_path / "cut", CONFIG, now=now)
    past, cut = (lists_of(ArtifactRoot(tmp_path / name).path("v0001")) for name in ("past", "cut"))
    assert past["list"].str.startswith("user:").any()
    pd.testing.assert_frame_equal(past, cut)


def test_rules_remove_items_from_the_index_and_every_list(tiny_dataset, models_dir, tmp_path):
    config = CONFIG.model_copy(update={"rules": [{"name": "in_stock", "column": "available", "equals": True}]})
    refresh(tiny_dataset, models_dir, tmp_path, config)
    version = ArtifactRoot(tmp_path).path("v0001")
    items = read_dataset(tiny_dataset, tables=("items",)).items
    blocked = set(items.loc[~items["available"], "item_id"])
    assert blocked
    ids, _ = read_embeddings(version)
    assert not blocked & set(ids)
    assert not blocked & set(lists_of(version)["item_id"])


def test_incremental_refresh_equals_a_full_rebuild(change_catalogue, data_copy, models_dir, tmp_path):
    config = CONFIG.model_copy(update={"cadence_s": {"user": 1e9, "similar": 1e9}})
    first = refresh(data_copy, models_dir, tmp_path / "inc", config)
    changed, added, removed = change_catalogue(data_copy, first["now"])
    inc = refresh(data_copy, models_dir, tmp_path / "inc", config, incremental=True)
    full = refresh(data_copy, models_dir, tmp_path / "full", config)
    assert inc["mode"] == "incremental" and inc["parent"] == "v0001"
    assert inc["catalogue"]["reembedded"] == 5 and inc["catalogue"]["new"] == 2
    assert inc["catalogue"]["dropped"] == 2

    inc_dir, full_dir = ArtifactRoot(tmp_path / "inc").path("v0002"), ArtifactRoot(tmp_path / "full").path("v0001")
    inc_ids, inc_vectors = read_embeddings(inc_dir)
    full_ids, full_vectors = read_embeddings(full_dir)
    assert sorted(inc_ids) == sorted(full_ids) and added <= set(inc_ids) and not removed & set(inc_ids)
    np.testing.assert_allclose(inc_vectors[np.argsort(inc_ids)], full_vectors[np.argsort(full_ids)], atol=1e-6)

    # the same searches, and changed items' new vectors (the price feeds the item tower)
    old_ids, old_vectors = read_embeddings(ArtifactRoot(tmp_path / "inc").path("v0001"))
    changed_pos = np.isin(old_ids, list(changed))
    new_of_changed = inc_vectors[np.isin(inc_ids, list(changed))]
    assert not np.allclose(np.sort(old_vectors[changed_pos], axis=0), np.sort(new_of_changed, axis=0))
    inc_served, full_served = open_version(inc_dir), open_version(full_dir)
    queries = full_vectors[:50]
    assert np.array_equal(inc_served.index.search(queries, 20)[0], full_served.index.search(queries, 20)[0])
    assert inc["index"]["recall"] == pytest.approx(full["index"]["recall"], abs=0.01)

    # cadence: user and similar lists carried over (minus removed items), the rest rebuilt
    assert not inc["lists"]["user"]["rebuilt"] and inc["lists"]["popular"]["rebuilt"]
    assert inc["lists"]["user"]["built_at"] == first["lists"]["user"]["built_at"]
    assert not removed & set(lists_of(inc_dir)["item_id"])


def reprice(data_dir, amount):
    """Changes the price of three live items, which the item tower reads."""
    items = pd.read_parquet(data_dir / "items.parquet")
    items.loc[items.index[items["removed_at"] < 0][:3], "price"] += amount
    items.to_parquet(data_dir / "items.parquet", index=False)


def test_incremental_refreshes_layer_the_embeddings_then_compact_them(data_copy, models_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(job, "MAX_LAYERS", 2)
    config = CONFIG.model_copy(update={"cadence_s": {"user": 1e9, "similar": 1e9}})
    root = ArtifactRoot(tmp_path / "art")
    first = refresh(data_copy, models_dir, root.root, config)
    manifests = []
    for amount in (1, 2):
        reprice(data_copy, amount)
        manifests.append(refresh(data_copy, models_dir, root.root, config, incremental=True))
    v1, v2, v3 = (root.path(v) for v in ("v0001", "v0002", "v0003"))

    # the parent's layer hard-linked, the re-embedded items in a layer of their own
    assert [d.name for d in job.embedding_layers(v2)] == ["v0001", "v0002"]
    assert all(os.path.samefile(shard, v2 / "embeddings" / "v0001" / shard.name)
               for shard in (v1 / "embeddings" / "v0001").iterdir())
    assert manifests[0]["catalogue"]["stored"] == first["catalogue"]["items"] + 3
    # list kinds carried over with no item gone keep the parent's files
    assert os.path.samefile(v1 / "store" / "lists" / "user.parquet", v2 / "store" / "lists" / "user.parquet")
    assert not os.path.samefile(v1 / "store" / "lists" / "popular.parquet", v2 / "store" / "lists" / "popular.parquet")

    # at MAX_LAYERS the next version writes one layer again, equal to a full refresh's vectors
    assert [d.name for d in job.embedding_layers(v3)] == ["v0003"]
    assert manifests[1]["catalogue"]["stored"] == manifests[1]["catalogue"]["items"]
    refresh(data_copy, models_dir, tmp_path / "full", config)
    ids, vectors = read_embeddings(v3)
    full_ids, full_vectors = read_embeddings(ArtifactRoot(tmp_path / "full").path("v0001"))
    np.testing.assert_array_equal(np.sort(ids), np.sort(full_ids))
    np.testing.assert_allclose(vectors[np.argsort(ids)], full_vectors[np.argsort(full_ids)], atol=1e-6)


def test_changed_models_make_an_incremental_refresh_full(tiny_dataset, models_dir, tmp_path):
    models = shutil.copytree(models_dir, tmp_path / "models")
    refresh(tiny_dataset, models, tmp_path / "art", CONFIG)
    checkpoint = models / "deepfm" / "checkpoints" / "best.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    state["epoch"] += 1
    torch.save(state, checkpoint)
    assert refresh(tiny_dataset, models, tmp_path / "art", CONFIG, incremental=True)["mode"] == "full"


def test_changed_index_settings_make_an_incremental_refresh_full(tiny_dataset, models_dir, tmp_path):
    refresh(tiny_dataset, models_dir, tmp_path, CONFIG)
    hnsw = CONFIG.model_copy(update={"index": {"kind": "hnsw"}})
    manifest = refresh(tiny_dataset, models_dir, tmp_path, hnsw, incremental=True)
    assert manifest["mode"] == "full" and manifest["index"]["kind"] == "hnsw"
    assert refresh(tiny_dataset, models_dir, tmp_path, hnsw, incremental=True)["mode"] == "incremental"


def test_a_parent_without_a_recall_probe_gets_one(data_copy, models_dir, tmp_path):
    refresh(data_copy, models_dir, tmp_path, CONFIG)
    (ArtifactRoot(tmp_path).path("v0001") / "index" / "probe.npz").unlink()  # as a version from before probes
    reprice(data_copy, 1)
    manifest = refresh(data_copy, models_dir, tmp_path, CONFIG, incremental=True)
    assert manifest["mode"] == "incremental" and manifest["index"]["recall"]["recall@100"] == 1.0
    assert (ArtifactRoot(tmp_path).path("v0002") / "index" / "probe.npz").is_file()


STEPS = ["export_step", "embeddings_step", "index_step", "pools_step", "store_step", "publish_step"]


@pytest.mark.parametrize("step", STEPS)
def test_a_failure_at_each_step_keeps_the_previous_version(step, tiny_dataset, models_dir, tmp_path, monkeypatch):
    refresh(tiny_dataset, models_dir, tmp_path, CONFIG)
    original = getattr(job, step)

    def fail_midway(*args, **kwargs):
        if step != "publish_step":  # the step does its work, then the machine dies
            original(*args, **kwargs)
        raise OSError(f"disk full during {step}")

    monkeypatch.setattr(job, step, fail_midway)
    with pytest.raises(OSError, match=step):
        refresh(tiny_dataset, models_dir, tmp_path, CONFIG, incremental=True)
    assert_previous_serves(tmp_path, "v0001")
    monkeypatch.undo()
    refresh(tiny_dataset, models_dir, tmp_path, CONFIG, incremental=True)
    assert ArtifactRoot(tmp_path).current() != "v0001"


def assert_previous_serves(root_dir, expected=None):
    root = ArtifactRoot(root_dir)
    current = root.current()
    assert current is not None and (expected is None or current == expected)
    verify_version(root.path(current))
    open_version(root.path(current))
    assert not current.startswith(".staging")


def test_sigkill_at_random_points_never_publishes_a_partial_version(data_copy, models_dir, tmp_path):
    # children forked from a server that imported the job but ran nothing (forking this process,
    # whose torch thread pools are running, can deadlock): each run is all refresh work
    fork = multiprocessing.get_context("forkserver")
    fork.set_forkserver_preload(["inference.refresh.job"])
    root = tmp_path / "art"

    def run(incremental: bool) -> multiprocessing.Process:
        process = fork.Process(target=refresh, args=(data_copy, models_dir, root, CONFIG, incremental), daemon=True)
        process.start()
        return process

    run(False).join()  # starts the server
    whole = {}
    for incremental in (False, True):  # how long each kind takes, the incremental one re-embedding items
        reprice(data_copy, 1)
        started = time.monotonic()
        run(incremental).join()
        whole[incremental] = time.monotonic() - started
    assert ArtifactRoot(root).current() == "v0003"
    rng = random.Random(0)
    published = 0
    for attempt in range(20):  # full and incremental runs in turn, each killed at a random point
        incremental = attempt % 2 == 1
        reprice(data_copy, 1)
        before = ArtifactRoot(root).current()
        process = run(incremental)
        time.sleep(rng.uniform(0, 1.1) * whole[incremental])
        process.kill()  # SIGKILL
        process.join()
        after = ArtifactRoot(root).current()
        assert after in (before, ArtifactRoot(root).versions()[-1])
        assert_previous_serves(root)
        published += after != before
    assert published <= 15, f"{published} of 20 runs finished before their kill; the kills missed the work"


def test_corrupt_files_in_a_new_version_are_refused_and_the_old_keeps_serving(data_copy, models_dir, tmp_path):
    refresh(data_copy, models_dir, tmp_path / "art", CONFIG)
    live = LiveArtifacts(tmp_path / "art", open_version)
    for damaged in ("index/index.faiss", "embeddings/{version}/part-000-000000.parquet"):
        reprice(data_copy, 1)  # so the new version embeds items into a layer of its own
        manifest = refresh(data_copy, models_dir, tmp_path / "art", CONFIG, incremental=True)
        damaged = damaged.format(version=manifest["version"])
        path = ArtifactRoot(tmp_path / "art").path(manifest["version"]) / damaged
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.chmod(0o644)  # published files are read-only: this is someone overriding that
        path.write_bytes(bytes(data))
        assert not live.refresh()
        assert live.version == "v0001" and f"checksum mismatch in {damaged}" in live.refused[manifest["version"]]
        assert live.state.store.get_list("popular")[0].size > 0


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "refresh.yaml"
    path.write_text("pools: {user_n: 0}\n")
    with pytest.raises(ValueError, match="user_n"):
        load_refresh_config(path)
    path.write_text("cadence_s: {hourly: 5}\n")
    with pytest.raises(ValueError, match="hourly"):
        load_refresh_config(path)
    path.write_text("retension: 3\n")
    with pytest.raises(ValueError, match="retension"):
        load_refresh_config(path)


def assert_redis_answers_as_snapshots(server, root_dir, data_dir):
    """Each complete version under ``root_dir`` answers from Redis as from its embedded snapshot: every user
    and item of the dataset, every list of any version, and unknown ones."""
    users = [*pd.read_parquet(data_dir / "users.parquet")["user_id"], -1]
    items = np.append(pd.read_parquet(data_dir / "items.parquet")["item_id"].to_numpy(), [-1, 99_999])
    root = ArtifactRoot(root_dir)
    names = {"unknown", *(name for v in root.versions() for name in lists_of(root.path(v))["list"].unique())}
    for version in root.versions():
        embedded = EmbeddedStore.open(root.path(version) / "store", version)
        on_redis = RedisStore(server.host, server.port, version, timeout_s=2.0)
        assert all(on_redis.user_features(user) == embedded.user_features(user) for user in users)
        got, want = on_redis.item_features(items), embedded.item_features(items)
        np.testing.assert_array_equal(got.found, want.found)
        pd.testing.assert_frame_equal(got.features, want.features)
        for name in sorted(names):
            for a, b in zip(on_redis.get_list(name), embedded.get_list(name), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{version} {name}")
        on_redis.close()


def redis_versions(server) -> dict[str, int]:
    """The versions that have keys in Redis, with how many."""
    with redis.Redis(server.host, server.port) as client:
        keys = [key.decode().split(":")[1] for key in client.scan_iter(match="recstack:v*")]
    return {version: keys.count(version) for version in sorted(set(keys))}


def test_incremental_versions_load_into_redis_as_deltas_and_retention_keeps_their_base(
        change_catalogue, data_copy, models_dir, redis_server, tmp_path):
    config = CONFIG.model_copy(update={"redis": f"{redis_server.host}:{redis_server.port}", "retention": 2,
                                       "cadence_s": {"user": 1e9, "similar": 1e9}})
    first = refresh(data_copy, models_dir, tmp_path, config)
    assert first["redis_base"] is None
    change_catalogue(data_copy, first["now"])
    bases = [refresh(data_copy, models_dir, tmp_path, config, incremental=True)["redis_base"]]
    written = redis_versions(redis_server)["v0002"]
    reprice(data_copy, 5)
    bases += [refresh(data_copy, models_dir, tmp_path, config, incremental=True)["redis_base"] for _ in range(2)]
    assert bases == ["v0001"] * 3  # each delta reads through the full version, not through its parent
    keys = redis_versions(redis_server)
    assert max(written, keys["v0003"]) < keys["v0001"] / 5  # only what differs from v0001
    assert keys["v0004"] == keys["v0003"]  # v0004 changed nothing since v0003: the same keys differ from v0001
    # retention 2 keeps v0003, v0004 and their base v0001; v0002 left the disk and Redis
    assert ArtifactRoot(tmp_path).versions() == ["v0001", "v0003", "v0004"] == list(keys)
    assert_redis_answers_as_snapshots(redis_server, tmp_path, data_copy)

    assert refresh(data_copy, models_dir, tmp_path, config)["redis_base"] is None  # a full refresh: a new base
    assert ArtifactRoot(tmp_path).versions() == ["v0001", "v0004", "v0005"] == list(redis_versions(redis_server))
    assert refresh(data_copy, models_dir, tmp_path, config, incremental=True)["redis_base"] == "v0005"
    assert ArtifactRoot(tmp_path).versions() == ["v0005", "v0006"] == list(redis_versions(redis_server))
    assert_redis_answers_as_snapshots(redis_server, tmp_path, data_copy)


def test_redis_failing_during_a_load_publishes_nothing_and_the_previous_version_serves(
        data_copy, models_dir, redis_server, tmp_path, monkeypatch):
    address = f"{redis_server.host}:{redis_server.port}"
    config = CONFIG.model_copy(update={"redis": address})
    refresh(data_copy, models_dir, tmp_path, config)
    live = LiveArtifacts(tmp_path, lambda d: open_version(d, lambda v: RedisStore(*redis_address(address), v, 2.0)))
    reprice(data_copy, 5)
    write, writes = store._write, []

    def drop_after_the_first_write(*args):  # the connection drops midway through the load
        if writes:
            raise redis.ConnectionError("Connection reset by peer")
        writes.append(write(*args))

    monkeypatch.setattr(store, "_write", drop_after_the_first_write)
    with pytest.raises(StoreUnavailable, match=f"redis at {address} failed during load_snapshot_into_redis"):
        refresh(data_copy, models_dir, tmp_path, config, incremental=True)
    assert writes and redis_versions(redis_server)["v0002"]  # a partial load, never complete
    assert_previous_serves(tmp_path, "v0001")
    assert ArtifactRoot(tmp_path).versions() == ["v0001"] and not list(tmp_path.glob(".staging-*"))
    assert live.refresh() and live.version == "v0001"  # the published version, still serving
    assert live.state.store.get_list("popular")[0].size  # from Redis
    assert_redis_answers_as_snapshots(redis_server, tmp_path, data_copy)

    def die(*args):  # the server dies while the delta is being written
        redis_server.process.kill()
        redis_server.process.wait()
        write(*args)

    monkeypatch.setattr(store, "_write", die)
    with pytest.raises(StoreUnavailable, match=address):
        refresh(data_copy, models_dir, tmp_path, config, incremental=True)
    assert_previous_serves(tmp_path, "v0001")
    assert ArtifactRoot(tmp_path).versions() == ["v0001"] and live.version == "v0001"


def test_the_index_is_tuned_to_the_target_recall_unless_the_config_fixes_it(tiny_dataset, models_dir, tmp_path):
    # 200 items: flat by default, so ask for IVF with a narrow search
    narrow = {"kind": "ivf_flat", "nlist": 4, "nprobe": 1}
    tuned = refresh(tiny_dataset, models_dir, tmp_path / "tuned", CONFIG.model_copy(
        update={"index": {"kind": "ivf_flat", "nlist": 4}, "target_recall": 0.99}))
    assert tuned["index"]["recall"]["recall@100"] >= 0.99 and tuned["index"]["params"]["nprobe"] > 1
    fixed = refresh(tiny_dataset, models_dir, tmp_path / "fixed", CONFIG.model_copy(update={"index": narrow}))
    assert fixed["index"]["params"]["nprobe"] == 1
