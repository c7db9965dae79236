"""The watermark after a real WebRTC round trip: the server marks, aiortc encodes (VP8), a real aiortc peer
receives, and the detector finds the mark in the received frames with the session's payload."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from aiortc.mediastreams import MediaStreamError
from golden_data import MEDIA_DIR
from server_harness import needs_golden, needs_media, needs_rtc_host, running_server

from avatar_forcing.provenance.check import check_frames
from avatar_forcing.provenance.watermark import Payload, session_hash
from avatar_forcing.server.client import AvatarClient

pytestmark = [needs_rtc_host, needs_golden, needs_media]
DEPLOYMENT = 321


class RecordingClient(AvatarClient):
    """The project's client, keeping the decoded video frames it receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.frames: list[np.ndarray] = []

    async def _receive(self, track) -> None:
        if track.kind != "video":
            return await super()._receive(track)
        while True:
            try:
                frame = await track.recv()
            except (MediaStreamError, asyncio.CancelledError):
                return
            self.received.video_times.append(time.monotonic())
            self.frames.append(frame.to_ndarray(format="rgb24"))


def test_received_video_carries_the_mark_in_every_two_second_window(tmp_path):
    async def run():
        async with RecordingClient(server.base_url) as c:
            avatar = await c.upload_avatar((MEDIA_DIR / "rumi.jpg").read_bytes())
            session_id = await c.start(avatar, media=MEDIA_DIR / "user.mp4")
            await asyncio.sleep(12)  # 11 s of video once live, with time to connect
            await c.stop()
            return session_id, c.frames

    with running_server(tmp_path, max_sessions=1, deployment_id=DEPLOYMENT) as server:
        session_id, frames = asyncio.run(run())
    frames = frames[25:]  # the first second: the connection's first key frames and bitrate ramp
    assert len(frames) >= 25 * 10, f"only {len(frames)} frames arrived"
    assert frames[0].shape == (128, 128, 3)
    result = check_frames(iter(frames), 25)
    assert len(result.windows) >= 5
    # >= 99 % of windows: with this many windows, every one.
    assert result.marked_fraction == 1.0, [round(w.z, 1) for w in result.windows]
    assert all(w.false_positive_rate <= 1e-6 for w in result.windows)
    assert result.total.payload == Payload(DEPLOYMENT, session_hash(session_id))
    assert result.total.payload_valid
