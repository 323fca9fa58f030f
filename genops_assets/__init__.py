"""genops: the GenOps lifecycle of a tuned LLM as Dagster software-defined assets."""

__version__ = "0.1.0"
