"""Offline evaluation: click-through and retrieval metrics, off-policy estimates (see README.md)."""
