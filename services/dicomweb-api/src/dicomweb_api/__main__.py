"""``python -m dicomweb_api``."""

from dicomweb_api.main import main

main()
