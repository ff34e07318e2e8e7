"""Scheduled maintenance tasks (retention cleanup, integrity verification,
orphan cleanup), run once across replicas: :func:`run_task_scheduler`."""
