"""Thin Dagster assets and checks built for a pipeline spec."""
