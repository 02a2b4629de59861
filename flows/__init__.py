"""Orchestration: Prefect flows around the plain stage functions, MLflow tracking and lineage, configs, the CLI.

Public names: `flows.config.PipelineConfig` / `load_config`, `flows.stages.STAGE_FLOWS` (stage name -> flow),
`flows.pipeline.pipeline_flow`, `flows.tracking.MlflowTracker`. Stage modules and Prefect are imported lazily so
`llm-pipeline --help` stays fast.
"""
