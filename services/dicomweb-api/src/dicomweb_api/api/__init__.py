"""The management REST API under ``/api/v1``."""
