"""The model worker thread: commands, sinks, and what a failing engine step does."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from golden_data import golden_folders, small_model

from avatar_forcing.model.engine import EngineSettings
from avatar_forcing.server.metrics import ServerMetrics
from avatar_forcing.server.worker import ModelWorker

FOLDER = next((f for f in golden_folders() if (f / "small_config.json").exists()), None)
pytestmark = pytest.mark.skipif(FOLDER is None, reason="needs a golden folder for the small configuration")


def test_a_failing_step_drops_its_sessions_tells_their_owners_and_the_worker_goes_on():
    worker = ModelWorker(lambda: small_model(FOLDER, strong=False), EngineSettings(max_sessions=4, decode=False),
                         ServerMetrics(4), warmup_blocks=1)
    worker.start()
    try:
        assert worker.ready.wait(120), worker.error
        assert worker.cost_first > 0  # measured at warm-up
        size = worker.engine.model.config.motion.input_size
        face = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
        errors, blocks = {}, {}
        done = threading.Event()

        async def run():
            for sid in ("a", "b"):
                worker.set_sink(sid, lambda out, sid=sid: blocks.setdefault(sid, []).append(out),
                                on_error=lambda msg, sid=sid: (errors.__setitem__(sid, msg), done.set()))
            real_step = worker.engine.step

            def failing_step(now=None):  # the next step that advances session "a" fails
                if any(d.session.id == "a" for d in worker.engine.due(now)):
                    worker.engine.step = real_step
                    raise RuntimeError("simulated device error")
                return real_step(now)

            await worker.call(lambda engine: setattr(engine, "step", failing_step))
            await worker.call(lambda engine: engine.open_session(face, session_id="a", now=time.monotonic()))
            assert await asyncio.get_running_loop().run_in_executor(None, done.wait, 30)
            await worker.call(lambda engine: engine.open_session(face, session_id="b", now=time.monotonic()))
            for _ in range(100):
                if blocks.get("b"):
                    break
                await asyncio.sleep(0.05)
            return await worker.call(lambda engine: set(engine.sessions))

        open_sessions = asyncio.run(run())
    finally:
        worker.stop()
    assert "simulated device error" in errors["a"]
    assert "a" not in open_sessions and "b" in open_sessions, open_sessions
    assert blocks.get("b"), "the worker stopped serving after the failure"
    assert worker.engine.capacity_left == 4 - 1
