"""What the server tells clients about the nature of its output (EU AI Act art. 50 disclosure)."""

from __future__ import annotations

import hashlib

DISCLOSURE = ("The avatar's video and audio are AI-generated: a synthetic person rendered by the Avatar Forcing "
              "model, not a recording of a real one. Every frame carries an invisible watermark.")


def watermark_payload(settings, session_id: str) -> dict | None:
    """The payload this session's frames carry (as `provenance check` prints it), or None when the watermark
    is off. `settings` needs .watermark and .deployment_id (ServerSettings)."""
    if not settings.watermark:
        return None
    # Same as watermark.session_hash, kept import-light here (no torch/cv2 for the API's models).
    digest = int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=4).digest(), "big")
    return {"deployment_id": settings.deployment_id, "session_hash": f"{digest:08x}"}
