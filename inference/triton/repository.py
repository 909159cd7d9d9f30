"""Exported models -> a Triton model repository (layout and tensors in README.md).

`write_repository` turns an `inference.export.export_models` directory into two models per
exported model: ``<name>`` runs ``model.pt`` on Triton's PyTorch backend (production, GPU or
CPU), ``<name>_py`` runs the same file from the Python backend (the only backend of the server
bundled with nvidia-pytriton). Each artefact version writes its own repository.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from inference.pipeline.scorers import ModelInputs

PYTHON_MODEL = Path(__file__).with_name("python_model.py")
PYTHON_SUFFIX = "_py"


@dataclass(frozen=True)
class RepositoryConfig:
    """How Triton runs each model.

    ``max_batch_size`` counts rows (candidates), not requests: one request of N candidates is a
    batch of N. With ``dynamic_batching`` Triton merges queued requests into batches of up to
    ``max_batch_size`` rows, waiting at most ``max_queue_delay_us`` for a preferred size.
    """

    gpu: bool = False
    instances: int = 1
    dynamic_batching: bool = True
    max_batch_size: int = 16384
    preferred_batch_sizes: tuple[int, ...] = (4096, 8192)
    max_queue_delay_us: int = 1000

    def __post_init__(self) -> None:
        if self.instances < 1 or self.max_batch_size < 1 or self.max_queue_delay_us < 0:
            raise ValueError(f"{self}: expected instances >= 1, max_batch_size >= 1 and max_queue_delay_us >= 0")
        wrong = [s for s in self.preferred_batch_sizes if not 1 <= s <= self.max_batch_size]
        if wrong:
            raise ValueError(f"preferred_batch_sizes {wrong} are outside [1, max_batch_size={self.max_batch_size}]")


INPUTS_DIGEST = "recstack_inputs_sha256"  # model parameter: `ModelInputs.digest` of the model's encoders


def model_config(name: str, interface: dict, config: RepositoryConfig, python: bool, digest: str) -> pb.ModelConfig:
    """The Triton config of one exported model (``interface`` is its ``<name>.json``, ``digest``
    the `ModelInputs.digest` of its encoders, kept as the parameter `INPUTS_DIGEST`).

    Inputs dense [n], ids [F, -1], lengths [F] behind the implicit batch dimension; a ranker
    outputs probability [1] (the model's (B,) reshaped), the query tower embedding [-1].
    """
    n_sparse, n_dense = len(interface["sparse"]), len(interface["dense"])
    ranker = interface["output"] == "probability"
    out = pb.ModelConfig(
        name=name,
        max_batch_size=config.max_batch_size,
        version_policy=pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=1)),
        input=[
            pb.ModelInput(name="dense", data_type=pb.TYPE_FP32, dims=[n_dense]),
            # the Python model pads every request's ids to one width, so requests of any width batch together
            pb.ModelInput(name="ids", data_type=pb.TYPE_INT64, dims=[n_sparse, -1], allow_ragged_batch=python),
            pb.ModelInput(name="lengths", data_type=pb.TYPE_INT64, dims=[n_sparse]),
        ],
        output=[
            pb.ModelOutput(name="probability", data_type=pb.TYPE_FP32, dims=[1], reshape=pb.ModelTensorReshape())
            if ranker else pb.ModelOutput(name="embedding", data_type=pb.TYPE_FP32, dims=[-1])
        ],
        instance_group=[pb.ModelInstanceGroup(
            count=config.instances,
            kind=pb.ModelInstanceGroup.KIND_GPU if config.gpu else pb.ModelInstanceGroup.KIND_CPU,
        )],
    )
    out.parameters[INPUTS_DIGEST].string_value = digest
    if python:
        out.backend = "python"
    else:
        out.platform = "pytorch_libtorch"
    if config.dynamic_batching:
        out.dynamic_batching.preferred_batch_size.extend(config.preferred_batch_sizes)
        out.dynamic_batching.max_queue_delay_microseconds = config.max_queue_delay_us
    return out


def write_repository(models_dir: Path, out: Path, config: RepositoryConfig = RepositoryConfig()) -> list[str]:
    """Writes ``<name>`` and ``<name>_py`` (version 1) for every model exported in ``models_dir``.

    ``out`` must not exist yet. Returns the model names written, sorted.
    """
    models_dir, out = Path(models_dir), Path(out)
    interfaces = {p.stem: json.loads(p.read_text()) for p in sorted(models_dir.glob("*.json"))
                  if p.with_suffix(".pt").is_file()}
    if not interfaces:
        raise ValueError(f"{models_dir}: no exported models (<name>.pt beside <name>.json); run export_models first")
    if out.exists():
        raise ValueError(f"{out} already exists; expected a new directory for the repository")
    names = []
    for name, interface in interfaces.items():
        for model, python in ((name, False), (name + PYTHON_SUFFIX, True)):
            (out / model).mkdir(parents=True)
            digest = ModelInputs.load(models_dir, name).digest
            config_text = text_format.MessageToString(model_config(model, interface, config, python, digest))
            (out / model / "config.pbtxt").write_text(config_text)
            _write_version(out / model / "1", models_dir / f"{name}.pt", python)
            names.append(model)
    return sorted(names)


def _write_version(directory: Path, scripted: Path, python: bool) -> None:
    directory.mkdir()
    shutil.copyfile(scripted, directory / "model.pt")
    if python:
        shutil.copyfile(PYTHON_MODEL, directory / "model.py")
