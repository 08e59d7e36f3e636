"""adloop: a real-time ad-targeting engine (collect -> predict -> act)."""

__version__ = "0.1.0"
