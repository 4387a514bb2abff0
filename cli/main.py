"""Console entry point ``mcad-cache``: the app plus one module per command, registered on import."""

from __future__ import annotations

from mcad_cache.cli import commands  # noqa: F401  (registers every command on the app)
from mcad_cache.cli.app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
