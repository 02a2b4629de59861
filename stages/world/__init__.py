"""The built-in world: a seeded synthetic corpus of stories and the task sets built from it (QA, harmful requests,
questions the story does not answer). It is one data source behind the task-data interface: only
`stages.data.builtin` imports it (tests/test_layout.py), so the pipeline runs on a user's data without it."""
