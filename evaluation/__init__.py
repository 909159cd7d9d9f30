"""Offline and online evaluation: metrics, off-policy estimates, A/B analysis, drift, shadow runs (see README.md)."""
