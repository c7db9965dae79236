"""A real browser against a real server: the page at / opens a WebRTC conversation with Chromium's fake
camera and microphone playing ../shared/media/user.mp4, receives the avatar at 25 fps, and stops it; and
the page says what happened when things go wrong: each of the server's refusals in its own words, a
server that goes away mid-session, a browser that offers no network address for the media.

Screenshots of those pages land in $AVATAR_FORCING_SCREENSHOTS (default /tmp/screens).

Needs Debian's chromium and chromium-driver, the shared media and golden folders, and a loopback address
other than 127.0.0.1 (ICE ignores 127.0.0.1), that is, running inside a private network namespace:

    unshare -n sh -c 'ip link set lo up; ip addr add 127.0.0.2/8 dev lo; exec .venv/bin/pytest tests/test_browser.py'

Each missing piece skips the tests with its reason.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import wave
from pathlib import Path
from types import SimpleNamespace

import av
import httpx
import numpy as np
import pytest
from golden_data import MEDIA_DIR, golden_folders
from server_harness import RTC_HOST, ServerProcess, host_available, running_server

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless as root, no network chatter, fake devices that need no permission prompt (ENVIRONMENT.md).
CHROME_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--allow-loopback-in-peer-connection",
    "--disable-dev-shm-usage",
]
FPS = 25
CLIP_SECONDS = 5  # the browser loops the clip
AVATAR_SIZE = 128  # the small reference configuration
WINDOW = (1280, 1000)  # a laptop screen: what must be visible without scrolling is checked against it
SCREENS = Path(os.environ.get("AVATAR_FORCING_SCREENSHOTS", "/tmp/screens"))


def _golden_folder() -> Path | None:
    folder = golden_folders()[0]
    return folder if (folder / "small_config.json").exists() else None


def _skip_reason() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} missing (Debian packages chromium and chromium-driver; scripts/install-system-deps.sh)"
    for name in ("rumi.jpg", "user.mp4"):
        if not (MEDIA_DIR / name).exists():
            return f"{MEDIA_DIR / name} missing (the shared sample media)"
    if _golden_folder() is None:
        return f"no golden folder at {golden_folders()[0]} (set AVATAR_FORCING_GOLDEN)"
    if not host_available(RTC_HOST):
        return ("no loopback address other than 127.0.0.1 (ICE ignores it): run inside "
                "unshare -n sh -c 'ip link set lo up; ip addr add 127.0.0.2/8 dev lo; exec pytest ...'")
    return None


_reason = _skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402  (only once we know a browser is there)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

# ---- media for the fake camera and microphone ----

def write_y4m(src: Path, dst: Path, seconds: float, width: int = 320, height: int = 240) -> int:
    """The clip's first seconds as raw YUV4MPEG2 (what Chromium's fake camera reads), cropped to 4:3."""
    frames = 0
    with av.open(str(src)) as container, open(dst, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{FPS}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in container.decode(video=0):  # user.mp4 is 25 fps already
            rgb = frame.to_ndarray(format="rgb24")
            keep = rgb.shape[1] * height // width  # rows of a 4:3 window, taken from the middle
            top = max(0, (rgb.shape[0] - keep) // 2)
            rgb = np.ascontiguousarray(rgb[top:top + keep])
            yuv = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(width, height, format="yuv420p")
            out.write(b"FRAME\n")
            out.write(yuv.to_ndarray().tobytes())  # Y, U, V planes back to back, no padding
            frames += 1
            if frames >= seconds * FPS:
                break
    return frames


def write_wav(src: Path, dst: Path, seconds: float, rate: int = 48000) -> None:
    """The clip's sound as 16-bit mono PCM WAV (what Chromium's fake microphone reads)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    chunks = []
    with av.open(str(src)) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    pcm = np.concatenate(chunks)[: int(seconds * rate)].astype("<i2")
    with wave.open(str(dst), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


# ---- fixtures: media, server, browser ----

@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake_devices")
    y4m, wav = folder / "user.y4m", folder / "user.wav"
    assert write_y4m(MEDIA_DIR / "user.mp4", y4m, CLIP_SECONDS) == CLIP_SECONDS * FPS
    write_wav(MEDIA_DIR / "user.mp4", wav, CLIP_SECONDS)
    return y4m, wav


class Server:
    """The harness's server process, with a plain HTTP client for the test's own checks."""

    def __init__(self, process: ServerProcess):
        self.process = process
        self.base = process.base_url
        self.http = httpx.Client(base_url=self.base, timeout=30)

    def logs(self) -> str:
        return "--- server log (tail) ---\n" + "\n".join(self.process.log().splitlines()[-60:])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # One slot: a second tab meets the server's real at_capacity refusal.
    with running_server(tmp_path_factory.mktemp("server"), max_sessions=1) as process:
        srv = Server(process)
        try:
            yield srv
        finally:
            srv.http.close()


def launch_browser(media, home: Path, args=CHROME_ARGS):
    y4m, wav = media
    # The browser writes caches and settings under HOME/XDG dirs: keep them in the test's tmp folder.
    home.mkdir(parents=True, exist_ok=True)  # (chromedriver exits at once when its log's folder is missing)
    env = dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(home / "cache"), XDG_CONFIG_HOME=str(home / "config"),
               SE_OFFLINE="true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in args:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={home / 'profile'}")
    options.add_argument(f"--use-file-for-fake-video-capture={y4m}")
    options.add_argument(f"--use-file-for-fake-audio-capture={wav}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    old_offline = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # selenium itself must never fetch a browser or driver
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, env=env,
                                                  log_output=str(home / "chromedriver.log")),
                                  options=options)
    finally:
        if old_offline is None:
            os.environ.pop("SE_OFFLINE", None)
        else:
            os.environ["SE_OFFLINE"] = old_offline
    driver.set_script_timeout(20)
    driver.set_window_size(*WINDOW)
    return driver


@pytest.fixture(scope="module")
def browser(media, tmp_path_factory):
    driver = launch_browser(media, tmp_path_factory.mktemp("browser_home"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def avatar_id(server):
    r = server.http.post("/v1/avatars", content=(MEDIA_DIR / "rumi.jpg").read_bytes(),
                         headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 201, f"POST /v1/avatars: {r.status_code} {r.text}\n{server.logs()}"
    return r.json()["avatar_id"]


# ---- helpers ----

def wait_for(what: str, probe, timeout: float, interval: float = 0.2, context=lambda: ""):
    """Poll probe() until it returns something truthy; fail with `what` and context() after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:.0f} s; last: {value!r}\n{context()}")
        time.sleep(interval)


def browser_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


VIDEO_JS = """
const v = document.getElementById('remote');
return {width: v.videoWidth, height: v.videoHeight, time: v.currentTime, paused: v.paused,
        ready: v.readyState};
"""


# ---- tests ----

def test_conversation_through_the_page(server, browser, avatar_id):
    t0 = time.monotonic()
    marks = {}
    driver = browser
    js = driver.execute_script

    def context():
        try:
            page = js("return {state: avatarDemo.state(), status: document.getElementById('call-status').textContent}")
        except Exception as exc:  # the page itself may be what broke
            page = repr(exc)
        return f"page: {page}\nbrowser errors: {browser_errors(driver)}\n{server.logs()}"

    driver.get(f"{server.base}/?avatar={avatar_id}")
    start = driver.find_element(By.ID, "start")
    wait_for("the Start button enabled (portrait list loaded)", start.is_enabled, 10, context=context)
    # The page says what this server runs: the small test model's random weights make no real avatar.
    notes = driver.find_element(By.ID, "server-notes")
    wait_for("the random-weights note", lambda: "random weights" in notes.text, 5, context=context)
    assert speech_buttons_enabled(driver) == [False, False, False]
    start.click()  # the real button, as a person would

    def live():
        state = js("return avatarDemo.state()")
        if state["state"] == "failed":
            pytest.fail(f"the page failed to start: {state['error']}\n{context()}")
        return state if state["state"] == "live" and state["sessionId"] else None

    # Speech cannot be given before the avatar is there: the buttons wait for "live".
    # State and buttons are read in one script, so a session going live between two reads is no false alarm.
    read_both = ("return [avatarDemo.state().state, "
                 "['speech-send', 'test-phrase', 'interrupt'].map(id => !document.getElementById(id).disabled)]")
    while True:
        page_state, enabled = js(read_both)
        if page_state not in ("starting", "connecting"):
            break
        assert enabled == [False, False, False], (page_state, enabled)
        time.sleep(0.05)
    state = wait_for("the conversation live", live, 20, context=context)
    session_id = state["sessionId"]
    marks["live"] = time.monotonic() - t0
    assert speech_buttons_enabled(driver) == [True, True, True]
    # The session id is on the page, for examples/push_speech.py, with a way to copy it.
    assert driver.find_element(By.ID, "session-id").text == session_id
    driver.find_element(By.ID, "copy-session").click()
    copied = driver.find_element(By.ID, "copy-status")
    wait_for("the copy answered", lambda: copied.text in ("Copied.", "Selected: press Ctrl-C to copy."), 5)
    if copied.text.startswith("Selected"):
        assert js("return window.getSelection().toString()") == session_id

    # The avatar plays in the page's <video>: its size is the model's, and time moves on.
    first = wait_for("the avatar video playing at 128x128",
                     lambda: (v := js(VIDEO_JS))["width"] == AVATAR_SIZE and v["time"] > 0 and v,
                     20, context=context)
    assert first["height"] == AVATAR_SIZE
    marks["video"] = time.monotonic() - t0

    # Over a few seconds: the browser decodes ~25 fps and receives audio; the server receives ours.
    server_before = session_info(server, session_id)
    before = js("return avatarDemo.stats()")["client"]
    time.sleep(3)
    after = js("return avatarDemo.stats()")["client"]
    server_after = session_info(server, session_id)
    seconds = (after["timestamp"] - before["timestamp"]) / 1000
    fps = (after["video"]["framesDecoded"] - before["video"]["framesDecoded"]) / seconds
    audio_packets = after["audio"].get("packetsReceived", 0) - before["audio"].get("packetsReceived", 0)
    assert fps > 18, f"received {fps:.1f} fps over {seconds:.1f} s\n{context()}"
    assert audio_packets > 10 * seconds, f"{audio_packets} audio packets in {seconds:.1f} s\n{context()}"
    assert (after["video"]["frameWidth"], after["video"]["frameHeight"]) == (AVATAR_SIZE, AVATAR_SIZE)
    later = js(VIDEO_JS)
    assert later["time"] > first["time"] + 2, f"video time {first['time']} -> {later['time']}"
    assert not later["paused"]
    # The browser sends its camera and microphone, and the server counts them as they arrive.
    assert after["sent"]["video"].get("framesSent", 0) > before["sent"]["video"].get("framesSent", 0)
    assert after["sent"]["audio"].get("packetsSent", 0) > before["sent"]["audio"].get("packetsSent", 0)
    assert server_after["state"] == "live", server_after
    assert server_after["session_id"] == session_id and server_after["avatar_id"] == avatar_id
    got, was = server_after["stats"], server_before["stats"]
    video_in = got["user_video_frames_received"] - was["user_video_frames_received"]
    audio_in = got["user_audio_seconds_received"] - was["user_audio_seconds_received"]
    assert video_in > 10 * seconds, f"server received {video_in} user video frames in ~{seconds:.1f} s: {got}"
    assert audio_in > 0.5 * seconds, f"server received {audio_in:.2f} s of user audio in ~{seconds:.1f} s: {got}"
    # ... and the page shows the server's figures under names a person reads (no raw JSON keys).
    rows = js("return Array.from(document.querySelectorAll('#server-stats th')).map(th => th.textContent)")
    assert "state" in rows and "your video frames received" in rows, rows
    assert rows[1:3] == ["block latency, median (ms)", "block latency, p99 (ms)"], rows
    assert not [r for r in rows if "." in r or "_" in r], rows
    # Whether the avatar keeps up shows beside the video, without scrolling.
    figures = driver.find_element(By.ID, "call-figures")
    wait_for("block latency beside the video", lambda: "block latency" in figures.text, 5, context=context)
    assert js("return arguments[0].getBoundingClientRect().bottom", figures) <= WINDOW[1] - 100
    marks["checked"] = time.monotonic() - t0

    # Stop: the page closes the session and the server forgets it.
    driver.find_element(By.ID, "stop").click()
    wait_for("the page idle", lambda: js("return avatarDemo.state().state") == "idle", 5, context=context)
    wait_for("GET /v1/sessions/{id} -> closed after Stop",
             lambda: server.http.get(f"/v1/sessions/{session_id}").json().get("state") == "closed", 5,
             context=context)
    assert server.http.get(f"/v1/sessions/{session_id}").json()["end_reason"] == "deleted"
    # The figures stay for reading, but no longer claim the session is live.
    wait_for("the server figures' state 'closed (deleted)' after Stop", lambda: js(
        "return document.querySelector('#server-stats tr[data-key=state] td').textContent") == "closed (deleted)",
        5, context=context)
    assert speech_buttons_enabled(driver) == [False, False, False]
    assert driver.find_element(By.ID, "session-id").text == session_id  # still there, marked ended
    assert driver.find_element(By.ID, "session-ended").is_displayed()
    screenshot(driver, "figures_after_stop")
    marks["stopped"] = time.monotonic() - t0

    assert browser_errors(driver) == []
    print("browser test timeline (s):", {k: round(v, 1) for k, v in marks.items()})


def speech_buttons_enabled(driver) -> list[bool]:
    return [driver.find_element(By.ID, i).is_enabled() for i in ("speech-send", "test-phrase", "interrupt")]


def screenshot(driver, name: str) -> Path:
    SCREENS.mkdir(parents=True, exist_ok=True)
    path = SCREENS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def session_info(server: Server, session_id: str) -> dict:
    r = server.http.get(f"/v1/sessions/{session_id}")
    assert r.status_code == 200, f"GET /v1/sessions/{session_id}: {r.status_code} {r.text}\n{server.logs()}"
    return r.json()


def test_page_shows_the_servers_upload_error(server, browser, tmp_path):
    """A portrait without a face: the page shows the server's own message."""
    import cv2

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 128, np.uint8))
    expected = server.http.post("/v1/avatars", content=blank.read_bytes(), headers={"Content-Type": "image/png"})
    assert expected.status_code == 422, expected.text
    message = expected.json()["error"]["message"]

    browser.get(f"{server.base}/")
    browser.find_element(By.ID, "upload-file").send_keys(str(blank))
    browser.find_element(By.ID, "upload").click()
    status = browser.find_element(By.ID, "avatar-status")
    wait_for("the upload error shown", lambda: "error" in (status.get_attribute("class") or ""), 10)
    assert status.text == message


def test_push_speech_example_against_the_server(server, tmp_path):
    """examples/push_speech.py: an unknown session id is one line with the server's reason, no traceback."""
    import subprocess
    import sys

    wav = tmp_path / "speech.wav"
    write_wav(MEDIA_DIR / "user.mp4", wav, 1.0, rate=16000)
    script = Path(__file__).resolve().parents[1] / "examples" / "push_speech.py"
    done = subprocess.run([sys.executable, str(script), server.base, "s_nobody", str(wav)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("push_speech: error: the server refused the speech stream: no session"), done.stderr
    assert "unknown_session, HTTP 404" in done.stderr and "Traceback" not in done.stderr


# ---- when things go wrong ----

def go_live(driver, base: str, avatar_id: str) -> str:
    """Open the page, press Start, wait for the conversation; the session id."""
    driver.get(f"{base}/?avatar={avatar_id}")
    start = driver.find_element(By.ID, "start")
    wait_for("the Start button enabled", start.is_enabled, 10)
    start.click()

    def live():
        state = driver.execute_script("return avatarDemo.state()")
        assert state["state"] != "failed", state
        return state["sessionId"] if state["state"] == "live" else None

    return wait_for("the conversation live", live, 20)


def start_and_read_error(driver, base: str, avatar_id: str, before_start: str = "", *args) -> str:
    """In the current tab: open the page, (run a script with args,) press Start; the error it shows."""
    driver.get(f"{base}/?avatar={avatar_id}")
    start = driver.find_element(By.ID, "start")
    wait_for("the Start button enabled", start.is_enabled, 10)
    if before_start:
        driver.execute_script(before_start, *args)
    start.click()
    status = driver.find_element(By.ID, "call-status")
    wait_for("the page failed", lambda: driver.execute_script("return avatarDemo.state().state") == "failed", 10)
    assert "error" in status.get_attribute("class")
    assert speech_buttons_enabled(driver) == [False, False, False]
    return status.text


def server_refusal(**state):
    """The server's own 503 for a state: SessionManager.refusal, the rule behind POST /v1/sessions."""
    from avatar_forcing.server.sessions import SessionManager

    worker = SimpleNamespace(ready=threading.Event(), error=None)
    if state.get("ready", True):
        worker.ready.set()
    manager = SimpleNamespace(draining=False, worker=worker, free=1, would_overload=lambda: state.get("overloaded"),
                              settings=SimpleNamespace(max_sessions=1, overload_admission="predict"))
    return SessionManager.refusal(manager)


# Answers the page's next POST /v1/sessions with a given 503, as the server would in that state (a model
# still loading, or measured overload, cannot be brought about on demand on a shared CPU).
ANSWER_NEXT_SESSION = """
const [body, retry] = arguments;
const real = window.fetch;
window.fetch = (url, init) => {
  if (url === "/v1/sessions" && init && init.method === "POST") {
    window.fetch = real;
    return Promise.resolve(new Response(body, {status: 503, statusText: "Service Unavailable",
                                               headers: {"Content-Type": "application/json", "Retry-After": retry}}));
  }
  return real(url, init);
};
"""


def test_each_refusal_shows_the_servers_code_and_message(server, browser, avatar_id):
    """Full, busy and loading are different situations: the page names each, with the server's words."""
    import json

    driver = browser
    first = driver.current_window_handle
    go_live(driver, server.base, avatar_id)  # takes the server's only slot
    driver.switch_to.new_window("tab")
    try:
        # at_capacity, for real: the server's answer to anyone else now.
        expected = server.http.post("/v1/sessions", json={})
        assert expected.status_code == 503 and expected.json()["error"]["code"] == "at_capacity", expected.text
        shown = start_and_read_error(driver, server.base, avatar_id)
        assert shown.startswith("The server is full (at_capacity): "), shown
        assert expected.json()["error"]["message"] in shown and "Retry in 10 s." in shown, shown
        screenshot(driver, "refusal_at_capacity")
        for name, headline, refusal in (
                ("overloaded", "The server is too busy", server_refusal(overloaded=True)),
                ("not_ready", "The model is not ready yet", server_refusal(ready=False))):
            assert refusal.code == name
            shown = start_and_read_error(driver, server.base, avatar_id, ANSWER_NEXT_SESSION,
                                         json.dumps(refusal.body()), refusal.headers["Retry-After"])
            assert shown.startswith(f"{headline} ({name}): "), shown
            assert refusal.message in shown and "full" not in shown, shown
            screenshot(driver, f"refusal_{name}")
    finally:
        driver.close()
        driver.switch_to.window(first)
        driver.execute_script("return avatarDemo.stop()")


@pytest.fixture
def own_server(tmp_path):
    """A server of this test alone (it is stopped and killed on purpose)."""
    process = ServerProcess(tmp_path, max_sessions=1, drain_timeout_s=120).start()
    try:
        yield Server(process)
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
        process.stop()


def test_draining_then_server_gone(own_server, browser):
    """SIGTERM: a new conversation is refused as "shutting down" while the live one goes on; then the
    server dies, and the live page says it is unreachable within seconds (not "TURN may be needed")."""
    server, driver = own_server, browser
    r = server.http.post("/v1/avatars", content=(MEDIA_DIR / "rumi.jpg").read_bytes(),
                         headers={"Content-Type": "image/jpeg"})
    avatar = r.json()["avatar_id"]
    first = driver.current_window_handle
    go_live(driver, server.base, avatar)
    server.process.proc.send_signal(signal.SIGTERM)
    wait_for("/readyz draining", lambda: server.http.get("/readyz").json().get("reason") == "draining", 10)
    driver.switch_to.new_window("tab")
    try:
        expected = server.http.post("/v1/sessions", json={}).json()["error"]
        shown = start_and_read_error(driver, server.base, avatar)
        assert shown.startswith("The server is shutting down (draining): "), shown
        assert expected["message"] in shown, shown
        screenshot(driver, "refusal_draining")
    finally:
        driver.close()
        driver.switch_to.window(first)
    assert driver.execute_script("return avatarDemo.state().state") == "live"  # draining lets it go on

    server.process.proc.kill()
    t0 = time.monotonic()
    status = driver.find_element(By.ID, "call-status")
    wait_for("the page saying the server is unreachable", lambda: "server is unreachable" in status.text, 8,
             context=lambda: status.text)
    took = time.monotonic() - t0
    assert "TURN" not in status.text
    assert driver.execute_script("return avatarDemo.state().state") == "failed"
    assert speech_buttons_enabled(driver) == [False, False, False]
    state_cell = driver.execute_script("return document.querySelector('#server-stats tr[data-key=state] td')"
                                       "?.textContent")
    assert state_cell in (None, "ended (unreachable)"), state_cell
    screenshot(driver, "server_gone")
    print(f"server killed -> page says unreachable in {took:.1f} s")


def test_browser_without_loopback_candidates_fails_at_once(server, media, avatar_id, tmp_path):
    """Chromium without --allow-loopback-in-peer-connection, on a machine whose only address is loopback,
    offers no ICE candidate: the page says so at once and keeps the speech buttons off."""
    args = [a for a in CHROME_ARGS if a != "--allow-loopback-in-peer-connection"]
    started = server.process.metric("avatar_sessions_started_total")
    (tmp_path / "home").mkdir()
    driver = launch_browser(media, tmp_path / "home", args)
    try:
        t0 = time.monotonic()
        shown = start_and_read_error(driver, server.base, avatar_id)
        took = time.monotonic() - t0
        assert "no ICE candidates" in shown and "--allow-loopback-in-peer-connection" in shown, shown
        assert took < 10, f"{took:.1f} s to fail"
        screenshot(driver, "no_loopback_candidates")
    finally:
        driver.quit()
    # It failed before asking the server for a session: nothing there holds a slot.
    assert server.process.metric("avatar_sessions_started_total") == started


# ---- the built-in model through the page ----

FRESH_FRAMES_JS = """
const done = arguments[arguments.length - 1];
const seconds = arguments[0];
const v = document.getElementById('remote');
const c = document.createElement('canvas');
c.width = v.videoWidth; c.height = v.videoHeight;
const g = c.getContext('2d', {willReadFrequently: true});
let last = null, frames = 0, fresh = 0, t0 = null;
function tick(now) {
  if (t0 === null) t0 = now;
  g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let sum = 0;
  for (let i = 0; i < d.length; i += 3) sum = (sum * 31 + d[i]) >>> 0;
  frames++;
  if (sum !== last) fresh++;
  last = sum;
  if (now - t0 < seconds * 1000) v.requestVideoFrameCallback(tick);
  else done({frames: frames, fresh: fresh, seconds: (now - t0) / 1000});
}
v.requestVideoFrameCallback(tick);
"""


def write_y4m_frames(frames: np.ndarray, dst: Path) -> None:
    """RGB frames [N, H, W, 3] as YUV4MPEG2 (Chromium's fake camera)."""
    h, w = frames.shape[1:3]
    with open(dst, "wb") as out:
        out.write(f"YUV4MPEG2 W{w} H{h} F{FPS}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            yuv = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
            out.write(b"FRAME\n")
            out.write(yuv.to_ndarray().tobytes())


@pytest.fixture(scope="module")
def builtin_media(tmp_path_factory):
    """A user made here (a rigged look of the packaged public-domain portrait, a held-out espeak-ng voice) for
    the fake camera and microphone, and the avatar's portrait (another look): nothing from ../shared."""
    import shutil

    from avatar_forcing.model.media.face import crop_portrait
    from avatar_forcing.model.media.image import load_image
    from avatar_forcing.model.training.conversations import augmented, make_conversation, packaged_portraits, render
    from avatar_forcing.model.training.rig import FaceRig
    from avatar_forcing.weights import builtin

    if not builtin.available() or shutil.which("espeak-ng") is None or not packaged_portraits():
        pytest.skip("needs weights/builtin, espeak-ng and matplotlib's sample portrait")
    folder = tmp_path_factory.mktemp("builtin_devices")
    grace = crop_portrait(load_image(packaged_portraits()["grace_hopper"]), 256)
    conversation = make_conversation(10, seed=4242, voices=("en-gb-x-gbclan", "en-029"))
    user = render(FaceRig(augmented(grace, 515151)), conversation.expressions("user"))
    y4m, wav = folder / "user.y4m", folder / "user.wav"
    write_y4m_frames(user, y4m)
    pcm = (np.clip(conversation.user.pcm, -1, 1) * 32767).astype("<i2")
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    portrait = folder / "avatar.png"
    import cv2

    cv2.imwrite(str(portrait), cv2.cvtColor(augmented(grace, 424242), cv2.COLOR_RGB2BGR))
    return (y4m, wav), portrait


def test_builtin_model_talks_and_listens_through_the_page(builtin_media, tmp_path):
    """The server with nothing but the built-in model: the page plays it at 25 fps with fresh pictures while
    it speaks (the test phrase) and while it listens (the fake microphone's user), and says which model runs.
    Screenshots: builtin_speaking.png and builtin_listening.png."""
    devices, portrait = builtin_media
    process = ServerProcess(tmp_path, config="builtin", weights="builtin", max_sessions=1).start()
    server = Server(process)
    driver = launch_browser(devices, tmp_path / "browser")
    try:
        listed = server.http.get("/v1/avatars").json()["avatars"]
        assert len(listed) == 1, f"the built-in model's sample portrait, ready to pick: {listed}"
        r = server.http.post("/v1/avatars", content=portrait.read_bytes(), headers={"Content-Type": "image/png"})
        assert r.status_code == 201, r.text
        go_live(driver, server.base, r.json()["avatar_id"])
        notes = driver.find_element(By.ID, "server-notes")
        wait_for("the built-in model's note", lambda: "built-in model" in notes.text, 5, context=server.logs)
        wait_for("the avatar video", lambda: driver.execute_script(VIDEO_JS)["time"] > 1, 20, context=server.logs)
        listening = driver.execute_async_script(FRESH_FRAMES_JS, 2.0)
        # The page opens at its top (banner, portraits): bring the avatar and the user's camera into the picture.
        driver.execute_script("document.getElementById('remote').scrollIntoView({block: 'center'});")
        screenshot(driver, "builtin_listening")
        driver.find_element(By.ID, "test-phrase").click()
        time.sleep(1.0)  # the phrase reaches the model and its first blocks come back
        speaking = driver.execute_async_script(FRESH_FRAMES_JS, 2.0)
        screenshot(driver, "builtin_speaking")
        print("page while listening:", listening, "while speaking:", speaking)
        for what, seen in (("listening", listening), ("speaking", speaking)):
            fps = seen["frames"] / seen["seconds"]
            assert fps > 18, f"{what}: {fps:.1f} fps shown\n{server.logs()}"
            assert seen["fresh"] >= 0.8 * seen["frames"], f"{what}: {seen}\n{server.logs()}"
        assert browser_errors(driver) == []
    finally:
        driver.quit()
        server.http.close()
        process.stop()
