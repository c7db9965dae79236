"""C2PA manifests: sign a generated mp4 (created by a trained algorithm, with the model's name and version)
and read one back with its validation state. Needs the `provenance` extra (c2pa-python); works offline (no
timestamp authority: the signature carries the signing time of this machine only)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from avatar_forcing.errors import UserError

from .credentials import Credentials

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
WATERMARK_ASSERTION = "org.avatar-forcing.watermark"


def _c2pa():
    try:
        import c2pa
    except ImportError:
        raise UserError("C2PA signing needs c2pa-python: pip install 'avatar-forcing-server[provenance]'") from None
    return c2pa


def manifest_definition(title: str, model_name: str, model_version: str, software_version: str,
                        watermark: dict | None) -> dict:
    assertions: list[dict] = [{
        "label": "c2pa.actions",
        "data": {"actions": [{
            "action": "c2pa.created",
            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
            "softwareAgent": {"name": model_name, "version": model_version},
            "description": "talking-head video generated from a portrait by the Avatar Forcing model",
        }]},
    }]
    if watermark is not None:  # where the invisible mark's payload can be matched against
        assertions.append({"label": WATERMARK_ASSERTION, "data": watermark})
    return {
        "claim_generator_info": [{"name": "avatar-forcing-server", "version": software_version}],
        "title": title,
        "format": "video/mp4",
        "assertions": assertions,
    }


def sign_mp4(path: Path, credentials: Credentials, definition: dict) -> None:
    """Embed a signed manifest into the mp4 at `path` (rewritten in place)."""
    c2pa = _c2pa()
    info = c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, credentials.chain_pem, credentials.key_pem, None)
    fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        with c2pa.Signer.from_info(info) as signer, c2pa.Builder(json.dumps(definition)) as builder, \
                open(path, "rb") as source, open(tmp, "w+b") as dest:
            builder.sign(signer, "video/mp4", source, dest)
        os.replace(tmp, path)
    except c2pa.C2paError as e:
        raise UserError(f"signing the C2PA manifest of {path} failed ({e}): check the certificate and key "
                        "(ES256, leaf first, with its CA)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_manifest(path: Path, trust_anchor_pem: bytes | None = None) -> dict:
    """The active manifest of a file and its validation state ('Invalid', 'Valid', or 'Trusted' when the
    signer chains to `trust_anchor_pem`), or {"present": False} when it has none."""
    c2pa = _c2pa()
    settings: dict = {"verify": {"verify_trust": trust_anchor_pem is not None}}
    if trust_anchor_pem is not None:
        settings["trust"] = {"trust_anchors": trust_anchor_pem.decode()}
    fmt = "video/mp4" if path.suffix.lower() in (".mp4", ".m4v", ".mov") else None
    try:
        with c2pa.Context.from_dict(settings) as context, open(path, "rb") as stream:
            reader = c2pa.Reader.try_create(fmt, stream, context=context) if fmt else \
                c2pa.Reader.try_create(stream, context=context)
            if reader is None:
                return {"present": False}
            with reader:
                active = reader.get_active_manifest() or {}
                results = reader.get_validation_results() or {}
                state = reader.get_validation_state()
    except c2pa.C2paError as e:
        return {"present": True, "validation_state": "Invalid", "errors": [str(e)]}
    failures = [item.get("code") for item in (results.get("activeManifest") or {}).get("failure", [])]
    actions = [a for assertion in active.get("assertions", []) if assertion.get("label", "").startswith("c2pa.actions")
               for a in assertion.get("data", {}).get("actions", [])]
    return {
        "present": True,
        "validation_state": state,
        "failures": failures,
        "signer": (active.get("signature_info") or {}).get("common_name"),
        "claim_generator": [g.get("name") for g in active.get("claim_generator_info", [])],
        "ai_generated": any(a.get("digitalSourceType") == TRAINED_ALGORITHMIC_MEDIA for a in actions),
        "software_agent": next((a.get("softwareAgent") for a in actions if a.get("softwareAgent")), None),
        "watermark": next((a.get("data") for a in active.get("assertions", [])
                           if a.get("label") == WATERMARK_ASSERTION), None),
    }
