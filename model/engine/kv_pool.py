"""Preallocated KV caches for up to N live sessions.

Each slot holds, per transformer layer and guidance branch, the self-attention keys/values of the last
`self_cache_len` frames (keys already rotated) and the cross-attention keys/values of the last
`cross_cache_len` condition tokens. A batched step gathers the rows of the sessions it advances into the
sampler's branch-major [3B, ...] layout and scatters the refreshed caches back.
"""

from __future__ import annotations

import torch

from ..config import FlowTransformerConfig
from ..flow_transformer import LayerKV
from ..sampler import NUM_BRANCHES


class PoolFullError(RuntimeError):
    """Every KV-cache slot is in use: no session can be opened until one closes."""

    pass


class KVCachePool:
    """Preallocated per-session KV caches, gathered into and scattered from batched steps."""

    def __init__(self, cfg: FlowTransformerConfig, capacity: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32):
        self.capacity = capacity
        self.depth = cfg.depth
        shape_self = (cfg.depth, capacity, NUM_BRANCHES, cfg.num_heads, cfg.self_cache_len, cfg.head_dim)
        shape_cross = (cfg.depth, capacity, NUM_BRANCHES, cfg.num_heads, cfg.cross_cache_len, cfg.head_dim)
        self.self_k = torch.zeros(shape_self, device=device, dtype=dtype)
        self.self_v = torch.zeros(shape_self, device=device, dtype=dtype)
        self.cross_k = torch.zeros(shape_cross, device=device, dtype=dtype)
        self.cross_v = torch.zeros(shape_cross, device=device, dtype=dtype)
        self._free = list(range(capacity - 1, -1, -1))

    # -- slots --------------------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise PoolFullError(f"all {self.capacity} KV-cache slots are in use")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.self_k, self.self_v, self.cross_k, self.cross_v))

    # -- rows ---------------------------------------------------------------------------------------------

    def gather(self, slots: torch.Tensor) -> list[LayerKV]:
        """Caches of the given slots as the sampler's per-layer [3B, heads, len, head_dim] tensors."""

        def rows(pool: torch.Tensor, layer: int) -> torch.Tensor:
            x = pool[layer].index_select(0, slots)  # [B, 3, H, L, D]
            return x.transpose(0, 1).reshape(-1, *x.shape[2:])  # branch-major [3B, H, L, D]

        return [LayerKV(rows(self.self_k, i), rows(self.self_v, i), rows(self.cross_k, i), rows(self.cross_v, i))
                for i in range(self.depth)]

    def scatter(self, slots: torch.Tensor, caches: list[LayerKV]) -> None:
        b = slots.numel()

        def put(pool: torch.Tensor, layer: int, value: torch.Tensor) -> None:
            rows = value.reshape(NUM_BRANCHES, b, *value.shape[1:]).transpose(0, 1)  # [B, 3, H, L, D]
            pool[layer].index_copy_(0, slots, rows.to(pool.dtype))

        for i, kv in enumerate(caches):
            put(self.self_k, i, kv.self_k)
            put(self.self_v, i, kv.self_v)
            put(self.cross_k, i, kv.cross_k)
            put(self.cross_v, i, kv.cross_v)
