#!/usr/bin/env python3
"""Write docker/grafana/dashboards/avatar-forcing.json, the Grafana dashboard of the server's metrics.

The dashboard is code: edit the panels here and run this script (tests/test_deployment.py fails when the
JSON file is not what this script writes, and when a query names a metric the server does not export).

    python3 docker/grafana/make_dashboard.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "avatar-forcing.json"
UID = "avatar-forcing"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = '{job=~"$job", instance=~"$instance"}'
RATE = "$__rate_interval"


def rate(metric: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({metric}{SEL}[{RATE}]))"


def quantile(q: float, histogram: str, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket{SEL}[{RATE}])))"


def mean(histogram: str, by: str = "") -> str:
    return f"{rate(histogram + '_sum', by)} / {rate(histogram + '_count', by)}"


# (title, unit, [(expr, legend)], options) per panel; rows are (row title, [panels]).
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], dict]]]] = [
    ("Sessions and capacity", [
        ("Sessions: active, capacity, free", "none", [
            (f"sum(avatar_sessions_active{SEL})", "active"),
            (f"sum(avatar_capacity_sessions{SEL})", "capacity"),
            (f"sum(avatar_capacity_free_sessions{SEL})", "free"),
        ], {}),
        ("Sessions started, ended and rejected", "ops", [
            (rate("avatar_sessions_started_total"), "started"),
            (rate("avatar_sessions_ended_total", "reason"), "ended: {{reason}}"),
            (rate("avatar_sessions_rejected_total", "reason"), "rejected: {{reason}}"),
        ], {}),
        ("Model ready", "none", [
            (f"avatar_model_ready{SEL}", "{{instance}}"),
        ], {"type": "stat", "mappings": {"0": ("loading", "orange"), "1": ("ready", "green")}, "w": 6}),
        ("Overloaded (admission closed)", "none", [
            (f"avatar_overloaded{SEL}", "{{instance}}"),
        ], {"type": "stat", "mappings": {"0": ("ok", "green"), "1": ("overloaded", "red")}, "w": 6}),
        ("Model worker busy (and a session's measured cost)", "percentunit", [
            (f"avatar_worker_utilisation{SEL}", "busy {{instance}}"),
            (f'avatar_session_cost_ratio{{which="first", {SEL[1:]}', "first session {{instance}}"),
            (f'avatar_session_cost_ratio{{which="more", {SEL[1:]}', "each further one {{instance}}"),
        ], {"w": 6}),
        ("HTTP error responses", "ops", [
            (rate("avatar_http_errors_total", "status"), "{{status}}"),
        ], {"w": 6}),
    ]),
    ("Real-time budget (one block = 10 frames = 400 ms)", [
        ("Block latency: inputs complete to frames ready", "s", [
            (quantile(0.5, "avatar_block_latency_seconds"), "p50"),
            (quantile(0.95, "avatar_block_latency_seconds"), "p95"),
            (quantile(0.99, "avatar_block_latency_seconds"), "p99"),
        ], {"threshold": 0.4}),
        ("Late blocks (first frame due before it was ready)", "percentunit", [
            (f"{rate('avatar_late_blocks_total')} / {rate('avatar_blocks_total')}", "late share"),
        ], {"threshold": 0.01}),
        ("Catch-up: input the engine skipped because it fell behind", "none", [
            (rate("avatar_engine_skipped_frames_total"), "frames skipped/s"),
            (rate("avatar_engine_skip_aheads_total"), "skip-aheads/s"),
        ], {}),
        ("Block latency by stage, p50", "s", [
            (quantile(0.5, "avatar_block_stage_seconds", "stage"), "{{stage}}"),
        ], {}),
        ("Block latency by stage, p99", "s", [
            (quantile(0.99, "avatar_block_stage_seconds", "stage"), "{{stage}}"),
        ], {}),
        ("Engine step time", "s", [
            (quantile(0.5, "avatar_worker_step_seconds"), "p50"),
            (quantile(0.99, "avatar_worker_step_seconds"), "p99"),
        ], {}),
        ("Blocks per second and sessions per engine step", "none", [
            (rate("avatar_blocks_total"), "blocks/s"),
            (mean("avatar_worker_batch_size"), "sessions per step (mean)"),
            (quantile(0.99, "avatar_worker_batch_size"), "sessions per step (p99)"),
        ], {}),
    ]),
    ("Media", [
        ("A/V offset at the sender", "s", [
            (quantile(0.5, "avatar_av_offset_seconds"), "p50"),
            (quantile(0.99, "avatar_av_offset_seconds"), "p99"),
        ], {"threshold": 0.04}),
        ("Queue depth (summed over sessions)", "none", [
            (f"sum by (queue) (avatar_queue_depth{SEL})", "{{queue}}"),
        ], {}),
        ("Frames sent", "ops", [
            (rate("avatar_frames_sent_total", "kind"), "{{kind}}"),
        ], {}),
        ("Frames dropped and client media too late to use", "ops", [
            (rate("avatar_frames_dropped_total", "kind, reason"), "dropped {{kind}}: {{reason}}"),
            (rate("avatar_input_dropped_total", "kind"), "input too late: {{kind}}"),
        ], {}),
    ]),
    ("Network (WebRTC, from RTCP)", [
        ("Round-trip time", "s", [
            (f"max(avatar_session_rtt_seconds{SEL})", "worst session"),
            (f"avg(avatar_session_rtt_seconds{SEL})", "mean"),
        ], {"w": 8}),
        ("Packet loss", "percentunit", [
            (f"max by (direction) (avatar_session_packet_loss_ratio{SEL})", "worst session, {{direction}}"),
            (f"avg by (direction) (avatar_session_packet_loss_ratio{SEL})", "mean, {{direction}}"),
        ], {"w": 8}),
        ("Media bitrate (all sessions)", "bps", [
            (f"sum by (direction) (avatar_session_bitrate_bps{SEL})", "{{direction}}"),
        ], {"w": 8}),
    ]),
    ("Process and device", [
        ("Event loop lag", "s", [
            (quantile(0.99, "avatar_event_loop_lag_seconds"), "p99"),
            (f"max by (stat) (avatar_event_loop_lag_window_seconds{SEL})", "last 10 s, {{stat}} (worst server)"),
        ], {"threshold": 0.1}),
        ("asyncio tasks, threads and session objects (a leak shows as growth)", "none", [
            (f"sum by (instance) (avatar_event_loop_tasks{SEL})", "{{instance}} tasks"),
            (f"sum by (instance) (avatar_threads{SEL})", "{{instance}} threads"),
            (f"sum by (instance) (avatar_session_objects{SEL})", "{{instance}} session objects"),
        ], {}),
        ("Accelerator memory", "bytes", [
            (f"sum by (instance, kind) (avatar_device_memory_bytes{SEL})", "{{instance}} {{kind}}"),
        ], {}),
        ("Process CPU (cores; video encoding too, unless in media processes)", "none", [
            (f"sum by (instance) (rate(process_cpu_seconds_total{SEL}[{RATE}]))", "{{instance}}"),
        ], {}),
        ("Video encoding per frame (thread: the server's codec threads; process: a media process)", "s", [
            (quantile(0.5, "avatar_video_encode_seconds", "where"), "p50 {{where}}"),
            (quantile(0.99, "avatar_video_encode_seconds", "where"), "p99 {{where}}"),
            (quantile(0.99, "avatar_video_encode_ipc_seconds"), "p99 hand-off to a media process"),
        ], {"threshold": 0.04}),
        ("Media processes alive", "none", [
            (f"sum by (instance) (avatar_media_processes{SEL})", "{{instance}}"),
        ], {}),
        ("Process resident memory", "bytes", [
            (f"sum by (instance) (process_resident_memory_bytes{SEL})", "{{instance}}"),
        ], {}),
        ("Open file descriptors (each WebRTC session holds UDP sockets)", "none", [
            (f"sum by (instance) (process_open_fds{SEL})", "{{instance}} open"),
            (f"min by (instance) (process_max_fds{SEL})", "{{instance}} limit"),
        ], {}),
        ("Restarts in the last hour", "none", [
            (f"sum by (instance) (changes(process_start_time_seconds{SEL}[1h]))", "{{instance}}"),
        ], {}),
    ]),
]


def _panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]], opts: dict,
           x: int, y: int, w: int, h: int) -> dict:
    kind = opts.get("type", "timeseries")
    defaults: dict = {"unit": unit}
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                              "spanNulls": True}
        defaults["min"] = 0
    if "threshold" in opts:
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                {"color": "red", "value": opts["threshold"]}]}
        if kind == "timeseries":
            defaults["custom"]["thresholdsStyle"] = {"mode": "line+area"}
    if "mappings" in opts:
        defaults["mappings"] = [{"type": "value", "options": {
            value: {"text": text, "color": color, "index": i}
            for i, (value, (text, color)) in enumerate(opts["mappings"].items())}}]
    options: dict = {"tooltip": {"mode": "multi", "sort": "desc"},
                     "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
    if kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "background", "graphMode": "none", "textMode": "value_and_name"}
    return {
        "id": pid, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                     "range": True} for i, (expr, legend) in enumerate(targets)],
    }


def _variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-variable"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1}


def build() -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for row_title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}})
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for title, unit, targets, opts in row:
            w, h = opts.get("w", 12), 8
            if x + w > 24:
                x, y = 0, y + row_h
            panels.append(_panel(pid, title, unit, targets, opts, x, y, w, h))
            pid, x, row_h = pid + 1, x + w, h
        y += row_h
    return {
        "uid": UID,
        "title": "Avatar Forcing server",
        "description": "Sessions, real-time budget, media, WebRTC and device metrics of the Avatar Forcing "
                       "server (server/metrics.py). Generated by docker/grafana/make_dashboard.py.",
        "tags": ["avatar-forcing"],
        "editable": False,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {"selected": True, "text": "Prometheus", "value": "prometheus"}, "hide": 0,
             "refresh": 1, "regex": "", "includeAll": False, "multi": False},
            _variable("job", "Job", "label_values(avatar_model_ready, job)"),
            _variable("instance", "Instance", 'label_values(avatar_model_ready{job=~"$job"}, instance)'),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
