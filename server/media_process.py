"""Video encoding in media processes, off the server process and its GIL.

The event loop (signalling, RTP, SRTP, pacing), the codec threads and the model worker's Python all share
one interpreter lock; compressing 16 sessions x 25 fps of 512x512 video is 2-5 cores of work on top. A
`MediaPool` runs a few child processes. Every video sender gets a `RemoteEncoder` (aiortc's Encoder
interface, called in aiortc's codec thread): it copies the frame into its own shared-memory slot, sends a
small request down its child's pipe and waits (without the GIL) for the RTP payloads, a few kB. Each child
encodes one request at a time, with the same encoders the server uses in-process (video_codecs.py).

Failure policy: a child that dies or stops answering (REPLY_TIMEOUT_S) is killed and replaced; its senders
move to a live one with their next frame (a keyframe), or encode in-process if none can start, so their
video never stalls for longer than that timeout.
Linux only (the child maps the parent's segment from /dev/shm).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from multiprocessing import shared_memory
from multiprocessing.connection import Connection

import av
import numpy as np
from aiortc.codecs.base import Encoder

from .video_codecs import local_encoder

log = logging.getLogger("avatar_forcing.server.media")

REPLY_TIMEOUT_S = 2.0  # a child silent this long on one frame is hung: it is killed and replaced
START_TIMEOUT_S = 60.0


class ChildGone(Exception):
    """The media process died, hung or was stopped."""


def supported() -> str | None:
    """None where media processes work here, else why not."""
    if not os.path.isdir("/dev/shm"):
        return "media processes need Linux shared memory (/dev/shm)"
    return None


# -- the child ------------------------------------------------------------------------------------------------

class _Mapped:
    """The parent's shared-memory slot, mapped in the child (by path, so the child never registers it with
    a resource tracker that would unlink it when the child exits)."""

    def __init__(self, name: str, nbytes: int):
        self.name = name
        with open(os.path.join("/dev/shm", name.lstrip("/")), "r+b") as f:
            self.map = mmap.mmap(f.fileno(), nbytes)

    def frame(self, shape: tuple[int, int, int]) -> av.VideoFrame:
        pixels = np.frombuffer(self.map, np.uint8, count=shape[0] * shape[1] * shape[2]).reshape(shape)
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")  # copies: the slot is free again
        del pixels
        return frame


def serve(conn: Connection, h264_backend: str) -> None:
    """The child's loop: ('encode', key, mime, slot, nbytes, shape, pts, time_base, keyframe, bitrate) ->
    ('ok', payloads, timestamp, seconds) or ('error', message); ('forget', key); ('stop',)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    encoders: dict[int, tuple[Encoder, _Mapped]] = {}
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        op = request[0]
        if op == "stop":
            return
        if op == "forget":
            entry = encoders.pop(request[1], None)
            if entry is not None:
                entry[1].map.close()
            continue
        _, key, mime, slot, nbytes, shape, pts, time_base, keyframe, bitrate = request
        try:
            entry = encoders.get(key)
            if entry is None or entry[1].name != slot:
                if entry is not None:
                    entry[1].map.close()
                entry = encoders[key] = (local_encoder(mime, h264_backend), _Mapped(slot, nbytes))
            encoder, mapped = entry
            if bitrate is not None:
                encoder.target_bitrate = bitrate  # type: ignore[attr-defined]
            frame = mapped.frame(shape)
            frame.pts, frame.time_base = pts, time_base
            t0 = time.perf_counter()
            payloads, timestamp = encoder.encode(frame, keyframe)
            conn.send(("ok", payloads, timestamp, time.perf_counter() - t0))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


# -- the parent -----------------------------------------------------------------------------------------------

class MediaChild:
    """One media process and its pipe; requests are serialised (the child does one at a time anyway)."""

    def __init__(self, context, h264_backend: str, index: int):
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=serve, args=(child_end, h264_backend), daemon=True,
                                       name=f"avatar-media-{index}")
        self.process.start()
        child_end.close()
        self.lock = threading.Lock()
        self.senders = 0
        self.alive = True
        # Senders whose encoders were freed. Told with the next request, not at once: a finalizer may run
        # inside request() on the same thread, where taking the lock would deadlock.
        self.forgotten: deque[int] = deque()
        if not self.conn.poll(START_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"media process {index} did not start within {START_TIMEOUT_S:.0f} s")
        self.conn.recv()

    def request(self, message: tuple) -> tuple:
        with self.lock:
            if not self.alive:
                raise ChildGone
            try:
                while self.forgotten:
                    self.conn.send(("forget", self.forgotten.popleft()))
                self.conn.send(message)
                if not self.conn.poll(REPLY_TIMEOUT_S):
                    log.error("media process %s did not answer within %.0f s: killing it",
                              self.process.name, REPLY_TIMEOUT_S)
                    self.kill()
                    raise ChildGone
                reply = self.conn.recv()
            except (EOFError, OSError):
                self.alive = False
                raise ChildGone from None
        if reply[0] == "error":
            raise RuntimeError(f"video encoding failed in {self.process.name}: {reply[1]}")
        return reply[1:]

    def kill(self) -> None:
        self.alive = False
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        with self.lock:
            if self.alive:
                try:
                    self.conn.send(("stop",))
                except OSError:
                    pass
        self.process.join(5)
        self.kill()


class MediaPool:
    """`processes` media processes; senders are spread over the live ones (fewest senders first)."""

    def __init__(self, processes: int, h264_backend: str,
                 observe: Callable[[float, float], None] | None = None):
        if processes < 1:
            raise ValueError("a media pool needs at least one process")
        self.h264_backend = h264_backend
        self._observe = observe  # (encode seconds in the child, round trip seconds)
        self._context = multiprocessing.get_context("spawn")  # no fork of a process with threads and CUDA
        self._lock = threading.Lock()
        self._keys = itertools.count(1)
        self._size = processes
        self._started = 0
        self.children: list[MediaChild] = []
        self.replaced = 0
        self.closed = False

    def start(self) -> None:
        """Start the processes (blocking: a few hundred ms each, for their imports)."""
        with self._lock:
            while len(self.children) < self._size:
                self.children.append(self._spawn())
        log.info("video encoding in %d media process(es), H.264 on %s", self._size, self.h264_backend)

    def _spawn(self) -> MediaChild:
        self._started += 1
        return MediaChild(self._context, self.h264_backend, self._started)

    def alive(self) -> int:
        return sum(child.alive and child.process.is_alive() for child in self.children)

    def assign(self) -> MediaChild:
        with self._lock:
            if self.closed:
                raise ChildGone
            for i, child in enumerate(self.children):
                if not (child.alive and child.process.is_alive()):
                    child.kill()
                    self.children[i] = self._spawn()
                    self.replaced += 1
                    log.warning("media process %s had ended: replaced", child.process.name)
            child = min(self.children, key=lambda c: c.senders)
            child.senders += 1
            return child

    def encoder(self, mime: str) -> Encoder:
        return RemoteEncoder(self, mime)

    def stop(self) -> None:
        with self._lock:
            self.closed = True
            children, self.children = self.children, []
        for child in children:
            child.stop()


class _Slot:
    """The shared memory one sender writes its frames into (freed when the sender's encoder is)."""

    def __init__(self) -> None:
        self.memory: shared_memory.SharedMemory | None = None

    def ensure(self, nbytes: int) -> shared_memory.SharedMemory:
        if self.memory is None or self.memory.size < nbytes:
            self.free()
            self.memory = shared_memory.SharedMemory(create=True, size=nbytes)
        return self.memory

    def free(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory.unlink()
            self.memory = None


def _release(child: MediaChild | None, key: int, slot: _Slot) -> None:
    if child is not None:
        child.forgotten.append(key)
        child.senders -= 1
    slot.free()


class RemoteEncoder(Encoder):
    """One video sender's encoder, working in a media process (aiortc calls it in a codec thread)."""

    def __init__(self, pool: MediaPool, mime: str):
        self._pool, self._mime = pool, mime
        self._key = next(pool._keys)
        self._slot = _Slot()
        self._child: MediaChild | None = None
        self._local: Encoder | None = None  # after its media process failed
        self.target_bitrate: int | None = None  # set by aiortc from the receiver's estimate (None: the default)
        self._finalizer = weakref.finalize(self, _release, None, self._key, self._slot)

    def encode(self, frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        for _ in range(2):  # its media process, or a fresh one if that one has gone
            if self._local is not None:
                break
            try:
                return self._encode_remote(frame, force_keyframe)
            except ChildGone:
                self._finalizer()  # off the dead process: its count, and a new slot for the next one
                self._child = None
                force_keyframe = True  # the receiver's decoder has not seen the new encoder's stream
                if self._pool.closed:
                    break
        if self._local is None:
            log.warning("no media process for a video sender: it encodes in this process from now on")
            self._local = local_encoder(self._mime, self._pool.h264_backend)
            force_keyframe = True
        if self.target_bitrate is not None:
            self._local.target_bitrate = self.target_bitrate  # type: ignore[attr-defined]
        return self._local.encode(frame, force_keyframe)

    def _encode_remote(self, frame, force_keyframe: bool) -> tuple[list[bytes], int]:
        if self._child is None:
            self._child = self._pool.assign()
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _release, self._child, self._key, self._slot)
        rgb = frame.to_ndarray(format="rgb24")
        memory = self._slot.ensure(rgb.nbytes)
        assert memory.buf is not None  # open until the slot is freed
        memory.buf[: rgb.nbytes] = rgb.reshape(-1).data
        t0 = time.perf_counter()
        payloads, timestamp, seconds = self._child.request(
            ("encode", self._key, self._mime, memory.name, memory.size, rgb.shape, frame.pts, frame.time_base,
             force_keyframe, self.target_bitrate))
        if self._pool._observe is not None:
            self._pool._observe(seconds, time.perf_counter() - t0)
        return payloads, timestamp

    def pack(self, packet) -> tuple[list[bytes], int]:
        raise NotImplementedError("the avatar's video track sends frames, never pre-encoded packets")
