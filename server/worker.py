"""The model worker: one thread that owns the model, the streaming engine and its KV-cache pool.

The event loop never waits for model work. It hands the worker small commands (open / close a session)
and awaits their result as a future; the worker runs them between engine steps, steps every due session in
one batch, and hands each block to its session's sink (which hops back onto the event loop). Input pushes
go straight into the sessions' thread-safe inputs and `wake()` the worker so due blocks start at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from avatar_forcing.model.avatar_forcing import AvatarForcing
from avatar_forcing.model.cpus import usable_cpus
from avatar_forcing.model.engine import BlockOutput, EngineSettings, Session, StreamingEngine

from .metrics import ServerMetrics

log = logging.getLogger("avatar_forcing.server.worker")

Sink = Callable[[BlockOutput], None]

# Private test hook (not a documented setting): every engine step is padded with a sleep until it has
# taken this many blocks of real time per session it advanced, e.g. 1.5 = a worker 1.5x too slow.
SLOW_STEP_ENV = "AVATAR_FORCING_TEST_STEP_BLOCKS"
COST_EWMA = 0.2  # weight of the newest live step in the per-batch-size step time


class ModelWorker:
    def __init__(self, load_model: Callable[[], AvatarForcing], engine_settings: EngineSettings,
                 metrics: ServerMetrics, warmup_blocks: int = 3, cpu_threads: int | None = None,
                 remeasure_idle_s: float = 120.0):
        self._load_model = load_model
        self._cpu_threads = cpu_threads
        self._engine_settings = engine_settings
        self._metrics = metrics
        self._warmup_blocks = warmup_blocks
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._sinks: dict[str, Sink] = {}
        self._error_sinks: dict[str, Callable[[str], None]] = {}
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
        self.engine: StreamingEngine | None = None
        self._busy: deque[tuple[float, float]] = deque()  # (end, seconds) of recent steps
        # A session's cost as a fraction of real time: alone, and each further one under batching. Measured
        # at warm-up, then tracked from every live step (and re-measured while idle), so one noisy start-up
        # figure never decides admission for long.
        self.cost_first = self.cost_more = 0.0
        self._step_time: dict[int, float] = {}  # batch size -> recent step seconds (EWMA)
        self._block_s = 0.0
        self._measured_at = 0.0
        self._remeasure_idle_s = remeasure_idle_s
        self.slow_step_blocks = float(os.environ.get(SLOW_STEP_ENV) or 0)
        self._probe_portrait: Any = None  # the warm-up's portrait code, reused by re-measurements
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None

    # -- lifecycle (event loop side) ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    async def call(self, fn: Callable[[StreamingEngine], Any]) -> Any:
        """Run fn(engine) on the worker thread between steps; await its result (or exception)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if future.done():
                return
            future.set_result(value) if ok else future.set_exception(value)

        def command(engine: StreamingEngine) -> None:
            try:
                result = fn(engine)
            except BaseException as exc:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(settle, False, exc)
            else:
                loop.call_soon_threadsafe(settle, True, result)

        self._commands.put(command)
        self._wake.set()
        return await future

    def submit(self, fn: Callable[[StreamingEngine], Any]) -> None:
        """Fire and forget; errors are logged."""
        self._commands.put(fn)
        self._wake.set()

    def set_sink(self, session_id: str, sink: Sink | None, on_error: Callable[[str], None] | None = None) -> None:
        """Where a session's blocks go (called on this thread), and who hears if the engine drops it."""
        if sink is None:
            self._sinks.pop(session_id, None)
            self._error_sinks.pop(session_id, None)
        else:
            self._sinks[session_id] = sink
            if on_error is not None:
                self._error_sinks[session_id] = on_error

    # -- the thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            t0 = time.perf_counter()
            # Leave a core to the event loop and the codecs: torch's spinning worker threads otherwise
            # fight them for it (measured on 2 cores: blocks 5-8x slower with 2 threads than with 1).
            torch.set_num_threads(self._cpu_threads or max(1, usable_cpus() - 1))
            model = self._load_model()
            settings = self._engine_settings
            if settings.precision == "auto":
                on_gpu = next(model.parameters()).device.type == "cuda"
                settings = replace(settings, precision="bfloat16" if on_gpu else "float32")
            self.engine = StreamingEngine(model, settings)
            if settings.compile:
                self.engine.precompile()
            self._warm_up()
            log.info("model ready in %.1f s (device %s, %s, %d session slots, KV pool %.1f MiB)",
                     time.perf_counter() - t0, self.engine.device, settings.precision, self.engine.pool.capacity,
                     self.engine.pool.nbytes() / 2**20)
        except BaseException as exc:
            self.error = exc
            log.error("the model could not be loaded: %s", exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
            return
        self._metrics.model_ready.set(1)
        self.ready.set()
        while not self._stopping:
            self._run_commands()
            if not self._step():
                if not self.engine.sessions and time.monotonic() - self._measured_at > self._remeasure_idle_s:
                    self._remeasure()
                self._wake.wait(0.01)
                self._wake.clear()
        self._run_commands()  # closes queued at shutdown

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command(self.engine)
            except Exception:
                log.exception("worker command failed")

    def _step(self) -> bool:
        engine = self.live_engine()
        t0 = time.perf_counter()
        try:
            outputs = self._engine_step()
        except Exception as exc:
            self._drop_due_sessions(exc)
            return False
        if not outputs:
            return False
        m = self._metrics
        seconds = time.perf_counter() - t0
        m.step_seconds.observe(seconds)
        self._busy.append((time.monotonic(), seconds))
        self._track_cost(len(outputs), seconds)
        for timings, size in {id(o.timings): (o.timings, o.batch_size) for o in outputs}.values():
            m.batch_size.observe(size)
            for stage, seconds in timings.items():
                m.stage_seconds.labels(stage).observe(seconds)
        for out in outputs:
            m.blocks.inc()
            m.block_latency.observe(max(0.0, out.done_at - out.ready_at))
            sink = self._sinks.get(out.session_id)
            if sink is not None:
                sink(out)
        if engine.device.type == "cuda":
            m.device_memory.labels("allocated").set(torch.cuda.memory_allocated(engine.device))
            m.device_memory.labels("reserved").set(torch.cuda.memory_reserved(engine.device))
        return True

    def _drop_due_sessions(self, exc: Exception) -> None:
        """A failing step must not take the worker or other sessions down, nor be retried forever: the
        sessions it was advancing leave the engine (their state may be half-updated) and their owners
        are told, so they end them."""
        engine = self.live_engine()
        failed = [d.session.id for d in engine.due()]
        log.error("engine step failed for sessions %s: %s", failed, exc, exc_info=exc)
        for sid in failed:
            if sid in engine.sessions:
                engine.close_session(sid)
            notify = self._error_sinks.get(sid)
            self._sinks.pop(sid, None)
            if notify is not None:
                notify(f"{type(exc).__name__}: {exc}")

    def utilisation(self, window_s: float = 5.0) -> float:
        """Share of the last `window_s` the worker spent stepping (1.0: no spare compute, behind real time)."""
        now = time.monotonic()
        while self._busy and self._busy[0][0] < now - window_s:
            self._busy.popleft()
        return min(1.0, sum(seconds for _, seconds in list(self._busy)) / window_s)

    def live_engine(self) -> StreamingEngine:
        """The engine, once the model is loaded (`ready` is set); before that, a RuntimeError."""
        if self.engine is None:
            raise RuntimeError("the model is not loaded")
        return self.engine

    def _engine_step(self, now: float | None = None) -> list[BlockOutput]:
        engine = self.live_engine()
        t0 = time.perf_counter()
        outputs = engine.step() if now is None else engine.step(now=now)
        if self.slow_step_blocks > 0 and outputs:  # the test hook: a worker this many times too slow
            time.sleep(max(0.0, self.slow_step_blocks * self._block_s * len(outputs) - (time.perf_counter() - t0)))
        return outputs

    def _track_cost(self, batch: int, seconds: float) -> None:
        """Fold a live step into the step time of its batch size and re-derive the session costs."""
        old = self._step_time.get(batch)
        self._step_time[batch] = seconds if old is None else (1 - COST_EWMA) * old + COST_EWMA * seconds
        self._set_costs()

    def _set_costs(self) -> None:
        times, block_s = self._step_time, self._block_s
        if 1 in times:
            self.cost_first = times[1] / block_s
        larger = [b for b in times if b > 1]
        if larger:
            b = max(larger)
            base = times.get(1, times[b] / b)
            self.cost_more = max(0.0, times[b] - base) / (b - 1) / block_s
        self._metrics.session_cost.labels("first").set(self.cost_first)
        self._metrics.session_cost.labels("more").set(self.cost_more)

    def _warm_up(self) -> None:
        """Throwaway sessions, so the first real one does not pay for first-call allocations, and so the
        cost of a session is known before any is live."""
        engine = self.live_engine()
        cfg = engine.model.config
        self._block_s = cfg.transformer.block_frames / cfg.fps
        size = cfg.motion.input_size
        face = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
        self._probe_portrait = engine.portraits.get(face)  # kept: re-measuring never evicts a real one
        try:
            self._measure()
        finally:
            engine.portraits.clear()
        log.info("a session costs %.0f%% of real time alone, %.0f%% more for each further one (batched)",
                 100 * self.cost_first, 100 * self.cost_more)

    def _remeasure(self) -> None:
        """While idle: measure again (a busy start, or load that has gone, must not decide for long)."""
        self._measure()
        log.info("re-measured while idle: a session costs %.0f%% of real time alone, %.0f%% more for each "
                 "further one", 100 * self.cost_first, 100 * self.cost_more)

    def _measure(self) -> None:
        """One throwaway session alone, then two together where the pool has room (the marginal cost of
        another one under batching), as fractions of real time."""
        engine = self.live_engine()
        cfg = engine.model.config
        size = cfg.motion.input_size
        rng = np.random.default_rng(0)
        seconds = (2 + self._warmup_blocks * 2) * cfg.transformer.block_frames / cfg.fps + 2
        opened: list[Session] = []
        # The throwaway sessions run on their own clock, which advances one block per step from their open
        # time: each step then finds exactly one block of each due and none behind real time, so catch-up
        # never skips them. A live block is due max_wait_frames after its last input frame (the wait for
        # late microphone audio; these sessions have none); the priming window's last input frame is
        # clip_frames - lead-in after the open (0 with a lead-in), block k's k blocks later. Half a frame
        # more keeps float rounding from making a step fall just short.
        live = engine.live_settings
        due_frames = cfg.transformer.clip_frames - live.lead_in_frames + live.max_wait_frames + 0.5
        blocks_run = 0  # steps taken on this clock

        def step() -> float:
            """One engine step on that clock; returns how long it took."""
            nonlocal blocks_run
            t0 = time.perf_counter()
            outputs = self._engine_step(now=blocks_run * self._block_s + due_frames / cfg.fps)
            took = time.perf_counter() - t0
            blocks_run += 1
            # The timings are per block: every open throwaway session must have made exactly one.
            advanced = sorted(out.session_id for out in outputs if not out.skipped_frames)
            if advanced != sorted(session.id for session in opened):
                raise RuntimeError(f"a measurement step advanced {advanced}, not each of the open sessions once")
            return took

        def add(name: str) -> None:
            inputs = engine.new_live_inputs()
            session = engine.open_session(self._probe_portrait, inputs=inputs, seed=0,
                                          now=blocks_run * self._block_s, session_id=name)
            speech = 0.05 * rng.standard_normal(int(seconds * cfg.sampling_rate))
            inputs.push_speech(speech.astype(np.float32))
            for j in range(int(seconds * cfg.fps)):  # webcam crops, so the motion encoder runs too
                inputs.push_user_crop(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), j / cfg.fps)
            opened.append(session)
            step()  # its priming block

        def timed_steps() -> float:
            return min(step() for _ in range(self._warmup_blocks))

        try:
            add("warm-up-1")
            step()  # first streaming shapes
            self._step_time = {1: timed_steps()}
            if engine.pool.capacity >= 2:  # one slot (MAX_SESSIONS=1): no batching to measure
                add("warm-up-2")
                self._step_time[2] = timed_steps()
        finally:
            for session in opened:
                engine.close_session(session.id)
        if 2 not in self._step_time:
            self.cost_more = self._step_time[1] / self._block_s  # unknown: assume no batching gain
        self._set_costs()
        self._measured_at = time.monotonic()
