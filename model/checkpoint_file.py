"""Writing a safetensors file whose bytes depend on its tensors and metadata only.

The safetensors writer puts the metadata's keys in hash order, which changes from process to process: two runs
that trained the very same tensors wrote files with different bytes, so a model rebuilt from its recipe could
not match the checksum of the one shipped. Here the file is written by the library, then its header is put in
canonical form (metadata keys sorted; the header keeps its length, so no offset moves).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

HEADER_LENGTH = struct.Struct("<Q")


def canonical_header(path: Path) -> None:
    """Sort the metadata keys of a safetensors file's JSON header, in place."""
    with open(path, "r+b") as f:
        (length,) = HEADER_LENGTH.unpack(f.read(HEADER_LENGTH.size))
        raw = f.read(length)
        header = json.loads(raw)
        metadata = header.get("__metadata__")
        if not metadata:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        # The tensors' entries keep the writer's (deterministic) order; only the metadata was unordered.
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > length:  # cannot happen for the writer's compact JSON; leave such a file as it is
            return
        f.seek(HEADER_LENGTH.size)
        f.write(canonical.ljust(length, b" "))  # the format pads its header with spaces


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write atomically (a temporary file renamed into place: an interrupted run leaves no half file), with
    reproducible bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        canonical_header(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
