"""See README.md: this package is not built yet."""
