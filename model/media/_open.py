"""Opening media files with PyAV, turning every failure into a MediaError the user can act on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from avatar_forcing.errors import MediaError

if TYPE_CHECKING:  # imported where used (see audio.py)
    import av


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """Return `path` as a Path, or raise MediaError when it is missing, a folder, or empty."""
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{what} file not found: {p} (check the path)")
    if not p.is_file():
        raise MediaError(f"{what} path is not a file: {p} (give the path of a media file)")
    if p.stat().st_size == 0:
        raise MediaError(f"{what} file is empty: {p} (re-export or re-record it)")
    return p


def open_input(path: str | os.PathLike, what: str) -> av.container.InputContainer:
    """Open a media file for reading; a file FFmpeg cannot parse becomes a MediaError."""
    import av

    p = check_input_file(path, what)
    try:
        return av.open(str(p), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise MediaError(
            f"{what} file {p} is not a media file FFmpeg can read ({e.__class__.__name__}): "
            "convert it to a common format (wav, mp3, mp4)"
        ) from e
