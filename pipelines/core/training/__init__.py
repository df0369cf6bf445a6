"""The training kernel every task shares, one module per concern: compute settings and the metrics sink (compute),
model surgery (model), the one builder of each library object (arguments), the best-epoch loop (loop), resumable
checkpoints (resume), the cost model (cost) and checkpoint folders with their manifests (checkpoints).

Training code never sees mlflow or Dagster: it reports through a `progress` callable and a metrics sink. This
package imports nothing itself, so that `pipelines.core.training.compute` can be imported without torch.
"""
