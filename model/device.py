"""Which torch device to run on."""

from __future__ import annotations

import torch

from avatar_forcing.errors import UserError


def pick_device(value: str) -> torch.device:
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {value}: no CUDA device is available here; use --device cpu")
    return torch.device(value)
