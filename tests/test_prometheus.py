"""A real Prometheus (Debian package) scrapes /metrics during a session; promtool checks the exposition."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import httpx
import pytest
from golden_data import MEDIA_DIR
from server_harness import free_port, needs_golden, needs_media, needs_rtc_host, running_server

from avatar_forcing.server.client import AvatarClient

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = [needs_rtc_host, needs_golden, needs_media,
              pytest.mark.skipif(not (PROMETHEUS and PROMTOOL),
                                 reason="needs Debian's prometheus package (scripts/install-system-deps.sh)")]


async def query(base: str, expr: str) -> list:
    async with httpx.AsyncClient(timeout=5) as http:
        r = await http.get(base + "/api/v1/query", params={"query": expr})
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_random_weights_prometheus_scrapes_a_live_session(tmp_path):
    with running_server(tmp_path) as server:
        target = server.base_url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: avatar
    static_configs:
      - targets: ["{target}"]
""")
        assert subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True).returncode == 0
        port = free_port(server.host)
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address={server.host}:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        prom_url = f"http://{server.host}:{port}"
        try:
            async def session_while_scraped():
                async with AvatarClient(server.base_url) as c:
                    await c.start(await c.upload_avatar((MEDIA_DIR / "rumi.jpg").read_bytes()),
                                  media=MEDIA_DIR / "user.mp4")
                    deadline = time.monotonic() + 40
                    while time.monotonic() < deadline:
                        await asyncio.sleep(1)
                        try:
                            active = await query(prom_url, "avatar_sessions_active")
                            blocks = await query(prom_url, "avatar_block_latency_seconds_count")
                        except httpx.HTTPError:
                            continue  # Prometheus still starting
                        if active and float(active[0]["value"][1]) >= 1 and blocks and \
                                float(blocks[0]["value"][1]) > 0:
                            break
                    async with httpx.AsyncClient(timeout=5) as http:
                        exposition = (await http.get(server.base_url + "/metrics")).text
                    up = await query(prom_url, 'up{job="avatar"}')
                    stages = await query(prom_url, "count(avatar_block_stage_seconds_count) by (stage)")
                    await c.stop()
                    return active, up, stages, exposition

            active, up, stages, exposition = asyncio.run(session_while_scraped())
        finally:
            prom.terminate()
            prom.wait(10)
    assert up and up[0]["value"][1] == "1", "Prometheus could not scrape the server"
    assert active and float(active[0]["value"][1]) >= 1, "Prometheus never saw the live session"
    assert {s["metric"]["stage"] for s in stages} >= {"audio_features", "transformer", "decode"}
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
