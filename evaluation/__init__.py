"""Offline evaluation: click-through and retrieval metrics (see README.md)."""
