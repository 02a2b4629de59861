"""Reading and writing data for the stages: corpus sources and shards, dataset files and their shapes, quality
filters and deduplication, truncation, and the task-data interface (`task_data`) the post-training stages read."""
