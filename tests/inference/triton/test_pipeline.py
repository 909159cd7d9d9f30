"""The request pipeline scoring on Triton: `{kind: triton}` scorers answer as in process, and a
server whose model was exported with other encoders is refused, so the pipeline falls back."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from inference.artifacts import ArtifactRoot
from inference.pipeline.config import PipelineConfig
from inference.pipeline.executor import build_pipeline
from inference.pipeline.scorers import ModelInputs
from inference.pipeline.types import Query
from inference.refresh.job import RefreshConfig, refresh
from inference.triton.scorer import TritonScorer, TritonScoringError
from inference.version import ServingVersion, open_version

EXAMPLE = Path(__file__).parents[3] / "configs" / "pipeline.yaml"
QUERIES = [Query(user_id=user, k=20) for user in range(1, 11)]

PYTHON_FIRST = [{"kind": "triton", "model": "deepfm_py"}, {"kind": "torchscript", "model": "deepfm"}]
TORCHSCRIPT_FIRST = [{"kind": "triton", "model": "deepfm"}, {"kind": "torchscript", "model": "deepfm"}]
IN_PROCESS = [{"kind": "torchscript", "model": "deepfm"}]


@pytest.fixture(scope="module")
def version(tiny_dataset, trained_runs, tmp_path_factory) -> ServingVersion:
    root = tmp_path_factory.mktemp("artifacts")
    refresh(tiny_dataset, trained_runs["two_tower"].parent, root, RefreshConfig(pools={"user_n": 20}))
    return open_version(ArtifactRoot(root).path("v0001"))


def config(**changes) -> PipelineConfig:
    raw = yaml.safe_load(EXAMPLE.read_text())
    for source in raw["sources"]:
        source["timeout_s"] = 5.0  # the example's tens of milliseconds are for an idle server, not a busy test machine
    return PipelineConfig.model_validate(raw | changes)


def answers(pipeline_config: PipelineConfig, version: ServingVersion) -> tuple[list, dict]:
    pipeline = build_pipeline(pipeline_config, version)
    try:
        return [pipeline(query) for query in QUERIES], dict(pipeline.stages.scorer.answered)
    finally:
        pipeline.close()


def test_a_triton_scorer_answers_as_the_ranker_in_process(triton, version):
    remote, used = answers(config(triton=triton.grpc_url, triton_timeout_s=5.0, scorer=PYTHON_FIRST),
                           version)
    local, _ = answers(config(scorer=IN_PROCESS), version)
    assert used == {"triton:deepfm_py": len(QUERIES)}
    for on_triton, in_process in zip(remote, local, strict=True):
        assert on_triton.item_ids.tolist() == in_process.item_ids.tolist()
        np.testing.assert_allclose(on_triton.scores, in_process.scores, atol=1e-5)


def test_a_model_exported_with_other_encoders_is_refused_and_the_pipeline_falls_back(triton, version, monkeypatch,
                                                                                    scoring_requests):
    load = ModelInputs.load

    def other_encoders(model_dir: Path, name: str) -> ModelInputs:
        inputs = load(model_dir, name)
        inputs.digest = "0" * 64  # as if this version's encoders differed from those the server's model has
        return inputs

    monkeypatch.setattr(ModelInputs, "load", other_encoders)
    inputs = ModelInputs.load(version.directory / "models", "deepfm")
    with pytest.raises(TritonScoringError, match=r"deepfm_py.*encodes rows with inputs '[0-9a-f]{64}', not this"):
        TritonScorer(triton.grpc_url, "deepfm_py", inputs, timeout_s=5.0).infer(*scoring_requests[0])
    _, used = answers(config(triton=triton.grpc_url, triton_timeout_s=5.0, scorer=PYTHON_FIRST),
                      version)
    assert used == {"torchscript:deepfm": len(QUERIES)}


def test_triton_scorers_need_the_server_named():
    with pytest.raises(ValueError, match=r"kind triton \['deepfm'\] run on Triton; expected `triton: host:port`"):
        config(scorer=TORCHSCRIPT_FIRST)



def test_closing_the_pipeline_closes_its_triton_channel(triton, version, scoring_requests):
    pipeline = build_pipeline(config(triton=triton.grpc_url, triton_timeout_s=5.0,
                                     scorer=PYTHON_FIRST), version)
    scorer = pipeline.stages.scorer.scorers[0]
    assert len(scorer.infer(*scoring_requests[0]).scores) == len(scoring_requests[0][1])
    pipeline.close()
    with pytest.raises(TritonScoringError, match="deepfm_py"):
        scorer.infer(*scoring_requests[0])


def test_a_model_the_server_does_not_serve_gets_a_warning_at_build_and_counted_fallbacks(triton, version, caplog):
    pipeline = build_pipeline(config(triton=triton.grpc_url, triton_timeout_s=5.0, scorer=TORCHSCRIPT_FIRST),
                              version)
    try:
        assert "scorer 'triton:deepfm' cannot score now" in caplog.text and "not loaded" in caplog.text
        pipeline(QUERIES[0])
        assert pipeline.stages.scorer.fallbacks == {"triton:deepfm": 1}
    finally:
        pipeline.close()
    served = build_pipeline(config(triton=triton.grpc_url, triton_timeout_s=5.0,
                                   scorer=PYTHON_FIRST), version)
    served.close()
    assert "'triton:deepfm_py' cannot score" not in caplog.text
