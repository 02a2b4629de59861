"""Pipeline stages: each module is a plain function from a config and input paths to output paths and metrics.

Nothing here imports Prefect. MLflow is reached only through the `Tracker` protocol in `stages.common`.
"""
