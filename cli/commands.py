"""Imports every command module so its @app.command functions register."""

from __future__ import annotations

import importlib

# Each module registers its commands on mcad_cache.cli.app.app when imported.
COMMAND_MODULES = (
    "data", "build", "inspect", "integrate", "distill", "evaluate", "demo", "study", "export", "search", "listing"
)  # fmt: skip

for _name in COMMAND_MODULES:
    importlib.import_module(f"mcad_cache.cli.{_name}")
