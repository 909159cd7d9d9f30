"""recstack: a multi-stage recommender stack. This package holds only the command line."""

__version__ = "0.1.0"
