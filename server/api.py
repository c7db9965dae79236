"""HTTP and WebSocket routes (docs/api.md describes them for client developers)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import APIRouter, Depends, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException

from avatar_forcing.errors import MediaError, NoFaceError
from avatar_forcing.model.media.audio import pcm16_to_float
from avatar_forcing.provenance.disclosure import DISCLOSURE, watermark_payload
from avatar_forcing.stats import percentile

from .avatars import Avatar, AvatarStore, ImageTooLarge
from .config import ServerSettings
from .errors import ApiError, error_response
from .metrics import ServerMetrics
from .sessions import OVERLOAD_ON, SessionManager
from .speech import parse_sample_rate, test_phrase, wav_body
from .turn import ice_servers
from .video import VideoEncoding
from .worker import ModelWorker

WEB_DIR = Path(__file__).parent / "web"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "application/octet-stream")
MAX_SDP_BYTES = 64 * 1024
MAX_WS_MESSAGE_BYTES = 1 << 20
FORM_OVERHEAD_BYTES = 64 * 1024  # a form's own parts and headers, beyond the file it carries
RTP_PROTOCOLS = ("UDP/TLS/RTP/SAVPF", "UDP/TLS/RTP/SAVP", "RTP/SAVPF", "RTP/SAVP", "RTP/AVPF", "RTP/AVP")
DATA_PROTOCOLS = ("UDP/DTLS/SCTP", "DTLS/SCTP", "TCP/DTLS/SCTP")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class AppContext:
    settings: ServerSettings
    metrics: ServerMetrics
    worker: ModelWorker
    sessions: SessionManager
    avatars: AvatarStore
    executor: Executor
    sample_rate: int
    video: VideoEncoding


def ctx_of(request: Request) -> AppContext:
    return request.app.state.ctx


# -- schemas ------------------------------------------------------------------------------------------------


class SessionOptions(BaseModel):
    seed: int | None = Field(default=None, ge=0, lt=2**63,
                             description="noise seed (0 to 2**63-1); the same seed and inputs replay the same avatar")


class SessionOffer(BaseModel):
    sdp: str = Field(..., description="the client's SDP offer")
    type: str = Field("offer", description="must be 'offer'")
    avatar_id: str = Field(..., description="id from POST /v1/avatars")
    options: SessionOptions = Field(default_factory=SessionOptions)


class SessionAnswer(BaseModel):
    session_id: str
    sdp: str
    type: str = "answer"
    # Disclosure (EU AI Act art. 50): the avatar is synthetic; its frames carry an invisible watermark.
    ai_generated: bool = True
    disclosure: str = DISCLOSURE
    watermark: dict | None = Field(None, description="payload every frame carries: deployment_id, session_hash")


class AvatarCreated(BaseModel):
    avatar_id: str
    width: int
    height: int


class AvatarInfo(BaseModel):
    avatar_id: str
    created_at: float


class AvatarList(BaseModel):
    avatars: list[AvatarInfo]


class SpeechQueued(BaseModel):
    queued_seconds: float
    starts_in_seconds: float
    utterance_id: int = Field(..., description="the utterance this speech belongs to (playback events name it)")


class Interrupted(BaseModel):
    dropped_seconds: float


class IceServers(BaseModel):
    ice_servers: list[dict]
    ttl_seconds: int


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_STATUSES = (400, 401, 403, 404, 408, 413, 415, 422, 503)
ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in ERROR_STATUSES}


# -- helpers ------------------------------------------------------------------------------------------------


def _token_ok(settings: ServerSettings, presented: str | None) -> bool:
    return settings.auth_token is None or (
        presented is not None and hmac.compare_digest(presented.encode(), settings.auth_token.encode()))


def bearer(header: str | None) -> str | None:
    header = header or ""
    return header[7:] if header.lower().startswith("bearer ") else None


def require_auth(request: Request) -> None:
    if not _token_ok(ctx_of(request).settings, bearer(request.headers.get("authorization"))):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                       {"WWW-Authenticate": "Bearer"})


def origin_allowed(settings: ServerSettings, origin: str | None, host: str | None) -> bool:
    """Browsers name the page that makes a request in `Origin`: a page of this server (same host), or one
    listed in AVATAR_FORCING_CORS_ORIGINS ("*": any), may change state; any other site may not, even when
    auth is off (a cross-site page could otherwise open sessions or upload with the visitor's network).
    Clients that are not browsers send no Origin and are not affected."""
    if origin is None or "*" in settings.cors_origins or origin in settings.cors_origins:
        return True
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


def require_origin(request: Request) -> None:
    if request.method in STATE_CHANGING and not origin_allowed(
            ctx_of(request).settings, request.headers.get("origin"), request.headers.get("host")):
        raise ApiError(403, "forbidden_origin", f"requests from {request.headers.get('origin')!r} are not "
                                                "allowed: add that origin to AVATAR_FORCING_CORS_ORIGINS")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def too_large(what: str, limit: int) -> ApiError:
    return ApiError(413, "too_large", f"{what} is over the {limit}-byte limit")


def refuse_declared_size(request: Request, limit: int, what: str) -> None:
    """413 before reading anything when the declared size is already over the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(what, limit)


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, refusing more than `limit` bytes (before reading it where the size is declared, and
    as it streams where it is not: chunked bodies) and a body trickled slower than the deadline allows.
    A client that hangs up mid-body raises starlette's ClientDisconnect (errors.py answers it quietly)."""
    refuse_declared_size(request, limit, what)
    deadline_s = ctx_of(request).settings.body_timeout_s
    body = bytearray()
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large(what, limit)
    except TimeoutError:
        raise ApiError(408, "request_timeout", f"{what} did not arrive within {deadline_s:.0f} s: "
                                               "send the whole body at once") from None
    return bytes(body)


async def read_form(request: Request, limit: int, what: str) -> FormData:
    """A multipart form, read through read_body's byte limit and deadline first (starlette's own parser
    would spool a chunked body of any size to disk before any limit applied); parsed once per request."""
    form = getattr(request.state, "form", None)
    if form is None:
        raw = await read_body(request, limit + FORM_OVERHEAD_BYTES, what)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=2, max_fields=8, max_part_size=limit)
        except StarletteHTTPException as exc:  # starlette's own form errors (too many parts, bad boundary)
            raise ApiError(400, "bad_form", f"the multipart form could not be read: {exc.detail}") from None
        request.state.form = form
    return form


async def read_upload(request: Request, field: str, types: tuple[str, ...], limit: int, what: str) -> bytes:
    """A file as a raw body of one of `types`, or as field `field` of a multipart form."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        form = await read_form(request, limit, what)
        upload = form.get(field)
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing_file", f"the form has no file field {field!r}")
        data = await upload.read()
        if len(data) > limit:
            raise too_large(what, limit)
        return data
    if kind not in types:
        raise ApiError(415, "unsupported_media_type", f"send {what} as {', '.join(types[:-1])} or as a "
                                                      f"multipart/form-data field {field!r}; got {kind or 'none'}")
    return await read_body(request, limit, what)


async def in_thread(ctx: AppContext, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(ctx.executor, fn, *args)


async def add_avatar(ctx: AppContext, data: bytes) -> Avatar:
    """Find and crop the face (in a media thread); have the worker encode it now, not at session start."""
    try:
        avatar = await in_thread(ctx, ctx.avatars.add, data)
    except NoFaceError as exc:
        raise ApiError(422, "no_face", str(exc)) from None
    except ImageTooLarge as exc:
        raise ApiError(413, "too_many_pixels", str(exc)) from None
    except MediaError as exc:
        raise ApiError(400, "not_an_image", str(exc)) from None
    crop = avatar.crop
    ctx.worker.submit(lambda engine: engine.portraits.get(crop))
    return avatar


def known_avatar(ctx: AppContext, avatar_id: str) -> Avatar:
    avatar = ctx.avatars.get(avatar_id)
    if avatar is None:
        raise ApiError(404, "unknown_avatar", f"no avatar {avatar_id!r}: upload it with POST /v1/avatars")
    return avatar


def check_sdp(sdp: str) -> None:
    """Cheap structural checks before aiortc sees the offer (it accepts some truncated ones)."""
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise ApiError(413, "too_large", f"the SDP offer is over {MAX_SDP_BYTES} bytes")
    lines = [line.strip() for line in sdp.strip().splitlines()]
    if not lines or lines[0] != "v=0":
        raise ApiError(400, "bad_sdp", "the SDP offer must start with 'v=0'")
    for needed in ("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:"):
        if not any(line.startswith(needed) for line in lines):
            raise ApiError(400, "bad_sdp", f"the SDP offer has no '{needed}' line (truncated or not WebRTC)")
    kinds = {check_media_line(line) for line in lines if line.startswith("m=")}
    if not {"audio", "video"} <= kinds:
        raise ApiError(400, "bad_sdp", "the offer must have an audio and a video section (microphone and "
                                       "webcam, or recvonly transceivers for both)")


def check_media_line(line: str) -> str:
    """`m=<media> <port> <proto> <fmt> ...` (RFC 8866): its media kind, or 400 saying what is wrong."""
    parts = line[2:].split()
    if len(parts) < 4:
        raise ApiError(400, "bad_sdp", f"media line {line!r} needs a kind, a port, a protocol and at least "
                                       "one format")
    kind, port, proto, formats = parts[0], parts[1], parts[2], parts[3:]
    if not port.split("/")[0].isdigit():
        raise ApiError(400, "bad_sdp", f"media line {line!r}: the port {port!r} is not a number")
    if kind in ("audio", "video"):
        if proto not in RTP_PROTOCOLS:
            raise ApiError(400, "bad_sdp", f"media line {line!r}: protocol {proto!r} is not WebRTC's "
                                           "(expected UDP/TLS/RTP/SAVPF)")
        if not all(f.isdigit() and int(f) <= 127 for f in formats):
            raise ApiError(400, "bad_sdp", f"media line {line!r}: RTP formats must be payload types 0-127")
    elif kind == "application":
        if proto not in DATA_PROTOCOLS:
            raise ApiError(400, "bad_sdp", f"media line {line!r}: protocol {proto!r} is not a data channel's")
    else:
        raise ApiError(400, "bad_sdp", f"media line {line!r}: unknown media kind {kind!r}")
    return kind


# -- routes -------------------------------------------------------------------------------------------------

public = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_auth), Depends(require_origin)], responses=ERRORS)


@public.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


@public.get("/healthz", tags=["health"])
async def healthz() -> dict:
    return {"status": "ok"}


@public.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
async def readyz(request: Request):
    ctx = ctx_of(request)
    refused = ctx.sessions.refusal()
    model = model_note(ctx.settings)
    if refused is not None:
        return JSONResponse({"status": "not_ready", "reason": refused.code, "detail": refused.message,
                             "model": model}, 503)
    fit = measured_capacity(ctx)
    return {"status": "ready", "capacity_free": max(0, min(ctx.sessions.free, fit - len(ctx.sessions.sessions))),
            "capacity_measured": fit, "model": model}


def measured_capacity(ctx: AppContext) -> int:
    """How many sessions this machine can run at once, from what the worker measured at warm-up (the
    same rule admission applies), never more than the configured slots. Slots alone say 16 on a CPU
    that runs one session at 60-90 % of real time."""
    slots = ctx.settings.max_sessions
    worker = ctx.worker
    if ctx.settings.overload_admission != "predict" or worker.cost_first <= 0:
        return slots  # not measured yet, or admission does not use it
    if worker.cost_first > OVERLOAD_ON:
        return 1  # an idle server admits one session all the same (behind real time: announce_ready warns)
    if worker.cost_more <= 0:
        return slots
    return min(slots, 1 + int((OVERLOAD_ON - worker.cost_first) / worker.cost_more))


def model_note(settings: ServerSettings) -> dict:
    """Which model serves, and what a person should expect of it (the page shows the note)."""
    if settings.config in ("", "official"):
        return {"name": "official", "note": ""}
    if settings.config == "builtin":
        return {"name": "builtin", "note": "This server runs the small built-in model (128 px, trained here on "
                                          "rigged public-domain portraits and synthetic voices): it talks and "
                                          "listens, but it is not the official model's quality."}
    return {"name": "test", "note": "This server runs a small test model with random weights: the face "
                                    "moves, but its speech and reactions mean nothing (not the official model)."}


@public.get("/metrics", tags=["health"], response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(ctx_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@v1.post("/avatars", status_code=201, response_model=AvatarCreated, tags=["avatars"],
         openapi_extra={"requestBody": {"content": {
             "multipart/form-data": {"schema": {"type": "object", "properties": {
                 "image": {"type": "string", "format": "binary"}}, "required": ["image"]}},
             **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES[:-1]}}}})
async def create_avatar(request: Request) -> AvatarCreated:
    ctx = ctx_of(request)
    data = await read_upload(request, "image", IMAGE_TYPES, ctx.settings.max_upload_bytes, "the portrait")
    avatar = await add_avatar(ctx, data)
    return AvatarCreated(avatar_id=avatar.avatar_id, width=avatar.source_size[0], height=avatar.source_size[1])


@v1.get("/avatars", response_model=AvatarList, tags=["avatars"])
async def list_avatars(request: Request) -> AvatarList:
    return AvatarList(avatars=[AvatarInfo(avatar_id=a.avatar_id, created_at=a.created_at)
                               for a in ctx_of(request).avatars.list()])


@v1.get("/avatars/{avatar_id}/image", tags=["avatars"], response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}})
async def avatar_image(avatar_id: str, request: Request) -> Response:
    return Response(known_avatar(ctx_of(request), avatar_id).jpeg, media_type="image/jpeg")


@v1.post("/sessions", status_code=201, response_model=SessionAnswer, tags=["sessions"],
         openapi_extra={"requestBody": {"required": True, "content": {
             "application/json": {"schema": {"$ref": "#/components/schemas/SessionOffer"}},
             "multipart/form-data": {"schema": {"type": "object", "properties": {
                 "sdp": {"type": "string"}, "type": {"type": "string"},
                 "options": {"type": "string", "description": "SessionOptions as JSON"},
                 "image": {"type": "string", "format": "binary"}}, "required": ["sdp", "image"]}}}}})
async def create_session(request: Request) -> SessionAnswer:
    ctx = ctx_of(request)
    ctx.sessions.admit()  # before reading uploads or finding faces: a full server answers at once
    kind = media_type(request)
    if kind == "application/json":
        raw = await read_body(request, MAX_SDP_BYTES + 4096, "the session request")
        try:
            offer = SessionOffer.model_validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            raise ApiError(422, "invalid_request", f"the session request is not valid: {problems}") from None
        avatar = known_avatar(ctx, offer.avatar_id)
    elif kind == "multipart/form-data":
        data = await read_upload(request, "image", IMAGE_TYPES, ctx.settings.max_upload_bytes, "the portrait")
        form = await read_form(request, ctx.settings.max_upload_bytes, "the portrait")
        fields = {name: form.get(name) for name in ("sdp", "type", "options")}
        files = [name for name, value in fields.items() if value is not None and not isinstance(value, str)]
        if files:
            raise ApiError(422, "invalid_request", f"the session form is not valid: {', '.join(files)} must be "
                                                   "text fields, not files")
        try:
            options = SessionOptions.model_validate_json(str(fields["options"] or "{}"))
            offer = SessionOffer(sdp=str(fields["sdp"] or ""), type=str(fields["type"] or "offer"),
                                 avatar_id="upload", options=options)
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", f"the session form is not valid: {exc.errors()[0]['msg']}") from None
        avatar = await add_avatar(ctx, data)
    else:
        raise ApiError(415, "unsupported_media_type", "send the session request as application/json (with "
                                                      "avatar_id) or multipart/form-data (with an image)")
    check_sdp(offer.sdp)
    session, answer = await ctx.sessions.create(avatar, offer.sdp, offer.type, offer.options.seed)
    return SessionAnswer(session_id=session.id, sdp=answer, watermark=watermark_payload(ctx.settings, session.id))


@v1.get("/sessions/{session_id}", tags=["sessions"])
async def get_session(session_id: str, request: Request) -> dict:
    return ctx_of(request).sessions.describe(session_id)


@v1.delete("/sessions/{session_id}", status_code=204, tags=["sessions"], response_class=Response)
async def delete_session(session_id: str, request: Request) -> Response:
    await ctx_of(request).sessions.close(session_id, "deleted")
    return Response(status_code=204)


@v1.post("/sessions/{session_id}/interrupt", response_model=Interrupted, tags=["speech"])
async def interrupt(session_id: str, request: Request) -> Interrupted:
    return Interrupted(dropped_seconds=round(ctx_of(request).sessions.get(session_id).interrupt(), 3))


async def _queue_speech(ctx: AppContext, session_id: str, pcm: np.ndarray, rate: int) -> SpeechQueued:
    seconds = len(pcm) / rate
    if seconds > ctx.settings.max_speech_seconds:
        raise ApiError(413, "too_large", f"{seconds:.1f} s of speech is over the "
                                         f"{ctx.settings.max_speech_seconds:.0f} s limit per request")
    session = ctx.sessions.get(session_id)  # again: it may have ended meanwhile
    # At its own rate (the session resamples, in this media thread); a whole file is one utterance.
    return SpeechQueued(**await in_thread(ctx, session.push_speech, pcm, rate, True))


@v1.post("/sessions/{session_id}/speech", status_code=202, response_model=SpeechQueued, tags=["speech"],
         openapi_extra={"requestBody": {"required": True, "content": {
             t: {"schema": {"type": "string", "format": "binary"}} for t in WAV_TYPES[:2]}}})
async def post_speech(session_id: str, request: Request) -> SpeechQueued:
    ctx = ctx_of(request)
    ctx.sessions.get(session_id)
    if media_type(request) not in WAV_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"send a WAV file as audio/wav; got {media_type(request) or 'none'}")
    data = await read_body(request, ctx.settings.max_upload_bytes, "the WAV file")
    try:
        pcm, rate = await in_thread(ctx, wav_body, data)
    except MediaError as exc:
        raise ApiError(400, "bad_wav", str(exc)) from None
    return await _queue_speech(ctx, session_id, pcm, rate)


@v1.post("/sessions/{session_id}/speech/test-phrase", status_code=202, response_model=SpeechQueued,
         tags=["speech"])
async def post_test_phrase(session_id: str, request: Request) -> SpeechQueued:
    ctx = ctx_of(request)
    ctx.sessions.get(session_id)
    pcm, rate = await in_thread(ctx, test_phrase)
    return await _queue_speech(ctx, session_id, pcm, rate)


@v1.get("/ice-servers", response_model=IceServers, tags=["sessions"])
async def get_ice_servers(request: Request) -> IceServers:
    settings = ctx_of(request).settings
    return IceServers(ice_servers=ice_servers(settings), ttl_seconds=settings.turn_ttl_s)


# -- the speech stream --------------------------------------------------------------------------------------

ws_router = APIRouter()


@ws_router.websocket("/v1/sessions/{session_id}/speech")
async def speech_stream(websocket: WebSocket, session_id: str):
    ctx: AppContext = websocket.app.state.ctx
    token = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    if not _token_ok(ctx.settings, token):
        return await _deny(websocket, 401, "unauthorized", "missing or wrong token: pass ?token=<token>")
    if not origin_allowed(ctx.settings, websocket.headers.get("origin"), websocket.headers.get("host")):
        return await _deny(websocket, 403, "forbidden_origin", f"pages from {websocket.headers.get('origin')!r} "
                                                               "may not stream speech: add that origin to "
                                                               "AVATAR_FORCING_CORS_ORIGINS")
    session = ctx.sessions.sessions.get(session_id)
    if session is None:
        return await _deny(websocket, 404, "unknown_session", f"no session {session_id!r} on this server")
    try:
        rate = parse_sample_rate(websocket.query_params.get("sample_rate"))
    except ValueError as exc:
        return await _deny(websocket, 400, "bad_sample_rate", str(exc))
    # Playback events are asked for (?events=1): a client that reads one answer per message keeps working.
    wanted = websocket.query_params.get("events", "0")
    if wanted not in ("0", "1", "false", "true"):
        return await _deny(websocket, 400, "bad_events", f"events={wanted!r}: use events=1 for playback events")
    events: asyncio.Queue | None = asyncio.Queue() if wanted in ("1", "true") else None
    await websocket.accept()
    await websocket.send_json({"type": "ready", "sample_rate": rate, **({"playback_events": True} if events else {})})
    if events is not None:
        session.playback_listeners.add(events)
    # An idle socket must not outlive its session (nor keep it in memory): wait for either.
    ended = asyncio.ensure_future(session.ended.wait())
    receiving: asyncio.Future | None = None
    next_event: asyncio.Future | None = None
    try:
        while True:
            # One sender (this loop) for answers and events alike, so they never interleave mid-message.
            receiving = receiving or asyncio.ensure_future(websocket.receive())
            waits = {receiving, ended}
            if events is not None:
                next_event = next_event or asyncio.ensure_future(events.get())
                waits.add(next_event)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if next_event is not None and next_event.done():
                await websocket.send_json(next_event.result())
                next_event = None
                continue
            if not receiving.done():
                await _ws_error(websocket, 1000, "session_ended", "the session has ended")
                return
            message, receiving = receiving.result(), None
            if message["type"] == "websocket.disconnect":
                return
            if session.state == "closed":
                await _ws_error(websocket, 1000, "session_ended", "the session has ended")
                return
            if message.get("bytes") is not None:
                data = message["bytes"]
                if len(data) > MAX_WS_MESSAGE_BYTES:
                    await _ws_error(websocket, 1009, "too_large",
                                    f"a message is at most {MAX_WS_MESSAGE_BYTES} bytes; send smaller chunks")
                    return
                try:
                    # Resampling is codec work: in a media thread (the socket is read in order, so
                    # chunks still queue in order).
                    queued = await in_thread(ctx, lambda data=data: session.push_speech(pcm16_to_float(data), rate))
                except MediaError as exc:
                    await _ws_error(websocket, 1003, "bad_pcm", str(exc))
                    return
                except ApiError as exc:
                    await _ws_error(websocket, 1009, exc.code, exc.message)
                    return
                await websocket.send_json({"type": "queued", **queued})
            elif message.get("text") is not None:
                try:
                    command = json.loads(message["text"])
                except ValueError:
                    command = None
                kind = command.get("type") if isinstance(command, dict) else None
                if kind == "interrupt":
                    dropped = session.interrupt()
                    if events is None:  # a listening socket has the `interrupted` event in its queue
                        await websocket.send_json({"type": "interrupted", "dropped_seconds": round(dropped, 3)})
                elif kind in ("flush", "end_of_speech"):
                    await websocket.send_json({"type": "flushed", "utterance_id": session.end_utterance()})
                else:
                    await _ws_error(websocket, 1003, "bad_command",
                                    'text messages are JSON commands: {"type": "interrupt"}, {"type": "flush"} or '
                                    '{"type": "end_of_speech"}; audio goes as binary')
                    return
    except WebSocketDisconnect:
        return
    finally:
        if events is not None:
            session.playback_listeners.discard(events)
        for pending in (ended, receiving, next_event):
            if pending is not None:
                pending.cancel()


async def _deny(websocket: WebSocket, status: int, code: str, message: str) -> None:
    await websocket.send_denial_response(error_response(status, code, message))


async def _ws_error(websocket: WebSocket, close_code: int, code: str, message: str) -> None:
    await websocket.send_json({"type": "error", "error": {"code": code, "message": message}})
    await websocket.close(close_code)


# -- event loop lag -----------------------------------------------------------------------------------------


async def watch_loop_lag(ctx: AppContext, period: float = 0.05, window_s: float = 10.0) -> None:
    """How late the loop wakes a sleeping task: the delay every other coroutine sees too."""
    window: deque[tuple[float, float]] = deque()
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(period)
        lag = max(0.0, time.perf_counter() - t0 - period)
        ctx.metrics.loop_lag.observe(lag)
        now = time.monotonic()
        window.append((now, lag))
        while window[0][0] < now - window_s:
            window.popleft()
        lags = [v for _, v in window]
        for stat, q in (("p50", 50), ("p99", 99), ("max", 100)):
            ctx.metrics.loop_lag_window.labels(stat).set(percentile(lags, q))
