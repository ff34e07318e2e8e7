"""``python -m query_service``."""

from query_service.main import main

main()
