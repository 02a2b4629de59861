"""Pipeline stages: each stage module here (ingest, contamination, tokenizer, pretrain, sft, reward, ppo, evaluate)
exposes `Config` and `run(cfg, inputs, out_dir, tracker)`, a plain function from a config and input paths to output
paths and metrics. What they share lives in subpackages: `data` (sources, shards, dataset shapes, filters, the
task-data interface), `posttrain` (trainer plumbing, scoring, held-out metrics, model cards), `runtime` (Dask
fan-out, torchrun launch) and `world` (the built-in world, reached only through `data.builtin`).

Nothing here imports Prefect. MLflow is reached only through the `Tracker` protocol in `stages.common`. Whether a
stage runs at all is decided by the flow layer (flows.stage_runner); a stage only resumes its own partial work.
"""
