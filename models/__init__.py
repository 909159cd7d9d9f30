"""Plain torch models; importing the package itself loads no torch."""

RANKERS = ("deepfm", "dlrm", "linear")  # the rankers' names: `recstack train ranker --model`, training, refresh
