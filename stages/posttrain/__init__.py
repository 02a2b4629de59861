"""Plumbing the post-training stages share: the transformers/TRL training loop set-up, scoring and held-out
metrics of chat models, alignment evaluation, and model cards."""
