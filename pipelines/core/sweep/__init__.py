"""Sweeps: a hyperparameter search over a spec's training and task settings with Optuna, before the fine-tuning
that counts. record.py holds the record of a sweep and what it reports to; space.py what the spec needs to check a
`sweep:` section (the searched names, their values, the metric); run.py runs one.

Each trial trains the spec with its sampled settings (TPE sampler) on the train split and is scored by the best
per-epoch validation metric; the median pruner stops a trial whose metric after an epoch falls below the median
of earlier trials there. The test split is never read. Trials run in `sweep.parallel` worker processes that share
the study through its storage (an SQLite file of the instance, or the instance's PostgreSQL database) and the
machine's threads. Each trial is an MLflow child run of the sweep's run: its settings as params, its per-epoch
metrics, its duration and how it ended.
"""
