"""Embedding model, LightGBM ranker, training, evaluation, model registry."""
