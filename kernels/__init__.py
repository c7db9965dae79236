"""Fast paths for the GPU, each beside a plain PyTorch reference with the same signature.

`choose(kernel, device)` picks the implementation for a device: the fast one where it is supported,
unless AVATAR_FORCING_KERNELS=reference forces the references everywhere (for A/B runs and debugging).
Every kernel has a test comparing the two on random inputs of realistic shapes (tests/test_kernels.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Kernel:
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
