"""Deploying a trained nested adapter: export and merge a rank, GGUF, SVD order, per-layer allocation,
rank recommendation and model cards. Builds on core/ (and evaluation/ for results files)."""
