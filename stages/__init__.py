"""Pipeline stages: each stage module (ingest, tokenizer, pretrain, sft, reward, ppo) exposes `Config` and
`run(cfg, inputs, out_dir, tracker)`, a plain function from a config and input paths to output paths and metrics.
The other modules hold what stages share (readers, cleaning, shard writing, corpus reading, HF trainer plumbing,
evaluation, reusing finished work).

Nothing here imports Prefect. MLflow is reached only through the `Tracker` protocol in `stages.common`.
"""
