"""Triton Python-backend model: runs the TorchScript file ``model.pt`` of its version directory.

`inference.triton.repository` copies this file to ``<name>_py/<version>/model.py``; it runs inside
Triton's Python stub, not in recstack. With dynamic batching Triton hands `execute` all the
requests of a batch: their ids are padded to one width and they run as one forward pass, then
the output is split back per request. If the pass fails, every request of the batch gets the error.
"""

import json
from pathlib import Path

import fbgemm_gpu  # noqa: F401  registers the fbgemm ops that scripted torchrec modules call
import numpy as np
import torch
import triton_python_backend_utils as pb_utils

INPUTS = ("dense", "ids", "lengths")
WARM_UP_CALLS = 3

# Triton runs requests in parallel across instances; several OpenMP threads per instance on a
# busy CPU spin against each other (DeepFM on 200 rows: 1 ms with one thread, 200 ms with two
# on a loaded 2-core machine).
torch.set_num_threads(1)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        path = Path(args["model_repository"]) / args["model_version"] / "model.pt"
        self.model = torch.jit.load(str(path), map_location=self.device)
        config = json.loads(args["model_config"])
        self.output = config["output"][0]["name"]
        dims = {i["name"]: [int(d) for d in i["dims"]] for i in config["input"]}
        n_dense, n_sparse = dims["dense"][0], dims["lengths"][0]
        warm_up = (torch.zeros(1, n_dense), torch.zeros(1, n_sparse, 1, dtype=torch.long),
                   torch.ones(1, n_sparse, dtype=torch.long))
        with torch.inference_mode():
            for _ in range(WARM_UP_CALLS):  # TorchScript profiles, then optimises, its first calls
                self.model(*(x.to(self.device) for x in warm_up))

    def execute(self, requests: list) -> list:
        tensors = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in INPUTS] for r in requests]
        sizes = [dense.shape[0] for dense, _, _ in tensors]
        width = max(ids.shape[2] for _, ids, _ in tensors)
        dense = np.concatenate([t[0] for t in tensors])  # (B, n)
        ids = np.concatenate([np.pad(t[1], ((0, 0), (0, 0), (0, width - t[1].shape[2]))) for t in tensors])  # (B, F, L)
        lengths = np.concatenate([t[2] for t in tensors])  # (B, F)
        try:
            with torch.inference_mode():
                out = self.model(*(torch.from_numpy(x).to(self.device) for x in (dense, ids, lengths)))
            out = out.cpu().numpy()  # (B,) probabilities or (B, D) embeddings
        except Exception as error:
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(error).__name__}: {error}"))
                    for _ in requests]
        parts = np.split(out, np.cumsum(sizes)[:-1])
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.output, part)]) for part in parts]
