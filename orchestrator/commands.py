"""Sweep-level subcommands (validate, sweep, tables, refine, ui)."""

from __future__ import annotations


def add_sweep_commands(sub) -> None:
    """Register the sweep subcommands on the ``wsss`` parser."""
