"""Offline refresh: candidate pools, static rules, versioned artefacts and their atomic publish."""
