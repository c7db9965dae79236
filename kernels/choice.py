"""A kernel: a fast path, its plain reference, and the devices where the fast one is valid."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Kernel:
    """A named operation with a plain reference and a fast path, and the devices the fast path supports."""

    name: str
    reference: Callable
    fast: Callable
    supports: Callable[[torch.device], bool]  # devices where `fast` is valid

    def choose(self, device: torch.device | str) -> Callable:
        device = torch.device(device)
        if os.environ.get("AVATAR_FORCING_KERNELS", "fast") == "reference" or not self.supports(device):
            return self.reference
        return self.fast


def any_device(_: torch.device) -> bool:
    return True


def cuda_only(device: torch.device) -> bool:
    return device.type == "cuda"
