#!/usr/bin/env python3
"""Docker HEALTHCHECK: exit 0 when GET /healthz answers 200, else 1 (standard library only, no curl).

The URL is http://127.0.0.1:$AVATAR_FORCING_PORT/healthz (port 8080 by default), or the first argument.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{os.environ.get('AVATAR_FORCING_PORT') or 8080}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # non-2xx answers raise HTTPError
            status = response.status
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
