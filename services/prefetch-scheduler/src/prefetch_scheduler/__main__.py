"""``python -m prefetch_scheduler``."""

from prefetch_scheduler.main import main

main()
