"""Generated reference tasks (TASKS.md)."""
