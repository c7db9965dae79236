"""The FastAPI application: wiring settings, the model worker, sessions, metrics and routes."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

import avatar_forcing
from avatar_forcing.model.avatar_forcing import AvatarForcing
from avatar_forcing.model.config import config_from_name
from avatar_forcing.model.engine import EngineSettings, batch_buckets

from .api import WEB_DIR, AppContext, public, v1, watch_loop_lag, ws_router
from .avatars import AvatarStore
from .config import ServerSettings
from .errors import install_error_handlers
from .metrics import ServerMetrics
from .sessions import SessionManager
from .worker import ModelWorker

log = logging.getLogger("avatar_forcing.server")


def default_model_loader(settings: ServerSettings) -> Callable[[], AvatarForcing]:
    def load() -> AvatarForcing:
        from avatar_forcing.model.device import pick_device
        from avatar_forcing.weights.loading import load_model

        return load_model(config_from_name(settings.config), settings.weights, device=pick_device(settings.device))

    return load


def create_app(settings: ServerSettings | None = None, *,
               load_model: Callable[[], AvatarForcing] | None = None) -> FastAPI:
    settings = settings or ServerSettings.from_env()
    model_cfg = config_from_name(settings.config)  # sizes and rates, before the weights load
    metrics = ServerMetrics(settings.max_sessions)
    # Lead-in frames the playout can still show when the first streaming block arrives.
    shown = math.ceil(settings.target_latency_s * model_cfg.fps) + model_cfg.transformer.context_frames
    worker = ModelWorker(load_model or default_model_loader(settings),
                         EngineSettings(max_sessions=settings.max_sessions, lead_in_frames_shown=shown,
                                        portrait_cache=settings.max_sessions,
                                        precision=settings.precision, compile=settings.compile,
                                        batch_buckets=batch_buckets(settings.max_sessions) if settings.compile
                                        else None), metrics,
                         cpu_threads=settings.cpu_threads)
    executor = ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 2)), thread_name_prefix="media")
    sessions = SessionManager(settings, worker, metrics, executor, model_cfg.fps, model_cfg.sampling_rate)
    ctx = AppContext(settings, metrics, worker, sessions, AvatarStore(model_cfg.motion.input_size, settings.max_avatars),
                     executor, model_cfg.sampling_rate)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        sessions.start()
        lag_task = asyncio.get_running_loop().create_task(watch_loop_lag(ctx))
        log.info("serving %s model on %s:%d with up to %d sessions", model_cfg.name, settings.host, settings.port,
                 settings.max_sessions)
        try:
            yield
        finally:
            await sessions.close_all("shutdown")
            await sessions.stop()
            lag_task.cancel()
            await asyncio.gather(lag_task, return_exceptions=True)
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)
            executor.shutdown(wait=True, cancel_futures=True)
            log.info("stopped")

    app = FastAPI(title="Avatar Forcing server", version=avatar_forcing.__version__, lifespan=lifespan,
                  description="Real-time talking and listening avatar over WebRTC. See docs/api.md.")
    app.state.ctx = ctx
    install_error_handlers(app, on_error=lambda status: metrics.http_errors.labels(str(status)).inc())
    if settings.cors_origins:
        # Credentials (the load balancer's affinity cookie) only go with named origins, never with "*".
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After"],
                           allow_credentials="*" not in settings.cors_origins)
    app.include_router(public)
    app.include_router(v1)
    app.include_router(ws_router)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app
