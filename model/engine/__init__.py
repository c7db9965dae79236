"""Streaming engine: live sessions, a KV-cache pool and batched block steps (free of networking/asyncio)."""

from .drift import PoseAnchorSettings
from .engine import STAGES, EngineSettings, PoolFullError, StreamingEngine, batch_buckets
from .inputs import LiveInputs, LiveSettings, PrecomputedInputs
from .session import BlockOutput, Session

__all__ = ["STAGES", "BlockOutput", "EngineSettings", "LiveInputs", "LiveSettings", "PoolFullError", "PoseAnchorSettings",
           "PrecomputedInputs", "Session", "StreamingEngine", "batch_buckets"]
