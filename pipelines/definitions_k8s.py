"""The definitions for a Kubernetes cluster where each step of a run gets its own pod (dagster-k8s's
k8s_job_executor): point the code location of deploy/helm/values.yaml at this module instead of pipelines.definitions.

The pipelines are the same; only the executor differs. Steps hand their values over through the data volume
(a ReadWriteMany claim mounted at the same path in every pod), and finetuned_checkpoint can in turn start its
training pod with GPUs through the spec's `compute: {launcher: k8s}`.
"""

from __future__ import annotations

from dagster_k8s import k8s_job_executor

from pipelines.definitions import build_definitions

defs = build_definitions(executor=k8s_job_executor)
