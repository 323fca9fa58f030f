"""Operator tooling: the ``genops`` command and the demos (not part of the code location)."""
from genops_assets.cli.home import DAGSTER_YAML, init_home
from genops_assets.cli.main import main

__all__ = ["DAGSTER_YAML", "init_home", "main"]
