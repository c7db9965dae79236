"""ICE servers for browsers, with short-lived TURN credentials (coturn's `use-auth-secret` scheme).

username = "<unix expiry>:<name>", credential = base64(HMAC-SHA1(static-auth-secret, username)): coturn
checks the HMAC and the expiry itself, so no credential store is shared with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from .config import ServerSettings


def turn_credentials(secret: str, ttl_s: int, name: str = "avatar", now: float | None = None) -> tuple[str, str]:
    expiry = int((time.time() if now is None else now) + ttl_s)
    username = f"{expiry}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers(settings: ServerSettings, name: str = "avatar") -> list[dict]:
    servers: list[dict] = []
    if settings.stun_urls:
        servers.append({"urls": list(settings.stun_urls)})
    if settings.turn_urls and settings.turn_secret:
        username, credential = turn_credentials(settings.turn_secret, settings.turn_ttl_s, name)
        servers.append({"urls": list(settings.turn_urls), "username": username, "credential": credential})
    return servers
