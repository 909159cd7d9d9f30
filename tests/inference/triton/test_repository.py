"""The model repository: every config.pbtxt parses as Triton's ModelConfig and matches the exported
model's tensors (GPU and CPU kinds, dynamic batching on and off); versions stage atomically; the
`recstack triton export` command."""

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from inference.triton.repository import PYTHON_MODEL, RepositoryConfig, write_repository
from recstack.cli import main

EXPORTED = ("deepfm", "dlrm", "linear", "two_tower")


def parse(path) -> pb.ModelConfig:
    return text_format.Parse(path.read_text(), pb.ModelConfig())


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_every_config_is_a_valid_model_config_for_its_model(gpu, batching, models_dir, tmp_path):
    config = RepositoryConfig(gpu=gpu, dynamic_batching=batching)
    names = write_repository(models_dir, tmp_path / "repo", config)
    assert names == sorted(n + suffix for n in EXPORTED for suffix in ("", "_py"))
    for name in names:
        model = parse(tmp_path / "repo" / name / "config.pbtxt")
        base, python = name.removesuffix("_py"), name.endswith("_py")
        interface = json.loads((models_dir / f"{base}.json").read_text())
        n_sparse, n_dense = len(interface["sparse"]), len(interface["dense"])
        assert model.name == name and model.max_batch_size == config.max_batch_size
        assert (model.backend, model.platform) == (("python", "") if python else ("", "pytorch_libtorch"))
        assert model.version_policy.latest.num_versions == 1
        assert [(i.name, i.data_type, list(i.dims), i.allow_ragged_batch) for i in model.input] == [
            ("dense", pb.TYPE_FP32, [n_dense], False),
            ("ids", pb.TYPE_INT64, [n_sparse, -1], python),
            ("lengths", pb.TYPE_INT64, [n_sparse], False),
        ]
        (output,) = model.output
        if interface["output"] == "probability":
            assert (output.name, list(output.dims), output.HasField("reshape"), list(output.reshape.shape)) == (
                "probability", [1], True, [])
        else:
            assert (output.name, list(output.dims)) == ("embedding", [-1])
        assert output.data_type == pb.TYPE_FP32
        (group,) = model.instance_group
        kind = pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU
        assert (group.kind, group.count) == (kind, 1)
        assert model.HasField("dynamic_batching") == batching
        if batching:
            assert list(model.dynamic_batching.preferred_batch_size) == [4096, 8192]
            assert model.dynamic_batching.max_queue_delay_microseconds == 1000
        version = tmp_path / "repo" / name / "1"
        assert (version / "model.pt").read_bytes() == (models_dir / f"{base}.pt").read_bytes()
        assert (version / "model.py").exists() == python
        if python:
            assert (version / "model.py").read_text() == PYTHON_MODEL.read_text()


def test_parsing_catches_a_broken_config(models_dir, tmp_path):
    write_repository(models_dir, tmp_path / "repo")
    path = tmp_path / "repo" / "deepfm" / "config.pbtxt"
    path.write_text(path.read_text().replace("max_batch_size", "max_batch"))
    with pytest.raises(text_format.ParseError, match="max_batch"):
        parse(path)


def test_bad_inputs_are_refused(models_dir, tmp_path):
    with pytest.raises(ValueError, match="no exported models"):
        write_repository(tmp_path, tmp_path / "repo")
    (tmp_path / "repo").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        write_repository(models_dir, tmp_path / "repo")
    with pytest.raises(ValueError, match="instances >= 1"):
        RepositoryConfig(instances=0)
    with pytest.raises(ValueError, match=r"preferred_batch_sizes \[20000\]"):
        RepositoryConfig(preferred_batch_sizes=(20000,))


def test_export_command_writes_a_gpu_repository(models_dir, tmp_path, capsys):
    assert main(["triton", "export", "--models", str(models_dir), "--out", str(tmp_path / "repo"), "--gpu"]) == 0
    assert json.loads(capsys.readouterr().out) == sorted(n + s for n in EXPORTED for s in ("", "_py"))
    kinds = {parse(p).instance_group[0].kind for p in (tmp_path / "repo").glob("*/config.pbtxt")}
    assert kinds == {pb.ModelInstanceGroup.KIND_GPU}
    assert main(["triton", "export", "--models", str(models_dir), "--out", str(tmp_path / "repo")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["triton", "export", "--models", str(tmp_path / "none"), "--out", str(tmp_path / "other")]) == 2
