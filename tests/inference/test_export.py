"""Export: TorchScript behind the padded interface equals the eager model on the same rows, and item
embedding shards written by Lightning predict equal the item tower's output."""

import json

import numpy as np
import pytest
import torch

from data.dataset import read_dataset, read_part
from data.encoders import join_features
from inference.export import export_item_embeddings, export_models, load_run, read_item_embeddings
from inference.pipeline.scorers import pad_batch


@pytest.fixture(scope="module")
def exported(trained_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    return out, export_models(trained_runs, out)


def test_pad_batch_keeps_every_id_in_place(trained_runs, tiny_dataset):
    trained = load_run(trained_runs["two_tower"])
    rows = read_dataset(tiny_dataset, tables=("items",)).items.head(7)
    batch = trained.encoder.encode(rows, ["item_id", "category", "price"])
    dense, ids, lengths = pad_batch(batch)
    assert ids.shape[:2] == (7, len(batch.sparse.keys())) and lengths.shape == (7, len(batch.sparse.keys()))
    for f, key in enumerate(batch.sparse.keys()):
        jagged = batch.sparse[key]
        for b, row in enumerate(jagged.to_dense()):
            assert lengths[b, f] == len(row)
            assert ids[b, f, : len(row)].tolist() == row.tolist()
            assert (ids[b, f, len(row):] == 0).all()
    assert torch.equal(dense, batch.dense)


@pytest.mark.parametrize("name", ["deepfm", "dlrm", "linear"])
def test_scripted_ranker_equals_eager_probabilities(name, exported, trained_runs, tiny_dataset):
    out, interfaces = exported
    trained = load_run(trained_runs[name])
    ds = read_dataset(tiny_dataset, tables=("users", "items"))
    rows = join_features(read_part(tiny_dataset, "test").head(300), ds.users, ds.items)
    batch = trained.encoder.encode(rows, interfaces[name]["features"])
    scripted = torch.jit.load(str(out / f"{name}.pt"))
    with torch.no_grad():
        eager = trained.module(batch)
        assert torch.allclose(scripted(*pad_batch(batch)), eager, atol=1e-6)
    assert interfaces[name]["output"] == "probability"
    assert json.loads((out / f"{name}.json").read_text()) == interfaces[name]


def test_scripted_query_tower_equals_eager(exported, trained_runs, tiny_dataset):
    out, interfaces = exported
    trained = load_run(trained_runs["two_tower"])
    users = read_dataset(tiny_dataset, tables=("users",)).users.head(50).assign(recent_items=[[1, 2, 3]] * 50)
    batch = trained.encoder.encode(users, interfaces["two_tower"]["features"])
    with torch.no_grad():
        eager = trained.module(batch)
        scripted = torch.jit.load(str(out / "two_tower.pt"))(*pad_batch(batch))
    assert scripted.shape == (50, 16) and torch.allclose(scripted, eager, atol=1e-6)


@pytest.mark.parametrize("devices", [1, 2])
def test_item_embedding_shards_equal_the_item_tower(devices, trained_runs, tiny_dataset, tmp_path):
    trained = load_run(trained_runs["two_tower"])
    items = read_dataset(tiny_dataset, tables=("items",)).items
    export_item_embeddings(trained, items, tmp_path, batch_size=64, devices=devices)
    shards = sorted(p.name for p in tmp_path.glob("part-*.parquet"))
    assert len(shards) == devices * -(-len(items) // (64 * devices))
    assert {name.split("-")[1] for name in shards} == {f"{rank:03d}" for rank in range(devices)}
    ids, vectors, version = read_item_embeddings(tmp_path)
    assert sorted(ids) == sorted(items["item_id"]) and version == trained.version
    order = np.argsort(ids)
    with torch.no_grad():
        expected = trained.module.embed_items(trained.encoder.encode(items.sort_values("item_id"),
                                                                     trained.features["items"]))
    np.testing.assert_allclose(vectors[order], expected.numpy(), atol=1e-6)


def test_export_refuses_unfinished_runs_and_wrong_tasks(trained_runs, tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="best.ckpt"):
        load_run(tmp_path)
    items = read_dataset(tiny_dataset, tables=("items",)).items
    with pytest.raises(ValueError, match="ranker run"):
        export_item_embeddings(load_run(trained_runs["deepfm"]), items, tmp_path)
