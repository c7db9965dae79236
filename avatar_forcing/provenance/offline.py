"""Provenance for `avatar-forcing generate`: watermark the frames it writes and sign the mp4 (C2PA)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from avatar_forcing import __version__

# torch and the marker are imported when a run starts: the command line registers `generate` (and these
# arguments) without loading them.

log = logging.getLogger("avatar_forcing.provenance")


def add_provenance_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("provenance (EU AI Act art. 50: AI-generated video must be marked)")
    g.add_argument("--deployment-id", type=int, default=0, help="operator id carried by the watermark (0-65535)")
    g.add_argument("--no-watermark", action="store_true", help="do not watermark the frames (not advised)")
    g.add_argument("--visible-label", action="store_true", help="burn a small 'AI-generated' label into the video")
    g.add_argument("--no-c2pa", action="store_true", help="do not sign the mp4 with a C2PA manifest")
    g.add_argument("--c2pa-cert", type=Path, help="PEM certificate chain, leaf first (default: a local one)")
    g.add_argument("--c2pa-key", type=Path, help="PEM private key of --c2pa-cert")


class OfflineProvenance:
    """One generated file: its run id (whose hash the watermark carries), the marker, and the signing."""

    def __init__(self, args: argparse.Namespace, model_name: str):
        from .credentials import load_credentials
        from .marker import FrameMarker

        self.model_name = model_name
        # The watermark's session hash comes from the run's seed, so the same seed gives the same video.
        self.run_id = f"generate-seed-{args.seed}"
        self.marker = FrameMarker(args.deployment_id, watermark=not args.no_watermark,
                                  visible_label=args.visible_label)
        # Credentials first: a bad --c2pa-cert fails before minutes of generation, not after.
        self.credentials = None if args.no_c2pa else load_credentials(args.c2pa_cert, args.c2pa_key)
        if args.no_c2pa:
            log.warning("no C2PA manifest: the file will not say in signed metadata that it is AI-generated")

    def sign(self, path: Path) -> None:
        from .manifest import manifest_definition, sign_mp4

        if self.credentials is None:
            return
        watermark = None
        if self.marker.watermark:
            payload = self.marker.payload(self.run_id)
            watermark = {**payload.to_json(), "run_id": self.run_id}
        definition = manifest_definition(path.name, f"avatar-forcing/{self.model_name}", __version__, __version__,
                                         watermark)
        sign_mp4(path, self.credentials, definition)
        log.info("signed %s with a C2PA manifest (%s certificate); watermark payload %s", path,
                 "local" if self.credentials.local else "operator's", watermark)
