"""The playout policy of docs/realtime.md on a controlled clock: gaps left by the engine's skip-ahead,
the delay coming back after lateness, and barge-in muting the block that was in flight."""

from __future__ import annotations

import logging

import numpy as np
import torch

from avatar_forcing.model.engine import BlockOutput
from avatar_forcing.server.app import is_loopback
from avatar_forcing.server.playout import Playout

FPS, RATE, SIZE, BLOCK = 25, 16000, 8, 10
SPF = RATE // FPS


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def block(first: int, value: int, loud: bool = True, n: int = BLOCK) -> BlockOutput:
    frames = np.full((n, SIZE, SIZE, 3), value, dtype=np.uint8)
    audio = np.full(n * SPF, 0.5 if loud else 0.0, dtype=np.float32)
    return BlockOutput("s", first // BLOCK, first, torch.zeros(n, 4), frames, audio, False, 0.0, 0.0)


def playout(clock: Clock, delay: float = 0.7) -> Playout:
    p = Playout(FPS, RATE, SIZE, delay, 1.5, clock=clock)
    p.start(clock.now, 0)  # frame 0 was captured now and plays `delay` later
    p.video_next = p.audio_next = 0
    return p


def play(p: Playout, clock: Clock, seconds: float) -> tuple[list[int], np.ndarray]:
    """Tick both tracks for `seconds` on the clock; the frame values shown and the audio sent."""
    shown, audio = [], []
    for _ in range(int(round(seconds * 50))):  # 20 ms ticks: audio every tick, video every other
        if round((clock.now - 100.0) * 50) % 2 == 0:
            shown.append(int(p.video_frame(clock.now)[0, 0, 0]))
        audio.append(p.audio_chunk(clock.now, RATE // 50))
        clock.now += 0.02
    return shown, np.concatenate(audio) if audio else np.zeros(0, np.float32)


def test_a_gap_the_engine_skipped_holds_the_picture_and_is_silent_for_exactly_its_length():
    clock = Clock()
    p = playout(clock)
    p.push(block(0, 10))
    p.push(block(20, 30))  # frames 10-19 were skipped by the engine
    clock.now += 0.7
    shown, audio = play(p, clock, 1.2)
    assert shown[:10] == [10] * 10 and shown[10:20] == [10] * 10 and shown[20:30] == [30] * 10, shown
    spf_audio = audio.reshape(-1, SPF)
    assert np.all(spf_audio[:10] > 0) and np.all(spf_audio[10:20] == 0) and np.all(spf_audio[20:30] > 0)
    assert p.skipped_frames == 10 and p.skipped_blocks == 1 and p.gap_frames_held == 10
    assert p.late_blocks == 0 and p.video_dropped == 0


def test_the_delay_comes_back_to_its_target_within_seconds_after_lateness_stops():
    clock = Clock()
    p = playout(clock)
    p.push(block(0, 1))
    clock.now += 0.4 + 0.7 + 0.6  # block 2 arrives 0.6 s after its playout time
    assert p.push(block(10, 2)) is True
    raised = p.delay
    assert raised > 1.2
    for i in range(3, 30):  # on time from now on: each block ready 0.1 s after its last input
        play(p, clock, max(0.0, 100 + 0.4 * (i + 1) + 0.1 - clock.now))
        assert p.push(block(10 * i, i)) is False
        if p.delay == p.target_delay:
            break
    assert p.delay == p.target_delay, f"delay {p.delay:.2f} s, {clock.now - 101.7:.1f} s after the lateness"
    assert clock.now - 101.7 < 8, f"the delay took {clock.now - 101.7:.1f} s to come back (was {raised:.2f} s)"


def test_barge_in_mutes_the_block_in_flight_but_keeps_its_frames():
    clock = Clock()
    p = playout(clock)
    p.push(block(0, 1))
    p.interrupt(claimed_until=20)  # the block of frames 10-19 had claimed its speech already
    p.push(block(10, 2))
    p.push(block(20, 3))  # claimed after the interrupt: keeps its (new) speech
    clock.now += 0.7
    shown, audio = play(p, clock, 1.2)
    per_frame = audio.reshape(-1, SPF)
    assert np.all(per_frame[:20] == 0), "speech claimed before the interrupt was played"
    assert np.all(per_frame[20:30] > 0)
    assert shown[10:20] == [2] * 10, "the muted block's frames must still play"


def test_loopback_addresses_are_recognised_for_the_auth_warning(caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
    logging.getLogger("avatar_forcing.server").debug("ok")
