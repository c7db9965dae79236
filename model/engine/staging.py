"""Host-to-device uploads that do not stall the host.

On a GPU, a copy from ordinary (pageable) memory blocks the host until it is done; from page-locked
(pinned) memory it runs asynchronously. Each kind of upload keeps a small ring of pinned buffers, grown as
needed and reused: a buffer is refilled only after the copy that last read it has finished (an event
marks it). On a CPU an upload is a plain conversion.
"""

from __future__ import annotations

import numpy as np
import torch


class PinnedUploads:
    """Uploads of one kind of host array through a ring of pinned buffers (plain copies on a CPU)."""

    def __init__(self, device: torch.device, slots: int = 4):
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        """`array` on the device (same dtype); returns at once on a GPU."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if not self.pinned:
            return host.to(self.device)
        i = self._next
        self._next = (i + 1) % len(self._buffers)
        event = self._events[i]
        if event is not None:
            event.synchronize()  # the copy that last read this buffer has finished
        buffer = self._buffers[i]
        if buffer is None or buffer.dtype != host.dtype or buffer.numel() < host.numel():
            buffer = torch.empty(max(host.numel(), 1), dtype=host.dtype, pin_memory=True)
            self._buffers[i] = buffer
        staged = buffer[:host.numel()].view(host.shape)
        staged.copy_(host)
        on_device = staged.to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._events[i] = done
        return on_device


def normalise_pixels(frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """RGB uint8 [N, H, W, 3] on the device -> [N, 3, H, W] in [-1, 1] (exactly `to_model_input`)."""
    return (frames.permute(0, 3, 1, 2).to(torch.float32) - 127.5).div(127.5).to(dtype)
