"""Subcommands of the `vosops` CLI (see vosops/cli.py)."""
