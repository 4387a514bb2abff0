"""Thin typer layer: parse arguments, build a config, call one pipeline, map errors to exit codes."""
