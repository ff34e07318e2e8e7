"""Container health check: GET ``$PACS_HEALTHCHECK_URL`` and exit 0 on a 2xx answer.

The image's HEALTHCHECK runs this in every PACS container; compose sets the
URL per service (each service has its own HTTP port).  Standard library only:
it runs in the slim runtime image, and must not pull in the service's imports.
Exit codes follow Docker's convention: 0 healthy, 1 unhealthy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

URL_VARIABLE = "PACS_HEALTHCHECK_URL"
TIMEOUT_SECONDS = 3.0
HEALTHY = 0
UNHEALTHY = 1


def check(url: str, timeout: float = TIMEOUT_SECONDS) -> tuple[int, str]:
    """Exit code and a one-line reason for the answer of ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        return UNHEALTHY, f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return UNHEALTHY, f"{url}: {exc}"
    if 200 <= status < 300:
        return HEALTHY, f"{url}: HTTP {status}"
    return UNHEALTHY, f"{url}: HTTP {status}"


def main() -> int:
    url = os.environ.get(URL_VARIABLE, "").strip()
    if not url:
        print(f"{URL_VARIABLE} is not set: no health endpoint to check", file=sys.stderr)
        return UNHEALTHY
    code, reason = check(url)
    print(reason, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
