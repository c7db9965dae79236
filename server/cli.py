"""`avatar-forcing serve`: run the server (settings from AVATAR_FORCING_* variables, flags override them)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import time
from pathlib import Path

import uvicorn

from .config import ServerSettings
from .http_limits import header_deadline_protocol
from .logs import setup_logging
from .ports import loop_factory

log = logging.getLogger("avatar_forcing.server")


class DrainingServer(uvicorn.Server):
    """SIGTERM / SIGINT first drains: new sessions are refused (503, /readyz says so) while live ones go on
    until they end or the drain timeout passes; then the server stops. A second signal stops it at once.
    A requested stop exits with status 0."""

    def __init__(self, config: uvicorn.Config, sessions, drain_timeout_s: float):
        super().__init__(config)
        self.sessions = sessions
        self.drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or not self.sessions.sessions or self.drain_timeout_s <= 0:
            self.should_exit = True
            return
        self._draining = True
        self.sessions.draining = True
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        log.warning("draining: new sessions are refused; %d live session(s) may go on for up to %.0f s. "
                    "Press Ctrl-C again (or send SIGTERM again) to stop now.", len(self.sessions.sessions),
                    self.drain_timeout_s)
        # Sessions end in many places (hang-up, timeouts, DELETE): polling the table is the simple check.
        while self.sessions.sessions and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.25)
        self.should_exit = True


def add_serve_command(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the WebRTC avatar server", description=__doc__)
    p.add_argument("--host", help="listen address (AVATAR_FORCING_HOST, default 0.0.0.0)")
    p.add_argument("--port", type=int, help="HTTP port (AVATAR_FORCING_PORT, default 8080)")
    p.add_argument("--config", help="'official' or a golden folder (AVATAR_FORCING_CONFIG)")
    p.add_argument("--weights", help="checkpoint directory / file / 'hub' (AVATAR_FORCING_WEIGHTS)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (AVATAR_FORCING_DEVICE)")
    p.add_argument("--max-sessions", type=int, help="concurrent sessions (AVATAR_FORCING_MAX_SESSIONS)")
    p.add_argument("--log-format", choices=("auto", "json", "text"),
                   help="AVATAR_FORCING_LOG_FORMAT (default auto: text on a terminal, JSON otherwise)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve https with this certificate (AVATAR_FORCING_TLS_CERT); "
                                                     "browsers on other machines need https for the camera")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key (AVATAR_FORCING_TLS_KEY)")
    p.set_defaults(func=run_serve)


def check_model(settings: ServerSettings) -> str:
    """What will be served, checked before anything slow starts: a configuration that parses and weights
    that are on disk (or a hub that answers). May switch `settings` to the built-in model (see
    `choose_default_model`). Raises UserError with what to do instead."""
    from avatar_forcing.errors import UserError, WeightsError
    from avatar_forcing.model.config import config_from_name
    from avatar_forcing.weights import builtin, hub

    choose_default_model(settings)
    config_from_name(settings.config)  # raises on a bad --config
    if settings.config == builtin.NAME:
        if settings.weights in (None, "", builtin.NAME):
            settings.weights = builtin.NAME
            if not builtin.weights_file().is_file():
                raise UserError(f"--config builtin: {builtin.weights_file()} is missing from this install")
            return builtin.describe()
        return f"the built-in model's architecture with the weights {hub.weights_source(settings.weights)}"
    if settings.config not in ("", "official"):
        source = hub.weights_source(settings.weights)
        if source == hub.HUB or not Path(source).exists():
            raise UserError(f"--config {settings.config} needs its weights file: set AVATAR_FORCING_WEIGHTS "
                            f"(or --weights) to e.g. {Path(settings.config) / 'small_weights.safetensors'}")
        return f"the small configuration of {settings.config} with {source} (random weights: a moving, " \
               "meaningless face that tests transport and the page, no real avatar)"
    try:
        where = hub.preflight(settings.weights, advice=False)
    except WeightsError as exc:
        # Two lines: what is wrong, then what the person can do about it.
        raise UserError(f"no model to serve: {exc}.\n  Official weights (about {hub.total_mb()} MB; CC BY-NC 4.0, "
                        f"non-commercial; real time needs a GPU): `avatar-forcing weights download --dir weights` "
                        f"where the hub is reachable, then AVATAR_FORCING_WEIGHTS=$PWD/weights make serve. "
                        f"To try the page without them: README, \u201cTry it\u201d.") from None
    return f"the official model from {where}"


def choose_default_model(settings: ServerSettings) -> None:
    """Nothing configured: the official model when its files are cached, else the built-in one, said in one
    line (`builtin.stands_in`)."""
    from avatar_forcing.weights import builtin

    if builtin.stands_in(settings.config, settings.weights):
        settings.config, settings.weights = builtin.NAME, builtin.NAME
        log.warning(builtin.notice())


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates its own malloc arena; with the media and codec threads of
    many sessions the memory freed in one never serves another, and RSS climbs with each session (measured:
    +330 MB over 200 open/close cycles, +40 MB with 2 arenas). Must run before those threads start."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return  # the operator decided
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except OSError:
        pass  # not glibc: nothing to tune


def run_serve(args: argparse.Namespace) -> int:
    limit_malloc_arenas()
    settings = ServerSettings.from_env(host=args.host, port=args.port, config=args.config, weights=args.weights,
                                       device=args.device, max_sessions=args.max_sessions,
                                       log_format=args.log_format, tls_cert=args.tls_cert, tls_key=args.tls_key)
    setup_logging(settings.log_format, settings.log_level)
    log.info("model: %s", check_model(settings))
    from .video_codecs import h264_backend

    h264_backend(settings.video_encoder)  # 'nvenc' where it cannot work stops here, with the reason
    from .app import create_app

    app = create_app(settings)
    # Slow and idle clients: a deadline for headers (http_limits), keep-alive and a connection cap.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, lifespan="on",
                            ws_max_size=2 << 20, timeout_graceful_shutdown=10,
                            http=header_deadline_protocol(settings.header_timeout_s),
                            timeout_keep_alive=max(1, round(settings.keep_alive_s)),
                            limit_concurrency=settings.max_connections,
                            ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    server = DrainingServer(config, app.state.ctx.sessions, settings.drain_timeout_s)
    worker = app.state.ctx.worker
    failed = []

    def fatal(exc: BaseException) -> None:
        """The model could not load: stop serving (a supervisor restarts us, and the log says why)."""
        failed.append(exc)
        server.should_exit = True

    worker.on_fatal = fatal
    with asyncio.Runner(loop_factory=loop_factory(settings.port_range())) as runner:
        runner.run(server.serve())
    if failed:
        log.error("exiting: the model could not be loaded (%s)", failed[0])
        return 1
    return 0
