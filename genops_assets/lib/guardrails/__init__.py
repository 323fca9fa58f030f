"""Guardrails: checks on what goes into and comes out of a served model (pure Python)."""
