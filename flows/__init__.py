"""Orchestration: Prefect flows around the plain stage functions, MLflow tracking and lineage, configs, the CLI.

Public names: `flows.config.PipelineConfig` / `load_config`, `flows.stage_flow.STAGE_FLOWS` (stage name -> flow),
`flows.pipeline.pipeline_flow`, `flows.stage_runner.run_stage`, `flows.tracking.MlflowTracker`. Those modules
import the stage modules and Prefect; `flows.cli` imports them only inside the commands, so `llm-pipeline --help`
stays fast.
"""
