"""Streaming engine: live sessions, a KV-cache pool and batched block steps (free of networking/asyncio)."""

from .drift import PoseAnchorSettings
from .engine import STAGES, EngineSettings, FrameMarker, PoolFullError, StreamingEngine, batch_buckets
from .inputs import LiveInputs, LiveSettings, PrecomputedInputs, SessionInputs
from .runner import BatchInputs, BlockRunner
from .scheduler import Phase, Scheduler
from .session import BlockOutput, Session

__all__ = ["STAGES", "BatchInputs", "BlockOutput", "BlockRunner", "EngineSettings", "FrameMarker", "LiveInputs",
           "LiveSettings", "Phase", "PoolFullError", "PoseAnchorSettings", "PrecomputedInputs", "Scheduler",
           "Session", "SessionInputs", "StreamingEngine", "batch_buckets"]
