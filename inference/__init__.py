"""After training: export, item index, online store, offline refresh, Triton, request pipeline (README.md)."""
