"""The FastAPI application: wiring settings, the model worker, sessions, metrics and routes."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

import avatar_forcing
from avatar_forcing.errors import UserError
from avatar_forcing.model.avatar_forcing import AvatarForcing
from avatar_forcing.model.config import config_from_name
from avatar_forcing.model.cpus import usable_cpus
from avatar_forcing.model.engine import EngineSettings, batch_buckets
from avatar_forcing.provenance.marker import FrameMarker

from .api import WEB_DIR, AppContext, measured_capacity, public, v1, watch_loop_lag, ws_router
from .avatars import AvatarStore
from .config import ServerSettings
from .errors import install_error_handlers
from .metrics import ServerMetrics
from .sessions import OVERLOAD_ON, SessionManager
from .video import VideoEncoding
from .worker import ModelWorker

log = logging.getLogger("avatar_forcing.server")


def default_model_loader(settings: ServerSettings) -> Callable[[], AvatarForcing]:
    def load() -> AvatarForcing:
        from avatar_forcing.model.device import pick_device
        from avatar_forcing.weights.loading import load_model

        return load_model(config_from_name(settings.config), settings.weights, device=pick_device(settings.device))

    return load


async def announce_ready(ctx: AppContext, model_name: str) -> None:
    """One line when the model is ready: where to open the page and how many sessions fit, measured."""
    while not ctx.worker.ready.is_set():
        if ctx.worker.error is not None:
            return  # the worker logged why; the server stops
        await asyncio.sleep(0.2)
    s = ctx.settings
    host = "localhost" if s.host in ("0.0.0.0", "::") else s.host
    fit = measured_capacity(ctx)
    scheme = "https" if s.tls_cert else "http"
    log.info("ready: serving the %s model at %s://%s:%d/ (about %d concurrent session%s on this machine, "
             "measured; %d slots configured)", model_name, scheme, host, s.port, fit, "" if fit == 1 else "s",
             s.max_sessions)
    if s.overload_admission == "predict" and ctx.worker.cost_first > OVERLOAD_ON:
        log.warning("one session costs %.0f%% of real time on this machine (measured at warm-up): it will skip "
                    "frames, and no second session is admitted; use a faster device or a smaller model",
                    100 * ctx.worker.cost_first)


def add_sample_portrait(avatars: AvatarStore) -> None:
    """The built-in model's sample portrait (public domain, weights/builtin/portrait.jpg) in the portrait
    list, so a first visit can press Start at once."""
    from avatar_forcing.weights import builtin

    path = builtin.folder() / "portrait.jpg"
    try:
        avatar = avatars.add(path.read_bytes())
    except (OSError, UserError) as exc:
        log.warning("the sample portrait %s could not be added: %s", path, exc)
        return
    log.info("sample portrait %s added as avatar %s", path.name, avatar.avatar_id)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
                                        compile_scope=settings.compile_scope,
                                        channels_last=settings.channels_last,
                                        batch_buckets=batch_buckets(settings.max_sessions) if settings.compile
                                        else None,
                                        # Catch-up: a session more than one block behind its newest input
                                        # skips ahead instead of generating stale blocks (docs/realtime.md).
                                        max_lag_frames=model_cfg.transformer.block_frames,
                                        frame_marker=FrameMarker(settings.deployment_id, watermark=settings.watermark,
                                                                 visible_label=settings.visible_label)), metrics,
                         cpu_threads=settings.cpu_threads)
    executor = ThreadPoolExecutor(max_workers=min(8, 2 * usable_cpus()), thread_name_prefix="media")
    sessions = SessionManager(settings, worker, metrics, executor, model_cfg.fps, model_cfg.sampling_rate)
    avatars = AvatarStore(model_cfg.motion.input_size, settings.max_avatars)
    video = VideoEncoding(settings, metrics)
    sessions.prepare_offer = video.prefer
    ctx = AppContext(settings, metrics, worker, sessions, avatars, executor, model_cfg.sampling_rate, video)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # aiortc encodes every frame (video and Opus) in the loop's default executor. Python's default has
        # cores + 4 threads: a few slow video encodes (or sessions waiting on a busy media process) would
        # hold them all and starve every session's audio. Waiting threads cost no CPU; give each session two.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=2 * settings.max_sessions + 4, thread_name_prefix="codec"))
        worker.start()
        await asyncio.get_running_loop().run_in_executor(None, video.start)
        if settings.config == "builtin":
            await asyncio.get_running_loop().run_in_executor(executor, add_sample_portrait, avatars)
        sessions.start()
        lag_task = asyncio.get_running_loop().create_task(watch_loop_lag(ctx))
        # "Serving" only once the model has loaded and been measured: until then the page and /readyz
        # say it is loading, and a model that cannot load stops the server with its reason.
        log.info("loading the %s model (port %d answers meanwhile; sessions start once it is ready)",
                 model_cfg.name, settings.port)
        ready_task = asyncio.get_running_loop().create_task(announce_ready(ctx, model_cfg.name))
        if settings.auth_token is None and not is_loopback(settings.host):
            log.warning("auth is off and the server listens on %s: anyone who can reach it may open sessions; "
                        "set AVATAR_FORCING_AUTH_TOKEN (or listen on 127.0.0.1)", settings.host)
        try:
            yield
        finally:
            ready_task.cancel()
            await sessions.close_all("shutdown")
            await sessions.stop()
            lag_task.cancel()
            await asyncio.gather(lag_task, ready_task, return_exceptions=True)
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)
            await asyncio.get_running_loop().run_in_executor(None, video.stop)
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
