"""Plain torch models; importing the package itself loads no torch."""

RANKERS = ("deepfm", "dlrm", "linear")  # `train ranker --model` choices, refresh's default runs
