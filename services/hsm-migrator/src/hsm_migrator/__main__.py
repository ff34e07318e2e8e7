"""``python -m hsm_migrator``."""

from hsm_migrator.main import main

main()
