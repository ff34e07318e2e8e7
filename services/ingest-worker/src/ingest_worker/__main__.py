"""``python -m ingest_worker``."""

from ingest_worker.main import main

main()
