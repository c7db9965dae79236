"""Running the real server (`avatar-forcing serve`, a subprocess) for tests, on the small configuration with
its random weights.

WebRTC needs a loopback address other than 127.0.0.1 (ICE ignores that one): the test command runs pytest
inside a private network namespace with 127.0.0.2 (scripts/run-tests.sh). Tests that need it skip with
the reason elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from aiortc import RTCPeerConnection
from golden_data import MEDIA_DIR, golden_folders

RTC_HOST = "127.0.0.2"
GOLDEN = next((f for f in golden_folders() if (f / "small_weights.safetensors").exists()), None)


def host_available(host: str) -> bool:
    """Whether an interface holds this address (binding alone is no test: Linux lets any 127/8 bind)."""
    import ifaddr  # what aioice itself uses to find ICE host candidates

    return any(ip.ip == host for adapter in ifaddr.get_adapters() for ip in adapter.ips)


needs_rtc_host = pytest.mark.skipif(
    not host_available(RTC_HOST),
    reason=f"WebRTC tests need the loopback address {RTC_HOST} (ICE ignores 127.0.0.1): run them through "
           "`make test`, which runs pytest inside a private network namespace that has it")
needs_golden = pytest.mark.skipif(GOLDEN is None, reason="needs the golden small configuration and weights")
needs_media = pytest.mark.skipif(not (MEDIA_DIR / "user.mp4").exists(), reason=f"needs the sample media in {MEDIA_DIR}")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, tmp: Path, host: str = RTC_HOST, **settings):
        self.host = host if host_available(host) else "127.0.0.1"
        self.port = free_port(self.host)
        self.base_url = f"http://{self.host}:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        # Hermetic: nothing of the caller's AVATAR_FORCING_* settings leaks into the server under test.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AVATAR_FORCING_")}
        env.update({
            "AVATAR_FORCING_CONFIG": str(GOLDEN), "AVATAR_FORCING_WEIGHTS": str(GOLDEN / "small_weights.safetensors"),
            "AVATAR_FORCING_HOST": self.host, "AVATAR_FORCING_PORT": str(self.port),
            "AVATAR_FORCING_DEVICE": "cpu", "AVATAR_FORCING_LOG_FORMAT": "json",
            # Transport tests run the model on whatever CPU CI has; only the admission test predicts load.
            "AVATAR_FORCING_OVERLOAD_ADMISSION": "off",
            "HOME": str(tmp), "XDG_CACHE_HOME": str(tmp / ".cache"),
        })
        for key, value in settings.items():
            env[f"AVATAR_FORCING_{key.upper()}"] = str(value)
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "avatar_forcing.cli", "serve"], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def status(self) -> dict[str, int]:
        """VmRSS (kB) and thread count of the server process."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                fields[key] = int(value.split()[0])
        return fields

    def metric(self, name: str, labels: str = "") -> float | None:
        """One sample of /metrics, e.g. metric("avatar_sessions_active")."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in httpx.get(self.base_url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


@contextlib.contextmanager
def running_server(tmp: Path, **settings):
    server = ServerProcess(tmp, **settings).start()
    try:
        yield server
    finally:
        server.stop()


def offer_sdp(direction: str = "sendrecv") -> str:
    """A real aiortc offer with one audio and one video transceiver in `direction` ("sendrecv": a peer that
    sends its camera and microphone, "recvonly": one that only watches). Only the SDP text is used: the
    peer connection is closed before the offer goes anywhere."""

    async def make() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction=direction)
        pc.addTransceiver("video", direction=direction)
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())
