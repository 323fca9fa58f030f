"""Pure Python core of genops: no Dagster imports, heavy ML imports only inside functions."""
