"""Subcommands this package adds to the `forcekit` CLI (see forcekit/cli.py)."""

from __future__ import annotations


def register(commands) -> None:
    """Nothing registered yet."""
