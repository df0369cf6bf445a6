"""tuneline: declarative fine-tuning pipelines on Dagster."""
