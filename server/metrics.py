"""Prometheus metrics of the server (all names start with `avatar_`; seconds and bytes, as Prometheus wants).

One registry per app, so tests can run several servers in one process. Per-session series (WebRTC stats)
carry a `session` label and are removed when the session ends, so their number is bounded by capacity.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily

from avatar_forcing.model.engine import STAGES

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5, 2.5, 5.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ENCODE_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.04, 0.08, 0.16)
OFFSET_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)


class ServerMetrics:
    def __init__(self, max_sessions: int):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        # Sessions and capacity
        self.sessions_active = Gauge("avatar_sessions_active", "Sessions open now", registry=r)
        self.sessions_started = Counter("avatar_sessions_started_total", "Sessions accepted", registry=r)
        self.sessions_rejected = Counter("avatar_sessions_rejected_total", "Session requests refused",
                                         ["reason"], registry=r)
        self.sessions_ended = Counter("avatar_sessions_ended_total", "Sessions ended", ["reason"], registry=r)
        self.capacity = Gauge("avatar_capacity_sessions", "Sessions this server can hold", registry=r)
        self.capacity.set(max_sessions)
        self.capacity_free = Gauge("avatar_capacity_free_sessions", "Sessions that can still be opened",
                                   registry=r)
        self.capacity_free.set(max_sessions)
        self.model_ready = Gauge("avatar_model_ready", "1 once the model is loaded and warm", registry=r)
        self.session_cost = Gauge("avatar_session_cost_ratio", "Compute per session as a fraction of real "
                                                              "time, from live steps (which: first, more)",
                                  ["which"], registry=r)
        self.worker_utilisation = Gauge("avatar_worker_utilisation", "Share of the last 5 s the model worker "
                                                                      "spent stepping", registry=r)
        self.overloaded = Gauge("avatar_overloaded", "1 while recent blocks take longer than real time (no new "
                                                     "sessions are admitted)", registry=r)
        # Model work
        self.stage_seconds = Histogram("avatar_block_stage_seconds", "Compute per engine step and stage",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.block_latency = Histogram("avatar_block_latency_seconds",
                                       "From a block's inputs being complete to its frames being ready",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("avatar_worker_step_seconds", "Wall time of one engine step",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("avatar_worker_batch_size", "Sessions advanced per engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.blocks = Counter("avatar_blocks_total", "Blocks generated", registry=r)
        self.skipped_frames = Counter("avatar_engine_skipped_frames_total",
                                      "Frames never generated because the engine fell behind and skipped ahead",
                                      registry=r)
        self.skip_aheads = Counter("avatar_engine_skip_aheads_total",
                                   "Times the engine skipped ahead (gaps before a block)", registry=r)
        self.late_blocks = Counter("avatar_late_blocks_total", "Blocks whose first frame was due before it was ready",
                                   registry=r)
        # Media
        self.frames_sent = Counter("avatar_frames_sent_total", "Media frames handed to WebRTC", ["kind"], registry=r)
        self.frames_dropped = Counter("avatar_frames_dropped_total", "Media frames dropped", ["kind", "reason"],
                                      registry=r)
        self.queue_depth = Gauge("avatar_queue_depth", "Items waiting, summed over sessions", ["queue"], registry=r)
        self.av_offset = Histogram("avatar_av_offset_seconds",
                                   "|audio - video| lateness of simultaneous media at the sender",
                                   buckets=OFFSET_BUCKETS, registry=r)
        self.input_dropped = Counter("avatar_input_dropped_total", "Client media arriving too late to use",
                                     ["kind"], registry=r)
        # Event loop and device
        self.video_encode_seconds = Histogram("avatar_video_encode_seconds", "Compression time of one video "
                                              "frame (where: thread = a codec thread of the server, process = "
                                              "a media process)", ["where"], buckets=ENCODE_BUCKETS, registry=r)
        self.video_encode_overhead = Histogram("avatar_video_encode_ipc_seconds", "What handing a frame to a media "
                                               "process and back adds to its compression time",
                                               buckets=ENCODE_BUCKETS, registry=r)
        self.media_processes = Gauge("avatar_media_processes", "Media processes alive (video encoding)", registry=r)
        self.loop_lag = Histogram("avatar_event_loop_lag_seconds", "Event loop scheduling delay",
                                  buckets=LAG_BUCKETS, registry=r)
        self.loop_lag_window = Gauge("avatar_event_loop_lag_window_seconds",
                                     "Loop delay over the last 10 s, from every sample: stat p50, p99 or max",
                                     ["stat"], registry=r)
        self.threads = Gauge("avatar_threads", "Python threads alive (a leak shows as growth)", registry=r)
        self.session_objects = Gauge("avatar_session_objects", "Session objects still in memory, open or "
                                                               "ended (a leak shows as growth)", registry=r)
        self.loop_tasks = Gauge("avatar_event_loop_tasks", "asyncio tasks alive (a leak shows as growth)",
                                registry=r)
        self.device_memory = Gauge("avatar_device_memory_bytes", "Accelerator memory", ["kind"], registry=r)
        self.http_errors = Counter("avatar_http_errors_total", "Error responses", ["status"], registry=r)
        # Per-session WebRTC statistics from RTCP, filled by a collector at scrape time.
        self._session_stats: dict[str, dict[str, float]] = {}
        r.register(_SessionStatsCollector(self._session_stats))
        for stage in STAGES:  # expose every stage from the start
            self.stage_seconds.labels(stage)

    def set_session_stats(self, session_id: str, stats: dict[str, float]) -> None:
        self._session_stats[session_id] = stats

    def drop_session(self, session_id: str) -> None:
        self._session_stats.pop(session_id, None)


class _SessionStatsCollector:
    """avatar_session_rtt_seconds / _packet_loss_ratio / _bitrate_bps{session,direction}."""

    def __init__(self, stats: dict[str, dict[str, float]]):
        self.stats = stats

    def collect(self):
        rtt = GaugeMetricFamily("avatar_session_rtt_seconds", "Round-trip time from RTCP", labels=["session"])
        loss = GaugeMetricFamily("avatar_session_packet_loss_ratio", "Fraction of packets lost (RTCP)",
                                 labels=["session", "direction"])
        rate = GaugeMetricFamily("avatar_session_bitrate_bps", "Media bitrate", labels=["session", "direction"])
        for sid, s in list(self.stats.items()):
            if "rtt" in s:
                rtt.add_metric([sid], s["rtt"])
            for direction in ("outbound", "inbound"):
                if f"loss_{direction}" in s:
                    loss.add_metric([sid, direction], s[f"loss_{direction}"])
                if f"bitrate_{direction}" in s:
                    rate.add_metric([sid, direction], s[f"bitrate_{direction}"])
        yield from (rtt, loss, rate)

    def describe(self):
        return []
