"""The pure library: no Dagster, no MLflow, no environment reads."""
