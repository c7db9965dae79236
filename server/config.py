"""Server settings, read from `AVATAR_FORCING_*` environment variables (README lists them all).

Each field's environment variable is its name upper-cased with the prefix, e.g. `max_sessions` ->
`AVATAR_FORCING_MAX_SESSIONS`. Lists are comma-separated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from avatar_forcing.errors import UserError

ENV_PREFIX = "AVATAR_FORCING_"


# How long this project's clients (server.client, integrations.remote) keep an idle connection: less than the
# server's keep_alive_s. With equal times (httpx's default is also 5 s) a request sent just as the server closes the
# connection fails with ReadError (seen once in 20 barge-in trials).
CLIENT_KEEP_ALIVE_S = 2.0


@dataclass
class ServerSettings:
    # Listening
    host: str = "0.0.0.0"
    port: int = 8080
    # Model
    config: str = "official"  # 'official' or a golden folder with small_config.json
    weights: str | None = None  # directory / file / 'hub' (None: $AVATAR_FORCING_WEIGHTS is this field)
    device: str = "auto"
    max_sessions: int = 16
    cpu_threads: int | None = None  # torch's CPU threads; default: all cores but one (kept for media work)
    precision: str = "auto"  # auto (bfloat16 on a GPU, float32 on a CPU), float32 or bfloat16
    compile: bool = False  # torch.compile the transformer (CUDA graphs per batch bucket on a GPU)
    compile_scope: str = "step"  # with compile: "step" (the transformer call) or "loop" (the whole denoising loop)
    channels_last: bool = False  # the motion auto-encoder's convolutions in NHWC memory (for GPU tensor cores)
    # Video compression: 'auto' takes NVENC for H.264 where the GPU has it, 'cpu' never, 'nvenc' must have it
    video_encoder: str = "auto"
    video_codec: str = "auto"  # codec answers prefer: auto (H.264 with NVENC, else the client's order), h264, vp8
    media_processes: int | None = None  # processes that encode video (0: codec threads; default: 1 per 4 cores)
    # Access
    auth_token: str | None = None  # when set, every /v1 route needs "Authorization: Bearer <token>"
    cors_origins: list[str] = field(default_factory=list)  # e.g. https://app.example.com; "*" for any
    max_upload_bytes: int = 10 * 1024 * 1024  # portraits and WAV bodies
    max_speech_seconds: float = 120.0  # one WAV upload / queued speech at most
    max_avatars: int = 256  # uploaded portraits kept (least recently used are forgotten)
    # Sessions
    idle_timeout_s: float = 300.0  # no media from the client for this long ends a session
    connect_timeout_s: float = 30.0  # ICE must connect within this
    target_latency_s: float = 0.7  # input-to-playout delay the pacer aims for (block + compute + margin)
    max_latency_s: float = 1.5  # late blocks raise the delay up to this
    drain_timeout_s: float = 600.0  # on SIGTERM: refuse new sessions, let live ones finish for up to this
    # "predict": refuse a session the measured worker load says would push everyone behind real time;
    # "off": admit up to max_sessions regardless.
    overload_admission: str = "predict"
    # ICE / TURN
    stun_urls: list[str] = field(default_factory=list)  # e.g. stun:stun.example.com:3478
    turn_urls: list[str] = field(default_factory=list)  # e.g. turn:turn.example.com:3478?transport=udp
    turn_secret: str | None = None  # coturn's static-auth-secret (use-auth-secret REST credentials)
    turn_ttl_s: int = 3600
    rtc_port_range: str | None = None  # e.g. "40000-40199": UDP ports for ICE host candidates
    # Connection limits (slow or idle clients must not hold sockets or memory)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_timeout_s: float = 30.0  # an upload's body must arrive within this
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 200  # open connections (and requests) at most; more get 503
    # HTTPS (browsers give the camera and microphone only to https pages, or to localhost)
    tls_cert: str | None = None  # PEM certificate (chain) file
    tls_key: str | None = None  # its PEM private key
    # Logging
    log_format: str = "auto"  # json, text, or auto: text on a terminal, JSON otherwise (files, collectors)
    log_level: str = "info"
    # Provenance (EU AI Act art. 50): every frame carries an invisible watermark (deployment id + session hash)
    watermark: bool = True  # off logs a warning: the video could no longer be recognised as AI-made
    deployment_id: int = 0  # 0-65535, the operator's id in the watermark
    visible_label: bool = False  # also burn a small "AI-generated" label into the video

    def __post_init__(self) -> None:
        if not 0 <= self.deployment_id <= 65535:
            raise UserError(f"AVATAR_FORCING_DEPLOYMENT_ID {self.deployment_id}: must be 0-65535")
        if self.max_sessions < 1:
            raise UserError("AVATAR_FORCING_MAX_SESSIONS must be at least 1")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise UserError("AVATAR_FORCING_PRECISION must be auto, float32 or bfloat16")
        if self.compile_scope not in ("step", "loop"):
            raise UserError("AVATAR_FORCING_COMPILE_SCOPE must be 'step' or 'loop'")
        if self.video_encoder not in ("auto", "cpu", "nvenc"):
            raise UserError("AVATAR_FORCING_VIDEO_ENCODER must be 'auto', 'cpu' or 'nvenc'")
        if self.video_codec not in ("auto", "h264", "vp8"):
            raise UserError("AVATAR_FORCING_VIDEO_CODEC must be 'auto', 'h264' or 'vp8'")
        if self.media_processes is not None and not 0 <= self.media_processes <= 64:
            raise UserError("AVATAR_FORCING_MEDIA_PROCESSES must be 0-64 (0: encode in the server process)")
        if self.overload_admission not in ("predict", "off"):
            raise UserError("AVATAR_FORCING_OVERLOAD_ADMISSION must be 'predict' or 'off'")
        if self.log_format not in ("auto", "json", "text"):
            raise UserError("AVATAR_FORCING_LOG_FORMAT must be 'auto', 'json' or 'text'")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UserError("https needs both AVATAR_FORCING_TLS_CERT and AVATAR_FORCING_TLS_KEY "
                            "(--tls-cert and --tls-key)")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise UserError(f"AVATAR_FORCING_{name.upper()} {path}: no such file")
        if self.turn_urls and not self.turn_secret:
            raise UserError("AVATAR_FORCING_TURN_URLS needs AVATAR_FORCING_TURN_SECRET (coturn static-auth-secret)")
        self.port_range()  # validate early

    def port_range(self) -> tuple[int, int] | None:
        if not self.rtc_port_range:
            return None
        try:
            low, high = (int(p) for p in self.rtc_port_range.split("-"))
        except ValueError:
            raise UserError(f"AVATAR_FORCING_RTC_PORT_RANGE {self.rtc_port_range!r}: expected LOW-HIGH, "
                            "e.g. 40000-40199") from None
        if not 1024 <= low <= high <= 65535:
            raise UserError(f"AVATAR_FORCING_RTC_PORT_RANGE {self.rtc_port_range!r}: ports must be 1024-65535")
        return low, high

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> ServerSettings:
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def env_names(cls) -> list[str]:
        return [ENV_PREFIX + f.name.upper() for f in fields(cls)]


def _parse(name: str, kind, raw: str):
    kind = str(kind)
    if kind.startswith("bool"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{ENV_PREFIX}{name.upper()}={raw!r}: expected true or false")
    try:
        if kind.startswith("list"):
            return [x.strip() for x in raw.split(",") if x.strip()]
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise UserError(f"{ENV_PREFIX}{name.upper()}={raw!r}: expected {kind.split(' ')[0]}") from None
    return raw
