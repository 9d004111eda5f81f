"""Executors run a plan's stages against the cache: ``local`` (one machine) for now."""
