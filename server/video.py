"""Where the server's video is compressed, decided once at start-up: which H.264 encoder (NVENC or libx264),
in which process (media processes or aiortc's codec threads), and which codec answers prefer."""

from __future__ import annotations

import logging

from avatar_forcing.model.cpus import usable_cpus

from . import video_codecs
from .config import ServerSettings
from .errors import UserError
from .media_process import MediaPool, supported
from .metrics import ServerMetrics

log = logging.getLogger("avatar_forcing.server.video")


def auto_media_processes(cpus: int) -> int:
    """None on a small machine (a process per 4 cores, at most 4): with 2-3 cores a media process only
    competes with the model worker and the event loop for the same cores."""
    return 0 if cpus < 4 else min(4, cpus // 4)


class VideoEncoding:
    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.settings, self.metrics = settings, metrics
        self.processes = (settings.media_processes if settings.media_processes is not None
                          else auto_media_processes(usable_cpus()))
        if self.processes and supported() is not None:
            if settings.media_processes:
                raise UserError(f"AVATAR_FORCING_MEDIA_PROCESSES={settings.media_processes}: {supported()}; "
                                "set it to 0")
            self.processes = 0
        self.h264 = "libx264"
        self.pool: MediaPool | None = None

    def start(self) -> None:
        """Blocking (the NVENC probe, the media processes' start): run it off the event loop."""
        try:
            self.h264 = video_codecs.h264_backend(self.settings.video_encoder)
        except RuntimeError as exc:
            raise UserError(str(exc)) from None
        m = self.metrics
        if self.processes:
            pool = MediaPool(self.processes, self.h264, observe=self._observe_remote)
            try:
                pool.start()
            except (RuntimeError, OSError) as exc:  # serve anyway: encoding in this process is slower, not wrong
                log.error("the media processes could not start (%s): video is encoded in this process", exc)
                pool.stop()
                self.processes = 0
            else:
                self.pool = pool
                m.media_processes.set_function(pool.alive)  # read at every scrape
                video_codecs.install(pool.encoder)
        if not self.processes:
            observe = m.video_encode_seconds.labels("thread").observe
            video_codecs.install(lambda mime: video_codecs.TimedEncoder(video_codecs.local_encoder(mime, self.h264),
                                                                        observe))
        log.info("video: H.264 on %s, encoding %s; answers prefer %s", self.h264,
                 f"in {self.processes} media process(es)" if self.processes else "in this process's codec threads",
                 self.preferred_codec() or "the client's codec order")

    def _observe_remote(self, encode_s: float, round_trip_s: float) -> None:
        self.metrics.video_encode_seconds.labels("process").observe(encode_s)
        self.metrics.video_encode_overhead.observe(max(0.0, round_trip_s - encode_s))

    def stop(self) -> None:
        video_codecs.install(None)
        if self.pool is not None:
            self.pool.stop()

    def preferred_codec(self) -> str | None:
        """'H264' or 'VP8' to put first in answers, or None for the client's order."""
        choice = self.settings.video_codec
        if choice == "auto":
            return "H264" if self.h264 == "nvenc" else None  # NVENC makes H.264 nearly free for the CPU
        return choice.upper()

    def prefer(self, offer_sdp: str) -> str:
        codec = self.preferred_codec()
        return video_codecs.prefer_codec(offer_sdp, codec) if codec else offer_sdp
