"""The HTTP API against the real server: bad input gets the right 4xx with a JSON error, never a crash."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json

import cv2
import httpx
import numpy as np
import pytest
import websockets
from golden_data import MEDIA_DIR
from media_files import wav_bytes
from server_harness import needs_golden, needs_media, offer_sdp, running_server
from websockets.exceptions import ConnectionClosed, InvalidStatus

pytestmark = [needs_golden, needs_media]
TOKEN = "s3cret-token"
TURN_SECRET = "turn-shared-secret"
MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("api"), max_sessions=2, auth_token=TOKEN,
                        max_upload_bytes=MAX_UPLOAD, max_speech_seconds=20,
                        turn_urls="turn:turn.example.com:3478?transport=udp", turn_secret=TURN_SECRET,
                        stun_urls="stun:stun.example.com:3478", cors_origins="https://app.example.com") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def avatar_id(http):
    r = http.post("/v1/avatars", content=(MEDIA_DIR / "rumi.jpg").read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 201, r.text
    return r.json()["avatar_id"]


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["status"] == status and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# -- authentication and health -----------------------------------------------------------------------------


def test_health_and_readiness_need_no_token(server):
    assert httpx.get(server.base_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.base_url + "/readyz")
    assert ready.status_code == 200 and ready.json()["capacity_free"] == 2


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc"])
def test_v1_routes_need_the_bearer_token(server, header):
    headers = {"Authorization": header} if header else {}
    r = httpx.get(server.base_url + "/v1/avatars", headers=headers)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"


def test_cors_preflight_for_the_configured_origin(server):
    r = httpx.options(server.base_url + "/v1/sessions", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    other = httpx.options(server.base_url + "/v1/sessions", headers={
        "Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers


def test_ice_servers_hand_out_coturn_rest_credentials(http):
    body = http.get("/v1/ice-servers").json()
    stun, turn = body["ice_servers"]
    assert stun == {"urls": ["stun:stun.example.com:3478"]}
    expiry, _, name = turn["username"].partition(":")
    assert int(expiry) > 0 and name
    expected = base64.b64encode(hmac.new(TURN_SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest())
    assert turn["credential"] == expected.decode()
    assert body["ttl_seconds"] == 3600


# -- avatars -----------------------------------------------------------------------------------------------


def test_avatar_upload_as_multipart_and_listing(http):
    r = http.post("/v1/avatars", files={"image": ("rumi.jpg", (MEDIA_DIR / "rumi.jpg").read_bytes(), "image/jpeg")})
    assert r.status_code == 201, r.text
    aid = r.json()["avatar_id"]
    assert aid in [a["avatar_id"] for a in http.get("/v1/avatars").json()["avatars"]]
    image = http.get(f"/v1/avatars/{aid}/image")
    assert image.headers["content-type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(image.content, np.uint8), cv2.IMREAD_COLOR).shape == (128, 128, 3)


def test_avatar_that_is_not_an_image(http):
    assert_error(http.post("/v1/avatars", content=b"definitely not a jpeg", headers={"content-type": "image/jpeg"}),
                 400, "not_an_image")


def test_avatar_without_a_face(http):
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    png = cv2.imencode(".png", noise)[1].tobytes()
    assert_error(http.post("/v1/avatars", content=png, headers={"content-type": "image/png"}), 422, "no_face")


def test_avatar_of_the_wrong_content_type(http):
    assert_error(http.post("/v1/avatars", content=b"hello", headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type")


def test_oversized_upload_is_refused(http):
    big = np.random.default_rng(1).integers(0, 255, (600, 600, 3), dtype=np.uint8)
    png = cv2.imencode(".png", big)[1].tobytes()
    assert len(png) > MAX_UPLOAD
    assert_error(http.post("/v1/avatars", content=png, headers={"content-type": "image/png"}), 413, "too_large")


def test_unknown_avatar(http):
    assert_error(http.get("/v1/avatars/nope/image"), 404, "unknown_avatar")
    assert_error(http.post("/v1/sessions", json={"sdp": offer_sdp(), "type": "offer", "avatar_id": "nope"}),
                 404, "unknown_avatar")


# -- session offers ----------------------------------------------------------------------------------------


def test_malformed_sdp(http, avatar_id):
    assert_error(http.post("/v1/sessions", json={"sdp": "hello", "type": "offer", "avatar_id": avatar_id}),
                 400, "bad_sdp")


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_truncated_sdp(http, avatar_id, fraction):
    sdp = offer_sdp()
    cut = sdp[: int(len(sdp) * fraction)]
    assert_error(http.post("/v1/sessions", json={"sdp": cut, "type": "offer", "avatar_id": avatar_id}), 400, "bad_sdp")


def test_offer_without_video(http, avatar_id):
    sdp = offer_sdp()
    audio_only = sdp[: sdp.index("m=video")]
    assert_error(http.post("/v1/sessions", json={"sdp": audio_only, "type": "offer", "avatar_id": avatar_id}),
                 400, "bad_sdp")


def test_answer_instead_of_offer(http, avatar_id):
    assert_error(http.post("/v1/sessions", json={"sdp": offer_sdp(), "type": "answer", "avatar_id": avatar_id}),
                 400, "bad_sdp")


def test_session_request_of_the_wrong_shape(http):
    assert_error(http.post("/v1/sessions", json={"type": "offer"}), 422, "invalid_request")
    assert_error(http.post("/v1/sessions", content=b"{not json", headers={"content-type": "application/json"}),
                 422, "invalid_request")
    assert_error(http.post("/v1/sessions", content=b"sdp", headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type")


def test_session_with_a_portrait_upload_in_the_same_request(http):
    r = http.post("/v1/sessions", data={"sdp": offer_sdp(), "type": "offer"},
                  files={"image": ("rumi.jpg", (MEDIA_DIR / "rumi.jpg").read_bytes(), "image/jpeg")})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["type"] == "answer" and body["sdp"].startswith("v=0")
    assert http.delete(f"/v1/sessions/{body['session_id']}").status_code == 204


# -- unknown sessions and speech ---------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", [("GET", ""), ("DELETE", ""), ("POST", "/interrupt"),
                                         ("POST", "/speech/test-phrase")])
def test_unknown_session_ids(http, method, path):
    assert_error(http.request(method, f"/v1/sessions/s_missing{path}"), 404, "unknown_session")


@pytest.fixture()
def session_id(http, avatar_id):
    r = http.post("/v1/sessions", json={"sdp": offer_sdp(), "type": "offer", "avatar_id": avatar_id})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    yield sid
    http.delete(f"/v1/sessions/{sid}")


def test_speech_wav_upload(http, session_id):
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(24000) / 24000)).astype(np.float32)
    r = http.post(f"/v1/sessions/{session_id}/speech", content=wav_bytes(tone, 24000),
                  headers={"content-type": "audio/wav"})
    assert r.status_code == 202, r.text
    assert r.json()["queued_seconds"] == pytest.approx(1.0, abs=0.05)
    assert http.post(f"/v1/sessions/{session_id}/interrupt").json()["dropped_seconds"] == pytest.approx(1.0, abs=0.05)


def test_speech_wav_with_a_bad_header(http, session_id):
    body = wav_bytes(np.zeros(1000, np.float32), 16000)
    wav = {"content-type": "audio/wav"}
    assert_error(http.post(f"/v1/sessions/{session_id}/speech", content=body[:30], headers=wav), 400, "bad_wav")
    assert_error(http.post(f"/v1/sessions/{session_id}/speech", content=b"RIFF" + body[8:], headers=wav),
                 400, "bad_wav")


def test_speech_of_the_wrong_type_or_too_long(http, session_id):
    assert_error(http.post(f"/v1/sessions/{session_id}/speech", content=b"x", headers={"content-type": "image/png"}),
                 415, "unsupported_media_type")
    long = wav_bytes(np.zeros(8000 * 25, np.float32), 8000)  # 25 s > the 20 s limit, 400 kB > 300 kB
    assert_error(http.post(f"/v1/sessions/{session_id}/speech", content=long, headers={"content-type": "audio/wav"}),
                 413, "too_large")


def test_test_phrase(http, session_id):
    r = http.post(f"/v1/sessions/{session_id}/speech/test-phrase")
    assert r.status_code == 202 and r.json()["queued_seconds"] > 1


def ws_url(server, session_id: str, query: str) -> str:
    return server.base_url.replace("http", "ws", 1) + f"/v1/sessions/{session_id}/speech{query}"


@pytest.mark.parametrize("query,status,code", [
    (f"?token={TOKEN}", 400, "bad_sample_rate"),  # rate not declared
    (f"?token={TOKEN}&sample_rate=abc", 400, "bad_sample_rate"),
    (f"?token={TOKEN}&sample_rate=100", 400, "bad_sample_rate"),
    ("?sample_rate=16000", 401, "unauthorized"),
])
def test_speech_stream_refused_before_opening(server, session_id, query, status, code):
    async def connect():
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(ws_url(server, session_id, query)):
                pass
        return refused.value.response

    response = asyncio.run(connect())
    assert response.status_code == status
    assert json.loads(response.body)["error"]["code"] == code


def test_speech_stream_of_unknown_session(server):
    async def connect():
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(ws_url(server, "s_missing", f"?token={TOKEN}&sample_rate=16000")):
                pass
        return refused.value.response.status_code

    assert asyncio.run(connect()) == 404


def test_speech_stream_bad_messages_close_with_an_error(server, session_id):
    async def talk(message):
        async with websockets.connect(ws_url(server, session_id, f"?token={TOKEN}&sample_rate=16000")) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await ws.send(message)
            reply = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            return reply, closed.value.rcvd.code

    reply, code = asyncio.run(talk(b"\x01\x02\x03"))  # an odd number of bytes is not PCM16
    assert reply["type"] == "error" and reply["error"]["code"] == "bad_pcm" and code == 1003
    reply, code = asyncio.run(talk("say hello"))
    assert reply["error"]["code"] == "bad_command" and code == 1003


def test_speech_stream_queues_and_interrupts(server, session_id):
    async def talk():
        async with websockets.connect(ws_url(server, session_id, f"?token={TOKEN}&sample_rate=24000")) as ws:
            assert json.loads(await ws.recv()) == {"type": "ready", "sample_rate": 24000}
            for _ in range(5):
                await ws.send((np.ones(2400, "<i2") * 1000).tobytes())  # 0.1 s at 24 kHz
                queued = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "interrupt"}))
            return queued, json.loads(await ws.recv())

    queued, interrupted = asyncio.run(talk())
    assert queued["type"] == "queued" and queued["queued_seconds"] == pytest.approx(0.5, abs=0.05)
    assert interrupted["type"] == "interrupted" and interrupted["dropped_seconds"] == pytest.approx(0.5, abs=0.05)


# -- capacity and schema -----------------------------------------------------------------------------------


def test_more_sessions_than_capacity(http, avatar_id, server):
    opened = []
    try:
        for _ in range(2):
            r = http.post("/v1/sessions", json={"sdp": offer_sdp(), "type": "offer", "avatar_id": avatar_id})
            assert r.status_code == 201, r.text
            opened.append(r.json()["session_id"])
        r = http.post("/v1/sessions", json={"sdp": offer_sdp(), "type": "offer", "avatar_id": avatar_id})
        assert_error(r, 503, "at_capacity")
        assert int(r.headers["retry-after"]) > 0
        ready = httpx.get(server.base_url + "/readyz")
        assert ready.status_code == 503 and ready.json()["reason"] == "at_capacity"
        assert server.metric("avatar_sessions_rejected_total", 'reason="at_capacity"') >= 1
    finally:
        for sid in opened:
            http.delete(f"/v1/sessions/{sid}")
    assert httpx.get(server.base_url + "/readyz").status_code == 200


def test_openapi_schema_lists_every_route(http):
    schema = http.get("/openapi.json").json()
    paths = schema["paths"]
    for path, methods in {
        "/v1/avatars": {"post", "get"}, "/v1/avatars/{avatar_id}/image": {"get"}, "/v1/sessions": {"post"},
        "/v1/sessions/{session_id}": {"get", "delete"}, "/v1/sessions/{session_id}/speech": {"post"},
        "/v1/sessions/{session_id}/speech/test-phrase": {"post"}, "/v1/sessions/{session_id}/interrupt": {"post"},
        "/v1/ice-servers": {"get"}, "/healthz": {"get"}, "/readyz": {"get"}, "/metrics": {"get"},
    }.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    offer = paths["/v1/sessions"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(offer)
    assert "503" in paths["/v1/sessions"]["post"]["responses"]


def test_ended_session_stays_visible_and_delete_is_idempotent(http, avatar_id):
    r = http.post("/v1/sessions", json={"sdp": offer_sdp(), "type": "offer", "avatar_id": avatar_id})
    sid = r.json()["session_id"]
    assert http.get(f"/v1/sessions/{sid}").json()["state"] == "connecting"
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204
    info = http.get(f"/v1/sessions/{sid}").json()
    assert info["state"] == "closed" and info["end_reason"] == "deleted"
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204  # a second DELETE is not an error
    assert_error(http.post(f"/v1/sessions/{sid}/interrupt"), 404, "unknown_session")  # but it is over


def test_admission_predicts_overload_from_the_measured_session_cost(tmp_path):
    """With overload admission on, a new session is refused (503 overloaded) as soon as the worker's measured
    cost says it would not keep up; the count admitted follows from the costs the server exports."""
    with running_server(tmp_path, max_sessions=16, overload_admission="predict") as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as c:
        first = server.metric("avatar_session_cost_ratio", 'which="first"')
        more = server.metric("avatar_session_cost_ratio", 'which="more"')
        assert first > 0 and more >= 0
        # An idle server admits one session even when that one alone would fall behind real time.
        expected = 1 + int((0.9 - first) / more) if first <= 0.9 and more > 0 else (16 if first <= 0.9 else 1)
        expected = min(expected, 16)
        aid = c.post("/v1/avatars", content=(MEDIA_DIR / "rumi.jpg").read_bytes(),
                     headers={"content-type": "image/jpeg"}).json()["avatar_id"]
        admitted, refusal = 0, None
        for _ in range(17):
            r = c.post("/v1/sessions", json={"sdp": offer_sdp(), "type": "offer", "avatar_id": aid})
            if r.status_code != 201:
                refusal = r
                break
            admitted += 1
        assert admitted == expected, (admitted, expected, first, more)
        code = "at_capacity" if expected == 16 else "overloaded"
        assert_error(refusal, 503, code)
        assert int(refusal.headers["retry-after"]) > 0
        if code == "overloaded":
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["reason"] == "overloaded"


def test_the_project_clients_drop_idle_connections_before_the_server_does():
    """Equal keep-alive times race: a request sent as the server closes its idle connection fails (ReadError)."""
    from avatar_forcing.server.config import CLIENT_KEEP_ALIVE_S, ServerSettings

    assert 0 < CLIENT_KEEP_ALIVE_S < ServerSettings().keep_alive_s
