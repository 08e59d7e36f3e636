"""Feast repo, online reads in the request path, training-set builder."""
