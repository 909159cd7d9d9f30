"""Rankers and the query tower served through NVIDIA Triton (see README.md).

`repository` writes the model repository, `server` runs the bundled ``tritonserver`` locally,
`scorer` is the pipeline's `TritonScorer`, and `python_model` is the Python-backend model file
copied into the repository.
"""
