"""Helpers shared by the tests of every package (fixtures stay in the conftest files)."""
