"""`avatar-forcing provenance check FILE|URL`: is this video (or image) from an Avatar Forcing server?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from avatar_forcing.errors import UserError

from .check import check_source, is_url
from .watermark import TARGET_FPR, session_hash


def add_provenance_command(subparsers) -> None:
    p = subparsers.add_parser("provenance", help="check a video for the AI-generated watermark and C2PA manifest",
                              description=__doc__)
    sub = p.add_subparsers(dest="provenance_command", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="detect the watermark (and read the C2PA manifest) of a video or image",
                           description="Exit status: 0 marked, 1 not marked, 2 bad input.")
    check.add_argument("source", help="video or image file, or the URL of a recording")
    check.add_argument("--window", type=float, default=2.0, help="seconds of video per decision (default 2)")
    check.add_argument("--trust", type=Path, help="PEM CA certificate(s) to trust for the C2PA signature")
    check.add_argument("--session-id", help="also say whether the mark belongs to this session")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    if args.window <= 0:
        raise UserError(f"--window must be positive, got {args.window}")
    if args.trust is not None and not args.trust.is_file():
        raise UserError(f"--trust {args.trust} does not exist: give a PEM CA certificate")
    result = check_source(args.source, args.window)
    report = result.to_json()
    report["c2pa"] = _manifest(args.source, args.trust)
    found = result.total
    if args.session_id is not None:
        report["session_matches"] = bool(found.present and found.payload_valid and found.payload
                                         and found.payload.session_hash == session_hash(args.session_id))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_human(args.source, report)
    return 0 if found.present else 1


def _manifest(source: str, trust: Path | None) -> dict | None:
    if is_url(source):
        return None  # read from a local copy: c2pa reads files, not streams over HTTP
    try:
        from .manifest import read_manifest

        return read_manifest(Path(source), trust.read_bytes() if trust else None)
    except UserError as e:  # c2pa-python not installed: the watermark check still stands
        return {"present": None, "error": str(e)}


def _print_human(source: str, report: dict) -> None:
    mark = report["watermark"]
    verdict = "PRESENT" if mark["present"] else "not found"
    print(f"{source}: AI-generated watermark {verdict} (z = {mark['z']}, false-positive rate <= "
          f"{mark['false_positive_rate']:.1e}; threshold {TARGET_FPR:.0e}; {mark['frames']} frames)")
    print(f"  windows marked: {report['windows_marked']} of {report['windows']}")
    if mark["payload"]:
        state = "valid" if mark["payload_valid"] else "CRC mismatch: needs more frames"
        print(f"  payload: deployment {mark['payload']['deployment_id']}, session hash "
              f"{mark['payload']['session_hash']} ({state})")
    if "session_matches" in report:
        print(f"  belongs to the given session: {'yes' if report['session_matches'] else 'no'}")
    c2pa = report["c2pa"]
    if c2pa is None or c2pa.get("present") is None:
        print(f"  C2PA manifest: not checked{': ' + c2pa['error'] if c2pa else ''}")
    elif not c2pa["present"]:
        print("  C2PA manifest: none")
    else:
        print(f"  C2PA manifest: {c2pa['validation_state']} (signer {c2pa.get('signer')}, AI-generated: "
              f"{c2pa.get('ai_generated')}, model {c2pa.get('software_agent')})"
              + (f"; failures: {', '.join(map(str, c2pa['failures']))}" if c2pa.get("failures") else ""))
